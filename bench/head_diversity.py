"""Several heads against one: do a word's heads pick out different words, and what does it buy?

    .venv/bin/python bench/head_diversity.py MODEL_DIR [MODEL_DIR ...] [--sentences 300]

For each model (e.g. bench/runs/tatoeba-en-zh, 8 heads, and bench/runs/tatoeba-en-zh-1head, the
same size with one head per layer, from bench/train_zh.sh): qkv.probe's diversity statistic on
validation sentences (for every query, the distinct words that are some head's top weight, per
layer and over all layers; the words some head gives >= 0.3), the validation loss and greedy
BLEU on the same sentences, and `qkv explain --query crossed` on "The chicken crossed the road
carelessly." and on "I love you." (pictures in MODEL_DIR/explain-*). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkv import checkpoint  # noqa: E402
from qkv.data import PARALLEL_SPLITS, parallel  # noqa: E402
from qkv.inspect import AttentionKind  # noqa: E402
from qkv.probe import Prober  # noqa: E402
from qkv.translate import Translator  # noqa: E402

CHICKEN = "The chicken crossed the road carelessly."
LOVE = "I love you."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--sentences", type=int, default=300)
    args = ap.parse_args()
    rows = []
    for run in map(Path, args.models):
        model, tok, meta = checkpoint.load(run / "best")
        dataset = meta.get("dataset") or "multi30k"
        valid = parallel(dataset, PARALLEL_SPLITS[dataset][0], meta["src_lang"], meta["tgt_lang"])
        pairs = random.Random(0).sample(valid, min(args.sentences, len(valid)))
        prober = Prober(Translator(model, tok), pairs, lambda m: None, meta["tgt_lang"])
        div = prober.diversity()[AttentionKind.ENCODER_SELF]
        rows.append((run.name, model.config.n_heads, div, prober.loss(), prober.bleu()))
        for name, text in (("chicken", CHICKEN), ("love", LOVE)):
            query = ["--query", "crossed"] if name == "chicken" else ["--query", "love"]
            subprocess.run(
                [sys.executable, "-m", "qkv", "explain", "--model", str(run / "best"), text]
                + query
                + ["--beam", "5", "--out", str(run / f"explain-{name}")],
                check=True,
            )
    print(
        "| model | heads | distinct top words per layer | words given >= 0.3 per layer | "
        "distinct top words, all layers | valid loss | valid BLEU (greedy) |"
    )
    print("|---|---:|---|---|---:|---:|---:|")
    for name, heads, div, loss, bleu in rows:
        per_layer = " / ".join(f"{x:.2f}" for x in div["distinct_top"])
        strong = " / ".join(f"{x:.2f}" for x in div["strong"])
        print(
            f"| {name} | {heads} | {per_layer} | {strong} | {div['distinct_top_all']:.2f} | "
            f"{loss:.3f} | {bleu:.2f} |"
        )


if __name__ == "__main__":
    main()
