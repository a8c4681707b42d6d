"""qkv's int8 product (qkv/csrc/int8_gemm.cpp) beside PyTorch's dynamic int8 product (on the
engine qkv.packed.int8_engine picks here) at decoding's shapes: microseconds per call (the
fastest of 5 x 100 calls), qkv's on AMX (where the CPU has it) and on AVX-512 VNNI alone, and
each one's largest error against the fp32 product. Rows: 32 (greedy over 32 sentences), 160
(beam 5), 672 (an encoder's batch of 32 x 21 tokens); weights of the small (d256) and base
(d512) models of translate_speed.py.

    .venv/bin/python bench/int8_gemm.py --threads 1
    .venv/bin/python bench/int8_gemm.py --threads 2
"""

import warnings

import torch
from timing import best_of, threads_flag

from qkv import native
from qkv.packed import int8_engine, prepack_int8, quantize_rows

SHAPES = [
    (32, 256, 256),
    (32, 256, 768),
    (32, 256, 1024),
    (32, 1024, 256),
    (32, 256, 8000),
    (160, 256, 1024),
    (160, 256, 8000),
    (672, 256, 256),
    (32, 512, 1536),
    (32, 512, 2048),
    (32, 2048, 512),
    (32, 512, 8000),
]


def main() -> None:
    threads_flag(__doc__)
    warnings.simplefilter("ignore")  # quantized tensors are deprecated, still served
    module = native._built()
    if module is None or not module.int8_available():
        raise SystemExit("qkv's int8 product is not built here (no AVX-512 VNNI, or no compiler)")
    engine = int8_engine()
    paths = {"amx": True, "vnni": False}
    print(f"threads {torch.get_num_threads()}, PyTorch's engine {engine}")
    head = f"{'rows x in x out':>18} {'torch us':>9} {'err':>6}"
    for path in paths:
        head += f" {'qkv-' + path + ' us':>12} {'err':>6} {'x torch':>8}"
    print(head)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m, k, n in SHAPES:
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            x = torch.randn(m, k, generator=g)
            want = x @ w.T + b
            q, scale = quantize_rows(w)
            prepacked = prepack_int8(w, b, engine)
            err = (torch.ops.quantized.linear_dynamic(x, prepacked, True) - want).abs().max()
            theirs = best_of(
                lambda p=prepacked, x=x: torch.ops.quantized.linear_dynamic(x, p, True)
            )
            row = f"{f'{m} x {k} x {n}':>18} {theirs:9.1f} {err.item():6.2f}"
            packed, sums = module.int8_pack(q)

            def call(x=x, packed=packed, scale=scale, sums=sums, b=b, n=n):
                return module.int8_linear(x, packed, scale, sums, b, n)

            for allowed in paths.values():
                before = module.int8_allow_amx(allowed)
                try:
                    err = (call() - want).abs().max()
                    ours = best_of(call)
                finally:
                    module.int8_allow_amx(before)
                row += f" {ours:12.1f} {err.item():6.2f} {theirs / ours:7.2f}x"
            print(row)


if __name__ == "__main__":
    main()
