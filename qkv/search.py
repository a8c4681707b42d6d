"""Decoding: greedy, sampling and beam search, behind one entry point, `decode`.

Search knows nothing about Transformers. It sees a `step(tokens, state) -> log_probs` function
(tokens (N, L) -> the last position's log-probabilities (N, V)) and a state with `select(index)`
that keeps rows `index`, in that order. `model_step(model)` makes the pair from a qkv model;
tests drive it with hand-written probability tables. Every tensor search makes lives on the
device of `src_lengths`.

Decoding starts from `bos`, or from a given prefix (a prompt): the prefix is fed in one step and
the output continues it. All three strategies edit the log-probabilities the same way before
choosing (`edit_log_probs`); a DecodeConfig says which strategy and how.

Shapes: B sentences, K beam size, N rows (B, or B * K in beam search), V vocabulary,
P prefix length, L length so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from . import native
from .config import DecodeConfig


class State(Protocol):
    """What search needs of a decoding state (a KV cache): keep rows `index`, in that order."""

    def select(self, index: Tensor) -> None: ...


StepFn = Callable[[Tensor, Any], Tensor]  # (tokens (N, L), state) -> log-probs (N, V)
# Called after each step of greedy or sampling with the (input, token) pairs just produced
# (eos excluded): what streaming output prints.
Emit = Callable[[list[tuple[int, int]]], None]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens: prefix and eos excluded
    score: float  # log_prob / length penalty: what beam search ranks by
    log_prob: float


def model_step(model: Any) -> StepFn:
    """A step function over a qkv model's KV cache: last position's log-probabilities."""

    def step(tokens: Tensor, cache: Any) -> Tensor:
        return log_softmax(model.step(tokens, cache, last=True)[:, -1].float())

    return step


def log_softmax(logits: Tensor) -> Tensor:
    """logits (N, V) -> log-probabilities: in place by qkv's C++ kernel where it applies (one
    read of the logits instead of three), else PyTorch's. For logits no one else holds."""
    return logits if native.log_softmax_(logits) else logits.log_softmax(-1)


def max_lengths(cfg: DecodeConfig, src_lengths: Tensor, cap: int) -> Tensor:
    """(B,) the most output tokens each input may get before eos: a * src_len + b, at most cap."""
    m = (cfg.max_len_a * src_lengths.float() + cfg.max_len_b).floor().long()
    return m.clamp(min=max(cfg.min_len, 1), max=max(cap, 1))


def max_steps(cfg: DecodeConfig, src_lengths: Tensor, max_positions: int | None) -> int:
    """The most steps `decode` may take on these inputs from `bos` (no prefix): the longest
    output allowed, plus the step that must end it (what fixed-shape decoding preallocates)."""
    return int(max_lengths(cfg, src_lengths, _cap(max_positions, 1)).max()) + 1


def _start(prefix: Tensor | None, b: int, bos: int, device: torch.device) -> Tensor:
    if prefix is None:
        return torch.full((b, 1), bos, dtype=torch.long, device=device)  # (B, 1)
    if prefix.dim() != 2 or prefix.shape[0] != b or prefix.shape[1] < 1:
        raise ValueError(f"prefix must be (B={b}, P>=1) token ids, got {tuple(prefix.shape)}")
    return prefix.to(device)  # (B, P)


def _cap(max_positions: int | None, prefix_len: int) -> int:
    """Output tokens that fit in the model's positions after a prefix of prefix_len."""
    return 1 << 30 if max_positions is None else max_positions - prefix_len


# --- choosing: the best token, the best k -----------------------------------------------------

