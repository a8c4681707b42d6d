"""Translation speed on identical weights: qkv vs HF transformers `generate` vs CTranslate2.

A random-init HF MarianMTModel (vocabulary 8k) is saved, converted to qkv (`qkv.marian.convert`)
and to CTranslate2 (its own converter), and all engines translate the same random sources with
forced equal output lengths (min = max = --out-len new tokens), so every engine generates the
same number of tokens. Runs are alternated between engines and repeated; the best of the
repeats counts. Output: sentences/s per engine and the ratios, plus how many outputs are
token-identical to qkv's.

    .venv/bin/python bench/translate_speed.py --size small
    .venv/bin/python bench/translate_speed.py --size base --sentences 128 --repeats 2

Needs transformers (the [test] extra) and ctranslate2 (`pip install ctranslate2`, optional:
left out when missing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from qkv import checkpoint
from qkv.marian import convert
from qkv.search import Limits, beam_search, greedy, model_step

V, EOS, UNK, PAD = 8000, 0, 1, 7999
SIZES = {
    "small": dict(d_model=256, layers=3, heads=8, ffn=1024),
    "base": dict(d_model=512, layers=6, heads=8, ffn=2048),
}


def hf_model(size: str) -> transformers.MarianMTModel:
    s = SIZES[size]
    cfg = transformers.MarianConfig(
        vocab_size=V,
        d_model=s["d_model"],
        encoder_layers=s["layers"],
        decoder_layers=s["layers"],
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["ffn"],
        decoder_ffn_dim=s["ffn"],
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.MarianMTModel(cfg).eval()


class _Vocab:
    """The little of a tokenizer CTranslate2's Marian converter reads: the vocabulary."""

    eos_token, unk_token, pad_token = "</s>", "<unk>", "<pad>"

    def get_vocab(self) -> dict[str, int]:
        vocab = {f"t{i}": i for i in range(V)}
        vocab.update({"</s>": EOS, "<unk>": UNK, "<pad>": PAD})
        return {t: i for t, i in vocab.items() if t not in (f"t{EOS}", f"t{UNK}", f"t{PAD}")}


def ct2_convert(hf_dir: Path, out: Path, quantization: str | None) -> Path | None:
    try:
        import ctranslate2.converters as conv
    except ImportError:
        return None

    class Converter(conv.TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):  # type: ignore[override]
            return _Vocab()

    Converter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    return out


def token_name(i: int) -> str:
    return {EOS: "</s>", UNK: "<unk>", PAD: "<pad>"}.get(i, f"t{i}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src-len", type=int, default=20)
    ap.add_argument("--out-len", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="beam5,greedy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="qkv-speed-"))
    hf = hf_model(args.size)
    hf.save_pretrained(tmp / "hf")
    ours, _, _ = checkpoint.load(convert(tmp / "hf", tmp / "qkv"))
    ours.eval()
    ct2_dirs = {
        "ct2-fp32": ct2_convert(tmp / "hf", tmp / "ct2-fp32", None),
        "ct2-int8": ct2_convert(tmp / "hf", tmp / "ct2-int8", "int8"),
    }

    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, V - 1, (args.sentences, args.src_len + 1), generator=g)
    src[:, -1] = EOS
    batches = [src[i : i + args.batch] for i in range(0, len(src), args.batch)]
    n_out = args.out_len

    def run_qkv(beam: int) -> list[list[int]]:
        limits = Limits(max_len_a=0, max_len_b=n_out, min_len=n_out, at_max="stop")
        out = []
        with torch.inference_mode():
            for x in batches:
                lengths = torch.full((len(x),), x.shape[1])
                state, kw = ours.start(x), dict(bos=PAD, eos=EOS, pad=PAD, limits=limits)
                if beam == 1:
                    out += [h.tokens for h in greedy(model_step(ours), state, lengths, **kw)]
                else:
                    hyps = beam_search(
                        model_step(ours),
                        state,
                        lengths,
                        beam=beam,
                        alpha=1.0,
                        penalty="power",
                        **kw,
                    )
                    out += [n[0].tokens for n in hyps]
        return out

    def run_hf(beam: int) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for x in batches:
                y = hf.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    num_beams=beam,
                    do_sample=False,
                    min_new_tokens=n_out,
                    max_new_tokens=n_out,
                    length_penalty=1.0,
                    early_stopping=False,
                    bad_words_ids=[[PAD]],
                )
                out += [row[1:] for row in y.tolist()]
        return out

    translators = {}
    for name, d in ct2_dirs.items():
        if d is not None:
            import ctranslate2

            compute = "int8" if name.endswith("int8") else "float32"
            translators[name] = ctranslate2.Translator(
                str(d), device="cpu", compute_type=compute, intra_threads=args.threads
            )
    tokens = [[[token_name(i) for i in row] for row in x.tolist()] for x in batches]
    ids = {token_name(i): i for i in range(V)}

    def run_ct2(name: str, beam: int) -> list[list[int]]:
        out = []
        for toks in tokens:
            res = translators[name].translate_batch(
                toks,
                beam_size=beam,
                min_decoding_length=n_out,
                max_decoding_length=n_out,
                length_penalty=1.0,
                max_batch_size=args.batch,
            )
            out += [[ids[t] for t in r.hypotheses[0]] for r in res]
        return out

    engines = {"qkv": run_qkv, "hf": run_hf}
    engines.update({n: (lambda beam, n=n: run_ct2(n, beam)) for n in translators})
    print(
        f"size {args.size}, {args.sentences} sentences, batch {args.batch}, source {args.src_len}"
        f"+eos tokens, {n_out} output tokens, {args.threads} threads, torch {torch.__version__}"
    )
    for mode in args.modes.split(","):
        beam = 1 if mode == "greedy" else int(mode.removeprefix("beam"))
        best: dict[str, float] = {}
        outputs: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):
            for name, fn in engines.items():  # alternated, so drifts hit every engine alike
                t0 = time.perf_counter()
                outputs[name] = fn(beam)
                rate = args.sentences / (time.perf_counter() - t0)
                best[name] = max(best.get(name, 0.0), rate)
        lengths = {name: {len(o) for o in outs} for name, outs in outputs.items()}
        print(f"\n{mode}: output lengths {lengths}")
        print(f"{'engine':10} {'sent/s':>8} {'qkv / it':>9} {'same as qkv':>12}")
        for name, rate in best.items():
            same = sum(a == b for a, b in zip(outputs[name], outputs["qkv"], strict=True))
            print(
                f"{name:10} {rate:8.1f} {best['qkv'] / rate:8.2f}x "
                f"{100 * same / args.sentences:11.0f}%"
            )


if __name__ == "__main__":
    main()
