"""torch.compile of the decoding step, tried and not offered: compile time and greedy speed of
the compiled step (inductor, dynamic shapes, weight freezing) beside the packed eager step qkv
runs (small random Marian model, 128 sentences, batch 32, 25 forced tokens). Outputs compared.

    .venv/bin/python bench/compile_decode.py    # about 3 minutes, most of it compiling
"""

import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from translate_speed import EOS, PAD, V, hf_model

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.marian import convert
from qkv.packed import pack
from qkv.search import greedy, model_step


def main() -> None:
    torch.set_num_threads(2)
    inductor_config.freezing = True
    tmp = Path(tempfile.mkdtemp(prefix="qkv-compile-"))
    hf_model("small").save_pretrained(tmp / "hf")
    plain = checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0].eval()
    packed = pack(checkpoint.load(tmp / "qkv")[0])
    src = torch.randint(2, V - 1, (128, 21), generator=torch.Generator().manual_seed(1))
    src[:, -1] = EOS
    cfg = DecodeConfig(strategy="greedy", max_len_a=0, max_len_b=25, min_len=25, at_max="stop")
    kw = dict(bos=PAD, eos=EOS, pad=PAD)
    compiled = torch.compile(model_step(plain), dynamic=True)

    def run(model, step) -> tuple[float, list[list[int]]]:
        out, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for x in src.split(32):
                hyps = greedy(step, model.start(x), torch.full((32,), 21), cfg, **kw)
                out += [h.tokens for h in hyps]
        return 128 / (time.perf_counter() - t0), out

    t0 = time.perf_counter()
    run(plain, compiled)
    print(f"first compiled run, compiling included: {time.perf_counter() - t0:.0f} s")
    for _ in range(3):
        eager, a = run(packed, model_step(packed))
        comp, b = run(plain, compiled)
        same = sum(x == y for x, y in zip(a, b, strict=True))
        print(f"greedy sentences/s: packed eager {eager:5.1f}, compiled {comp:5.1f}", end="")
        print(f" ({same}/128 outputs identical)")


if __name__ == "__main__":
    main()
