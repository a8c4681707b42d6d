"""Command-line flags from the config dataclasses: one --flag per field, with the field's meaning
and default in --help, and the decoding flags read back into one DecodeConfig (contradictions
are usage errors, not guesses). Also the parser that prints usage errors in one line, and what
every command shares: --model and --device, loading a model directory, reading input lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, NoReturn

import torch

from .config import DecodeConfig, help_of
from .data import read_lines


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a hint), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command(sub, name: str, summary: str, description: str, examples: list[str]) -> Parser:
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- flags generated from the config dataclasses ----------------------------------------------


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_floats(text: str) -> tuple[float, ...]:
    if text.lower() == "none":
        return ()
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.9,0.98, got {text!r}") from None


def config_flags(
    p: argparse.ArgumentParser,
    cls: type,
    prefix: str,
    title: str,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    shown_defaults: dict[str, Any] | None = None,
) -> None:
    """One --flag per config field; the value stays None unless given (the config decides)."""
    group = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, default = hints[f.name], (shown_defaults or {}).get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None, "metavar": "X"}
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=typing.get_args(tp), metavar=None)
        elif tp is bool:
            kwargs.update(type=parse_bool, metavar="true|false")
        elif typing.get_origin(tp) is tuple:
            kwargs.update(type=parse_floats, metavar="A,B")
            default = ",".join(map(str, default)) or "none"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif args and args[0] in (int, float, str):  # X | None
            kwargs["type"] = args[0]
        kwargs["help"] = f"{help_of(f)} (default {default})"
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {
        k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None
    }


# --- decoding and inference -------------------------------------------------------------------

SAMPLING = ("temperature", "top_k", "top_p", "seed")


def add_decode_flags(p: argparse.ArgumentParser, strategy: str = "beam") -> None:
    config_flags(p, DecodeConfig, "d_", "decoding", shown_defaults={"strategy": strategy})
    g = p.add_argument_group("decoding shortcuts and inference")
    g.add_argument("--greedy", action="store_true", help="same as --strategy greedy")
    g.add_argument("--sample", action="store_true", help="same as --strategy sample")
    add_batch_size_flag(g)
    add_device_flag(g)
    g.add_argument(
        "--int8",
        action="store_true",
        help="8-bit weights in the linear layers (CPU; on PyTorch's int8 product, the large ones)",
    )
    add_precision_flag(g)
    p.set_defaults(default_strategy=strategy)


def add_device_flag(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")


def add_batch_size_flag(p) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")


def add_precision_flag(p) -> None:
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the large linear layers' number format on the CPU; auto: bf16 only where the "
        "CPU has bf16 units and a quick measurement finds it faster, else fp32 (default auto)",
    )


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="fixed-shape decoding compiled with torch.compile (qkv/fixed.py): same outputs, "
        "but 10-40 s of compiling per batch shape the first time (graphs and kernels cached "
        "under ~/.cache/qkv/inductor: a later run takes a few seconds per shape); not faster "
        "than the default on an AVX2 CPU; see bench/README.md",
    )


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    """The DecodeConfig the flags ask for; contradictions are usage errors, not guesses."""
    values = given(args, "d_")
    chosen = {s for s, on in (("greedy", args.greedy), ("sample", args.sample)) if on}
    if "strategy" in values:
        chosen.add(values["strategy"])
    if len(chosen) > 1:
        raise UsageError(f"choose one decoding strategy, not {' and '.join(sorted(chosen))}")
    if not chosen and ("beam" in values or "nbest" in values):
        chosen.add("beam")  # --beam 5 alone asks for beam search
    strategy = chosen.pop() if chosen else args.default_strategy
    for name in ("beam", "nbest"):
        if name in values and strategy != "beam":
            raise UsageError(f"--{name} applies to beam search, not {strategy}")
    for name in SAMPLING:
        if name in values and strategy != "sample":
            flag = name.replace("_", "-")
            raise UsageError(f"--{flag} applies to sampling (--sample), not {strategy}")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    cfg = DecodeConfig(**{**values, "strategy": strategy})
    stored = {k: v for k, v in stored_decoding(args).items() if k not in values}
    return cfg.replace(**stored) if stored else cfg


def stored_decoding(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding defaults --model keeps in its decoding.json (qkv.tuning; flags win)."""
    from .checkpoint import CheckpointError, resolve
    from .tuning import read

    model = getattr(args, "model", None)
    if not model:
        return {}
    try:
        path = resolve(model)
    except CheckpointError:
        return {}  # not a model directory: the loader says so, in its own words
    return read(path)


# --- what the commands share: a model directory, its device, the input lines ---------------


