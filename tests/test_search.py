import math

import pytest
import torch

from qkv.search import (
    BeamTrace,
    Limits,
    beam_search,
    greedy,
    model_step,
    no_repeat_ngram,
    top_k_filter,
    top_p_filter,
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


class PrefixState:
    """The stub's 'cache': each row's tokens so far. select() reorders rows like a KV cache."""

    def __init__(self, n: int):
        self.prefixes: list[tuple[int, ...]] = [()] * n
        self.selects = 0

    def select(self, index: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]
        self.selects += 1


def table_step(tokens: torch.Tensor, state: PrefixState) -> torch.Tensor:
    state.prefixes = [p + (t,) for p, t in zip(state.prefixes, tokens[:, 0].tolist(), strict=True)]
    out = torch.full((len(state.prefixes), V), float("-inf"))
    for row, prefix in enumerate(state.prefixes):
        for tok, p in TABLE.get(prefix[1:], {EOS: 1.0}).items():  # prefix[0] is bos
            out[row, tok] = math.log(p)
    return out


def run_beam(beam=2, alpha=0.0, nbest=2, n=1, **kw):
    return beam_search(
        table_step,
        PrefixState(n),
        torch.full((n,), 3),
        bos=BOS,
        eos=EOS,
        beam=beam,
        alpha=alpha,
        nbest=nbest,
        **kw,
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


def test_beam_one_is_greedy_on_the_table():
    (hyps,) = run_beam(beam=1, nbest=1)
    (g,) = greedy(table_step, PrefixState(1), torch.tensor([3]), bos=BOS, eos=EOS)
    assert hyps[0].tokens == g.tokens == [A]
    assert g.log_prob == pytest.approx(math.log(0.3))


def test_batched_beams_are_independent():
    together = run_beam(n=3)
    assert together == [run_beam(n=1)[0]] * 3


def test_min_and_max_length():
    (hyps,) = run_beam(beam=2, nbest=1, limits=Limits(min_len=2))
    assert hyps[0].tokens == [B, C]  # [A] alone is too short
    (hyps,) = run_beam(beam=2, nbest=2, limits=Limits(max_len_a=0, max_len_b=1))
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
    limits = Limits(max_len_a=1.0, max_len_b=4)
    kw = dict(bos=1, eos=2, limits=limits, no_repeat=no_repeat)
    with torch.no_grad():
        gr = greedy(model_step(model), model.start(src), lengths, **kw)
        bs = beam_search(model_step(model), model.start(src), lengths, beam=1, **kw)
    assert [h.tokens for h in gr] == [b[0].tokens for b in bs]
    for h, b in zip(gr, bs, strict=True):
        assert h.log_prob == pytest.approx(b[0].log_prob, abs=1e-4)


def test_beam_scores_match_the_model(tiny):
    """Each returned hypothesis' log-prob equals the model's own full-forward score of it."""
    model = tiny()
    src = torch.randint(3, 23, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = beam_search(
            model_step(model),
            model.start(src),
            torch.tensor([7, 7]),
            bos=1,
            eos=2,
            beam=4,
            nbest=3,
            limits=Limits(max_len_a=0, max_len_b=6),
        )
        for i, hyps in enumerate(out):
            assert len(hyps) == 3
            assert hyps[0].score >= hyps[1].score >= hyps[2].score
            for h in hyps:
                tgt = torch.tensor([[1] + h.tokens])
                lp = model(src[i : i + 1], tgt).log_softmax(-1)[0]
                want = sum(lp[j, t].item() for j, t in enumerate(h.tokens + [2]))
                assert h.log_prob == pytest.approx(want, abs=1e-4)
