"""What a new shape costs a bf16 matrix product on the CPU. oneDNN, which runs PyTorch's bf16
matmuls there, compiles (JIT) a kernel for each new shape, in 256 KB code buffers (mmap: the
page faults bf16 training showed in bench/page_faults.py); fp32 goes to MKL, which does not.
Prints (1) one linear layer, 2,048 x 256 -> 1,024 rows give or take, at a row count never
seen before against one seen; (2) the small model's training step (bench/profile_train.py) on
real Multi30k batches in bf16, over batches whose shapes are new and again over the same
batches, with the fused loss's rows padded to a multiple of 128 (qkv.loss.ROW_QUANTUM, since
2026-11-30) and without (ROW_QUANTUM = 1, the code before). Each setting has its own batches
(so neither meets shapes the other compiled): compare new / seen within a row.

    .venv/bin/python bench/new_shapes.py
"""

import argparse
import time

import torch
import torch.nn.functional as F
from profile_train import training_step
from timing import tokens_per_s

from qkv import loss
from qkv.allocator import keep_freed_memory


def linear_ms(dtype: torch.dtype, rows: list[int]) -> float:
    w = torch.randn(1024, 256).to(dtype)
    xs = [torch.randn(m, 256).to(dtype) for m in rows]
    t0 = time.perf_counter()
    for x in xs:
        F.linear(x, w)
    return (time.perf_counter() - t0) / len(xs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12, help="per pass and setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    for dtype in (torch.float32, torch.bfloat16):
        linear_ms(dtype, [1500])  # load the library's kernels once
        new = linear_ms(dtype, list(range(1501, 1601)))
        seen = linear_ms(dtype, list(range(1501, 1601)))
        name = str(dtype).removeprefix("torch.")
        print(f"linear, {name}: a new row count {new:.2f} ms, one seen before {seen:.2f} ms")
    step, data = training_step(True, 2 + 4 * args.batches)
    for batch in data[:2]:
        step(batch)
    sets = {  # each setting its own batches, so neither meets shapes the other compiled
        1: (data[2::4], data[3::4]),
        loss.ROW_QUANTUM: (data[4::4], data[5::4]),
    }
    print(f"\nbf16 training step, {args.threads} threads, target tokens/s")
    print(f"{'ROW_QUANTUM':>12} {'new shapes':>11} {'seen':>8} {'new / seen':>11}")
    result = {}
    for quantum, (first, second) in sets.items():
        loss.ROW_QUANTUM = quantum
        for batches in (first, second):
            for when in ("new", "seen"):
                result.setdefault((quantum, when), []).append(tokens_per_s(step, batches))
    for quantum in sets:
        new = sum(result[quantum, "new"]) / 2
        seen = sum(result[quantum, "seen"]) / 2
        print(f"{quantum:12} {new:11,.0f} {seen:8,.0f} {new / seen:10.2f}x")


if __name__ == "__main__":
    main()
