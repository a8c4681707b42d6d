"""qkv's training kernels on and off, side by side: attention with dropout in C++
(csrc/train_attention.cpp), relu and skip-connection dropout in one pass (csrc/dropout_fused.cpp)
and, under bf16 autocast, the pre-LN norm writing bf16 (csrc/layer_norm.cpp). "off" is the route
before them: PyTorch's ops, with qkv's dropout mask. Each step as bench/train_speed.py runs qkv's
(forward, label-smoothed loss, backward, clipping, fused AdamW), in bf16 autocast and in fp32,
the four configurations alternated, each measured --repeats times; the best counts.

    .venv/bin/python bench/train_kernels.py                 # the small size, 2 threads
    .venv/bin/python bench/train_kernels.py --size base --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
from train_speed import PAD, SIZES, build, real, synthetic, timed_steps

from qkv import native
from qkv.allocator import keep_freed_memory


def kernels(on: bool):
    """The training kernels in use (as qkv/native.py decided) or replaced by PyTorch's ops."""
    return contextlib.nullcontext() if on else native.off(*native.TRAINING_KERNELS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    in_use = {
        "attention": native.train_attentions() is not None,
        "fused dropout and norm": native.fused_dropouts() is not None,
    }
    print(f"size {args.size}, {args.threads} threads; kernels in use here: {in_use}")
    models = {}
    for precision in ("bf16", "fp32"):
        model = build("qkv", args.size).train()
        models[precision] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    configs = [(p, on) for p in ("bf16", "fp32") for on in (True, False)]
    for kind in ("synthetic", "real"):
        data = synthetic(args.steps, 64, 20, 25) if kind == "synthetic" else real(args.steps)
        tokens = sum(int((o != PAD).sum()) for _, _, o in data)

        def run(precision: str, on: bool, data=data) -> float:
            model, opt = models[precision]
            with kernels(on):
                return timed_steps("qkv", model, opt, data, precision == "bf16")

        for c in configs:
            run(*c)  # warm-up
        best = {c: math.inf for c in configs}
        for _ in range(args.repeats):
            for c in configs:  # alternated
                best[c] = min(best[c], run(*c))
        print(f"\n{kind} batches ({len(data)} steps, {tokens:,} target tokens), target tokens/s:")
        print(f"{'':6} {'kernels on':>11} {'off':>8} {'on / off':>9}")
        for p in ("bf16", "fp32"):
            on, off = tokens / best[(p, True)], tokens / best[(p, False)]
            print(f"{p:6} {on:11.0f} {off:8.0f} {on / off:8.2f}x")
        for on in (True, False):
            ratio = best[("fp32", on)] / best[("bf16", on)]
            print(f"bf16 / fp32, kernels {'on' if on else 'off'}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
