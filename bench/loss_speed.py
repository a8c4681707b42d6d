"""The vocabulary projection and the label-smoothed cross-entropy of one 2048-token batch's real
target tokens (1,800 x 256 hidden states, 8k vocabulary), forward + backward, three ways:
`F.linear` then PyTorch's `F.cross_entropy(..., label_smoothing=0.1)`; `F.linear` then qkv's
closed-form `smoothed_cross_entropy` (the route before 2026-11-30); and qkv's
`linear_cross_entropy`, projection and loss fused, chunk by chunk (the route now), each chunk's
loss by qkv's C++ kernel (since 2026-11-30) or by PyTorch's ops (`native.off()`). In fp32, or
with `--precision bf16` under bf16 autocast as `qkv train --precision bf16` runs it; the fused
route once per chunk size in `--chunks`, in rows (qkv.loss.CHUNK_SCORES / 8000 is qkv's).
Alternated, best of --repeats. With --new-rows every call gets a number of rows no call had
before (1,600 and up), as training's batches do: oneDNN compiles a kernel for each new shape
of a bf16 matrix product, which the fused route avoids by padding its rows (qkv.loss).

    .venv/bin/python bench/loss_speed.py
    .venv/bin/python bench/loss_speed.py --precision bf16 --threads 1 --chunks 64,128,256,512
    .venv/bin/python bench/loss_speed.py --precision bf16 --new-rows
"""

import argparse
import time

import torch
import torch.nn.functional as F

from qkv import loss, native
from qkv.loss import linear_cross_entropy, smoothed_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunks", default=str(loss.CHUNK_SCORES // 8000), help="rows per chunk")
    ap.add_argument("--new-rows", action="store_true", help="a new row count at every call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(256, 8000, bias=False)
    h0 = torch.randn(1800 + 1000, 256, generator=g)
    target0 = torch.randint(0, 8000, (1800 + 1000,), generator=g)
    systems = {
        "F.linear + F.cross_entropy": lambda h, target: F.cross_entropy(
            head(h).float(), target, reduction="sum", label_smoothing=0.1
        ),
        "F.linear + smoothed_cross_entropy": lambda h, target: smoothed_cross_entropy(
            head(h).float(), target, 0.1
        ),
    }
    for rows in map(int, args.chunks.split(",")):

        def fused(h, target, rows=rows):
            loss.CHUNK_SCORES = rows * 8000
            return linear_cross_entropy(h, head.weight, None, target, 0.1)

        systems[f"linear_cross_entropy, {rows} rows"] = fused

        def fused_torch(h, target, fused=fused):
            with native.off():  # each chunk's loss by PyTorch's ops, not qkv's C++ kernel
                return fused(h, target)

        systems[f"  {rows} rows, PyTorch's chunk ops"] = fused_torch
    best = {name: float("inf") for name in systems}
    calls = 0
    for _ in range(args.repeats):
        for name, fn in systems.items():
            n = 1600 + calls if args.new_rows else 1800
            calls += 1
            h, target = h0[:n].clone().requires_grad_(), target0[:n]
            head.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                value = fn(h, target)
            value.backward()
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = "a new row count (1,600 and up) at every call" if args.new_rows else "1,800 rows"
    print(f"{args.precision}, {args.threads} threads, {rows}, best of {args.repeats}")
    base = best["F.linear + F.cross_entropy"]
    for name, t in best.items():
        print(f"{name:34} {t * 1e3:7.1f} ms   {base / t:.2f}x")


if __name__ == "__main__":
    main()
