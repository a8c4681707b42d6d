"""The steps between a decoding step's products, qkv's C++ kernels (csrc/pointwise.cpp) against
PyTorch's ops, on the CPU:

- add + norm: a post-LN layer's norm(x + y) (PyTorch: an add, then layer_norm);
- gelu, silu: the feed-forward's activation in place after MKL's product (PyTorch: gelu_, silu_).

First each alone, microseconds per call (the fastest of 5 x 100 calls), at decoding's row counts
(32 sentences: greedy; 160: beam 5; 672: a batch's 32 sources of 21 tokens, the encoder) and
the largest difference from fp64's result for both. Then in a decode: the small random Marian
model of translate_speed.py (post-LN, GELU), decoded as translate_speed.py decodes it (4
batches of 32 sentences, 20+eos source tokens, 25 forced outputs), greedy and beam 5, with the
kernels on and off alternated in one process; sentences/s and how many outputs are the same.

    .venv/bin/python bench/pointwise_speed.py --threads 1
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import alternate, best_of
from translate_speed import hf_model, qkv_engine

from qkv import native
from qkv.allocator import keep_freed_memory
from qkv.marian import convert


def alone(module) -> None:
    g = torch.Generator().manual_seed(0)
    head = f"{'what':>9} {'shape':>12} {'torch us':>9} {'C++ us':>7} {'x':>5}"
    print(f"{head} {'torch err':>9} {'C++ err':>8}")
    for rows in (32, 160, 672):
        for d in (256, 512):
            x, y = torch.randn(rows, d, generator=g) * 3, torch.randn(rows, d, generator=g)
            w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
            exact = F.layer_norm((x + y).double(), (d,), w.double(), b.double(), 1e-5)
            theirs_err = (F.layer_norm(x + y, (d,), w, b, 1e-5) - exact).abs().max()
            ours_err = (module.add_layer_norm(x, y, w, b, 1e-5) - exact).abs().max()
            theirs = best_of(lambda x=x, y=y, w=w, b=b, d=d: F.layer_norm(x + y, (d,), w, b, 1e-5))
            ours = best_of(lambda x=x, y=y, w=w, b=b: module.add_layer_norm(x, y, w, b, 1e-5))
            row = f"{'add+norm':>9} {f'{rows}x{d}':>12} {theirs:9.1f} {ours:7.1f}"
            print(f"{row} {theirs / ours:5.2f} {theirs_err:9.1e} {ours_err:8.1e}")
    for kind, op in (("gelu", torch.ops.aten.gelu_), ("silu", torch.ops.aten.silu_)):
        for rows in (32, 160, 672):
            x = torch.randn(rows, 1024, generator=g) * 3
            exact = getattr(F, kind)(x.double())
            theirs_err = (op(x.clone()) - exact).abs().max()
            mine = x.clone()
            module.activate_(mine, kind)
            ours_err = (mine - exact).abs().max()
            # in place: each call on a fresh copy of x (applied again and again, the values
            # would pass through denormals on their way to 0), the copy's own time taken off
            z = x.clone()
            copy = best_of(lambda z=z, x=x: z.copy_(x))
            theirs = best_of(lambda z=z, x=x, op=op: op(z.copy_(x))) - copy
            ours = best_of(lambda z=z, x=x, k=kind: module.activate_(z.copy_(x), k)) - copy
            row = f"{kind:>9} {f'{rows}x1024':>12} {theirs:9.1f} {ours:7.1f}"
            print(f"{row} {theirs / ours:5.2f} {theirs_err:9.1e} {ours_err:8.1e}")


def in_a_decode(module) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="qkv-pointwise-"))
    hf_model("small").save_pretrained(tmp / "hf")
    shape = argparse.Namespace(sentences=128, src_len=20, batch=32, out_len=25)
    decode = qkv_engine(convert(tmp / "hf", tmp / "qkv"), False, shape)  # as translate_speed's
    for beam in (1, 5):

        def run(on: bool, beam=beam) -> tuple[float, list]:
            native._state["pointwise"] = module if on else None
            t0 = time.perf_counter()
            outs = decode(beam, shape.sentences // shape.batch)
            return len(outs) / (time.perf_counter() - t0), outs

        best, same = alternate(run, 3)
        name = "greedy" if beam == 1 else f"beam {beam}"
        print(
            f"{name:>7}: kernels on {best[True]:6.1f} sent/s, off {best[False]:6.1f} "
            f"({best[True] / best[False]:.2f}x); same outputs {same}/{shape.sentences}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()  # as the `qkv` command runs
    torch.set_num_threads(args.threads)
    module = native._built()  # the kernels, whatever native's quick check would say
    assert module is not None, "qkv's C++ kernels did not build here"
    print(f"{args.threads} thread(s), torch {torch.__version__}")
    with torch.inference_mode():
        alone(module)
    in_a_decode(module)


if __name__ == "__main__":
    main()
