"""fp32 or bf16: which number format runs the matrix products, chosen per machine.

bfloat16 keeps fp32's exponent and 8 bits of mantissa: half the bytes per weight, and on CPUs
with bf16 dot-product units (AVX512-BF16, AMX) or on a recent GPU, several times the matmul
throughput. Without those units bf16 is emulated and slower than fp32, so "auto" asks twice
before using it: does the hardware have the units (oneDNN's own check on the CPU, CUDA's on
a GPU), and is a product of the shape that dominates the work measurably faster in bf16 (a
quick timing, well under a second)? Either answer no and it stays fp32, bit for bit the path
it always was. bench/README.md gives the measured speeds, BLEU difference and training curves
per machine, with its CPU flags.

Where bf16 is used:
- training (`TrainConfig.precision`): autocast of the forward pass and loss; weights, gradients
  and the optimizer stay fp32 (qkv/train.py);
- inference on the CPU (`qkv.packed.pack(model, bf16=True)`): the large linear layers run on
  bf16 copies of their weights (packed for oneDNN's bf16 GEMM where the CPU has the units),
  with bf16 inputs and fp32 outputs; attention, softmax, LayerNorm and the search stay fp32.
"""

from __future__ import annotations

import time
from functools import cache

import torch
import torch.nn.functional as F

from . import native

MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much in the quick measurement to be chosen


def bf16_units(device: torch.device) -> bool:
    """Whether `device` has hardware bf16 arithmetic (not an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def best_of(fn, reps: int) -> float:
    """Seconds of fn's fastest call of `reps`, after one to warm up (qkv.native's check too)."""
    fn()  # warm-up: first calls allocate and pick kernels
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@cache
def bf16_speedup(
    rows: int, d_in: int, d_out: int, device_type: str, training: bool = False, reps: int = 20
) -> float:
    """fp32 time / bf16 time of a (rows x d_in) by (d_in x d_out) product on the device, each
    the best of `reps` (cached per shape for the life of the process). On the CPU, inference
    is timed with the packed kernels it uses (qkv.packed), training with plain matmuls. On a
    busy machine most single timings are disturbed (with 5, a 7.6x gain once measured under
    1.2x and bf16 was refused), so each is the best of 20, and a measurement under MIN_SPEEDUP
    is repeated (up to three in all, the largest kept) before saying no."""
    device = torch.device(device_type)
    x = torch.randn(rows, d_in, device=device)
    w = torch.randn(d_out, d_in, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cpu" and not training:  # the packed kernels of inference (qkv.packed)
        try:
            pw16 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
        except RuntimeError:  # no packed bf16 kernel for this CPU: no gain to measure
            return 0.0
        linear = torch.ops.mkldnn._linear_pointwise
        x16 = x.bfloat16()
        f16 = lambda: linear(x16, pw16, None, "none", [], "")
        if native.packs():  # fp32 runs on MKL's packed product here
            pw32 = native.pack_weight(w)
            f32 = lambda: native.packed_linear(x, pw32, None, d_out)
        else:
            pw32 = torch.ops.mkldnn._reorder_linear_weight(w, None)
            f32 = lambda: linear(x, pw32, None, "none", [], "")
    else:
        w16, x16 = w.bfloat16(), x.bfloat16()
        f32 = lambda: (F.linear(x, w), sync())
        f16 = lambda: (F.linear(x16, w16), sync())
    best = 0.0
    for _ in range(3):
        best = max(best, best_of(f32, reps) / best_of(f16, reps))
        if best >= MIN_SPEEDUP:
            break
    return best


def resolve(
    choice: str, device: torch.device, rows: int, d_in: int, d_out: int, training: bool = False
) -> str:
    """ "fp32" or "bf16" for `choice`: an explicit one as asked; "auto" bf16 only when the device
    has bf16 units and the product (rows x d_in) by (d_in x d_out), the shape that dominates
    the work, runs at least MIN_SPEEDUP times faster in bf16."""
    if choice != "auto":
        return choice
    if not bf16_units(device):
        return "fp32"
    speedup = bf16_speedup(rows, d_in, d_out, device.type, training)
    return "bf16" if speedup >= MIN_SPEEDUP else "fp32"


def why(choice: str, chosen: str, device: torch.device) -> str:
    """A short reason for the log: what was asked and what decided it."""
    if choice != "auto":
        return f"{chosen} (asked for)"
    if not bf16_units(device):
        return f"{chosen} (auto: no bf16 units on {device.type})"
    return f"{chosen} (auto: bf16 units, measured {'faster' if chosen == 'bf16' else 'not faster'})"


def for_decoding(model, choice: str, device: torch.device) -> str:
    """fp32 or bf16 for decoding with `model` (qkv.packed's bf16 weights are CPU-only): "auto"
    times the output projection at 32 rows, the largest product of a decoding step."""
    if choice == "fp32" or device.type != "cpu":
        return "fp32"
    cfg = model.config
    return resolve(choice, device, 32, cfg.d_model, cfg.target_vocab)
