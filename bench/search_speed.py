"""Semantic search over 100,000 sentences: how fast a corpus is embedded, and how long a query
takes (embedding it plus scoring the whole corpus), with the code `qkv search` runs.

    python bench/search_speed.py --model runs/stsb [--n 100000] [--queries 200]

The corpus: distinct English lines of SST-2's phrases, Multi30k's captions and STS-B's
sentences (../shared/data or $QKV_DATA), the first --n of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qkv.data import multi30k
from qkv.sentences import SentenceEncoder, semantic_search
from qkv.tasks.classify import sst2
from qkv.tasks.similarity import stsb

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sentence_baselines import cpu_name  # noqa: E402


def corpus(n: int) -> list[str]:
    lines = [t for t, _ in sst2("glue/train")]
    lines += [en for en, _ in multi30k("train", "en", "de")]
    lines += [s for split in ("train", "dev", "test") for r in stsb(split) for s in (r.a, r.b)]
    seen: dict[str, None] = {}
    for line in lines:
        if line.strip():
            seen.setdefault(line.strip(), None)
    return list(seen)[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    sentences = corpus(args.n)
    enc = SentenceEncoder.load(args.model, batch_size=args.batch_size)
    enc.encode(sentences[:512])  # warm-up
    t0 = time.monotonic()
    vectors = enc.encode(sentences, normalize=True)  # as `qkv search` stores them
    embed_s = time.monotonic() - t0
    queries = sentences[:: max(1, len(sentences) // args.queries)][: args.queries]
    latencies = []
    for q in queries:
        t0 = time.monotonic()
        (hits,) = semantic_search(enc.encode([q]), vectors, k=10, normalized=True)
        latencies.append(time.monotonic() - t0)
        assert sentences[hits[0][0]] == q or hits[0][1] > 0.999  # the query is in the corpus
    latencies.sort()
    results = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "corpus": len(sentences),
        "dim": vectors.shape[1],
        "embed_seconds": round(embed_s, 1),
        "sentences_per_s": round(len(sentences) / embed_s),
        "query_ms_median": round(1000 * latencies[len(latencies) // 2], 2),
        "query_ms_p95": round(1000 * latencies[int(len(latencies) * 0.95)], 2),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
