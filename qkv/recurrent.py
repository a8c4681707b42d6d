"""The world before attention: recurrent encoder-decoders, as baselines for the Transformer.

Both read the source with a bidirectional GRU (one state per source token: the forward and the
backward direction's, side by side) and write the target with a GRU, one token at a time:

- FixedVector ("gru"): the decoder sees the source only through one fixed-size vector, the
  encoder's final states (the forward direction's at the last token, the backward direction's at
  the first): the encoder-decoder of Cho et al. 2014 and Sutskever et al. 2014, whose whole
  sentence must fit in that vector.
- AdditiveAttention ("gru-attention"): before each output token the decoder's previous state
  scores every encoder state, score_j = v . tanh(W s + U h_j) (Bahdanau et al. 2015), and the
  softmax-weighted mix of the encoder states (the context) joins the decoder's input.

They share the Transformer models' interface (`encode`, `decoder(tgt, memory, mask)`, `lm_head`,
`start`/`step` with an explicit cache), so training, search, translation, evaluation and
`explain` run on them unchanged. d_model is the embedding and decoder width; each encoder
direction has d_model / 2, so an encoder state is d_model wide. Shapes: B batch, S source
length, T target length, D d_model, L decoder layers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig
from .models import Seq2Seq, output_projection, token_embedding


class RecurrentEncoder(nn.Module):
    """Token embeddings -> a bidirectional GRU -> one state per source token (B, S, D)."""

    def __init__(
        self, embed: nn.Embedding, d_model: int, n_layers: int, dropout: float, scale: float
    ):
        super().__init__()
        self.embed, self.scale = embed, scale
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(
            d_model,
            d_model // 2,
            num_layers=n_layers,
            bidirectional=True,
            batch_first=True,
            dropout=dropout if n_layers > 1 else 0.0,
        )

    def forward(self, src: Tensor, mask: Tensor) -> Tensor:
        """src (B, S) and its padding mask (B, 1, 1, S) -> states (B, S, D); zeros on padding.
        Packed by length, so the backward direction starts at each sentence's own last token."""
        lengths = mask[:, 0, 0, :].sum(-1).cpu()
        x = self.dropout(self.embed(src) * self.scale)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return out


def final_state(memory: Tensor, mask: Tensor) -> Tensor:
    """The encoder's summary of a sentence (B, D): the forward direction's state at the last real
    token and the backward direction's at the first, each having read the whole sentence."""
    half = memory.shape[-1] // 2
    last = mask[:, 0, 0, :].sum(-1) - 1  # (B,)
    forward = memory[torch.arange(len(memory), device=memory.device), last, :half]
    return torch.cat([forward, memory[:, 0, half:]], dim=-1)


class RecurrentCache:
    """What a recurrent decoder carries between steps: its hidden states (L, B, D), and what it
    reads of the source: all encoder states, their projected keys and mask (attention), or the one
    fixed vector (B, D). `select` keeps rows `index`, in that order (beam search's reorder)."""

    def __init__(self, hidden: Tensor, memory: Tensor, mask: Tensor, keys: Tensor | None = None):
        self.hidden, self.memory, self.mask, self.keys = hidden, memory, mask, keys
        self.length = 0  # target positions consumed so far

    def select(self, index: Tensor) -> None:
        self.hidden = self.hidden.index_select(1, index)
        self.memory = self.memory.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)


class RecurrentDecoder(nn.Module):
    """What both GRU decoders share: the target embedding, the first states from the source
    summary (s_0 = tanh(W c), one slice per layer), and the readout: each step's [s_i; y_{i-1};
    c_i] through tanh(W_o .) to a D-wide vector for the output projection. Subclasses say how
    the source enters (`start`) and run the recurrence (`run`)."""

    def __init__(
        self, embed: nn.Embedding, d_model: int, n_layers: int, dropout: float, scale: float
    ):
        super().__init__()
        self.embed, self.scale = embed, scale
        self.dropout = nn.Dropout(dropout)
        self.init = nn.Linear(d_model, n_layers * d_model)
        self.readout = nn.Linear(3 * d_model, d_model)
        self.n_layers = n_layers

    def first_hidden(self, c: Tensor) -> Tensor:
        """The starting states (L, B, D) from the source summary c (B, D)."""
        h0 = torch.tanh(self.init(c)).view(len(c), self.n_layers, -1)
        return h0.transpose(0, 1).contiguous()

    def start(self, memory: Tensor, mask: Tensor, steps: int = 0) -> RecurrentCache:
        """The cache of a decode (`steps`, the most it may take, is for Transformer caches:
        a recurrent state does not grow)."""
        raise NotImplementedError

    def run(self, y: Tensor, cache: RecurrentCache) -> Tensor:
        """Embedded targets (B, T, D) -> [s_i; y_{i-1}; c_i] per step (B, T, 3D); updates
        cache.hidden."""
        raise NotImplementedError

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: RecurrentCache | None = None,
    ) -> Tensor:
        """tgt (B, T) -> readout vectors (B, T, D). Without a cache, decodes from the start."""
        if cache is None:
            assert memory is not None and mask is not None
            cache = self.start(memory, mask)
        mixed = self.run(self.dropout(self.embed(tgt) * self.scale), cache)
        cache.length += tgt.shape[1]
        return self.dropout(torch.tanh(self.readout(mixed)))