# torch.argmax and torch.topk on the CPU walk each row one score at a time, while amax (the
# largest value, without its position) is vectorized: over 32 rows of 8,000 scores, argmax took
# 325 us and amax 16 us on one thread of an AVX-512 Xeon. So both look at blocks of BLOCK scores:
# the block maxima say which blocks can hold the winners, and only those are searched (1.9-5.2x
# faster at decoding's shapes on that CPU, bench/choose_speed.py). Short rows, where there is
# little to gain, go to torch's. Where qkv's C++ kernels are in use (qkv/native.py), a scan of
# the same idea in C++ (csrc/choose.cpp) takes precedence; the blocks serve the rest (a GPU,
# QKV_NATIVE=0).
BLOCK = 64


def _block_maxima(x: Tensor) -> Tensor:
    """(N, V) -> (N, ceil(V / BLOCK)): the largest score of each block of BLOCK consecutive
    scores (the last block holds the V % BLOCK left over, if any)."""
    n, v = x.shape
    whole = v - v % BLOCK
    maxima = x[:, :whole].view(n, -1, BLOCK).amax(-1)
    if whole < v:
        maxima = torch.cat([maxima, x[:, whole:].amax(-1, keepdim=True)], 1)
    return maxima


def _block_scores(x: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor]:
    """The scores of blocks (N, m) of each row: (N, m * BLOCK) scores and their positions in x.
    A last, shorter block is read as the last BLOCK scores of the row, with those that belong
    to the block before it set to -inf, so every score is seen once."""
    n, v = x.shape
    whole = v - v % BLOCK
    start = (blocks * BLOCK).clamp(max=v - BLOCK)  # (N, m)
    index = (start[..., None] + torch.arange(BLOCK, device=x.device)).view(n, -1)
    scores = x.gather(1, index)
    if whole < v:  # the short block's first scores are its neighbour's
        scores = scores.masked_fill(
            (blocks[..., None] * BLOCK > index.view(*blocks.shape, -1)).view(n, -1), float("-inf")
        )
    return scores, index


def argmax(x: Tensor) -> Tensor:
    """x (N, V) -> (N,): the position of each row's largest score, the first one on ties (NaN
    counts as largest), as torch.argmax(x, -1): qkv's C++ scan where it applies, else by
    blocks."""
    best = native.argmax(x)
    return best if best is not None else block_argmax(x)


