"""The `qkv` command line. Each subcommand is a small function over the library; bad input ends
in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .config import ConfigError


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
    except (UsageError, ConfigError) as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
