"""MKL's packed product (qkv/native.py, what qkv.packed uses for fp32 where it is faster) against
oneDNN's packed product (what it used before, and uses where MKL's is missing or slower) and
plain F.linear: first every product of one decoding step in sequence (the decoder's q/k/v,
output, cross-attention query and output, and feed-forward layers, then the output layer over an
8k vocabulary), so that each finds its weights evicted by the ones before it as in decoding; at
1 (one sentence), 8, 32 (greedy over 32 sentences), 160 (beam 5) and 672 rows (the encoder's 32
sentences of 21 tokens); ms per step, the fastest quarter of --repeats x 10 runs. Then the small
random Marian model of translate_speed.py decoding 8 batches of 32 sentences (25 forced tokens,
greedy and beam 5), packed with MKL's product and with oneDNN's (each with pack's default
min_weights, as `qkv translate` runs it), alternated in one process, best of --repeats;
sentences/s and how many outputs are the same, and the memory each packed model takes. Last,
where the products' time goes inside a real greedy step: each product of the small model's
step timed in place (32 sentences, 1 thread or more), against the same products in sequence
alone, and in sequence with 1 or 2 MB of other memory touched between them, as a step's
attention and cache writes do.

    .venv/bin/python bench/packed_gemm.py --threads 1
    .venv/bin/python bench/packed_gemm.py --threads 2
"""

import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fused_ffn import compare, decode_all, small_batches, small_model
from timing import ab_flags
from translate_speed import SIZES, forced

from qkv import checkpoint, native
from qkv.packed import pack

MEMORY = """
import sys, torch
from pathlib import Path
from qkv import checkpoint, native
from qkv.packed import pack

def memory():
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())
    return [int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmSize")]

native.kernel(), native.gemm()
model = checkpoint.load(sys.argv[1])[0]
before = memory()
if sys.argv[2] == "mkl":
    pack(model)
else:
    with native.off():
        pack(model)
print(*(a - b for a, b in zip(memory(), before)))
"""


def packing_memory(model_dir: Path, route: str) -> tuple[float, float]:
    """MB of resident memory and of address space that pack() adds to a fresh process (Linux),
    packing for MKL's product or oneDNN's."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(model_dir), route],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def step_shapes(size: str) -> list[tuple[int, int]]:
    """(out, in) of every product in a decoding step of the translate_speed model of that size."""
    d, ffn, layers = SIZES[size]["d_model"], SIZES[size]["ffn"], SIZES[size]["layers"]
    per_layer = [(3 * d, d), (d, d), (d, d), (d, d), (ffn, d), (d, ffn)]
    return per_layer * layers + [(8000, d)]


def quartile(fn, runs: int) -> float:
    """ms of fn, the fastest quarter's slowest of `runs` runs, after two warm-ups."""
    fn(), fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 4] * 1e3


def step_layers(size: str, gen: torch.Generator) -> list[tuple]:
    """Random weights and biases of a decoding step's products (step_shapes), each with its
    copies packed for oneDNN's product and for MKL's: (w, b, oneDNN's, MKL's)."""
    layers = []
    for n, k in step_shapes(size):
        w, b = torch.randn(n, k, generator=gen) * 0.05, torch.randn(n, generator=gen)
        onednn = torch.ops.mkldnn._reorder_linear_weight(w, None)
        layers.append((w, b, onednn, native.pack_weight(w)))
    return layers


def per_step(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    print("one decoding step's products in sequence, ms: F.linear, oneDNN packed, MKL packed")
    for size in ("small", "base"):
        layers = step_layers(size, gen)
        for rows in (1, 8, 32, 160, 672):
            xs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w, *_ in layers}}

            def plain(layers=layers, xs=xs):
                for w, b, _, _ in layers:
                    F.linear(xs[w.shape[1]], w, b)

            def dnn(layers=layers, xs=xs):
                for w, b, p, _ in layers:
                    torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, b, "none", [], "")

            def mkl(layers=layers, xs=xs):
                for w, b, _, p in layers:
                    native.packed_linear(xs[w.shape[1]], p, b, w.shape[0])

            with torch.inference_mode():
                t = [quartile(f, repeats * 10) for f in (plain, dnn, mkl)]
            print(
                f"  {size:5} {rows:4} rows: {t[0]:7.2f} {t[1]:7.2f} {t[2]:7.2f}"
                f"   oneDNN / MKL {t[1] / t[2]:.2f}x, F.linear / MKL {t[0] / t[2]:.2f}x"
            )


