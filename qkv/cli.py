"""The `qkv` command line. Each subcommand is a small function over the library; bad input ends
in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .checkpoint import CheckpointError, write_text_atomic
from .config import ConfigError
from .data import DataError
from .marian import MarianImportError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a hint), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SHADES = " .:-=+*#%@"


def _shade(w: float) -> str:
    return SHADES[min(int(w * len(SHADES)), len(SHADES) - 1)]


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .inspect import record_attention
    from .models import count_parameters, from_config

    words = args.sentence.split()
    if not words:
        raise UsageError("demo: the sentence is empty")
    vocab = ["<pad>", "<s>", "</s>"] + sorted(set(words))
    ids = torch.tensor([[vocab.index(w) for w in words]])
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=args.d_model, n_heads=args.heads, dropout=0.0)
    model = from_config(cfg).eval()
    print(
        f"model: {cfg.arch}, d_model={cfg.d_model}, heads={cfg.n_heads}, "
        f"layers={cfg.n_encoder_layers}+{cfg.n_decoder_layers}, "
        f"{count_parameters(model):,} parameters"
    )
    tgt = torch.tensor([[cfg.bos_id] + ids[0, :-1].tolist()])
    with torch.no_grad(), record_attention(model) as rec:
        model(ids, tgt)
    w = rec.last("encoder.layers.0.self_attn")[0]  # (H, S, S)
    print(
        f"\nencoder layer 0 self-attention of {args.sentence!r} (untrained weights; "
        f"darker = more weight, shades {SHADES!r}); each row sums to 1:"
    )
    width = max(map(len, words))
    for h in range(min(args.show_heads, cfg.n_heads)):
        print(f"\nhead {h}")
        print(" " * (width + 1) + " ".join(word[:3].ljust(3) for word in words))
        for i, word in enumerate(words):
            cells = " ".join(_shade(float(x)) * 3 for x in w[h, i])
            print(f"{word.rjust(width)} {cells}   max {float(w[h, i].max()):.2f}")
    print(f"\nrecorded {len(rec)} attention modules:", ", ".join(sorted(rec)))
    return 0


# --- train ------------------------------------------------------------------------------------

# Model fields that training derives from the data (the tokenizer decides them), so no flag.
DERIVED = {
    "arch",
    "vocab_size",
    "tgt_vocab_size",
    "share_embeddings",
    "pad_id",
    "bos_id",
    "eos_id",
    "n_classes",
}


def _field_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str], prefix: str) -> None:
    """One --flag per config field, so every field can be overridden from the command line."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": None, "metavar": "X"}
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=typing.get_args(tp), metavar=None)
        elif tp is bool:
            kwargs.update(type=_bool, metavar="true|false")
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif args and args[0] in (int, float, str):  # X | None
            kwargs["type"] = args[0]
        elif typing.get_origin(tp) is tuple:
            kwargs.update(type=_floats, metavar="A,B")
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.9,0.98, got {text!r}") from None


