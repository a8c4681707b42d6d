"""Print the validation curve (BLEU vs training minutes) of a training run as a markdown table."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
print("| step | epoch | minutes | valid loss | valid BLEU (greedy, 500 sent.) |")
print("|---:|---:|---:|---:|---:|")
for r in rows:
    print(
        f"| {r['step']} | {r['epoch']} | {r['minutes']:.1f} | {r['valid_loss']:.3f} "
        f"| {r['valid_bleu']:.2f} |"
    )