def block_argmax(x: Tensor) -> Tensor:
    """argmax by blocks: the block maxima say which block holds the winner."""
    if x.device.type != "cpu" or x.shape[1] < 8 * BLOCK:
        return x.argmax(-1)
    best = _block_maxima(x).argmax(-1, keepdim=True)  # (N, 1): the first block holding the max
    scores, index = _block_scores(x, best)
    return index.gather(1, scores.argmax(-1, keepdim=True))[:, 0]


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x (N, V) -> the k largest scores of each row, best first, and their positions (N, k)
    each, as torch.topk(x, k). The k best scores lie in the k blocks with the largest maxima
    (a block left out has a maximum below k others, so below k scores of other blocks). Among
    tied scores either position may come out, as with torch's; so may any position of a -inf
    score where a row has fewer than k others."""
    if x.device.type != "cpu" or x.shape[1] < 8 * k * BLOCK:
        return x.topk(k, dim=1)
    blocks = _block_maxima(x).topk(k, dim=1).indices  # (N, k)
    scores, index = _block_scores(x, blocks)
    values, at = scores.topk(k, dim=1)
    return values, index.gather(1, at)


def beam_topk(log_probs: Tensor, scores: Tensor, want: int) -> tuple[Tensor, Tensor]:
    """log_probs (n * K, V) of the K beams of n sentences, scores (n, K) theirs so far -> each
    sentence's `want` best whole-prefix log-probs over its K * V extensions, best first, and
    their positions beam * V + token (n, want) each: qkv's C++ scan where it applies (it adds a
    beam's score only to the few log-probs that can win), else the sum's `topk`. log_probs may
    be overwritten."""
    chosen = native.beam_topk(log_probs, scores, want)
    if chosen is not None:
        return chosen
    return topk(log_probs.add_(scores.view(-1, 1)).view(len(scores), -1), want)


# --- logit edits: small pure functions, applied in order by edit_log_probs --------------------


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
    for row, toks in enumerate(history.tolist()):
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


def edit_log_probs(
    log_probs: Tensor,
    t: int,
    history: Tensor,
    at_max: Tensor,
    cfg: DecodeConfig,
    eos: int,
    pad: int | None,
) -> Tensor:
    """What every strategy does to step t's log-probabilities (N, V) before choosing: padding is
    never generated, eos not before min_len, eos forced on rows at their maximum length (`at_max`
    (N,) bool, when cfg.at_max == "eos"), no repeated n-gram of `history` (N, L)."""
    if pad is not None and pad != eos:
        log_probs[:, pad] = float("-inf")
    if t < cfg.min_len:
        log_probs[:, eos] = float("-inf")
    if cfg.at_max == "eos":
        log_probs = force(log_probs, eos, at_max)
    return no_repeat_ngram(log_probs, history, cfg.no_repeat_ngram)


def length_penalty(length: int | Tensor, alpha: float, style: str = "gnmt") -> float | Tensor:
    """What a finished hypothesis' log-prob is divided by (a tensor of lengths: elementwise).
    "gnmt": ((5 + L) / 6)^alpha (Wu et al. 2016); "power": L^alpha (fairseq, HF transformers).
    alpha 0 = plain log-prob."""
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if style == "power":
        return (length if isinstance(length, Tensor) else float(length)) ** alpha
    raise ValueError(f"unknown length penalty style {style!r}")


# --- one output per input: greedy and sampling -------------------------------------------------

Choose = Callable[[Tensor], Tensor]  # edited log-probs (N, V) -> chosen tokens (N,)


def greedy(
    step: StepFn,
    state: State,
    src_lengths: Tensor,
    cfg: DecodeConfig,
    *,
    bos: int,
    eos: int,
    pad: int | None = None,
    max_positions: int | None = None,
    prefix: Tensor | None = None,
    emit: Emit | None = None,
) -> list[Hypothesis]:
    """Take the most likely token each step: the readable baseline, the oracle for beam size 1."""
    return _one_per_row(
        step,
        state,
        src_lengths,
        cfg,
        argmax,
        bos,
        eos,
        pad,
        max_positions,
        prefix,
        emit,
    )


def sample(
    step: StepFn,
    state: State,
    src_lengths: Tensor,
    cfg: DecodeConfig,
    *,
    bos: int,
    eos: int,
    pad: int | None = None,
    max_positions: int | None = None,
    prefix: Tensor | None = None,
    emit: Emit | None = None,
) -> list[Hypothesis]:
    """Draw each token from the model's distribution, sharpened by the temperature and cut to the
    top k tokens and to the top-p nucleus; reproducible for a seed. The score is the model's
    log-probability of what was drawn."""
    generator = torch.Generator(device=src_lengths.device).manual_seed(cfg.seed)

    # Temperature -> 0 is greedy, -> infinity uniform over the allowed tokens. With the best
    # score moved to 0 first and the temperature kept within fp32's range, both ends stay finite
    # (a temperature of 1e-45 or 3.5e38 used raw made every score -inf or NaN).
    temperature = min(max(cfg.temperature, 1e-30), 1e30)

    def draw(log_probs: Tensor) -> Tensor:
        scaled = (log_probs - log_probs.amax(-1, keepdim=True)) / temperature
        logits = top_p_filter(top_k_filter(scaled, cfg.top_k), cfg.top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return _one_per_row(
        step, state, src_lengths, cfg, draw, bos, eos, pad, max_positions, prefix, emit
    )


def _one_per_row(
    step: StepFn,
    state: State,
    src_lengths: Tensor,
    cfg: DecodeConfig,
    choose: Choose,
    bos: int,
    eos: int,
    pad: int | None,
    max_positions: int | None,
    prefix: Tensor | None,
    emit: Emit | None = None,
) -> list[Hypothesis]:
    """One row per input; each step appends `choose`'s token. Finished rows leave the batch."""
    device = src_lengths.device
    b = src_lengths.shape[0]
    last = _start(prefix, b, bos, device)  # (B, P): the first step feeds the whole prefix
    limit = max_lengths(cfg, src_lengths, _cap(max_positions, last.shape[1]))  # (B,)
    out: list[list[int]] = [[] for _ in range(b)]
    log_prob = [0.0] * b
    rows = torch.arange(b, device=device)  # which input each live row is
    history = torch.empty(b, 0, dtype=torch.long, device=device)  # (N, L) generated so far
    for t in range(int(limit.max()) + 1):
        at_max = t >= limit[rows]
        log_probs = edit_log_probs(step(last, state), t, history, at_max, cfg, eos, pad)  # (N, V)
        nxt = choose(log_probs)  # (N,)
        chosen = log_probs.gather(1, nxt[:, None])[:, 0]
        is_eos = nxt == eos
        done = is_eos | (t + 1 >= limit[rows]) if cfg.at_max == "stop" else is_eos
        for r, tok, lp, e in zip(
            rows.tolist(), nxt.tolist(), chosen.tolist(), is_eos.tolist(), strict=True
        ):
            log_prob[r] += lp
            if not e:
                out[r].append(tok)
        if emit is not None:
            emit(
                [
                    (r, out[r][-1])
                    for r, e in zip(rows.tolist(), is_eos.tolist(), strict=True)
                    if not e
                ]
            )
        if done.all():
            break
        if done.any():  # drop finished rows from the batch and the state
            keep = (~done).nonzero()[:, 0]
            state.select(keep)
            rows, nxt, history = rows[keep], nxt[keep], history[keep]
        last = nxt[:, None]  # (N, 1)
        history = torch.cat([history, last], 1)
    return [Hypothesis(toks, lp, lp) for toks, lp in zip(out, log_prob, strict=True)]


