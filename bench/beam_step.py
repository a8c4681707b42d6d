"""Less work per beam step, A/B in one process: beam search (K=5) over the small random Marian
model of translate_speed.py (packed, as `qkv translate` runs it) with the current cache, and with
each saving switched off: the cross-attention keys/values copied per beam instead of shared by a
sentence's beams, the reorder copying the whole cache buffer instead of its used part, and
the first step computed for all K beams of a sentence (identical rows) instead of once per
sentence. Alternated, best of the repeats; outputs compared.

    .venv/bin/python bench/beam_step.py --threads 1
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from translate_speed import EOS, PAD, V, hf_model

import qkv.cache as cache_module
from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.marian import convert
from qkv.packed import pack
from qkv.search import beam_search, model_step

SHARED, USED_ONLY = cache_module._groups, cache_module.KVCache.select


def per_beam(source: torch.Tensor) -> tuple[torch.Tensor, int]:
    return source, 1  # never group: one cross-attention row per beam, as before 2026-11-29


def whole_buffer(self, index: torch.Tensor) -> None:
    if self._k is not None and self._v is not None:
        self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)


class KRowStart:
    """Beam search's start before 2026-11-30: the state expanded to K rows per sentence before
    the first step, which then computed K identical rows. Search now hands the first step one
    row per sentence and expands with the first select (index // K); any of a sentence's K
    equal rows serves, so that select maps back to the first."""

    def __init__(self, state, b: int, k: int):
        state.select(torch.arange(b).repeat_interleave(k))
        self.state, self.k, self.first = state, k, True  # first: before the first select

    def select(self, index: torch.Tensor) -> None:
        self.state.select(index * self.k if self.first else index)
        self.first = False

    def wrap(self, step):
        def first_on_k_rows(tokens: torch.Tensor, st: "KRowStart") -> torch.Tensor:
            if not st.first:
                return step(tokens, st.state)
            return step(tokens.repeat_interleave(st.k, dim=0), st.state)[:: st.k]

        return first_on_k_rows


# name: (cross-attention grouping, cache reorder, first step once per sentence)
SYSTEMS = {
    "current": (SHARED, USED_ONLY, True),
    "first step on K rows": (SHARED, USED_ONLY, False),
    " + per-beam cross K/V": (per_beam, USED_ONLY, False),
    " + whole-buffer reorder": (per_beam, whole_buffer, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "base"])
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--src-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="qkv-beam-"))
    hf_model(args.size).save_pretrained(tmp / "hf")
    model = pack(checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0])
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, V - 1, (args.sentences, args.src_len + 1), generator=g)
    src[:, -1] = EOS
    cfg = DecodeConfig(beam=5, max_len_a=0, max_len_b=25, min_len=25, at_max="stop")

    def run(once: bool) -> tuple[float, list[list[int]]]:
        out, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for x in src.split(32):
                lengths = torch.full((len(x),), x.shape[1])
                step, state = model_step(model), model.start(x)
                if not once:
                    state = KRowStart(state, len(x), cfg.beam)
                    step = state.wrap(step)
                hyps = beam_search(step, state, lengths, cfg, bos=PAD, eos=EOS, pad=PAD)
                out += [h[0].tokens for h in hyps]
        return args.sentences / (time.perf_counter() - t0), out

    best: dict[str, float] = {}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, (groups, select, once) in SYSTEMS.items():
            cache_module._groups, cache_module.KVCache.select = groups, select
            rate, outs[name] = run(once)
            best[name] = max(best.get(name, 0.0), rate)
    cache_module._groups, cache_module.KVCache.select = SHARED, USED_ONLY
    ref = outs["current"]
    print(f"{args.size}, beam 5, {args.sentences} sentences, batch 32, {args.threads} threads")
    for name, rate in best.items():
        same = sum(a == b for a, b in zip(outs[name], ref, strict=True))
        ratio = best["current"] / rate
        print(f"{name:32} {rate:6.1f} sentences/s   current / it {ratio:.2f}x   same {same}")


if __name__ == "__main__":
    main()