def _overrides(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {
        k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None
    }


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ModelConfig, TrainConfig, from_dict, to_dict
    from .presets import PRESETS
    from .train import read_run_config, train

    out = Path(args.out)
    if args.resume:
        run_file = out / "train_config.json"
        if not run_file.is_file():
            raise UsageError(f"{out}: nothing to resume (no train_config.json)")
        model_cfg, train_cfg = read_run_config(run_file)
        # a resumed run may get a new time or step budget, nothing else
        budget = {
            k: v
            for k, v in _overrides(args, "t_").items()
            if k in ("max_minutes", "max_steps", "max_epochs", "threads")
        }
        train_cfg = train_cfg.replace(**budget)
    else:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        model_cfg, train_cfg = PRESETS[args.preset]
        if args.config:
            import json

            try:
                data = json.loads(Path(args.config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UsageError(f"{args.config}: cannot read JSON config ({e})") from None
            if not isinstance(data, dict) or set(data) - {"model", "train"}:
                raise UsageError(f"{args.config}: expected an object with 'model' and/or 'train'")
            model_cfg = from_dict(
                ModelConfig, {**to_dict(model_cfg), **data.get("model", {})}, source=args.config
            )
            train_cfg = from_dict(
                TrainConfig, {**to_dict(train_cfg), **data.get("train", {})}, source=args.config
            )
        data_flags = {
            "src": "src_file",
            "tgt": "tgt_file",
            "tsv": "tsv_file",
            "valid_src": "valid_src_file",
            "valid_tgt": "valid_tgt_file",
        }
        files = {data_flags[k]: getattr(args, k) for k in data_flags if getattr(args, k)}
        if files.get("src_file") or files.get("tsv_file"):
            files["dataset"] = None
        model_cfg = model_cfg.replace(**_overrides(args, "m_"))
        train_cfg = train_cfg.replace(**{**_overrides(args, "t_"), **files})
        if (out / "last").exists() and not args.overwrite:
            raise UsageError(f"{out} already holds a training run; use --resume or --overwrite")
    train(model_cfg, train_cfg, out, resume=args.resume)
    return 0


# --- translate and evaluate -------------------------------------------------------------------


def _load_translator(path: str, int8: bool = False):
    from .checkpoint import load
    from .packed import available
    from .translate import Translator

    if int8 and not available(int8=True):
        raise UsageError("--int8: this PyTorch build has no fbgemm int8 kernels")

    model, tok, meta = load(path)
    if tok is None:
        raise UsageError(f"{path}: the model directory has no tokenizer.json")
    if not hasattr(model, "step") or not hasattr(model, "encode"):
        raise UsageError(f"{path}: not an encoder-decoder model")
    return Translator(model, tok, int8), meta


def _decode_options(args: argparse.Namespace):
    from .translate import DecodeOptions

    if args.beam < 1 or args.batch_size < 1:
        raise UsageError("--beam and --batch-size must be >= 1")
    if not 1 <= args.nbest <= args.beam and not (args.greedy or args.sample):
        raise UsageError(f"--nbest must be between 1 and --beam ({args.beam})")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be > 0 and --top-p in (0, 1]")
    return DecodeOptions(
        beam=args.beam,
        alpha=args.alpha,
        nbest=args.nbest,
        greedy=args.greedy,
        sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        min_len=args.min_len,
        no_repeat_ngram=args.no_repeat_ngram,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=5, help="beam size (1 = greedy)")
    g.add_argument("--greedy", action="store_true", help="greedy search")
    g.add_argument("--sample", action="store_true", help="sample instead of searching")
    g.add_argument("--nbest", type=int, default=1, help="hypotheses per sentence (beam search)")
    g.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-len-a", type=float, default=1.5, help="max length = a * src_len + b")
    g.add_argument("--max-len-b", type=int, default=10)
    g.add_argument("--min-len", type=int, default=0)
    g.add_argument("--no-repeat-ngram", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0, help="for --sample")
    g.add_argument(
        "--int8",
        action="store_true",
        help="8-bit weights in the large linear layers (faster on CPU; BLEU within 0.3 here)",
    )


def _read_input(path: str | None) -> list[str]:
    if path is None:
        try:
            return sys.stdin.read().splitlines()
        except UnicodeDecodeError:
            raise UsageError("stdin: invalid UTF-8") from None
    from .data import read_lines

    return read_lines(path)


def cmd_translate(args: argparse.Namespace) -> int:
    translator, _ = _load_translator(args.model, args.int8)
    opts = _decode_options(args)
    lines = _read_input(args.input)
    if args.trace:
        _write_trace(translator, lines, opts, args.trace)
    results = translator.translate(lines, opts)
    if opts.nbest > 1:
        out = "".join(
            f"{i} ||| {t.text} ||| {t.score:.4f}\n"
            for i, nbest in enumerate(results)
            for t in nbest
        )
    else:
        out = "".join(nbest[0].text + "\n" for nbest in results)
    if args.output:
        write_text_atomic(args.output, out)
    else:
        sys.stdout.write(out)
    return 0


def _write_trace(translator, lines: list[str], opts, path: str) -> None:
    import json

    from .html import beam_page

    if not path.endswith((".html", ".json")):
        raise UsageError("--trace must name a .html or .json file")
    if opts.greedy or opts.sample or opts.beam < 2:
        raise UsageError("--trace needs beam search (--beam 2 or more)")
    trace = translator.trace(lines, opts)
    text = beam_page(trace) if path.endswith(".html") else json.dumps(trace)
    write_text_atomic(path, text)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import multi30k, read_lines
    from .evaluate import score

    if args.hyp or args.ref:
        if not (args.hyp and args.ref):
            raise UsageError("give both --hyp and --ref")
        hyps, refs = read_lines(args.hyp), read_lines(args.ref)
        if len(hyps) != len(refs):
            raise UsageError(f"{args.hyp} has {len(hyps)} lines but {args.ref} has {len(refs)}")
        print(score(hyps, refs).summary())
        return 0
    if not args.model:
        raise UsageError("give --model DIR (with --split) or --hyp FILE --ref FILE")
    translator, meta = _load_translator(args.model, args.int8)
    src_lang = args.src_lang or meta.get("src_lang")
    tgt_lang = args.tgt_lang or meta.get("tgt_lang")
    if not (src_lang and tgt_lang):
        raise UsageError("the model does not name its languages; give --src-lang and --tgt-lang")
    pairs = multi30k(args.split, src_lang, tgt_lang, args.data_dir)
    if args.limit:
        pairs = pairs[: args.limit]
    opts = _decode_options(args)
    import time

    t0 = time.monotonic()
    hyps = [n[0].text for n in translator.translate([s for s, _ in pairs], opts)]
    seconds = time.monotonic() - t0
    mode = "greedy" if opts.greedy or opts.beam == 1 else f"beam {opts.beam}"
    print(
        f"multi30k {args.split} {src_lang}->{tgt_lang}, {len(pairs)} sentences, {mode}, "
        f"{len(pairs) / seconds:.1f} sentences/s"
    )
    print(score(hyps, [t for _, t in pairs]).summary())
    for (src, ref), hyp in list(zip(pairs, hyps, strict=True))[: args.show]:
        print(f"\n  src: {src}\n  ref: {ref}\n  hyp: {hyp}")
    if args.output:
        write_text_atomic(args.output, "".join(h + "\n" for h in hyps))
    return 0


# --- explain and probe ------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from . import plot
    from .explain import explain
    from .html import attention_page

    if not args.sentence.strip():
        raise UsageError("explain: the sentence is empty")
    translator, _ = _load_translator(args.model, args.int8)
    opts = _decode_options(args)
    e = explain(translator, args.sentence, opts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    axes = {
        "encoder self": (e.src_tokens, e.src_tokens),
        "decoder self": (e.tgt_in, e.tgt_in),
        "cross": (e.src_tokens, e.tgt_in),
    }
    written = []
    for kind, layers in e.attention.items():
        x, y = axes[kind]
        name = kind.replace(" ", "_")
        written.append(plot.attention_grid(layers, x, y, f"{kind} attention", out / f"{name}.png"))
    cross = e.alignment()
    written.append(
        plot.alignment(
            cross,
            e.src_tokens,
            e.tgt_out,
            "cross-attention alignment (mean of all layers and heads)",
            out / "alignment.png",
        )
    )
    data = e.to_json()
    page = out / "attention.html"
    write_text_atomic(str(page), attention_page(data))
    written.append(page)
    if args.json:
        write_text_atomic(str(out / "attention.json"), json.dumps(data))
        written.append(out / "attention.json")
    print(e.translation)
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return 0


def cmd_import_marian(args: argparse.Namespace) -> int:
    from .marian import convert

    out = convert(args.src, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .data import multi30k
    from .probe import run_probe

    if args.sentences < 1:
        raise UsageError("--sentences must be >= 1")
    translator, meta = _load_translator(args.model)
    src_lang = args.src_lang or meta.get("src_lang")
    tgt_lang = args.tgt_lang or meta.get("tgt_lang")
    if args.src and args.tgt:
        from .data import read_parallel

        pairs = read_parallel(args.src, args.tgt)
    elif src_lang and tgt_lang:
        pairs = multi30k(args.split, src_lang, tgt_lang, args.data_dir)
    else:
        raise UsageError("give --src and --tgt files, or --src-lang and --tgt-lang")
    import random

    pairs = random.Random(args.seed).sample(pairs, min(args.sentences, len(pairs)))
    run_probe(
        translator,
        pairs,
        args.out,
        beam=args.beam,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qkv",
        description="Attention and the Transformer, with the inner workings visible.",
        epilog="example: qkv demo 'the cat sat on the mat'",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    d = sub.add_parser(
        "demo",
        help="build a small model and show attention weights of a toy sentence",
        description="Build a small encoder-decoder, print its size and the attention weights "
        "that each head of encoder layer 0 gives a toy sentence.",
        epilog="example: qkv demo 'the cat sat on the mat' --show-heads 2",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("sentence", nargs="?", default="the cat sat on the mat")
    d.add_argument("--d-model", type=int, default=256)
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--show-heads", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    from .config import ModelConfig, TrainConfig
    from .presets import PRESETS

    t = sub.add_parser(
        "train",
        help="train a translation model",
        description="Train an encoder-decoder on parallel text: a named data set (Multi30k) or "
        "your own files. Shows loss, lr, tokens/s and ETA; keeps the best checkpoint in "
        "OUT/best and a resumable one in OUT/last.",
        epilog="examples:\n  qkv train --preset multi30k-de-en --out runs/de-en --max-minutes 60\n"
        "  qkv train --preset multi30k-de-en --src my.de --tgt my.en --out runs/mine\n"
        "  qkv train --out runs/de-en --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--preset", default="multi30k-de-en", help=f"one of: {', '.join(PRESETS)}")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--config", help='JSON file {"model": {...}, "train": {...}} over the preset')
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if --out has a run")
    t.add_argument("--src", help="your source file, one sentence per line (plain or .gz)")
    t.add_argument("--tgt", help="your target file, line-aligned with --src")
    t.add_argument("--tsv", help="or one file of source<TAB>target lines")
    t.add_argument("--valid-src", help="validation source file (default: held out from --src)")
    t.add_argument("--valid-tgt", help="validation target file")
    _field_flags(
        t,
        TrainConfig,
        {"src_file", "tgt_file", "tsv_file", "valid_src_file", "valid_tgt_file"},
        "t_",
    )
    _field_flags(t, ModelConfig, DERIVED, "m_")
    t.set_defaults(func=cmd_train)

    tr = sub.add_parser(
        "translate",
        help="translate text with a trained model",
        description="Translate lines from stdin (or --input) to stdout (or --output).",
        epilog="examples:\n  echo 'Ein Mann fährt Fahrrad.' | qkv translate --model runs/de-en\n"
        "  qkv translate --model runs/de-en --input in.de --output out.en --beam 5 --nbest 3\n"
        "  qkv translate --model runs/de-en --int8 < in.de    # 8-bit weights: faster on CPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--model", required=True, help="model directory (or a training --out)")
    tr.add_argument("--input", help="file to translate (default: stdin)")
    tr.add_argument("--output", help="file to write (default: stdout)")
    tr.add_argument("--trace", help="write the beam-search tree to this .html or .json file")
    _add_decode_flags(tr)
    tr.set_defaults(func=cmd_translate)

    ev = sub.add_parser(
        "evaluate",
        help="score a model on a data set split, or hypothesis/reference files",
        description="Cased, detokenized sacreBLEU and chrF (with signatures), plus lowercased "
        "13a-tokenized BLEU as older papers report it.",
        epilog="examples:\n  qkv evaluate --model runs/de-en --split test_2016_flickr\n"
        "  qkv evaluate --hyp out.en --ref ref.en",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--model", help="model directory (or a training --out)")
    ev.add_argument("--split", default="test_2016_flickr", help="train, val or test_2016_flickr")
    ev.add_argument("--src-lang", help="default: the model's")
    ev.add_argument("--tgt-lang", help="default: the model's")
    ev.add_argument("--data-dir", help="where to look for data sets first")
    ev.add_argument("--limit", type=int, default=0, help="only the first N sentences")
    ev.add_argument("--show", type=int, default=3, help="print N example translations")
    ev.add_argument("--output", help="also write the translations here")
    ev.add_argument("--hyp", help="hypothesis file (instead of --model)")
    ev.add_argument("--ref", help="reference file")
    _add_decode_flags(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser(
        "explain",
        help="translate a sentence and show every head's attention",
        description="Translate one sentence and capture all attention (encoder self, decoder "
        "self, cross) for every layer and head along the output: PNG grids, a cross-attention "
        "alignment, and one self-contained HTML page (works offline, opened from disk).",
        epilog="example:\n  qkv explain --model runs/de-en 'Ein Mann fährt Fahrrad.' --out ex/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("sentence")
    ex.add_argument("--model", required=True, help="model directory (or a training --out)")
    ex.add_argument("--out", default="explain", help="directory for the pictures and the page")
    ex.add_argument("--json", action="store_true", help="also write the raw weights as JSON")
    _add_decode_flags(ex)
    ex.set_defaults(func=cmd_explain, beam=1)

    pr = sub.add_parser(
        "probe",
        help="measure focus, redundancy, mitigation, receptive field on validation data",
        description="One report (markdown + PNG + JSON) answering the explainers' claims with "
        "numbers: head focus, head redundancy and pruning, what skip connections and other "
        "layers absorb, receptive field by depth, beam vs greedy.",
        epilog="example:\n  qkv probe --model runs/de-en --out probe/ --sentences 200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("--model", required=True, help="model directory (or a training --out)")
    pr.add_argument("--out", default="probe", help="directory for report.md, report.json, PNGs")
    pr.add_argument("--sentences", type=int, default=200, help="validation subsample size")
    pr.add_argument("--split", default="val", help="Multi30k split (default val)")
    pr.add_argument("--src", help="or your own source file")
    pr.add_argument("--tgt", help="and its reference file")
    pr.add_argument("--src-lang", help="default: the model's")
    pr.add_argument("--tgt-lang", help="default: the model's")
    pr.add_argument("--data-dir", help="where to look for data sets first")
    pr.add_argument("--beam", type=int, default=5, help="beam size for the beam-vs-greedy line")
    pr.add_argument("--seed", type=int, default=0, help="for the subsample")
    pr.set_defaults(func=cmd_probe)

    im = sub.add_parser(
        "import-marian",
        help="convert a Hugging Face MarianMTModel (OPUS-MT) directory into a qkv model",
        description="Convert config.json + model.safetensors (or pytorch_model.bin, read with "
        "weights_only) + the sentencepiece vocabulary into a qkv model directory, usable by "
        "translate, evaluate, explain and probe.",
        epilog="example:\n  qkv import-marian opus-mt-de-en/ --out models/opus-de-en",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    im.add_argument("src", help="the Hugging Face model directory")
    im.add_argument("--out", required=True, help="the qkv model directory to write")
    im.set_defaults(func=cmd_import_marian)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (UsageError, ConfigError, DataError, CheckpointError, MarianImportError) as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