# --- beam search ------------------------------------------------------------------------------


@dataclass
class Candidates:
    """One beam-search step's top 2K extensions of each sentence still searched, best first:
    (n, 2K) each."""

    log_prob: Tensor  # of the whole prefix
    origin: Tensor  # which of the sentence's K beams it extends
    token: Tensor
    finishing: Tensor  # bool: ends a hypothesis
    live: Tensor  # bool: one of the K that go on


@dataclass
class BeamTrace:
    """Every candidate beam search considered, as one tree per sentence, for the beam-tree
    picture. A node: id, parent (None for the start), step, token, log_prob (of the whole
    prefix), score (length-normalised), kept ("live", "finished" or "" = pruned)."""

    trees: list[list[dict[str, Any]]] = field(default_factory=list)
    _slot_node: list[list[int]] = field(default_factory=list)  # tree node behind each beam slot

    def start(self, n_sentences: int, beam: int, root_token: int) -> None:
        root = dict(id=0, parent=None, step=-1, token=root_token, log_prob=0.0, score=0.0)
        self.trees = [[dict(root, kept="live")] for _ in range(n_sentences)]
        self._slot_node = [[0] * beam for _ in range(n_sentences)]

    def record(self, sentences: Tensor, t: int, norm: float, c: Candidates) -> None:
        """Add one step's candidates: in rank order, until K live ones are found (the ranks
        search looked at)."""
        k = len(self._slot_node[0])
        new_slot_node = [list(row) for row in self._slot_node]
        lps, origins, toks = c.log_prob.tolist(), c.origin.tolist(), c.token.tolist()
        fin, liv = c.finishing.tolist(), c.live.tolist()
        for i, s in enumerate(sentences.tolist()):
            tree, n_live = self.trees[s], 0
            for rank in range(2 * k):
                total = lps[i][rank]
                if total == float("-inf"):
                    break
                kept = "finished" if fin[i][rank] else "live" if liv[i][rank] else ""
                parent = self._slot_node[s][origins[i][rank]]
                tree.append(
                    dict(
                        id=len(tree),
                        parent=parent,
                        step=t,
                        token=toks[i][rank],
                        log_prob=total,
                        score=total / norm,
                        kept=kept,
                    )
                )
                if kept == "live":
                    new_slot_node[s][n_live] = len(tree) - 1
                    n_live += 1
                if n_live == k:
                    break
        self._slot_node = new_slot_node

    def tokens(self, sentence: int, node: int) -> list[int]:
        """The tokens from the start (excluded) to `node` (included)."""
        tree, out = self.trees[sentence], []
        while tree[node]["parent"] is not None:
            out.append(tree[node]["token"])
            node = tree[node]["parent"]
        return out[::-1]


