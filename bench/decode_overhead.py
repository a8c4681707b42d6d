"""The fixed cost of a decoding step: milliseconds per step of greedy and beam-5 search (32
sentences, 20-token sources, 25 forced steps, packed as `qkv translate` runs it) for a tiny model
(d16, vocabulary 64), whose matmuls cost next to nothing, beside the small translation model
(d256, vocabulary 8k). The tiny model's time is Python and per-operation overhead.

    .venv/bin/python bench/decode_overhead.py
    .venv/bin/python bench/decode_overhead.py --threads 1
"""

import argparse
import time

import torch

from qkv.config import DecodeConfig, ModelConfig
from qkv.models import from_config
from qkv.packed import pack
from qkv.search import beam_search, greedy, max_steps, model_step


def ms_per_step(model, beam: int, steps: int = 25, repeats: int = 3) -> float:
    src = torch.randint(3, model.config.vocab_size, (32, 21), generator=torch.Generator())
    lengths = torch.full((32,), 21)
    cfg = DecodeConfig(
        beam=beam, alpha=1.0, max_len_a=0, max_len_b=steps, min_len=steps, at_max="stop"
    )
    kw = dict(bos=1, eos=2, pad=0)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            state = model.start(src, max_steps(cfg, lengths, None))  # as qkv translate
            if beam == 1:
                greedy(model_step(model), state, lengths, cfg, **kw)
            else:
                beam_search(model_step(model), state, lengths, cfg, **kw)
            best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    torch.manual_seed(0)
    for name, d, heads, vocab in (("tiny", 16, 2, 64), ("small", 256, 8, 8000)):
        cfg = ModelConfig(
            vocab_size=vocab,
            d_model=d,
            n_heads=heads,
            d_ff=4 * d,
            n_encoder_layers=3,
            n_decoder_layers=3,
            dropout=0.0,
            max_len=64,
        )
        model = pack(from_config(cfg))
        greedy_ms, beam_ms = ms_per_step(model, 1), ms_per_step(model, 5)
        print(f"{name:5} (d{d}, vocabulary {vocab}): greedy {greedy_ms:5.2f} ms/step, ", end="")
        print(f"beam 5 {beam_ms:5.2f} ms/step")


if __name__ == "__main__":
    main()
