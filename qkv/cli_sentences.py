"""The encoder's commands: `qkv classify`, `qkv embed`, `qkv search`, and `qkv evaluate` on a
classifier or a bi-encoder. Same shape as qkv/cli.py: a parser beside a function that makes one
library call and prints; bad input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import sha256
from .flags import (
    UsageError,
    add_batch_size_flag,
    add_device_flag,
    command,
    load_model_dir,
    model_flags,
    note_cut,
    read_input,
)


def _encoder(args: argparse.Namespace, pooling: str | None = None, task: str | None = None):
    """A SentenceEncoder over --model: any model with an encoder (classifier, bi-encoder,
    translation model), or one trained for `task`; on --device, packed for inference."""
    from .sentences import SentenceEncoder

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    model, tok, meta = load_model_dir(args, task)
    if model.config.arch == "decoder-only":
        raise UsageError(f"{args.model}: a decoder-only model has no encoder to embed with")
    return SentenceEncoder(model, tok, args.batch_size, pooling), meta


def _inference_flags(p: argparse.ArgumentParser) -> None:
    model_flags(p)
    add_batch_size_flag(p)
    add_device_flag(p)


def _pooling_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pooling",
        choices=("mean", "weighted", "max", "first"),
        help="mean, frequency-weighted mean (bi-encoders) or max of the real tokens' vectors, "
        "or the first token's (default: the model's; "
        "mean for a translation model)",
    )


def _lines(args: argparse.Namespace, enc=None) -> list[str]:
    """The input lines; with `enc` (a SentenceEncoder), a note on those it must cut."""
    lines = read_input(args.input)
    if not lines:
        raise UsageError("no input (stdin was empty)")
    if enc is not None:
        note_cut(enc.tokenizer, lines, enc.max_tokens, args.input)
    return lines


# --- classify ---------------------------------------------------------------------------------


def add_classify(sub) -> None:
    p = command(
        sub,
        "classify",
        "label sentences with a trained classifier",
        "One sentence per line (stdin or --input) -> its label and that label's probability, "
        "tab-separated; --json: one object per line with every class's probability.",
        [
            "echo 'a gorgeous , witty , seductive movie .' | qkv classify --model runs/sst2",
            "qkv classify --model runs/sst2 --input reviews.txt --json > labels.jsonl",
        ],
    )
    _inference_flags(p)
    p.add_argument("--input", help="sentences, one per line (default: stdin)")
    p.add_argument("--json", action="store_true", help="JSON lines with all probabilities")
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from .sentences import labelled

    enc, meta = _encoder(args, task="classify")
    labels, lines = meta["labels"], _lines(args, enc)
    probs = enc.probabilities(lines)
    for text, p in zip(lines, probs, strict=True):
        best = int(p.argmax())
        if args.json:
            row = {"text": text, **labelled(labels, p.tolist())}
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"{labels[best]}\t{float(p[best]):.4f}")
    return 0


# --- embed ------------------------------------------------------------------------------------


def add_embed(sub) -> None:
    p = command(
        sub,
        "embed",
        "sentence embeddings from any encoder (bi-encoder, classifier, translation model)",
        "One sentence per line (stdin or --input) -> one vector per sentence: a .npy matrix "
        "(--output X.npy) or JSON lines. Pooling: the mean over real tokens (padding masked) "
        "or the first token.",
        [
            "qkv embed --model runs/stsb --input sentences.txt --output emb.npy",
            "echo 'A man plays a guitar.' | qkv embed --model runs/de-en --pooling mean",
        ],
    )
    _inference_flags(p)
    _pooling_flag(p)
    p.add_argument("--input", help="sentences, one per line (default: stdin)")
    p.add_argument("--output", help="write a float32 .npy matrix here (default: JSON lines)")
    p.add_argument("--normalize", action="store_true", help="scale every vector to length 1")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    if args.output and not args.output.endswith(".npy"):
        raise UsageError("--output must end in .npy")
    enc, _ = _encoder(args, args.pooling)
    lines = _lines(args, enc)
    t0 = time.monotonic()
    vectors = enc.encode(lines, normalize=args.normalize).numpy()
    seconds = time.monotonic() - t0
    if args.output:
        _save_npy(Path(args.output), vectors)
        print(
            f"wrote {args.output}: {vectors.shape[0]} x {vectors.shape[1]} "
            f"({len(lines) / max(seconds, 1e-9):,.0f} sentences/s)",
            file=sys.stderr,
        )
    else:
        for text, v in zip(lines, vectors, strict=True):
            print(json.dumps({"text": text, "embedding": [round(float(x), 6) for x in v]}))
    return 0


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically: a killed run leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- search -----------------------------------------------------------------------------------


def add_search(sub) -> None:
    p = command(
        sub,
        "search",
        "the corpus lines most similar to a query (semantic search)",
        "Embed every line of --corpus once (saved beside it as CORPUS.qkv-embeddings and "
        "reused while the corpus, the model and the pooling are unchanged), then print the "
        "top-k lines by cosine similarity to each query: score<TAB>line number<TAB>line.",
        [
            "qkv search --model runs/stsb --corpus sentences.txt 'A dog runs on the beach.'",
            "qkv search --model runs/stsb --corpus sentences.txt --k 3 < queries.txt",
        ],
    )
    p.add_argument("query", nargs="?", help="the query (default: one query per line of stdin)")
    _inference_flags(p)
    _pooling_flag(p)
    p.add_argument("--corpus", required=True, help="the sentences to search, one per line")
    p.add_argument("--k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per query")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from .checkpoint import resolve
    from .data import read_lines
    from .sentences import semantic_search

    if args.k < 1:
        raise UsageError("--k must be >= 1")
    enc, _ = _encoder(args, args.pooling)
    corpus = read_lines(args.corpus)
    queries = [args.query] if args.query is not None else read_input(None)
    if not queries or not all(q.strip() for q in queries):
        raise UsageError("empty query")
    model_dir = resolve(args.model)
    fingerprint = {
        "model": sha256(model_dir / "model.safetensors"),
        "corpus": sha256(Path(args.corpus)),
        "pooling": args.pooling or "",
    }
    vectors = corpus_embeddings(enc, corpus, Path(args.corpus), fingerprint)
    t0 = time.monotonic()
    hits = semantic_search(enc.encode(queries), vectors, args.k, normalized=True)
    ms = 1000 * (time.monotonic() - t0) / len(queries)
    for q, found in zip(queries, hits, strict=True):
        if args.json:
            rows = [{"line": i + 1, "score": round(s, 6), "text": corpus[i]} for i, s in found]
            print(json.dumps({"query": q, "results": rows}, ensure_ascii=False))
            continue
        if len(queries) > 1:
            print(f"# {q}")
        for i, s in found:
            print(f"{s:.4f}\t{i + 1}\t{corpus[i]}")
    print(f"qkv: {ms:.1f} ms per query over {len(corpus):,} lines", file=sys.stderr)
    return 0


def corpus_embeddings(enc, corpus: list[str], path: Path, fingerprint: dict[str, str]):
    """The corpus's embeddings, of length 1: read from beside the corpus when they were made
    from the same corpus, model and pooling; else computed (with progress) and saved there
    atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    cache = path.with_name(path.name + ".qkv-embeddings")
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as f:
                same = f.metadata() == fingerprint
            if same:
                return load_file(str(cache))["embeddings"]
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable: computed afresh and replaced
    t0, chunks, step = time.monotonic(), [], 10_000
    for start in range(0, len(corpus), step):
        chunks.append(enc.encode(corpus[start : start + step], normalize=True))
        done, seconds = start + len(chunks[-1]), time.monotonic() - t0
        print(
            f"qkv: embedded {done:,}/{len(corpus):,} lines ({done / seconds:,.0f} sentences/s)",
            file=sys.stderr,
        )
    vectors = torch.cat(chunks)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".part")
        os.close(fd)
        save_file({"embeddings": vectors.contiguous()}, tmp, metadata=fingerprint)
        os.replace(tmp, cache)
    except OSError as e:
        print(f"qkv: note: could not save {cache} ({e.strerror or e})", file=sys.stderr)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return vectors


