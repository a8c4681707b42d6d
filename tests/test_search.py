import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.config import DecodeConfig
from qkv.search import (
    BLOCK,
    BeamTrace,
    argmax,
    beam_search,
    block_argmax,
    decode,
    greedy,
    model_step,
    no_repeat_ngram,
    top_k_filter,
    top_p_filter,
    topk,
)

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
V = 6

# Next-token probabilities given the tokens generated so far (bos not included).
TABLE = {
    (): {A: 0.6, B: 0.4},
    (A,): {EOS: 0.5, C: 0.3, B: 0.2},
    (B,): {C: 0.625, EOS: 0.375},
    (A, C): {EOS: 1.0},
    (B, C): {EOS: 1.0},
    (A, B): {EOS: 1.0},
}


# A second sentence's table: another winner ([B, B]), so rows mixed up between sentences show.
TABLE2 = {
    (): {B: 0.9, A: 0.1},
    (B,): {B: 0.8, EOS: 0.2},
    (B, B): {EOS: 1.0},
}


class PrefixState:
    """The stub's 'cache': each row's sentence and tokens so far. select() reorders rows like a
    KV cache."""

    def __init__(self, n: int, tables=None):
        self.prefixes: list[tuple[int, ...]] = [()] * n
        self.tables = list(tables or [TABLE] * n)
        self.selects = 0

    def select(self, index: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]
        self.tables = [self.tables[i] for i in index.tolist()]
        self.selects += 1


def table_step(tokens: torch.Tensor, state: PrefixState) -> torch.Tensor:
    rows = tokens.tolist()  # (N, L): a whole prefix on the first step, then one token
    state.prefixes = [p + tuple(t) for p, t in zip(state.prefixes, rows, strict=True)]
    out = torch.full((len(state.prefixes), V), float("-inf"))
    for row, (prefix, table) in enumerate(zip(state.prefixes, state.tables, strict=True)):
        for tok, p in table.get(prefix[1:], {EOS: 1.0}).items():  # prefix[0] is bos
            out[row, tok] = math.log(p)
    return out


def run_beam(beam=2, alpha=0.0, nbest=2, n=1, trace=None, **cfg):
    cfg = DecodeConfig(beam=beam, alpha=alpha, nbest=nbest, **cfg)
    return beam_search(
        table_step, PrefixState(n), torch.full((n,), 3), cfg, bos=BOS, eos=EOS, trace=trace
    )


def gnmt(log_prob: float, length: int, alpha: float) -> float:
    return log_prob / ((5 + length) / 6) ** alpha


def test_beam_exact_hypotheses_and_scores():
    (hyps,) = run_beam()
    # [A] ends at step 1 (0.6 * 0.5); [B, C] and [A, C] end at step 2: 0.4*0.625, 0.6*0.3
    assert [h.tokens for h in hyps] == [[A], [B, C]]
    assert hyps[0].log_prob == pytest.approx(math.log(0.3))
    assert hyps[1].log_prob == pytest.approx(math.log(0.25))
    assert [h.score for h in hyps] == pytest.approx([math.log(0.3), math.log(0.25)])


def test_length_penalty_flips_the_winner():
    alpha = 2.0
    (hyps,) = run_beam(alpha=alpha)
    assert [h.tokens for h in hyps] == [[B, C], [A]]
    assert hyps[0].score == pytest.approx(gnmt(math.log(0.25), 3, alpha))  # length counts eos
    assert hyps[1].score == pytest.approx(gnmt(math.log(0.3), 2, alpha))


def test_exact_finish_keeps_searching_for_a_longer_winner():
    # [A] ends at step 1 with 0.55; [A, B, C] reaches 0.45 but ends only at step 3. With
    # alpha 2 the longer one wins (0.45 over a larger penalty), but at step 1 the live [A, B],
    # scored as if it ended then, loses to [A]: the usual test stops there, "exact" goes on.
    table = {(): {A: 1.0}, (A,): {EOS: 0.55, B: 0.45}, (A, B): {C: 1.0}, (A, B, C): {EOS: 1.0}}

    def run(**kw):
        cfg = DecodeConfig(beam=1, **kw)
        state = PrefixState(1, [table])
        (hyps,) = beam_search(table_step, state, torch.tensor([3]), cfg, bos=BOS, eos=EOS)
        return hyps[0], state.selects

    (short, steps_h), (long, steps_e) = run(alpha=2.0), run(alpha=2.0, finish="exact")
    assert short.tokens == [A] and short.score == pytest.approx(gnmt(math.log(0.55), 2, 2.0))
    assert long.tokens == [A, B, C] and long.score == pytest.approx(gnmt(math.log(0.45), 4, 2.0))
    assert long.score > short.score and steps_e > steps_h
    # without a length penalty a log-prob only falls: the usual test is already exact
    assert run(alpha=0.0)[0].tokens == run(alpha=0.0, finish="exact")[0].tokens == [A]


