"""Decoding: greedy, beam search and sampling.

Search knows nothing about Transformers. It sees a `step(tokens, state) -> log_probs` function
(tokens (N, 1) -> (N, V)) and a state with `select(index)` that keeps rows `index`, in that
order. `model_step(model)` makes the pair from a qkv model; tests drive it with hand-written
probability tables.

Shapes: B sentences, K beam size, N = B * K rows, V vocabulary, L length so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class State(Protocol):
    def select(self, index: Tensor) -> None: ...


StepFn = Callable[[Tensor, Any], Tensor]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, eos excluded
    score: float  # log_prob / length penalty: what beam search ranks by
    log_prob: float


@dataclass(frozen=True)
class Limits:
    """How many tokens an output may have before its end-of-sentence: at most a * src_len + b
    (and at most `cap`), at least `min_len`.

    at_max: what happens to an output that reaches the maximum: "eos" ends it with the
    end-of-sentence token (scored like any other token); "stop" cuts it there without one, as
    HF transformers' `max_new_tokens` does.
    """

    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    cap: int = 256
    at_max: str = "eos"

    def max_lengths(self, src_lengths: Tensor) -> Tensor:
        m = (self.max_len_a * src_lengths.float() + self.max_len_b).floor().long()
        return m.clamp(min=max(self.min_len, 1), max=self.cap)


def model_step(model: Any) -> StepFn:
    """A step function over a qkv model's KV cache: last position's log-probabilities."""

    def step(tokens: Tensor, cache: Any) -> Tensor:
        return model.step(tokens, cache)[:, -1].float().log_softmax(-1)

    return step


# --- logit edits: small pure functions applied in order --------------------------------------


def force(log_probs: Tensor, token: int, where: Tensor) -> Tensor:
    """Allow only `token` on rows where `where` is True (max length reached: end now). It keeps
    its own log-probability, so scores stay the model's scores of the output."""
    if where.any():
        keep = log_probs[where, token]
        log_probs[where] = float("-inf")
        log_probs[where, token] = keep.nan_to_num(neginf=0.0)  # never leave a row impossible
    return log_probs