def in_place(model, repeats: int) -> None:
    """ms per greedy step of model (32 sentences) and of the products inside it (each timed
    where it runs), the fastest of `repeats` runs of 20 steps."""
    real, spent = native.packed_linear, [0.0]

    def timed(*args):
        t0 = time.perf_counter()
        y = real(*args)
        spent[0] += time.perf_counter() - t0
        return y

    gen = torch.Generator().manual_seed(1)
    src = torch.randint(2, 7999, (32, 21), generator=gen)
    tokens = torch.randint(3, 7999, (32, 1), generator=gen)
    best = (float("inf"), 0.0)
    native.packed_linear = timed
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                cache = model.start(src)
                for _ in range(3):
                    model.step(tokens, cache, last=True)
                spent[0], t0 = 0.0, time.perf_counter()
                for _ in range(20):
                    model.step(tokens, cache, last=True)
                best = min(best, ((time.perf_counter() - t0) / 20, spent[0] / 20))
    finally:
        native.packed_linear = real
    print(f"  in a greedy step: {best[0] * 1e3:.2f} ms, of which the products {best[1] * 1e3:.2f}")


def evicted(repeats: int) -> None:
    """The small model's step products on MKL's packed product in sequence (32 rows), with 0,
    1 or 2 MB copied between them; ms per step, the fastest of repeats x 10."""
    gen = torch.Generator().manual_seed(0)
    layers = step_layers("small", gen)
    xs = {k: torch.randn(32, k, generator=gen) for k in (256, 1024)}
    for mb in (0, 1, 2):
        src, dst = torch.randn(mb * 2**18 + 1), torch.empty(mb * 2**18 + 1)
        times = []
        with torch.inference_mode():
            for _ in range(repeats * 10):
                total = 0.0
                for w, b, _, p in layers:
                    dst.copy_(src)
                    t0 = time.perf_counter()
                    native.packed_linear(xs[w.shape[1]], p, b, w.shape[0])
                    total += time.perf_counter() - t0
                times.append(total)
        print(f"  in sequence, {mb} MB touched between products: {min(times) * 1e3:.2f} ms")


def main() -> None:
    args = ab_flags(__doc__)
    if native.gemm() is None:
        raise SystemExit("MKL's packed product is not in use here (see the line above)")
    print(f"{args.threads} threads, torch {torch.__version__}")
    per_step(args.repeats)
    model_dir = small_model("qkv-gemm-")
    mkl = pack(checkpoint.load(model_dir)[0])
    with native.off():  # packs for oneDNN (the attention kernel is used by both when decoding)
        onednn = pack(checkpoint.load(model_dir)[0])
    print("memory that packing the small model adds, MB resident / address space (fresh process):")
    for route in ("mkl", "onednn"):
        rss, size = packing_memory(model_dir, route)
        print(f"  {route:6}: {rss:5.0f} / {size:5.0f}")
    batches, lengths = small_batches()
    print("small model, 8 x 32 sentences, sentences/s")
    for beam in (1, 5):
        cfg = forced(beam)

        def run(ours: bool, cfg=cfg):
            return decode_all(mkl if ours else onednn, batches, lengths, cfg)

        line = "  {mode:7}: MKL's product {on:6.1f}, oneDNN's {off:6.1f} -> {ratio:.2f}x"
        compare(run, args.repeats, beam, line + "; outputs the same {same}/256")
    print("the small model's 19 products per step, MKL's packed, 32 rows")
    in_place(mkl, args.repeats)
    evicted(args.repeats)


if __name__ == "__main__":
    main()