def beam_search(
    step: StepFn,
    state: State,
    src_lengths: Tensor,
    cfg: DecodeConfig,
    *,
    bos: int,
    eos: int,
    pad: int | None = None,
    max_positions: int | None = None,
    prefix: Tensor | None = None,
    trace: BeamTrace | None = None,
) -> list[list[Hypothesis]]:
    """Keep the K best partial outputs of each sentence; return each sentence's n best.

    Layout: the sentences still being searched, K rows each (N = n * K rows). Each step scores
    all K*V extensions of a sentence's beams and takes the top 2K: among those, an
    end-of-sentence candidate ranked in the top K finishes a hypothesis, and the best K others
    stay alive. Taking 2K guarantees K live ones even if up to K of them end. A sentence is done
    when it has K finished hypotheses and its best live beam, scored as if it ended now, cannot
    beat the worst of them; its rows then leave the batch.
    Scores are log-probabilities divided by the length penalty (length includes eos).
    `state` must hold B rows. The first step runs on them (a sentence's K beams would all read
    the same start), and its select expands them to B*K; each later step reorders and shrinks
    them with one select. The choices are made on tensors for all sentences at once; Python only
    touches the few candidates that finish (and every candidate when `trace` records the tree).
    """
    device = src_lengths.device
    b, k = src_lengths.shape[0], cfg.beam
    start = _start(prefix, b, bos, device)  # (B, P)
    p = start.shape[1]
    limit = max_lengths(cfg, src_lengths, _cap(max_positions, p))  # (B,)
    sent = torch.arange(b, device=device)  # (n,) the sentence behind each group of K rows
    tokens = start.repeat_interleave(k, dim=0)  # (N, L), the prefix included
    # only the first beam of each sentence is live at the start, so we do not get K copies
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    if trace is not None:
        trace.start(b, k, int(start[0, -1]))
    first_k = torch.arange(2 * k, device=device) < k  # (2K,) ranks that may finish a hypothesis

    for t in range(int(limit.max()) + 1):
        feed = start if t == 0 else tokens[:, -1:]  # (B, P) first, then (N, 1)
        at_max = (t >= limit[sent]).repeat_interleave(k)  # (N,)
        raw = step(feed, state)  # (N, V)
        if t == 0:  # one row per sentence: each of its K beams starts from it
            raw = raw.repeat_interleave(k, dim=0)
        log_probs = edit_log_probs(raw, t, tokens[:, p:], at_max, cfg, eos, pad)
        v = log_probs.shape[-1]
        top_lp, top_idx = beam_topk(log_probs, scores, 2 * k)  # (n, 2K) whole-prefix, best first
        origin, token = top_idx // v, top_idx % v  # which beam, which token
        norm = length_penalty(t + 1, cfg.alpha, cfg.penalty)

        possible = top_lp > float("-inf")
        ends = token == eos
        if cfg.at_max == "stop":  # the last allowed token: every candidate ends here
            ends |= (t + 1 >= limit[sent])[:, None]
        going = ~ends & possible
        c = Candidates(
            top_lp, origin, token, ends & possible & first_k, going & (going.cumsum(1) <= k)
        )
        # the live candidates first, in rank order (a stable sort on "not live")
        pick = (~c.live).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]  # (n, K)
        new_scores = top_lp.gather(1, pick).masked_fill(~c.live.gather(1, pick), float("-inf"))
        new_origin, new_token = origin.gather(1, pick), token.gather(1, pick)  # (n, K)

        for i, rank in c.finishing.nonzero().tolist():  # a few per step
            s, o, tok = int(sent[i]), int(origin[i, rank]), int(token[i, rank])
            seq = tokens[i * k + o, p:].tolist() + ([] if tok == eos else [tok])
            lp = float(top_lp[i, rank])
            finished[s].append(Hypothesis(seq, lp / norm, lp))
            finished[s].sort(key=lambda h: -h.score)
            del finished[s][k:]
        if trace is not None:
            trace.record(sent, t, norm, c)

        # Done: K finished, and no live beam would beat the worst of them: ending now (the
        # usual test, HF's; with alpha > 0 a longer beam could still win), or ever ("exact": a
        # log-prob only falls, so the best a live beam can reach is its log-prob now over the
        # penalty of the longest output allowed).
        sents = sent.tolist()
        full = torch.tensor([len(finished[s]) >= k for s in sents], device=device)
        worst = [finished[s][-1].score if finished[s] else 0.0 for s in sents]
        if cfg.finish == "exact" and cfg.alpha > 0:
            longest = (limit[sent] + 1).float()  # the longest output allowed, eos included
            best_live = new_scores[:, 0] / length_penalty(longest, cfg.alpha, cfg.penalty)
        else:
            best_live = new_scores[:, 0] / norm
        done = ~c.live.any(1) | (full & (best_live <= torch.tensor(worst, device=device)))
        if done.all():
            break
        keep = (~done).nonzero()[:, 0]  # (n',) the sentences that go on
        index = (keep[:, None] * k + new_origin[keep]).view(-1)  # (n' * K,) rows to keep
        # reorder beams and drop finished sentences: one select (after the first step the
        # state still holds one row per sentence, and row i * K + j of the layout is its row i)
        state.select(index if t else index // k)
        tokens = torch.cat([tokens[index], new_token[keep].view(-1, 1)], 1)
        scores, sent = new_scores[keep], sent[keep]

    # sentences that ran out of length without a finished hypothesis keep an empty one
    for i in range(b):
        if not finished[i]:  # cannot happen when max length forces eos; kept for safety
            finished[i].append(Hypothesis([], -math.inf, -math.inf))
    return [f[: cfg.nbest] for f in finished]


def decode(
    step: StepFn,
    state: State,
    src_lengths: Tensor,
    cfg: DecodeConfig,
    *,
    bos: int,
    eos: int,
    pad: int | None = None,
    max_positions: int | None = None,
    prefix: Tensor | None = None,
    trace: BeamTrace | None = None,
    emit: Emit | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch as `cfg` says: each input's n-best list (one hypothesis unless beam search
    asks for more). `max_positions` is the model's position limit, prefix included; `trace`
    (beam search only) receives the search tree of this very search; `emit` (greedy and
    sampling only) receives each step's new tokens."""
    kw = dict(bos=bos, eos=eos, pad=pad, max_positions=max_positions, prefix=prefix)
    if trace is not None and cfg.strategy != "beam":
        raise ValueError("a search trace needs beam search")
    if emit is not None and cfg.strategy == "beam":
        raise ValueError("beam search has no output until it ends: nothing to emit")
    match cfg.strategy:
        case "greedy":
            return [[h] for h in greedy(step, state, src_lengths, cfg, emit=emit, **kw)]
        case "sample":
            return [[h] for h in sample(step, state, src_lengths, cfg, emit=emit, **kw)]
        case "beam":
            return beam_search(step, state, src_lengths, cfg, trace=trace, **kw)
    raise AssertionError(cfg.strategy)  # DecodeConfig validated it
