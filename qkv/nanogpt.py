"""Import a nanoGPT character-level checkpoint (karpathy/nanoGPT, `ckpt.pt`) as a qkv language
model, so that both run on identical weights.

nanoGPT's GPT is qkv's DecoderOnly with learned positions, exact GELU, pre-LN, a tied output
and no embedding scale; with `bias=False` (nanoGPT's default) its linear layers and LayerNorms
have no biases, and neither has the imported model (ModelConfig.bias).
Its character vocabulary (meta.pkl, a pickle we do not open) is the sorted set of characters of
the training text, so it is rebuilt from that text. qkv's vocabulary puts four special tokens
first; nanoGPT has none, so their embeddings are zero and an output bias of -1e4 keeps them from
ever being predicted.

The checkpoint is read with `torch.load(weights_only=True)`: tensors and plain values only, no
code from the file runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .config import ModelConfig
from .data import read_text
from .models import DecoderOnly
from .tokenizer import SPECIALS, Characters

NEVER = -1e4  # output bias of the special tokens nanoGPT does not have


class NanoGPTImportError(ValueError):
    """A checkpoint that is not a nanoGPT character model; one line."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:100]


def model_config(args: dict) -> ModelConfig:
    """qkv's config for nanoGPT's `model_args`."""
    d = int(args["n_embd"])
    return ModelConfig(
        arch="decoder-only",
        vocab_size=len(SPECIALS) + int(args["vocab_size"]),
        d_model=d,
        n_heads=int(args["n_head"]),
        d_ff=4 * d,
        n_encoder_layers=0,
        n_decoder_layers=int(args["n_layer"]),
        dropout=0.0,
        activation="gelu",
        norm_first=True,
        positions="learned",
        max_len=int(args["block_size"]),
        scale_embedding=False,
        tie_output=True,
        output_bias=True,
        bias=bool(args.get("bias", True)),
    )


def convert_state(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """nanoGPT's state dict -> qkv DecoderOnly's."""
    sd = {k.removeprefix("_orig_mod."): v.float() for k, v in sd.items()}  # torch.compile'd
    d, n = cfg.d_model, len(SPECIALS)

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise NanoGPTImportError(f"not a nanoGPT checkpoint (or bias wrong): no {key}")
        return sd[key]

    wte = get("transformer.wte.weight")
    token = torch.cat([torch.zeros(n, d), wte])
    out = {
        "decoder.embed.token.weight": token,
        "decoder.embed.learned.weight": get("transformer.wpe.weight"),
        "decoder.norm.weight": get("transformer.ln_f.weight"),
        "lm_head.weight": token,
        "lm_head.bias": torch.cat([torch.full((n,), NEVER), torch.zeros(len(wte))]),
    }
    for i in range(cfg.n_decoder_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        qkv_w = get(src + "attn.c_attn.weight")  # (3D, D): q, k, v stacked
        qkv_b = get(src + "attn.c_attn.bias") if cfg.bias else None
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = qkv_w[j * d : (j + 1) * d]
            if qkv_b is not None:
                out[f"{dst}self_attn.{name}.bias"] = qkv_b[j * d : (j + 1) * d]
        pairs = {
            "attn.c_proj": "self_attn.out_proj",
            "mlp.c_fc": "ff.fc1",
            "mlp.c_proj": "ff.fc2",
            "ln_1": "attn_residual.norm",
            "ln_2": "ff_residual.norm",
        }
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"] = get(f"{src}{a}.weight")
            if cfg.bias:
                out[f"{dst}{b}.bias"] = get(f"{src}{a}.bias")
    if cfg.bias:
        out["decoder.norm.bias"] = get("transformer.ln_f.bias")
    return out


def convert(ckpt: str | Path, text: str | Path, out: str | Path) -> Path:
    """Write a qkv model directory for nanoGPT checkpoint `ckpt`, trained on `text`."""
    try:
        saved = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NanoGPTImportError(f"{ckpt}: no such file") from None
    except Exception as e:  # a pickle with code in it, or not a checkpoint at all
        raise NanoGPTImportError(
            f"{ckpt}: not a checkpoint torch.load(weights_only=True) can read ({_first_line(e)})"
        ) from None
    if not isinstance(saved, dict) or "model" not in saved or "model_args" not in saved:
        raise NanoGPTImportError(f"{ckpt}: not a nanoGPT checkpoint (no model / model_args)")
    chars = Characters.of(read_text(text))
    args = saved["model_args"]
    try:
        if len(chars.chars) != int(args["vocab_size"]):
            raise NanoGPTImportError(
                f"{text} has {len(chars.chars)} distinct characters but the checkpoint's "
                f"vocabulary is {args['vocab_size']}: not the text it was trained on"
            )
        cfg = model_config(args)
        model = DecoderOnly(cfg)
        model.load_state_dict(convert_state(saved["model"], cfg))
    except NanoGPTImportError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # missing or mis-shaped entries
        raise NanoGPTImportError(
            f"{ckpt}: not a nanoGPT character model ({_first_line(e)})"
        ) from None
    meta = {"task": "lm", "tokenizer": "char", "block_size": cfg.max_len, "source": str(ckpt)}
    return checkpoint.save(out, model, chars, meta)
