"""The next-item commands: `qkv recommend`, and `qkv evaluate` on a next-item model. Same shape
as qkv/cli.py: a parser beside a function that makes one library call and prints; bad input is
one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DataError
from .flags import UsageError, add_device_flag, command, load_model_dir, model_flags, read_input


def _model(args: argparse.Namespace):
    from .recommend import block_size

    model, items, meta = load_model_dir(args, "items")
    return model, items, meta, block_size(model, meta)


def add_recommend(sub) -> None:
    p = command(
        sub,
        "recommend",
        "the next items after a history, with a next-item model",
        "Top-k next items for a history of item ids (oldest first) given on the command line, "
        "or for each line of --input; item<TAB>score rows, a blank line between histories "
        "(--json: one object per history). Items the history holds are not recommended again "
        "unless --repeat. --explain DIR: the attention over the history and how much each past "
        "item moved the top recommendation, as pictures and an HTML page.",
        [
            "qkv recommend --model runs/ml-1m 2969 1178 1574 957 2147 --k 5",
            "qkv recommend --model runs/ml-1m --input histories.txt --json > top10.jsonl",
            "qkv recommend --model runs/ml-1m 2969 1178 1574 957 2147 --explain why/",
        ],
    )
    model_flags(p)
    p.add_argument("history", nargs="*", help="item ids, oldest first")
    p.add_argument("--input", help="histories, one per line: item ids separated by spaces")
    p.add_argument("--k", type=int, default=10, help="items per history (default 10)")
    p.add_argument("--repeat", action="store_true", help="also recommend items already seen")
    p.add_argument("--json", action="store_true", help="JSON lines: history, items, scores")
    p.add_argument("--explain", metavar="DIR", help="pictures of why (one history only)")
    add_device_flag(p)
    p.set_defaults(func=run_recommend)


def _histories(args: argparse.Namespace) -> list[list[int]]:
    from .tokenizer import parse_history

    if args.history and args.input:
        raise UsageError("give the history on the command line or --input, not both")
    if args.history:
        return [parse_history(" ".join(args.history))]
    lines = read_input(args.input)
    source = args.input or "stdin"
    histories = [parse_history(line, f"{source}:{n}") for n, line in enumerate(lines, 1)]
    if not histories:
        raise UsageError(f"{source}: no histories")
    empty = [n for n, h in enumerate(histories, 1) if not h]
    if empty:
        raise UsageError(f"{source}:{empty[0]}: an empty history")
    return histories


def run_recommend(args: argparse.Namespace) -> int:
    from .recommend import recommend

    if args.k < 1:
        raise UsageError("--k must be >= 1")
    histories = _histories(args)
    if args.explain and len(histories) != 1:
        raise UsageError("--explain takes one history")
    model, items, _, block_size = _model(args)
    results = recommend(model, items, histories, block_size, args.k, not args.repeat)
    rows = []
    for history, recs in zip(histories, results, strict=True):
        if args.json:
            line = {"history": history, "items": [r.item for r in recs]}
            rows.append(json.dumps({**line, "scores": [round(r.score, 4) for r in recs]}))
        else:
            rows.append("\n".join(f"{r.item}\t{r.score:.4f}" for r in recs))
    print(("\n" if args.json else "\n\n").join(rows))
    if args.explain:
        from .explain import explain_recommendation, write_artifacts

        e = explain_recommendation(model, items, histories[0], block_size, not args.repeat)
        for w in write_artifacts(e, Path(args.explain)):
            print(f"wrote {w}", file=sys.stderr)
    return 0


def evaluate_items(args: argparse.Namespace) -> int:
    """`qkv evaluate` on a next-item model: leave-one-out over every user of the data it was
    trained on (or --interactions), both protocols, beside the most-popular baseline."""
    from .items import leave_one_out, ml1m_file, read_interactions
    from .recommend import evaluate

    for flag in ("tsv", "plot", "hyp", "ref"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag} is not for next-item models")
    split = args.split or "test"
    if split not in ("valid", "test"):
        raise UsageError(f"--split for a next-item model: valid or test, not {split!r}")
    model, items, meta, block_size = _model(args)
    source = args.interactions or meta.get("interactions")
    path = Path(source) if source else ml1m_file(args.data_dir)
    users = read_interactions(path)
    try:
        data = leave_one_out(users, items, str(path))
    except DataError as e:
        raise DataError(f"{e} (the model was trained on {meta.get('interactions')})") from None
    seed = args.d_seed or 0  # --seed: what the sampled negatives are drawn with
    report = evaluate(model, data, split, block_size, seed=seed, popular=True)
    print(f"{path}, leave-one-out, negatives drawn with seed {seed}")
    print(report.table())
    return 0
