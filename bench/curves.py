"""Two or more training runs' validation curves side by side at equal updates (their
metrics.jsonl): per run the minutes, validation loss and greedy validation BLEU, as a markdown
table. Used for bf16 against fp32 on the same recipe.

    .venv/bin/python bench/curves.py bench/runs/prec-fp32-de-en bench/runs/prec-bf16-de-en
"""

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3 or "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__.strip())
        sys.exit(0 if "-h" in sys.argv or "--help" in sys.argv else 2)
    runs = [Path(p) for p in sys.argv[1:]]
    rows = {}
    for i, run in enumerate(runs):
        if not (run / "metrics.jsonl").is_file():
            sys.exit(f"curves.py: error: {run / 'metrics.jsonl'} not found (no validation yet?)")
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(r["step"], [None] * len(runs))[i] = r
    head = "| step |" + "".join(f" {r.name}: minutes | loss | BLEU |" for r in runs)
    print(head)
    print("|---:|" + "---:|---:|---:|" * len(runs))
    for step in sorted(rows):
        cells = [
            "  |  |  |"
            if r is None
            else f" {r['minutes']:.1f} | {r['valid_loss']:.3f} | {r['valid_bleu']:.2f} |"
            for r in rows[step]
        ]
        print(f"| {step:,} |" + "".join(cells))


if __name__ == "__main__":
    main()
