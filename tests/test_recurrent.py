"""The recurrent baselines (qkv.recurrent): what the fixed-vector decoder can see, the additive
attention against a hand computation, incremental decoding, padding, and the commands on them."""

import math

import pytest
import torch

from qkv.cli import main
from qkv.config import DecodeConfig
from qkv.inspect import record_attention
from qkv.models import from_config
from qkv.recurrent import AdditiveAttention, final_state
from qkv.search import decode, model_step

from .conftest import tiny_config


def build(arch: str, **overrides):
    torch.manual_seed(0)
    return from_config(tiny_config(arch=arch, **overrides)).eval()


def batch():
    """Three sources of different lengths (eos = 2, pad = 0) and teacher-forced targets."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 23, (3, 7), generator=g)
    src[0, 6] = 2
    src[1, 3], src[1, 4:] = 2, 0
    src[2, 5], src[2, 6:] = 2, 0
    tgt = torch.randint(4, 23, (3, 5), generator=g)
    tgt[:, 0] = 1
    return src, tgt


def test_fixed_vector_decoder_sees_only_the_final_state():
    model = build("gru")
    src, tgt = batch()
    with torch.no_grad():
        memory, mask = model.encode(src)
        logits = model.lm_head(model.decoder(tgt, memory, mask))
        half = memory.shape[-1] // 2
        last = mask[:, 0, 0].sum(-1) - 1
        # every encoder state changed except the two halves of the final state
        noise = torch.randn_like(memory) * 5
        keep = torch.zeros_like(memory, dtype=torch.bool)
        rows = torch.arange(3)
        keep[rows, last, :half] = True
        keep[:, 0, half:] = True
        changed = torch.where(keep, memory, memory + noise)
        same = model.lm_head(model.decoder(tgt, changed, mask))
        assert torch.equal(final_state(changed, mask), final_state(memory, mask))
        assert torch.equal(same, logits)
        # and the final state itself does matter
        moved = memory.clone()
        moved[rows, last, :half] += 1.0
        assert not torch.allclose(model.lm_head(model.decoder(tgt, moved, mask)), logits)


def test_final_state_is_each_direction_after_the_whole_sentence():
    """Forward half at the last real token, backward half at the first: what a GRU run over the
    sentence alone ends with (h_n), whatever the padding after it."""
    model = build("gru", n_encoder_layers=1)
    src, _ = batch()
    with torch.no_grad():
        memory, mask = model.encode(src)
        summary = final_state(memory, mask)
        for row in range(3):
            n = int(mask[row, 0, 0].sum())
            x = model.encoder.embed(src[row : row + 1, :n]) * model.encoder.scale
            _, h_n = model.encoder.rnn(x)  # (2 directions, 1, D/2)
            torch.testing.assert_close(summary[row], torch.cat([h_n[0, 0], h_n[1, 0]]))


def test_additive_attention_by_hand():
    torch.manual_seed(0)
    att = AdditiveAttention(d_query=2, d_key=3, d_attn=2)
    q = torch.tensor([[0.5, -1.0]])
    memory = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 3.0, 3.0]]])
    mask = torch.tensor([[True, True, False]])  # the third source position is padding
    with torch.no_grad():
        context, weights = att(q, att.keys(memory), memory, mask)
    W, U, b = att.query.weight.detach(), att.key.weight.detach(), att.key.bias.detach()
    v = att.v.weight.detach()[0]
    scores = []
    for j in range(2):
        hidden = [
            math.tanh(
                sum(float(W[a, i]) * float(q[0, i]) for i in range(2))
                + sum(float(U[a, i]) * float(memory[0, j, i]) for i in range(3))
                + float(b[a])
            )
            for a in range(2)
        ]
        scores.append(sum(float(v[a]) * hidden[a] for a in range(2)))
    expected = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    assert weights[0].tolist() == pytest.approx(expected + [0.0], abs=1e-6)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    mix = [sum(expected[j] * float(memory[0, j, i]) for j in range(2)) for i in range(3)]
    assert context[0].tolist() == pytest.approx(mix, abs=1e-6)


@pytest.mark.parametrize("arch", ["gru", "gru-attention"])
def test_incremental_decoding_equals_the_full_forward(arch):
    model = build(arch)
    src, tgt = batch()
    with torch.no_grad():
        full = model(src, tgt)
        cache = model.start(src)
        first = model.step(tgt[:, :2], cache)  # a two-token prefix, then one at a time
        rest = [model.step(tgt[:, i : i + 1], cache) for i in range(2, tgt.shape[1])]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gru", "gru-attention"])
def test_padding_changes_nothing(arch):
    model = build(arch)
    src, tgt = batch()
    with torch.no_grad():
        together = model(src, tgt)
        for row in range(3):
            n = int((src[row] != 0).sum())
            alone = model(src[row : row + 1, :n], tgt[row : row + 1])
            torch.testing.assert_close(alone[0], together[row], rtol=1e-5, atol=1e-5)


def test_attention_weights_are_recorded_and_sum_to_one():
    model = build("gru-attention")
    src, tgt = batch()
    with torch.no_grad(), record_attention(model) as rec:
        model(src, tgt)
    (w,) = rec["decoder.cross_attn"]
    assert w.shape == (3, 1, 5, 7)  # (B, one head, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 1, 5))
    assert float(w[1, :, :, 4:].abs().max()) == 0.0  # never on padding


@pytest.mark.parametrize("arch", ["gru", "gru-attention"])
def test_beam_search_reorders_the_recurrent_cache(arch):
    """Beam 1 is greedy: the same tokens, whatever reordering beam search does to the cache."""
    model = build(arch)
    src, _ = batch()
    lengths = (src != 0).sum(-1)
    args = dict(bos=1, eos=2, pad=0, max_positions=20)
    with torch.no_grad():
        greedy = decode(
            model_step(model), model.start(src), lengths, DecodeConfig("greedy"), **args
        )
        beam1 = decode(
            model_step(model), model.start(src), lengths, DecodeConfig(beam=1, alpha=0.0), **args
        )
        beam4 = decode(model_step(model), model.start(src), lengths, DecodeConfig(beam=4), **args)
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam1]
    # beam 4's best is scored by a teacher-forced pass over it
    with torch.no_grad():
        for row, (hyp,) in enumerate(beam4):
            tgt = torch.tensor([[1] + hyp.tokens])
            n = int(lengths[row])
            lp = model(src[row : row + 1, :n], tgt).log_softmax(-1)[0]
            total = sum(float(lp[i, t]) for i, t in enumerate(hyp.tokens + [2]))
            assert hyp.log_prob == pytest.approx(total, abs=1e-4)


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def gru_run(corpus, tmp_path_factory):
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("gru")
    argv = ["train", "--preset", "tiny", "--arch", "gru-attention", "--out", str(out)]
    argv += ["--src", str(root / "train.de"), "--tgt", str(root / "train.en"), "--threads", "1"]
    argv += ["--max-steps", "300", "--eval-every", "300", "--lr", "0.01"]
    assert main(argv) == 0
    return out


def test_the_commands_on_a_gru_attention_model(capsys, gru_run, tmp_path):
    config = (gru_run / "train_config.json").read_text()
    assert '"arch": "gru-attention"' in config
    src = tmp_path / "in.de"
    src.write_text("eins Hund läuft\nzwei Katze schläft\n", encoding="utf-8")
    rc, out, _ = run(capsys, "translate", "--model", str(gru_run), "--input", str(src))
    assert rc == 0
    assert out.splitlines() == ["one dog runs", "two cat sleeps"]  # it learned the toy language
    rc, out, err = run(
        capsys,
        *("explain", "--model", str(gru_run), "zwei Katze schläft", "--beam", "5"),
        *("--out", str(tmp_path)),
    )
    assert rc == 0 and out.strip() == "two cat sleeps"
    assert (tmp_path / "alignment.png").is_file() and (tmp_path / "attention.html").is_file()


def test_arch_is_for_translation_only(capsys, tmp_path):
    rc, _, err = run(
        capsys, "train", "--preset", "shakespeare-char", "--arch", "gru", "--out", str(tmp_path)
    )
    assert rc == 2 and "translation model" in err and "Traceback" not in err