def device_of_flag(name: str) -> torch.device:
    from .models import pick_device

    try:
        return pick_device(name)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def load_model_dir(
    args: argparse.Namespace, task: str | None, int8: bool = False, packed: bool = True
):
    """(model on --device packed for inference, tokenizer, meta) of a model directory trained
    for `task` (None: for any task). `packed=False`: the plain model, in eval mode. The
    commands with --precision get bf16 weights where it asks for them (or auto finds them
    faster); the others stay fp32."""
    from .checkpoint import load
    from .packed import available, pack
    from .precision import for_decoding

    device = device_of_flag(args.device)
    if int8 and (device.type != "cpu" or not available(int8=True)):
        raise UsageError("--int8 needs the CPU and a PyTorch build with fbgemm int8 kernels")
    precision = getattr(args, "precision", "fp32")
    if precision == "bf16" and (int8 or not packed):
        other = "--int8" if int8 else "--compile"
        raise UsageError(f"--precision bf16 and {other} do not go together")
    check_precision(precision, device)
    model, tok, meta = load(args.model, device)
    trained_for = meta.get("task", "translation")
    if task is not None and trained_for != task:
        raise UsageError(f"{args.model}: a model for {trained_for}, not for {task}")
    if tok is None:
        raise UsageError(f"{args.model}: the model directory has no tokenizer")
    if not packed:
        return model.eval(), tok, meta
    bf16 = not int8 and for_decoding(model, precision, device) == "bf16"
    model = pack(model, int8, bf16=bf16)
    if precision == "auto" and bf16 and bf16_layers(model):  # outputs differ a little: say so
        print("qkv: bf16 weights (auto: faster here); --precision fp32 for fp32", file=sys.stderr)
    return model, tok, meta


def check_precision(precision: str, device: torch.device) -> None:
    """--precision bf16 asks for the packed CPU path: refused elsewhere, in one line."""
    from .packed import available

    if precision == "bf16" and (device.type != "cpu" or not available()):
        raise UsageError("--precision bf16 is for CPU inference with oneDNN (this device: fp32)")


def bf16_layers(model) -> int:
    """How many of the model's layers run on bf16 weights (small layers stay fp32)."""
    return sum(bool(getattr(getattr(m, "packed", None), "bf16", False)) for m in model.modules())


def load_translator(args: argparse.Namespace, int8: bool = False):
    """A Translator over a model directory, on --device, packed for CPU inference (or, with
    --compile, plain for inductor, which packs the weights its own way)."""
    from .translate import Translator

    compile = getattr(args, "compile", False)
    if compile and int8:
        raise UsageError("--compile and --int8 do not go together (int8 runs eagerly)")
    model, tok, meta = load_model_dir(args, "translation", int8, packed=not compile)
    if not hasattr(model, "step") or not hasattr(model, "encode"):
        raise UsageError(f"{args.model}: not an encoder-decoder model")
    fixed = None
    if compile:
        from .fixed import FixedDecoder, use_disk_cache
        from .models import EncoderDecoder

        if not isinstance(model, EncoderDecoder):
            raise UsageError(f"{args.model}: --compile decodes Transformer models only")
        use_disk_cache()
        fixed = FixedDecoder(model, compile=True)
    return Translator(model, tok, getattr(args, "batch_size", 64), fixed), meta


def task_of(model_dir: str) -> str:
    """What a model directory's model was trained for (its config.json's meta.task)."""
    from .checkpoint import read_config

    return read_config(model_dir)[1].get("task", "translation")


def model_flags(p: argparse.ArgumentParser, data: bool = False) -> None:
    """--model (and --device); with data, where the evaluation data comes from."""
    p.add_argument("--model", required=True, help="model directory (or a training --out)")
    if data:
        p.add_argument("--src-lang", help="default: the model's")
        p.add_argument("--tgt-lang", help="default: the model's")
        p.add_argument("--data-dir", help="where to look for data sets first")


def read_input(path: str | None) -> list[str]:
    if path is not None:
        return read_lines(path)
    try:
        return sys.stdin.read().splitlines()
    except UnicodeDecodeError:
        raise UsageError("stdin: invalid UTF-8") from None


def note_cut(tokenizer, lines: list[str], limit: int, source: str | None) -> None:
    """Say on stderr which input lines are longer than the model reads (`limit` tokens): they
    are cut, not refused, so one long line does not lose a whole file's results."""
    long = [n for n, ids in enumerate(tokenizer.encode_batch(lines), 1) if len(ids) > limit]
    if long:
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        print(
            f"qkv: note: {source or 'stdin'}:{long[0]}{more} is longer than the model's "
            f"{limit} tokens: only the first {limit} are read",
            file=sys.stderr,
        )