def test_beam_one_is_greedy_on_the_table():
    (hyps,) = run_beam(beam=1, nbest=1)
    greedy_cfg = DecodeConfig(strategy="greedy")
    (g,) = greedy(table_step, PrefixState(1), torch.tensor([3]), greedy_cfg, bos=BOS, eos=EOS)
    assert hyps[0].tokens == g.tokens == [A]
    assert g.log_prob == pytest.approx(math.log(0.3))


def test_batched_beams_are_independent():
    """Sentences with different tables in one batch get what each gets alone."""
    cfg = DecodeConfig(beam=2, nbest=2, alpha=0.0)
    tables = [TABLE, TABLE2, TABLE, TABLE2]

    def run(ts):
        state = PrefixState(len(ts), ts)
        return beam_search(table_step, state, torch.full((len(ts),), 3), cfg, bos=BOS, eos=EOS)

    together = run(tables)
    alone = [run([t])[0] for t in tables]
    assert together == alone
    assert together[1][0].tokens == [B, B] and together[0][0].tokens == [A]


def test_decode_dispatches_on_the_strategy():
    for strategy, want in (("greedy", [A]), ("beam", [A])):
        cfg = DecodeConfig(strategy=strategy, beam=2, alpha=0.0)
        (hyps,) = decode(table_step, PrefixState(1), torch.tensor([3]), cfg, bos=BOS, eos=EOS)
        assert len(hyps) == 1 and hyps[0].tokens == want
    with pytest.raises(ValueError, match="beam search"):
        decode(
            table_step,
            PrefixState(1),
            torch.tensor([3]),
            DecodeConfig(strategy="greedy"),
            bos=BOS,
            eos=EOS,
            trace=BeamTrace(),
        )


def test_decode_from_a_prefix_continues_it():
    """A prefix is fed in one step; the output continues it and excludes it."""
    prefix = torch.tensor([[BOS, B]])
    for strategy in ("greedy", "beam"):
        cfg = DecodeConfig(strategy=strategy, beam=2, alpha=0.0)
        state = PrefixState(1)
        (hyps,) = decode(table_step, state, torch.tensor([3]), cfg, bos=BOS, eos=EOS, prefix=prefix)
        assert hyps[0].tokens == [C]  # after [B]: C (0.625) beats eos (0.375)
        assert hyps[0].log_prob == pytest.approx(math.log(0.625))


def _sample_many(cfg, n=400):
    state = PrefixState(n)
    hyps = decode(table_step, state, torch.full((n,), 3), cfg, bos=BOS, eos=EOS)
    return [tuple(h[0].tokens) for h in hyps]


def test_sampling_is_reproducible_and_follows_the_table():
    cfg = DecodeConfig(strategy="sample", seed=7)
    a, b = _sample_many(cfg), _sample_many(cfg)
    assert a == b  # same seed, same draws
    assert a != _sample_many(cfg.replace(seed=8))
    # every possible output appears, at about its probability: [A] 0.3, [B, C] 0.25, ...
    assert set(a) == {(A,), (A, C), (A, B), (B, C), (B,)}
    assert abs(a.count((A,)) / len(a) - 0.3) < 0.08


def test_sampling_respects_top_k_and_top_p():
    # top-k 1 is greedy; top-p 0.5 keeps only A first (0.6 >= 0.5), then only eos after A
    assert set(_sample_many(DecodeConfig(strategy="sample", top_k=1))) == {(A,)}
    assert set(_sample_many(DecodeConfig(strategy="sample", top_p=0.5))) == {(A,)}
    # top-k 2 after A allows eos and C, never B (0.2)
    outs = set(_sample_many(DecodeConfig(strategy="sample", top_k=2)))
    assert (A, B) not in outs and {(A,), (A, C)} <= outs
    # a low temperature sharpens towards greedy
    cold = _sample_many(DecodeConfig(strategy="sample", temperature=0.05))
    assert cold.count((A,)) == len(cold)


