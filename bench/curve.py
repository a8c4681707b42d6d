"""Print the validation curve of a training run (its metrics.jsonl) as a markdown table: BLEU vs
training minutes for translation, validation loss (nats per token and per character, perplexity)
for a language model."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
if "valid_bleu" in rows[0]:
    print("| step | epoch | minutes | valid loss | valid BLEU (greedy, 500 sent.) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['step']} | {r['epoch']} | {r['minutes']:.1f} | {r['valid_loss']:.3f} "
            f"| {r['valid_bleu']:.2f} |"
        )
else:
    print("| step | epoch | minutes | valid loss (nats/token) | nats/char | perplexity |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['step']} | {r['epoch']} | {r['minutes']:.1f} | {r['valid_loss']:.4f} "
            f"| {r['valid_nats_per_char']:.4f} | {r['valid_ppl']:.2f} |"
        )
