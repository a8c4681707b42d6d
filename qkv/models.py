"""The three Transformers built from an encoder and/or a decoder.

- EncoderOnly: a sentence in, per-token embeddings and one pooled sentence embedding out
  (classification, similarity; BERT-like).
- DecoderOnly: a causal model over any vocabulary, words or item ids (next token / next item).
- EncoderDecoder: sequence to sequence (translation), the paper's model.

(qkv.recurrent holds the GRU encoder-decoders that attention replaced, as translation baselines.)

`start(...)` / `step(...)` on the decoder-bearing models are all that search needs: search never
touches layers. Shapes: B batch, S source length, T target length, D d_model, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .cache import DecoderCache
from .config import ModelConfig
from .decoder import Decoder, DecoderLayer
from .embedding import Embeddings
from .encoder import Encoder, EncoderLayer
from .masks import padding_mask


def token_embedding(vocab: int, d_model: int, pad_id: int) -> nn.Embedding:
    emb = nn.Embedding(vocab, d_model, padding_idx=pad_id)
    # std D^-1/2, so that after the sqrt(D) scale the inputs have unit variance
    nn.init.normal_(emb.weight, std=d_model**-0.5)
    with torch.no_grad():
        emb.weight[pad_id].zero_()
    return emb


def _embeddings(cfg: ModelConfig, token: nn.Embedding) -> Embeddings:
    return Embeddings(token, cfg.max_len, cfg.positions, cfg.dropout, cfg.scale_embedding)


def _final_norm(cfg: ModelConfig) -> nn.Module | None:
    if not cfg.norm_first:
        return None
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


def _layer_args(cfg: ModelConfig) -> dict:
    """What every encoder and decoder layer is built from; dropouts resolved here, once."""
    return dict(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_ff=cfg.d_ff,
        dropout=cfg.dropout,
        activation=cfg.activation,
        norm_first=cfg.norm_first,
        eps=cfg.layer_norm_eps,
        attention_dropout=cfg.attention_dropout_p,
        activation_dropout=cfg.activation_dropout_p,
        bias=cfg.bias,
    )


def _encoder(cfg: ModelConfig, token: nn.Embedding) -> Encoder:
    layers = [EncoderLayer(**_layer_args(cfg)) for _ in range(cfg.n_encoder_layers)]
    return Encoder(_embeddings(cfg, token), layers, _final_norm(cfg))


def _decoder(cfg: ModelConfig, token: nn.Embedding, cross_attention: bool) -> Decoder:
    layers = [
        DecoderLayer(**_layer_args(cfg), cross_attention=cross_attention)
        for _ in range(cfg.n_decoder_layers)
    ]
    return Decoder(_embeddings(cfg, token), layers, _final_norm(cfg))


def output_projection(cfg: ModelConfig, vocab: int, token: nn.Embedding) -> nn.Linear:
    """The projection from D to vocabulary scores, optionally tied to the input embedding."""
    head = nn.Linear(cfg.d_model, vocab, bias=cfg.output_bias)
    if cfg.output_bias:
        nn.init.zeros_(head.bias)
    if cfg.tie_output:
        head.weight = token.weight
    return head


def _init_linear(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pool(x: Tensor, mask: Tensor, how: str = "mean", weights: Tensor | None = None) -> Tensor:
    """One vector per sentence from per-token embeddings x (B, S, D) and the padding mask
    (B, 1, 1, S): the mean over real tokens (padding never counts), their element-wise max, the
    first token's, or ("weighted") the mean weighted by `weights` (B, S)."""
    if how == "first":
        return x[:, 0]
    if how == "max":
        return x.masked_fill(~mask[:, 0, 0, :, None], float("-inf")).amax(1)
    keep = mask[:, 0, 0, :, None].to(x.dtype)  # (B, S, 1)
    if how == "weighted":
        assert weights is not None, "weighted pooling needs per-token weights"
        keep = keep * weights[..., None].to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class Seq2Seq(nn.Module):
    """What every encoder-decoder does with its parts, whatever their layers (the Transformer's
    here, qkv.recurrent's GRUs): `encoder(src, mask)` -> memory, `decoder(tgt, memory, mask)` or
    `decoder(tokens, cache=...)` -> hidden states, `decoder.start(memory, mask)` -> the cache,
    `lm_head` -> vocabulary scores. Subclasses build the parts and set `config`."""

    config: ModelConfig

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src ids (B, S) -> memory (B, S, D) and its padding mask (B, 1, 1, S)."""
        mask = padding_mask(src, self.config.pad_id)
        return self.encoder(src, mask), mask

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), tgt (B, T) (starting with bos) -> logits (B, T, V) for the next tokens."""
        memory, mask = self.encode(src)
        return self.lm_head(self.decoder(tgt, memory, mask))

    def start(self, src: Tensor, steps: int = 0) -> Any:
        """Encode the source once; return the cache that `step` grows (the decoder's kind).
        `steps`: the most target positions the decode may reach, if known (a Transformer's
        cache reserves room for them, so it need not grow)."""
        memory, mask = self.encode(src)
        return self.decoder.start(memory, mask, steps=steps)

    def step(self, tokens: Tensor, cache: Any, last: bool = False) -> Tensor:
        """New target tokens (B, T) -> logits (B, T, V); `cache` grows by T positions. `last`:
        only the last position's logits (B, 1, V), all that search needs after a prefix."""
        h = self.decoder(tokens, cache=cache)
        return self.lm_head(h[:, -1:] if last else h)