@pytest.mark.parametrize("t", [5e-324, 1e-45, 3.4028235677973366e38, 1e308])
def test_sampling_at_extreme_temperatures_is_greedy_or_uniform_never_nan(t):
    """Temperatures beyond fp32's range (found by the server's schema fuzzing: 3.4028235677973366e38
    overflowed to inf, and -inf / inf is NaN): near 0 sampling is greedy, huge it is uniform."""
    outs = _sample_many(DecodeConfig(strategy="sample", temperature=t), n=2000)
    if t < 1:
        assert set(outs) == {(A,)}
    else:  # A or B first, each half the time (0.6 / 0.4 at temperature 1)
        assert abs(sum(o[0] == A for o in outs) / len(outs) - 0.5) < 0.04


def test_min_and_max_length():
    (hyps,) = run_beam(beam=2, nbest=1, min_len=2)
    assert hyps[0].tokens == [B, C]  # [A] alone is too short
    (hyps,) = run_beam(beam=2, nbest=2, max_len_a=0, max_len_b=1)
    assert all(h.tokens in ([A], [B]) for h in hyps)  # eos forced after one token
    assert {tuple(h.tokens) for h in hyps} == {(A,), (B,)}
    with pytest.raises(ValueError, match="nbest"):
        run_beam(beam=2, nbest=3)


def test_trace_is_the_search_tree():
    trace = BeamTrace()
    (hyps,) = run_beam(trace=trace, n=1)
    (tree,) = trace.trees
    step1 = [(n["token"], n["kept"], n["parent"]) for n in tree if n["step"] == 1]
    # from beam [A] (node 1): eos finishes, C lives; from [B] (node 2): C lives
    assert step1 == [(EOS, "finished", 1), (C, "live", 2), (C, "live", 1)]
    finished = sorted((n for n in tree if n["kept"] == "finished"), key=lambda n: -n["score"])
    # the trace's final hypotheses are beam search's own output
    assert [trace.tokens(0, n["id"])[:-1] for n in finished[:2]] == [h.tokens for h in hyps]
    assert [n["score"] for n in finished[:2]] == pytest.approx([h.score for h in hyps])


def test_no_repeat_ngram():
    lp = torch.zeros(1, 8)
    history = torch.tensor([[3, 4, 5, 3]])  # bigram (3, 4) seen: after 3, 4 is banned
    out = no_repeat_ngram(lp.clone(), history, 2)
    assert out[0, 4] == float("-inf") and (out[0, [0, 1, 2, 3, 5, 6, 7]] == 0).all()


def test_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all()
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("no_repeat", [0, 2])
def test_beam_one_equals_greedy_on_a_model(tiny, no_repeat):
    model = tiny()
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, 23, (5, 9), generator=g)
    src[2, 5:] = 0
    src[4, 3:] = 0
    lengths = (src != 0).sum(1)
    cfg = DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4, no_repeat_ngram=no_repeat)
    kw = dict(bos=1, eos=2)
    with torch.no_grad():
        gr = greedy(model_step(model), model.start(src), lengths, cfg, **kw)
        bs = beam_search(model_step(model), model.start(src), lengths, cfg, **kw)
    assert [h.tokens for h in gr] == [b[0].tokens for b in bs]
    for h, b in zip(gr, bs, strict=True):
        assert h.log_prob == pytest.approx(b[0].log_prob, abs=1e-4)


