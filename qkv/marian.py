"""Import Marian (OPUS-MT) translation models from a Hugging Face `MarianMTModel` directory.

Marian is the paper's Transformer with a few choices of its own, each mapped to a config field:
post-LN layers (norm_first=False), token embeddings scaled by sqrt(d_model), sinusoidal
positions in the [sin | cos] layout (ours too), a bias on the final logits (output_bias), one
embedding matrix for source, target and output (share_embeddings, tie_output), swish
activations (silu), and the padding token as the decoder's start token.
No unrestricted unpickling: weights come from safetensors, or from a PyTorch .bin read with
`weights_only=True` (PyTorch's restricted loader: tensors and plain containers only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, ModelConfig
from .models import EncoderDecoder
from .tokenizer import MarianVocab

ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}


class MarianImportError(Exception):
    """A Marian directory that cannot be converted; one line naming the problem."""


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a MarianConfig dict."""
    need = [
        "vocab_size",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "encoder_ffn_dim",
        "pad_token_id",
        "eos_token_id",
    ]
    missing = [k for k in need if k not in hf]
    if missing:
        raise MarianImportError(f"config.json lacks {', '.join(missing)}: not a Marian config?")
    if hf.get("model_type") not in (None, "marian"):
        raise MarianImportError(f"config.json describes a {hf['model_type']!r} model, not 'marian'")
    if (
        hf.get("decoder_attention_heads", hf["encoder_attention_heads"])
        != hf["encoder_attention_heads"]
        or hf.get("decoder_ffn_dim", hf["encoder_ffn_dim"]) != hf["encoder_ffn_dim"]
    ):
        raise MarianImportError("encoder and decoder with different head counts or FFN sizes")
    act = hf.get("activation_function", "swish")
    if act not in ACTIVATIONS:
        raise MarianImportError(f"activation {act!r} is not supported")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    tgt_vocab = None if shared else hf.get("decoder_vocab_size") or hf["vocab_size"]
    try:
        return ModelConfig(
            arch="encoder-decoder",
            vocab_size=hf["vocab_size"],
            tgt_vocab_size=tgt_vocab,
            d_model=hf["d_model"],
            n_heads=hf["encoder_attention_heads"],
            d_ff=hf["encoder_ffn_dim"],
            n_encoder_layers=hf["encoder_layers"],
            n_decoder_layers=hf["decoder_layers"],
            dropout=0.0,
            activation=ACTIVATIONS[act],  # type: ignore[arg-type]
            norm_first=False,
            positions="sinusoidal",
            max_len=hf.get("max_position_embeddings", 512),
            scale_embedding=hf.get("scale_embedding", True),
            tie_output=hf.get("tie_word_embeddings", True),
            share_embeddings=shared,
            output_bias=True,
            pad_id=hf["pad_token_id"],
            bos_id=hf.get("decoder_start_token_id", hf["pad_token_id"]),
            eos_id=hf["eos_token_id"],
        )
    except ConfigError as e:
        raise MarianImportError(f"config.json: {e}") from None


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(src / "model.safetensors"))
    if (src / "pytorch_model.bin").is_file():
        try:  # weights_only: tensors and plain containers only, never arbitrary objects
            return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise MarianImportError(
                f"{src}/pytorch_model.bin: cannot be read safely ({e})"
            ) from None
    raise MarianImportError(f"{src}: no model.safetensors or pytorch_model.bin")


_LAYER_PARTS = {
    "self_attn_layer_norm": "attn_residual.norm",
    "encoder_attn_layer_norm": "cross_residual.norm",
    "final_layer_norm": "ff_residual.norm",
    "encoder_attn": "cross_attn",
    "self_attn": "self_attn",
    "fc1": "ff.fc1",
    "fc2": "ff.fc2",
}


def map_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Marian state dict -> qkv EncoderDecoder state dict."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}

    def first(*names: str) -> torch.Tensor:
        for n in names:
            if n in hf:
                return hf[n]
        raise MarianImportError(f"weights lack {names[0]}")

    out["encoder.embed.token.weight"] = first("shared.weight", "encoder.embed_tokens.weight")
    if cfg.share_embeddings:
        out["decoder.embed.token.weight"] = out["encoder.embed.token.weight"]
    else:
        out["decoder.embed.token.weight"] = first("decoder.embed_tokens.weight")
    out["lm_head.weight"] = (
        out["decoder.embed.token.weight"] if cfg.tie_output else first("lm_head.weight")
    )
    bias = hf.get("final_logits_bias")
    out["lm_head.bias"] = bias.reshape(-1) if bias is not None else torch.zeros(cfg.target_vocab)
    for key, value in hf.items():
        parts = key.split(".")
        if parts[0] not in ("encoder", "decoder") or parts[1] != "layers":
            continue
        side, i, module, rest = parts[0], parts[2], parts[3], ".".join(parts[4:])
        if module not in _LAYER_PARTS:
            raise MarianImportError(f"unexpected weight {key}")
        out[f"{side}.layers.{i}.{_LAYER_PARTS[module]}.{rest}"] = value
    return out


def convert(src: str | Path, out: str | Path) -> Path:
    """Convert a HF MarianMTModel directory into a qkv model directory."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise MarianImportError(
            f"{src}: no config.json (expected a Hugging Face MarianMTModel directory)"
        )
    try:
        hf_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarianImportError(f"{src}/config.json: not valid JSON ({e})") from None
    cfg = model_config(hf_cfg)
    state = map_weights(read_weights(src), cfg)
    model = EncoderDecoder(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MarianImportError(f"weights lack {len(missing)} tensors, e.g. {missing[0]}")
    for k, v in state.items():
        if k not in expected:
            raise MarianImportError(f"unexpected weight {k}")
        if v.shape != expected[k].shape:
            raise MarianImportError(
                f"{k}: shape {tuple(v.shape)}, config says {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    has_vocab = (src / "source.spm").is_file() and (src / "vocab.json").is_file()
    try:
        vocab = MarianVocab(src, cfg) if has_vocab else None
    except ImportError:
        raise MarianImportError(
            "the vocabulary needs sentencepiece: pip install sentencepiece"
        ) from None
    meta = {"task": "translation", "imported_from": "marian", "source": str(src)}
    return checkpoint.save(out, model, vocab, meta)
