"""What a decoding step costs, apart from the encoder: each engine of translate_speed.py
translates the same batches twice, once stopping after 1 output token and once after 25
(forced), and the difference over the 24 later steps is the cost of a step; the first run is the
encoder plus one step. qkv (packed, as `qkv translate` runs it; `--precision bf16` for its bf16
weights) beside CTranslate2 (float32, or int8 with --int8), each engine and length in its own
process, alternated, best of --repeats; milliseconds per batch of 32 sentences.

    .venv/bin/python bench/step_cost.py --threads 1
    .venv/bin/python bench/step_cost.py --threads 1 --precision bf16 --int8
"""

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
from translate_speed import ct2_convert, hf_model, worker

from qkv.marian import convert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=["small", "base"], default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="qkv's")
    ap.add_argument("--int8", action="store_true", help="CTranslate2's int8 (else float32)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qkv-steps-"))
    hf_model(args.size).save_pretrained(tmp / "hf")
    convert(tmp / "hf", tmp / "qkv")
    ct2 = "ct2-int8" if args.int8 else "ct2-fp32"
    if ct2_convert(tmp / "hf", tmp / ct2, "int8" if args.int8 else None) is None:
        raise SystemExit("step_cost.py needs ctranslate2 (pip install ctranslate2)")
    ours = "qkv-bf16" if args.precision == "bf16" else "qkv"
    ctx = mp.get_context("spawn")
    conns = {}
    for name in (ours, ct2):
        for out_len in (1, 25):
            a = argparse.Namespace(
                sentences=32 * args.batches,
                batch=32,
                src_len=20,
                out_len=out_len,
                threads=args.threads,
            )
            mine, theirs = ctx.Pipe()
            ctx.Process(target=worker, args=(name, tmp, a, theirs), daemon=True).start()
            conns[name, out_len] = mine
    for conn in conns.values():
        assert conn.recv() == "ready"
    print(
        f"{args.size}, {args.threads} threads, batches of 32 sentences, torch {torch.__version__}"
    )
    print(f"{'engine':10} {'decoding':8} {'1 token':>9} {'25 tokens':>10} {'per later step':>15}")
    for beam in (1, 5):
        best: dict[tuple[str, int], float] = {}
        for conn in conns.values():  # warm-up
            conn.send((beam, 1))
            conn.recv()
        for _ in range(args.repeats):
            for key, conn in conns.items():
                time.sleep(0.5)
                conn.send((beam, args.batches))
                seconds = conn.recv()[0] / args.batches * 1e3
                best[key] = min(best.get(key, float("inf")), seconds)
        mode = "greedy" if beam == 1 else f"beam {beam}"
        for name in (ours, ct2):
            one, full = best[name, 1], best[name, 25]
            print(f"{name:10} {mode:8} {one:7.1f}ms {full:8.1f}ms {(full - one) / 24:12.2f}ms")
    for conn in conns.values():
        conn.send(None)


if __name__ == "__main__":
    main()