def test_beam_scores_match_the_model(tiny):
    """Each returned hypothesis' log-prob equals the model's own full-forward score of it."""
    model = tiny()
    src = torch.randint(3, 23, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cfg = DecodeConfig(beam=4, nbest=3, max_len_a=0, max_len_b=6)
        out = beam_search(
            model_step(model), model.start(src), torch.tensor([7, 7]), cfg, bos=1, eos=2
        )
        for i, hyps in enumerate(out):
            assert len(hyps) == 3
            assert hyps[0].score >= hyps[1].score >= hyps[2].score
            for h in hyps:
                tgt = torch.tensor([[1] + h.tokens])
                lp = model(src[i : i + 1], tgt).log_softmax(-1)[0]
                want = sum(lp[j, t].item() for j, t in enumerate(h.tokens + [2]))
                assert h.log_prob == pytest.approx(want, abs=1e-4)


def test_a_decode_from_a_prefix_equals_teacher_forcing(tiny):
    """Greedy from a prompt on a decoder-only model: each chosen token is the argmax of the
    full forward over prompt + output so far."""
    model = tiny(arch="decoder-only", n_encoder_layers=0)
    prompt = torch.tensor([[1, 5, 9, 4], [1, 7, 7, 3]])
    cfg = DecodeConfig(strategy="greedy", max_len_a=0, max_len_b=6, min_len=6)
    with torch.no_grad():
        out = decode(
            model_step(model), model.start(), torch.tensor([4, 4]), cfg, bos=1, eos=2, prefix=prompt
        )
        for row, (h,) in enumerate(out):
            assert len(h.tokens) == 6
            full = torch.tensor([prompt[row].tolist() + h.tokens])
            logits = model(full)[0]  # (T, V)
            for j, tok in enumerate(h.tokens):
                lp = logits[prompt.shape[1] - 1 + j].log_softmax(-1)
                lp[2] = float("-inf")  # eos is forbidden below min_len
                assert int(lp.argmax()) == tok


def test_beam_search_runs_its_first_step_once_per_sentence():
    # a sentence's K beams all start from bos: the first step computes one row per sentence,
    # the later ones K rows per sentence still searched
    rows_seen: list[int] = []

    def spy(tokens: torch.Tensor, state: PrefixState) -> torch.Tensor:
        rows_seen.append(len(tokens))
        return table_step(tokens, state)

    cfg = DecodeConfig(beam=3, nbest=3, alpha=0.0)
    hyps = beam_search(
        spy, PrefixState(2, [TABLE, TABLE2]), torch.full((2,), 3), cfg, bos=BOS, eos=EOS
    )
    assert rows_seen[:2] == [2, 6]
    # by hand: [A] 0.3 ends at step 1 ([B] 0.15 ranks 4th of 6, too low to end there); then
    # [B, C] 0.25 and [A, C] 0.18 beat [A, B] 0.12; TABLE2: [B, B] 0.72
    assert [h.tokens for h in hyps[0]] == [[A], [B, C], [A, C]]
    assert hyps[1][0].tokens == [B, B]


# --- the block-wise argmax and top-k, against torch's ------------------------------------------


def score_rows(rows: int, width: int, kind: str, seed: int) -> torch.Tensor:
    """Rows of scores: distinct, many ties (small integers), or mostly -inf (a forced token)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(0, 4, (rows, width), generator=g).float()
    x = torch.randn(rows, width, generator=g)
    if kind == "few finite":
        x[:, 3:] = float("-inf")
    return x


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(8 * BLOCK, 20 * BLOCK),  # a last, shorter block in most draws
    kind=st.sampled_from(["distinct", "ties", "few finite"]),
    seed=st.integers(0, 2**16),
)
def test_argmax_is_torchs_first_largest(width, kind, seed):
    """By blocks (where the C++ scans are off) and the route search takes here."""
    x = score_rows(5, width, kind, seed)
    for route in (block_argmax, argmax):
        assert torch.equal(route(x), x.argmax(-1))
    x[1, width // 3] = x[3, width - 1] = float("nan")  # NaN counts as largest, as in torch
    for route in (block_argmax, argmax):
        assert torch.equal(route(x), x.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 10),
    blocks=st.integers(8, 30),
    tail=st.integers(0, BLOCK - 1),
    kind=st.sampled_from(["distinct", "ties", "few finite"]),
    seed=st.integers(0, 2**16),
)
def test_topk_finds_torchs_k_largest(k, blocks, tail, kind, seed):
    x = score_rows(4, k * blocks * BLOCK + tail, kind, seed)
    values, index = topk(x, k)
    want = x.topk(k, dim=1).values
    assert torch.equal(values, want)  # the same scores, best first
    assert torch.equal(x.gather(1, index), values)  # found where they are
    finite = values > float("-inf")
    for row, ok in zip(index, finite, strict=True):  # each position once
        assert len(set(row[ok].tolist())) == int(ok.sum())


def test_topk_and_argmax_leave_short_rows_to_torch():
    x = torch.randn(3, 100)
    assert torch.equal(block_argmax(x), x.argmax(-1))
    assert torch.equal(topk(x, 5)[1], x.topk(5).indices)


def test_topk_reads_the_last_short_block_without_its_neighbours_scores():
    # the short block is read as the row's last BLOCK scores: those of the block before it
    # must not count twice
    whole = 16 * BLOCK
    x = torch.randn(2, whole + 10, generator=torch.Generator().manual_seed(0))
    x[:, whole - 5] = 10.0  # in the last whole block, within BLOCK of the row's end
    x[:, whole + 3] = 9.0  # in the short block
    values, index = topk(x, 2)
    assert values.tolist() == [[10.0, 9.0]] * 2
    assert index.tolist() == [[whole - 5, whole + 3]] * 2
