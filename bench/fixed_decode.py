"""Fixed-shape decoding (qkv/fixed.py), eager and compiled with inductor, beside the packed eager
step `qkv translate` runs by default: compile time, then sentences/s alternating the systems,
outputs compared (a random Marian model as in translate_speed.py, 20-token sources, batch 32,
25 forced tokens).

    .venv/bin/python bench/fixed_decode.py --size small --strategy greedy
    .venv/bin/python bench/fixed_decode.py --size small --strategy beam
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from translate_speed import EOS, PAD, V, hf_model

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.fixed import FixedDecoder, use_disk_cache
from qkv.marian import convert
from qkv.packed import pack
from qkv.search import decode, max_steps, model_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "base"])
    ap.add_argument("--strategy", default="greedy", choices=["greedy", "beam"])
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-freeze", action="store_true", help="weights as graph inputs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"inductor cache: {use_disk_cache()}")
    tmp = Path(tempfile.mkdtemp(prefix="qkv-fixed-"))
    hf_model(args.size).save_pretrained(tmp / "hf")
    plain = checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0].eval()
    packed = pack(checkpoint.load(tmp / "qkv")[0])
    n, batch = args.sentences, 32
    src = torch.randint(2, V - 1, (n, 21), generator=torch.Generator().manual_seed(1))
    src[:, -1] = EOS
    beam = 5 if args.strategy == "beam" else 1
    cfg = DecodeConfig(
        strategy=args.strategy, beam=beam, max_len_a=0, max_len_b=25, min_len=25, at_max="stop"
    )
    kw = dict(bos=PAD, eos=EOS, pad=PAD)
    lengths = torch.full((batch,), 21)
    steps = max_steps(cfg, lengths, None)
    fixed = {
        "fixed eager": FixedDecoder(packed),
        "fixed compiled": FixedDecoder(plain, True, freeze=not args.no_freeze),
    }

    def run(name: str) -> tuple[float, list[list[int]]]:
        out, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for x in src.split(batch):
                if name == "packed eager":
                    step, state = model_step(packed), packed.start(x)
                else:
                    step, state = fixed[name].start(x, steps, cfg.beam)
                out += [h[0].tokens for h in decode(step, state, lengths, cfg, **kw)]
        return n / (time.perf_counter() - t0), out

    t0 = time.perf_counter()
    with torch.inference_mode():
        step, state = fixed["fixed compiled"].start(src[:batch], steps, cfg.beam)
        decode(step, state, lengths, cfg, **kw)
    print(f"first compiled batch, compiling included: {time.perf_counter() - t0:.1f} s")
    for _ in range(args.repeats):
        speed, outs = {}, {}
        for name in ["packed eager", "fixed eager", "fixed compiled"]:
            speed[name], outs[name] = run(name)
        same = {
            k: sum(a == b for a, b in zip(outs["packed eager"], o, strict=True))
            for k, o in outs.items()
        }
        print(
            f"{args.size} {args.strategy} sentences/s: "
            + ", ".join(f"{k} {v:.1f} ({same[k]}/{n} same)" for k, v in speed.items())
            + f"; compiled/packed {speed['fixed compiled'] / speed['packed eager']:.2f}x"
        )


if __name__ == "__main__":
    main()