class FixedVectorDecoder(RecurrentDecoder):
    """A GRU over the target whose only view of the source is the fixed vector c: it sets the
    first state, s_0 = tanh(W c), and is part of every step's input and of the readout."""

    def __init__(
        self, embed: nn.Embedding, d_model: int, n_layers: int, dropout: float, scale: float
    ):
        super().__init__(embed, d_model, n_layers, dropout, scale)
        self.rnn = nn.GRU(
            2 * d_model,
            d_model,
            num_layers=n_layers,
            batch_first=True,
            dropout=dropout if n_layers > 1 else 0.0,
        )

    def start(self, memory: Tensor, mask: Tensor, steps: int = 0) -> RecurrentCache:
        c = final_state(memory, mask)  # everything the decoder will ever know of the source
        return RecurrentCache(self.first_hidden(c), c, mask)

    def run(self, y: Tensor, cache: RecurrentCache) -> Tensor:
        c = cache.memory[:, None].expand(-1, y.shape[1], -1)  # (B, T, D), the same each step
        s, cache.hidden = self.rnn(torch.cat([y, c], dim=-1), cache.hidden)
        return torch.cat([s, y, c], dim=-1)


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score_j = v . tanh(W s + U h_j); weights = softmax over the source.

    Keys U h_j are computed once per sentence (`keys`); each step adds the query's W s. Weights
    go to `recorder` when set (qkv.inspect.record_attention), as (B, 1 head, T, S)."""

    def __init__(self, d_query: int, d_key: int, d_attn: int):
        super().__init__()
        self.query = nn.Linear(d_query, d_attn, bias=False)
        self.key = nn.Linear(d_key, d_attn)
        self.v = nn.Linear(d_attn, 1, bias=False)
        self.recorder: Callable[[nn.Module, Tensor], None] | None = None

    def keys(self, memory: Tensor) -> Tensor:
        return self.key(memory)  # (B, S, A)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """query (B, Dq), keys (B, S, A), memory (B, S, D), mask (B, S) -> context (B, D) and
        weights (B, S), which sum to 1 over the real source tokens."""
        scores = self.v(torch.tanh(keys + self.query(query)[:, None])).squeeze(-1)  # (B, S)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        context = torch.bmm(weights[:, None], memory).squeeze(1)  # (B, D)
        return context, weights


class AttentionDecoder(RecurrentDecoder):
    """A stack of GRU cells that attends before each token (Bahdanau et al. 2015, section 3.1):
    the top layer's previous state s_{i-1} queries the encoder states for context c_i; the first
    layer reads [y_{i-1}; c_i]; the readout mixes [s_i; y_{i-1}; c_i]. Sequential by nature: the
    query of step i is the state step i - 1 produced."""

    def __init__(
        self, embed: nn.Embedding, d_model: int, n_layers: int, dropout: float, scale: float
    ):
        super().__init__(embed, d_model, n_layers, dropout, scale)
        self.cross_attn = AdditiveAttention(d_model, d_model, d_model)
        self.cells = nn.ModuleList(
            [nn.GRUCell(2 * d_model if i == 0 else d_model, d_model) for i in range(n_layers)]
        )

    def start(self, memory: Tensor, mask: Tensor, steps: int = 0) -> RecurrentCache:
        h0 = self.first_hidden(final_state(memory, mask))
        return RecurrentCache(h0, memory, mask[:, 0, 0, :], self.cross_attn.keys(memory))

    def run(self, y: Tensor, cache: RecurrentCache) -> Tensor:
        assert cache.keys is not None
        hidden = list(cache.hidden.unbind(0))  # L x (B, D)
        outputs, all_weights = [], []
        for t in range(y.shape[1]):
            context, weights = self.cross_attn(hidden[-1], cache.keys, cache.memory, cache.mask)
            x = torch.cat([y[:, t], context], dim=-1)
            for i, cell in enumerate(self.cells):
                hidden[i] = cell(x, hidden[i])
                x = self.dropout(hidden[i])
            outputs.append(torch.cat([hidden[-1], y[:, t], context], dim=-1))
            all_weights.append(weights)
        cache.hidden = torch.stack(hidden)
        if self.cross_attn.recorder is not None:  # one record per call, as the Transformer's
            self.cross_attn.recorder(self.cross_attn, torch.stack(all_weights, 1)[:, None])
        return torch.stack(outputs, dim=1)


class RecurrentEncoderDecoder(Seq2Seq):
    """A bidirectional GRU encoder and a GRU decoder, with (config.arch "gru-attention") or
    without ("gru") attention over the encoder states; the output projection is tied to the
    target embedding, as in the Transformer models."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        src_tok = token_embedding(cfg.vocab_size, d, cfg.pad_id)
        tgt_tok = (
            src_tok if cfg.share_embeddings else token_embedding(cfg.target_vocab, d, cfg.pad_id)
        )
        # std D^-1/2 and a sqrt(D) scale: unit-variance inputs, and unit-scale logits through
        # the tied output (as the Transformer models)
        scale = d**0.5 if cfg.scale_embedding else 1.0
        self.encoder = RecurrentEncoder(src_tok, d, cfg.n_encoder_layers, cfg.dropout, scale)
        decoder = AttentionDecoder if cfg.arch == "gru-attention" else FixedVectorDecoder
        self.decoder = decoder(tgt_tok, d, cfg.n_decoder_layers, cfg.dropout, scale)
        self.lm_head = output_projection(cfg, cfg.target_vocab, tgt_tok)
        if not cfg.tie_output:
            nn.init.normal_(self.lm_head.weight, std=d**-0.5)
