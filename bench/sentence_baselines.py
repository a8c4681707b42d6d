"""The encoder tasks beside their lexical baselines, on the same splits, in one run.

    python bench/sentence_baselines.py                       # the TF-IDF baselines only
    python bench/sentence_baselines.py --sst2 runs/sst2 --stsb runs/stsb \
        --zero-shot bench/runs/multi30k-de-en/averaged bench/runs/multi30k-en-de/averaged

- SST-2: TF-IDF (words and bigrams) + logistic regression trained on glue/train; accuracy on
  glue/dev and sentence/test; a qkv classifier on the same two splits.
- STS-B test: TF-IDF cosine (IDF from sts-train); a qkv bi-encoder; and the zero-shot encoders
  of translation models (mean-pooled, no training on STS-B). Spearman x 100 overall and per
  genre, Pearson x 100 overall.

Needs scikit-learn (`pip install -e .[bench]`). Data: ../shared/data or $QKV_DATA.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from qkv.sentences import SentenceEncoder
from qkv.tasks.classify import sst2
from qkv.tasks.similarity import correlations, stsb


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def sst2_tfidf() -> dict[str, float]:
    train = sst2("glue/train")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x = vec.fit_transform([t for t, _ in train])
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x, [y for _, y in train])
    out = {}
    for split in ("glue/dev", "sentence/test"):
        rows = sst2(split)
        pred = clf.predict(vec.transform([t for t, _ in rows]))
        out[split] = 100 * float(np.mean([p == y for p, (_, y) in zip(pred, rows, strict=True)]))
    return out


def sst2_qkv(model_dir: str) -> dict[str, float]:
    enc = SentenceEncoder.load(model_dir)
    from qkv.checkpoint import read_config

    labels = read_config(model_dir)[1]["labels"]
    out = {}
    for split in ("glue/dev", "sentence/test"):
        rows = sst2(split)
        pred = enc.probabilities([t for t, _ in rows]).argmax(-1).tolist()
        right = [labels[p] == y for p, (_, y) in zip(pred, rows, strict=True)]
        out[split] = 100 * float(np.mean(right))
    return out


def stsb_tfidf() -> dict[str, float]:
    train, test = stsb("train"), stsb("test")
    vec = TfidfVectorizer().fit([s for r in train for s in (r.a, r.b)])
    a, b = vec.transform([r.a for r in test]), vec.transform([r.b for r in test])
    cos = np.asarray(a.multiply(b).sum(axis=1)).ravel()  # rows are L2-normalised
    return correlations(cos.tolist(), test)


def stsb_encoder(model_dir: str) -> dict[str, float]:
    test = stsb("test")
    enc = SentenceEncoder.load(model_dir)
    t0 = time.monotonic()
    cos = enc.similarity([r.a for r in test], [r.b for r in test]).tolist()
    seconds = time.monotonic() - t0
    return {**correlations(cos, test), "sentences_per_s": 2 * len(test) / seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sst2", help="a qkv classifier trained with --preset sst2")
    p.add_argument("--stsb", help="a qkv bi-encoder trained with --preset stsb")
    p.add_argument("--zero-shot", nargs="*", default=[], help="translation models' directories")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results: dict = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d")}
    results["sst2"] = {"tfidf_logreg": sst2_tfidf()}
    if args.sst2:
        results["sst2"]["qkv"] = sst2_qkv(args.sst2)
    results["stsb_test"] = {"tfidf_cosine": stsb_tfidf()}
    if args.stsb:
        results["stsb_test"]["qkv"] = stsb_encoder(args.stsb)
    for d in args.zero_shot:
        results["stsb_test"][f"zero-shot {d}"] = stsb_encoder(d)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