def no_repeat_ngram(log_probs: Tensor, history: Tensor, n: int) -> Tensor:
    """Forbid any token that would complete an n-gram already present in that row's history."""
    if n <= 0 or history.shape[1] < n:
        return log_probs
    hist = history.tolist()
    for row, toks in enumerate(hist):
        prefix = toks[len(toks) - (n - 1) :] if n > 1 else []
        for i in range(len(toks) - n + 1):
            if toks[i : i + n - 1] == prefix:
                log_probs[row, toks[i + n - 1]] = float("-inf")
    return log_probs


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of top tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # drop a token when the tokens above it already reach p (the top one always stays)
    drop = probs.cumsum(-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def length_penalty(length: int, alpha: float, style: str = "gnmt") -> float:
    """What a finished hypothesis' log-prob is divided by. "gnmt": ((5 + L) / 6)^alpha (Wu et al.
    2016); "power": L^alpha (fairseq, HF transformers). alpha 0 = plain log-prob."""
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if style == "power":
        return float(length) ** alpha
    raise ValueError(f"unknown length penalty style {style!r}")


# --- greedy and sampling ----------------------------------------------------------------------


def greedy(
    step: StepFn,
    state: Any,
    src_lengths: Tensor,
    *,
    bos: int,
    eos: int,
    limits: Limits = Limits(),
    no_repeat: int = 0,
    pad: int | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """Take the most likely token each step (or sample one); the readable baseline and the
    oracle for beam size 1. Finished sentences leave the batch."""
    b = src_lengths.shape[0]
    max_len = limits.max_lengths(src_lengths)
    out: list[list[int]] = [[] for _ in range(b)]
    logp = [0.0] * b
    rows = torch.arange(b)  # which sentence each live row is
    last = torch.full((b, 1), bos, dtype=torch.long)
    history = torch.empty(b, 0, dtype=torch.long)
    for t in range(int(max_len.max()) + 1):
        lp = step(last, state)  # (N, V)
        if pad is not None and pad != eos:
            lp[:, pad] = float("-inf")
        if t < limits.min_len:
            lp[:, eos] = float("-inf")
        if limits.at_max == "eos":
            lp = force(lp, eos, t >= max_len[rows])
        lp = no_repeat_ngram(lp, history, no_repeat)
        if sample:
            logits = top_p_filter(top_k_filter(lp / temperature, top_k), top_p)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            nxt = lp.argmax(-1)
        chosen = lp.gather(1, nxt[:, None])[:, 0]
        is_eos = nxt == eos
        done = is_eos | (t + 1 >= max_len[rows]) if limits.at_max == "stop" else is_eos
        for r, tok, lpv, e in zip(
            rows.tolist(), nxt.tolist(), chosen.tolist(), is_eos.tolist(), strict=True
        ):
            logp[r] += lpv
            if not e:
                out[r].append(tok)
        if done.all():
            break
        if done.any():  # drop finished rows from the batch and the state
            keep = (~done).nonzero()[:, 0]
            state.select(keep)
            rows, nxt, history = rows[keep], nxt[keep], history[keep]
        last = nxt[:, None]
        history = torch.cat([history, last], 1)
    return [Hypothesis(toks, lp, lp) for toks, lp in zip(out, logp, strict=True)]


# --- beam search ------------------------------------------------------------------------------


@dataclass
class BeamTrace:
    """Every candidate beam search considered, as one tree per sentence, for the beam-tree
    picture. A node: id, parent (None for the start), step, token, log_prob (of the whole
    prefix), score (length-normalised), kept ("live", "finished" or "" = pruned)."""

    trees: list[list[dict[str, Any]]] = field(default_factory=list)

    def start(self, n_sentences: int, beam: int, bos: int) -> list[list[int]]:
        root = dict(id=0, parent=None, step=-1, token=bos, log_prob=0.0, score=0.0, kept="live")
        self.trees = [[dict(root)] for _ in range(n_sentences)]
        return [[0] * beam for _ in range(n_sentences)]  # the tree node behind each beam slot

    def add(self, sentence: int, parent: int, **fields: Any) -> int:
        tree = self.trees[sentence]
        tree.append(dict(id=len(tree), parent=parent, **fields))
        return len(tree) - 1

    def tokens(self, sentence: int, node: int) -> list[int]:
        """The tokens from the start (excluded) to `node` (included)."""
        tree, out = self.trees[sentence], []
        while tree[node]["parent"] is not None:
            out.append(tree[node]["token"])
            node = tree[node]["parent"]
        return out[::-1]


def beam_search(
    step: StepFn,
    state: Any,
    src_lengths: Tensor,
    *,
    bos: int,
    eos: int,
    beam: int = 5,
    alpha: float = 0.6,
    penalty: str = "gnmt",
    nbest: int = 1,
    limits: Limits = Limits(),
    no_repeat: int = 0,
    pad: int | None = None,
    trace: BeamTrace | None = None,
) -> list[list[Hypothesis]]:
    """Keep the K best partial translations of each sentence; return each sentence's n best.

    Layout: the sentences still being searched, K rows each (N = n * K rows). Each step scores
    all K*V extensions of a sentence's beams and takes the top 2K: among those, an
    end-of-sentence candidate ranked in the top K finishes a hypothesis, and the best K others
    stay alive. Taking 2K guarantees K live ones even if up to K of them end. A sentence is done
    when it has K finished hypotheses and its best live beam, scored as if it ended now, cannot
    beat the worst of them; its rows then leave the batch.
    Scores are log-probabilities divided by the length penalty (length includes eos). The `pad`
    token, if given, is never generated.
    `state` must hold B rows; it is expanded to B*K here, then reordered and shrunk with one
    select per step. The choices are made on tensors for all sentences at once; Python only
    touches the few candidates that finish (and every candidate when `trace` records the tree).
    """
    if nbest > beam:
        raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({beam})")
    b, k = src_lengths.shape[0], beam
    max_len = limits.max_lengths(src_lengths)  # (B,)
    state.select(torch.arange(b).repeat_interleave(k))
    sent = torch.arange(b)  # (n,) the sentence behind each group of K rows
    tokens = torch.full((b * k, 1), bos, dtype=torch.long)  # (N, L), bos included
    # only the first beam of each sentence is live at the start, so we do not get K copies
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    slot_node = trace.start(b, k, bos) if trace is not None else None
    first_k = torch.arange(2 * k) < k  # (2K,) ranks that may finish a hypothesis

    for t in range(int(max_len.max()) + 1):
        n = len(sent)
        lp = step(tokens[:, -1:], state)  # (N, V)
        v = lp.shape[-1]
        if pad is not None and pad != eos:
            lp[:, pad] = float("-inf")
        if t < limits.min_len:
            lp[:, eos] = float("-inf")
        if limits.at_max == "eos":
            lp = force(lp, eos, (t >= max_len[sent]).repeat_interleave(k))
        lp = no_repeat_ngram(lp, tokens[:, 1:], no_repeat)
        cand = (scores.view(-1, 1) + lp).view(n, k * v)  # (n, K*V) total log-probs
        top_lp, top_idx = cand.topk(2 * k, dim=1)  # (n, 2K), best first
        origin, token = top_idx // v, top_idx % v  # which beam, which token
        norm = length_penalty(t + 1, alpha, penalty)

        possible = top_lp > float("-inf")
        ends = token == eos
        if limits.at_max == "stop":  # the last allowed token: every candidate ends here
            ends |= (t + 1 >= max_len[sent])[:, None]
        finishing = ends & possible & first_k
        going = ~ends & possible
        live = going & (going.cumsum(1) <= k)  # the best K candidates that go on
        # the live candidates first, in rank order (a stable sort on "not live")
        pick = (~live).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]  # (n, K)
        new_scores = top_lp.gather(1, pick).masked_fill(~live.gather(1, pick), float("-inf"))
        new_origin, new_token = origin.gather(1, pick), token.gather(1, pick)

        for i, rank in finishing.nonzero().tolist():  # a few per step
            s, o, tok = int(sent[i]), int(origin[i, rank]), int(token[i, rank])
            seq = tokens[i * k + o, 1:].tolist() + ([] if tok == eos else [tok])
            total = float(top_lp[i, rank])
            finished[s].append(Hypothesis(seq, total / norm, total))
            finished[s].sort(key=lambda h: -h.score)
            del finished[s][k:]
        if trace is not None and slot_node is not None:
            slot_node = _trace_step(
                trace, slot_node, sent, t, norm, top_lp, origin, token, finishing, live, k
            )

        # Done: K finished, and no live beam ending now would beat the worst of them. (The
        # usual early-stop test; with alpha > 0 a longer beam could in principle still win.)
        sents = sent.tolist()
        full = torch.tensor([len(finished[s]) >= k for s in sents])
        worst = torch.tensor([finished[s][-1].score if finished[s] else 0.0 for s in sents])
        done = ~live.any(1) | (full & (new_scores[:, 0] / norm <= worst))
        if done.all():
            break
        keep = (~done).nonzero()[:, 0]  # (n',) the sentences that go on
        index = (keep[:, None] * k + new_origin[keep]).view(-1)  # (n' * K,) rows to keep
        state.select(index)  # reorder beams and drop finished sentences: one select
        tokens = torch.cat([tokens[index], new_token[keep].view(-1, 1)], 1)
        scores, sent = new_scores[keep], sent[keep]

    # sentences that ran out of length without K finished hypotheses keep what they have
    for i in range(b):
        if not finished[i]:  # cannot happen when max length forces eos; kept for safety
            finished[i].append(Hypothesis([], -math.inf, -math.inf))
    return [f[:nbest] for f in finished]


def _trace_step(
    trace: BeamTrace,
    slot_node: list[list[int]],
    sent: Tensor,
    t: int,
    norm: float,
    top_lp: Tensor,
    origin: Tensor,
    token: Tensor,
    finishing: Tensor,
    live: Tensor,
    k: int,
) -> list[list[int]]:
    """Record one step's candidates in the beam tree: in rank order, until K live ones are
    found (the ranks search looked at). Returns the tree node behind each new beam slot."""
    new_slot_node = [list(row) for row in slot_node]
    lps, origins, toks = top_lp.tolist(), origin.tolist(), token.tolist()
    fin, liv = finishing.tolist(), live.tolist()
    for i, s in enumerate(sent.tolist()):
        n_live = 0
        for rank in range(2 * k):
            total = lps[i][rank]
            if total == float("-inf"):
                break
            kept = "finished" if fin[i][rank] else "live" if liv[i][rank] else ""
            node = trace.add(
                s,
                slot_node[s][origins[i][rank]],
                step=t,
                token=toks[i][rank],
                log_prob=total,
                score=total / norm,
                kept=kept,
            )
            if kept == "live":
                new_slot_node[s][n_live] = node
                n_live += 1
            if n_live == k:
                break
    return new_slot_node
