"""The feed-forward's activation inside its first packed product (qkv.packed.PackedFeedForward)
against the same packed model with it apart: the small random Marian model of translate_speed.py
(gelu), as `qkv translate` runs it (fp32, and bf16 where the CPU packs bf16), 8 batches of 32
sentences, 25 forced output tokens, greedy and beam 5; the two settings alternated in one
process, best of --repeats; sentences/s and how many outputs are the same.

    .venv/bin/python bench/fused_ffn.py --threads 1
"""

import tempfile
import time
from pathlib import Path

import torch
from timing import ab_flags, alternate
from translate_speed import EOS, PAD, V, forced, hf_model

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.marian import convert
from qkv.packed import Packed, PackedFeedForward, pack
from qkv.search import beam_search, greedy, model_step


def decode_all(model, batches, lengths, cfg: DecodeConfig) -> tuple[float, list]:
    """Sentences/s over the batches, and the outputs."""
    kw = dict(bos=PAD, eos=EOS, pad=PAD)
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            step, state = model_step(model), model.start(x)
            if cfg.beam == 1:
                out += [h.tokens for h in greedy(step, state, lengths, cfg, **kw)]
            else:
                out += [n[0].tokens for n in beam_search(step, state, lengths, cfg, **kw)]
    return 32 * len(batches) / (time.perf_counter() - t0), out


def small_model(prefix: str) -> Path:
    """translate_speed.py's small random Marian model, saved and converted to qkv in a new
    temporary directory: the qkv model's directory."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    hf_model("small").save_pretrained(tmp / "hf")
    return convert(tmp / "hf", tmp / "qkv")


def small_batches() -> tuple[list[torch.Tensor], torch.Tensor]:
    """8 batches of 32 random sources of 20 tokens and eos, the same in every run; lengths."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(2, V - 1, (32, 21), generator=g) for _ in range(8)]
    for x in batches:
        x[:, -1] = EOS
    return batches, torch.full((32,), 21)


def compare(run, repeats: int, beam: int, line: str) -> None:
    """run(True) against run(False) (alternated, timing.alternate), printed as `line` says
    with {mode}, {on}, {off}, {ratio} and {same} (of 256 outputs)."""
    best, same = alternate(run, repeats)
    mode = "greedy" if beam == 1 else f"beam {beam}"
    ratio = best[True] / best[False]
    print(line.format(mode=mode, on=best[True], off=best[False], ratio=ratio, same=same))


def main() -> None:
    args = ab_flags(__doc__)
    model_dir = small_model("qkv-ffn-")
    batches, lengths = small_batches()
    bf16_packs = Packed([torch.nn.Linear(256, 256)], bf16=True)._packed is not None
    print(f"small model, {args.threads} threads, 8 x 32 sentences, torch {torch.__version__}")
    for precision in ["fp32"] + (["bf16"] if bf16_packs else []):
        model = pack(checkpoint.load(model_dir)[0], bf16=precision == "bf16")
        ffns = [m for m in model.modules() if isinstance(m, PackedFeedForward)]
        post_op = ffns[0].post_op
        for beam in (1, 5):
            cfg = forced(beam)

            def run(fused: bool, cfg=cfg, model=model, ffns=ffns, post_op=post_op):
                for m in ffns:
                    m.post_op = post_op if fused else None
                return decode_all(model, batches, lengths, cfg)

            line = "{mode:7}: fused {on:6.1f} sent/s, apart {off:6.1f} -> {ratio:.2f}x"
            compare(run, args.repeats, beam, f"{precision} {line}; outputs the same {{same}}/256")


if __name__ == "__main__":
    main()
