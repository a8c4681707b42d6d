"""Translation speed on identical weights: qkv vs HF transformers `generate` vs CTranslate2.

A random-init HF MarianMTModel (vocabulary 8k) is saved, converted to qkv (`qkv.marian.convert`)
and to CTranslate2 (its own converter), and all engines translate the same random sources with
forced equal output lengths (min = max = --out-len new tokens), so every engine generates the
same number of tokens. qkv runs as `qkv translate` does (linear layers prepacked, qkv.packed) and
with 8-bit weights (`--int8`); on a CPU with bf16 units also with bf16 weights ("qkv-bf16", as
`qkv translate --precision bf16` runs it), against CTranslate2's compute types for the CPU.
Each engine runs in its own process (in one process,
CTranslate2's OpenMP threads slow PyTorch's down by 20-25% after each of its runs, and the
reverse may hold); runs are alternated between engines, with a pause between them, and
repeated; the best of the repeats counts. Output: sentences/s per engine and the ratios, plus
how many outputs are token-identical to qkv's.

    .venv/bin/python bench/translate_speed.py --size small
    .venv/bin/python bench/translate_speed.py --size base --sentences 128 --repeats 2

Needs transformers (the [test] extra) and ctranslate2 (`pip install ctranslate2`, optional:
left out when missing).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
import transformers

from qkv import checkpoint
from qkv.allocator import keep_freed_memory
from qkv.config import DecodeConfig
from qkv.fixed import FixedDecoder, use_disk_cache
from qkv.marian import convert
from qkv.packed import pack
from qkv.precision import bf16_units
from qkv.search import beam_search, greedy, max_steps, model_step

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


def forced(beam: int, n: int = 25) -> DecodeConfig:
    """How every engine decodes here: exactly n new tokens (min = max), HF's length penalty."""
    return DecodeConfig(
        beam=beam, alpha=1.0, penalty="power", max_len_a=0, max_len_b=n, min_len=n, at_max="stop"
    )


def token_name(i: int) -> str:
    return {EOS: "</s>", UNK: "<unk>", PAD: "<pad>"}.get(i, f"t{i}")