class EncoderDecoder(Seq2Seq):
    """Encoder over the source, decoder over the target with cross-attention to the encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        src_tok = token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        tgt_tok = (
            src_tok
            if cfg.share_embeddings
            else token_embedding(cfg.target_vocab, cfg.d_model, cfg.pad_id)
        )
        self.encoder = _encoder(cfg, src_tok)
        self.decoder = _decoder(cfg, tgt_tok, cross_attention=True)
        self.lm_head = output_projection(cfg, cfg.target_vocab, tgt_tok)
        # tied weights belong to the embedding and keep its init
        _init_linear(nn.ModuleList([self.encoder.layers, self.decoder.layers]))
        if not cfg.tie_output:
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model**-0.5)


class DecoderOnly(nn.Module):
    """A causal language model over tokens or items: each position predicts the next."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        tok = token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        self.decoder = _decoder(cfg, tok, cross_attention=False)
        self.lm_head = output_projection(cfg, cfg.vocab_size, tok)
        _init_linear(self.decoder.layers)
        if not cfg.tie_output:
            nn.init.normal_(self.lm_head.weight, std=cfg.d_model**-0.5)

    def forward(self, ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """ids (B, T) -> logits (B, T, V). `pad_mask` (B, 1, 1, T) hides padding keys."""
        return self.lm_head(self.decoder(ids, tgt_mask=pad_mask))

    def start(self, offsets: Tensor | None = None, steps: int = 0) -> DecoderCache:
        """An empty cache; it takes its batch size from the first step (a prompt, or bos).
        `offsets` (B,): prompts of different lengths, left-padded by that many pads each.
        `steps`: the most positions the decode may reach, prompt included, if known."""
        return self.decoder.start(offsets=offsets, steps=steps)

    def step(self, tokens: Tensor, cache: DecoderCache, last: bool = False) -> Tensor:
        """New tokens (B, T) -> logits (B, T, V); `cache` grows by T positions. `last`: only the
        last position's logits (B, 1, V)."""
        h = self.decoder(tokens, cache=cache)
        return self.lm_head(h[:, -1:] if last else h)


class EncoderOnly(nn.Module):
    """Encoder with a pooled sentence embedding; forward gives class logits when the config has
    `n_classes`, else per-token vocabulary logits (masked-token prediction, tied to the input)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        tok = token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        self.encoder = _encoder(cfg, tok)
        _init_linear(self.encoder.layers)
        # a weight per vocabulary entry for "weighted" pooling: set from the training text's
        # token frequencies (rare tokens say more about meaning, as IDF or SIF weights)
        self.register_buffer("token_weight", torch.ones(cfg.vocab_size))
        self.classifier: nn.Linear | None = None
        self.lm_head: nn.Linear | None = None
        if cfg.n_classes:
            self.classifier = nn.Linear(cfg.d_model, cfg.n_classes)
        else:
            self.lm_head = output_projection(cfg, cfg.vocab_size, tok)
            if not cfg.tie_output:
                nn.init.normal_(self.lm_head.weight, std=cfg.d_model**-0.5)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> per-token embeddings (B, S, D) and the pooled sentence embedding (B, D)
        (config.pooling: the mean, weighted mean or max over real tokens, or the first token's)."""
        mask = padding_mask(src, self.config.pad_id)
        x = self.encoder(src, mask)
        return x, pool(x, mask, self.config.pooling, self.token_weight[src])

    def forward(self, src: Tensor) -> Tensor:
        x, pooled = self.encode(src)
        if self.classifier is not None:
            return self.classifier(pooled)  # (B, n_classes)
        assert self.lm_head is not None
        return self.lm_head(x)  # (B, S, V)


Model = Seq2Seq | DecoderOnly | EncoderOnly  # Seq2Seq: the Transformer's, or a GRU baseline


def from_config(cfg: ModelConfig) -> Model:
    """Build the model a config describes."""
    match cfg.arch:
        case "encoder-decoder":
            return EncoderDecoder(cfg)
        case "decoder-only":
            return DecoderOnly(cfg)
        case "encoder-only":
            return EncoderOnly(cfg)
        case "gru" | "gru-attention":
            from .recurrent import RecurrentEncoderDecoder  # built on this module's Seq2Seq

            return RecurrentEncoderDecoder(cfg)
    raise AssertionError(cfg.arch)  # ModelConfig validated it


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters live: every tensor made for it goes there."""
    return next(model.parameters()).device


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": CUDA when there is a GPU, else the CPU; or a device name ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA GPU (PyTorch sees none)")
    return device


def count_parameters(model: nn.Module) -> int:
    """Parameters, counting tied matrices once."""
    return sum(p.numel() for p in model.parameters())
