"""PyTorch's two x86 engines for dynamic int8 products, side by side: fbgemm's (PyTorch's
default on x86) and oneDNN's, at decoding's shapes (32 rows: greedy over 32 sentences; 160:
beam 5), microseconds per call (the fastest of 5 x 100 calls), and each one's largest error
against the fp32 product. `qkv.packed.int8_engine` makes the same comparison once per process
(32 rows by the 8000 x 256 and 1024 x 256 weights, summed) and prepacks int8 weights for
oneDNN's engine where it is at least 1.1x faster there, else for fbgemm's.

    .venv/bin/python bench/int8_engines.py --threads 1
"""

import warnings

import torch
from timing import best_of, threads_flag

from qkv.packed import int8_engine, prepack_int8

SHAPES = [(32, 256, 768), (32, 256, 1024), (32, 1024, 256), (32, 256, 8000), (160, 256, 1024)]


def main() -> None:
    threads_flag(__doc__)
    warnings.simplefilter("ignore")  # quantized tensors are deprecated, still served
    engines = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
    print(f"threads {torch.get_num_threads()}, engines {engines}, qkv picks {int8_engine()}")
    print(f"{'rows x in x out':>18} " + " ".join(f"{e + ' us':>10} {'err':>6}" for e in engines))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m, k, n in SHAPES:
            w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, k)
            row = f"{f'{m} x {k} x {n}':>18}"
            for engine in engines:
                packed = prepack_int8(w, b, engine)
                err = (torch.ops.quantized.linear_dynamic(x, packed, True) - (x @ w.T + b)).abs()
                t = best_of(lambda p=packed, x=x: torch.ops.quantized.linear_dynamic(x, p, True))
                row += f" {t:10.1f} {err.max().item():6.2f}"
            print(row)


if __name__ == "__main__":
    main()