# --- evaluate on a classifier or a bi-encoder ---------------------------------------------------


def default_splits(meta: dict) -> list[str]:
    dataset = meta.get("train", {}).get("dataset")
    return {"sst2": ["glue/dev", "sentence/test"], "stsb": ["dev", "test"]}.get(dataset, [])


def evaluate_sentences(args: argparse.Namespace, task: str) -> int:
    """`qkv evaluate --model DIR` for a classifier (accuracy, per-class P/R/F1, confusion
    matrix) or a bi-encoder (Spearman and Pearson x 100, overall and per genre)."""
    if task == "similarity" and args.plot:
        raise UsageError("--plot draws a classifier's confusion matrix; this is a bi-encoder")
    enc, meta = _encoder(args, task=task)
    sets = []
    if args.tsv:
        sets.append((args.tsv, None))
    else:
        splits = [args.split] if args.split else default_splits(meta)
        if not splits:
            raise UsageError("the model was trained on your own data: give --tsv FILE")
        sets += [(None, s) for s in splits]
    for tsv, split in sets:
        if task == "classify":
            _evaluate_classifier(args, enc, meta, tsv, split, several=len(sets) > 1)
        else:
            _evaluate_similarity(args, enc, meta, tsv, split)
    return 0


def _evaluate_classifier(args, enc, meta, tsv, split, several: bool) -> None:
    from . import plot
    from .evaluate import class_report
    from .tasks.classify import check_labels, read_labelled, sst2

    name = tsv or f"sst2 {split}"
    rows = read_labelled(tsv) if tsv else sst2(split, args.data_dir)
    labels = meta["labels"]
    check_labels(rows, labels, name)
    probs = enc.probabilities([t for t, _ in rows])
    report = class_report([y for _, y in rows], [labels[int(i)] for i in probs.argmax(-1)], labels)
    print(f"{name}: {len(rows)} sentences\n{report.summary()}\n")
    if args.plot:
        path = Path(args.plot)
        if several:  # one picture per split
            path = path.with_name(f"{path.stem}-{split.replace('/', '-')}{path.suffix}")
        plot.confusion(report.confusion, labels, f"{name}: accuracy {report.accuracy:.1f} %", path)
        print(f"wrote {path}", file=sys.stderr)


def _evaluate_similarity(args, enc, meta, tsv, split) -> None:
    from .tasks.similarity import correlations, read_scored, stsb

    score_range = tuple(meta.get("score_range", (0.0, 5.0)))
    name = tsv or f"stsb {split}"
    rows = read_scored(tsv, score_range) if tsv else stsb(split, args.data_dir)
    cos = enc.similarity([r.a for r in rows], [r.b for r in rows]).tolist()
    scores = correlations(cos, rows)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
    print(f"{name}: {len(rows)} pairs: {shown}")