def sources(args: argparse.Namespace) -> list[torch.Tensor]:
    """The same random source batches in every process."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, V - 1, (args.sentences, args.src_len + 1), generator=g)
    src[:, -1] = EOS
    return [src[i : i + args.batch] for i in range(0, len(src), args.batch)]


def qkv_engine(
    model_dir: Path, int8: bool, args: argparse.Namespace, compiled: bool = False, bf16=False
):
    # as `qkv translate` runs it: linear layers prepacked (8-bit with --int8, bf16 with
    # --precision bf16); or as `qkv translate --compile`: fixed-shape decoding compiled by
    # inductor (the plain model)
    model = checkpoint.load(model_dir)[0].eval() if compiled else None
    fixed = FixedDecoder(model, compile=True) if compiled else None
    model = model or pack(checkpoint.load(model_dir)[0], int8=int8, bf16=bf16)
    batches, n = sources(args), args.out_len
    kw = dict(bos=PAD, eos=EOS, pad=PAD)

    def run(beam: int, n_batches: int) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for x in batches[:n_batches]:
                lengths = torch.full((len(x),), x.shape[1])
                cfg = forced(beam, n)
                if fixed is None:
                    # the cache's room reserved, as qkv translate does
                    step, state = model_step(model), model.start(x, max_steps(cfg, lengths, None))
                else:
                    step, state = fixed.start(x, max_steps(cfg, lengths, None), beam)
                if beam == 1:
                    out += [h.tokens for h in greedy(step, state, lengths, cfg, **kw)]
                else:
                    hyps = beam_search(step, state, lengths, cfg, **kw)
                    out += [n[0].tokens for n in hyps]
        return out

    return run


def hf_engine(hf_dir: Path, args: argparse.Namespace):
    hf = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    batches, n = sources(args), args.out_len

    def run(beam: int, n_batches: int) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for x in batches[:n_batches]:
                y = hf.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    num_beams=beam,
                    do_sample=False,
                    min_new_tokens=n,
                    max_new_tokens=n,
                    length_penalty=1.0,
                    early_stopping=False,
                    bad_words_ids=[[PAD]],
                )
                out += [row[1:] for row in y.tolist()]
        return out

    return run


def ct2_engine(ct2_dir: Path, int8: bool, args: argparse.Namespace):
    import ctranslate2

    translator = ctranslate2.Translator(
        str(ct2_dir),
        device="cpu",
        compute_type="int8" if int8 else "float32",
        intra_threads=args.threads,
    )
    tokens = [[[token_name(i) for i in row] for row in x.tolist()] for x in sources(args)]
    ids = {token_name(i): i for i in range(V)}

    def run(beam: int, n_batches: int) -> list[list[int]]:
        out = []
        for toks in tokens[:n_batches]:
            res = translator.translate_batch(
                toks,
                beam_size=beam,
                min_decoding_length=args.out_len,
                max_decoding_length=args.out_len,
                length_penalty=1.0,
                max_batch_size=args.batch,
            )
            out += [[ids[t] for t in r.hypotheses[0]] for r in res]
        return out

    return run


def worker(name: str, tmp: Path, args: argparse.Namespace, conn) -> None:
    """One engine in its own process: for each (beam size, number of batches) received, run and
    send back (seconds, outputs); None ends it."""
    torch.set_num_threads(args.threads)
    if name.startswith("qkv"):
        keep_freed_memory()  # as the qkv command runs (qkv/allocator.py)
    match name:
        case "qkv" | "qkv-int8" | "qkv-bf16":
            run = qkv_engine(tmp / "qkv", name == "qkv-int8", args, bf16=name == "qkv-bf16")
        case "qkv-compiled":
            use_disk_cache()
            run = qkv_engine(tmp / "qkv", False, args, compiled=True)
        case "hf":
            run = hf_engine(tmp / "hf", args)
        case _:
            run = ct2_engine(tmp / name, name == "ct2-int8", args)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        t0 = time.perf_counter()
        out = run(*msg)
        conn.send((time.perf_counter() - t0, out))


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
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    ap.add_argument(
        "--compiled", action="store_true", help="also qkv --compile (minutes of compiling first)"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qkv-speed-"))
    hf_model(args.size).save_pretrained(tmp / "hf")
    convert(tmp / "hf", tmp / "qkv")
    names = ["qkv", "qkv-int8", "hf"] + (["qkv-compiled"] if args.compiled else [])
    names += ["qkv-bf16"] if bf16_units(torch.device("cpu")) else []
    for name, quant in (("ct2-fp32", None), ("ct2-int8", "int8")):
        if ct2_convert(tmp / "hf", tmp / name, quant) is not None:
            names.append(name)

    ctx = mp.get_context("spawn")
    conns = {}
    for name in names:
        ours, theirs = ctx.Pipe()
        ctx.Process(target=worker, args=(name, tmp, args, theirs), daemon=True).start()
        conns[name] = ours
    for conn in conns.values():
        assert conn.recv() == "ready"

    print(
        f"size {args.size}, {args.sentences} sentences, batch {args.batch}, source {args.src_len}"
        f"+eos tokens, {args.out_len} output tokens, {args.threads} threads, "
        f"torch {torch.__version__}, one process per engine"
    )
    all_batches = -(-args.sentences // args.batch)  # ceil
    for mode in args.modes.split(","):
        beam = 1 if mode == "greedy" else int(mode.removeprefix("beam"))
        best: dict[str, float] = {}
        outputs: dict[str, list[list[int]]] = {}
        for name, conn in conns.items():  # warm-up (pack weights, allocate, compile): 1 batch
            t0 = time.perf_counter()
            conn.send((beam, 1))
            conn.recv()
            if name == "qkv-compiled":
                print(
                    f"{mode}: qkv-compiled's first batch, compiling: "
                    f"{time.perf_counter() - t0:.1f} s"
                )
        for _ in range(args.repeats):
            for name, conn in conns.items():  # alternated, so drifts hit every engine alike
                time.sleep(args.pause)  # let the previous engine's threads go idle
                conn.send((beam, all_batches))
                seconds, outputs[name] = conn.recv()
                best[name] = max(best.get(name, 0.0), args.sentences / seconds)
        lengths = {name: {len(o) for o in outs} for name, outs in outputs.items()}
        print(f"\n{mode}: output lengths {lengths}")
        ours = [n for n in ("qkv", "qkv-int8", "qkv-bf16") if n in best]
        print(f"{'engine':12} {'sent/s':>8}" + "".join(f" {n + ' / it':>14}" for n in ours), end="")
        print(f" {'same as qkv':>12}")
        for name, rate in best.items():
            same = sum(a == b for a, b in zip(outputs[name], outputs["qkv"], strict=True))
            print(
                f"{name:12} {rate:8.1f}" + "".join(f" {best[n] / rate:13.2f}x" for n in ours),
                end="",
            )
            print(f" {100 * same / args.sentences:11.0f}%")
    for conn in conns.values():
        conn.send(None)


if __name__ == "__main__":
    main()
