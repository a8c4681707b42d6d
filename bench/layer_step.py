"""A decoder layer's step in C++ (csrc/decoder_step.cpp) against the same kernels called from
Python (qkv/decoder.py's layers), in a decode: the random Marian models of translate_speed.py
(small: d256, 3 layers; base: d512, 6 layers; post-LN, vocabulary 8k), decoded as
translate_speed.py decodes them (batches of 32 sentences, 20+eos source tokens, 25 forced
outputs, packed as `qkv translate` runs them: fp32, or with `--int8` 8-bit weights, or with
`--bf16` bf16 ones), greedy
and beam 5, the C++ step on and off alternated in one process; sentences/s, milliseconds per
batch, and how many outputs are the same.

    .venv/bin/python bench/layer_step.py --threads 1
    .venv/bin/python bench/layer_step.py --threads 1 --int8
    .venv/bin/python bench/layer_step.py --threads 1 --bf16   # on a CPU with bf16 units
    .venv/bin/python bench/layer_step.py --threads 2 --size base
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from timing import alternate
from translate_speed import hf_model, qkv_engine

from qkv import native
from qkv.allocator import keep_freed_memory
from qkv.marian import convert


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=["small", "base"], nargs="+", default=["small", "base"])
    parser.add_argument("--repeats", type=int, default=3)
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--int8", action="store_true", help="8-bit weights (qkv translate --int8)")
    kinds.add_argument("--bf16", action="store_true", help="bf16 weights (--precision bf16)")
    args = parser.parse_args()
    keep_freed_memory()  # as the `qkv` command runs
    torch.set_num_threads(args.threads)
    shape = argparse.Namespace(sentences=128, src_len=20, batch=32, out_len=25)
    kind = "int8" if args.int8 else "bf16" if args.bf16 else "fp32"
    print(f"{args.threads} thread(s), {kind} weights, torch {torch.__version__}")
    module = native.layer_steps()  # before the runs below switch it on and off
    assert module is not None, "the C++ layer step is not in use here (see the lines above)"
    for size in args.size:
        tmp = Path(tempfile.mkdtemp(prefix="qkv-layer-step-"))
        hf_model(size).save_pretrained(tmp / "hf")
        decode = qkv_engine(convert(tmp / "hf", tmp / "qkv"), args.int8, shape, bf16=args.bf16)
        batches = shape.sentences // shape.batch
        for beam in (1, 5):

            def run(on: bool, beam=beam, decode=decode, batches=batches) -> tuple[float, list]:
                native._state["step"] = module if on else None
                t0 = time.perf_counter()
                outs = decode(beam, batches)
                return len(outs) / (time.perf_counter() - t0), outs

            best, same = alternate(run, args.repeats)
            name = "greedy" if beam == 1 else f"beam {beam}"
            ms = {on: 1000 * shape.batch / best[on] for on in (True, False)}
            print(
                f"{size:>5} {name:>7}: C++ step {best[True]:6.1f} sent/s ({ms[True]:5.1f} ms a "
                f"batch), Python {best[False]:6.1f} ({ms[False]:5.1f} ms): "
                f"{best[True] / best[False]:.2f}x; same outputs {same}/{shape.sentences}"
            )


if __name__ == "__main__":
    main()
