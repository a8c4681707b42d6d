"""Fixed-shape decoding (qkv/fixed.py) against the eager path, the reference: same tokens and
scores, eager and compiled; compiled graphs thrown away when the weights change."""

import pytest
import torch

from qkv.config import DecodeConfig
from qkv.fixed import FixedDecoder, weights_key
from qkv.translate import Translator


def sources(n=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 11, (n,), generator=g).tolist()
    return [torch.randint(3, 23, (k,), generator=g).tolist() + [2] for k in lengths]


def same(got, want):
    assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in want]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)


CONFIGS = [
    DecodeConfig(strategy="greedy", max_len_a=1.0, max_len_b=4),
    DecodeConfig(strategy="beam", beam=3, nbest=2, max_len_a=1.0, max_len_b=4),
    DecodeConfig(strategy="beam", beam=4, alpha=1.0, max_len_b=20, min_len=3),
    DecodeConfig(strategy="sample", temperature=2.0, seed=5, max_len_b=12),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.strategy}{c.beam}")
def test_fixed_shape_decoding_equals_the_eager_path(tiny, cfg):
    model = tiny()
    src = sources()
    want = Translator(model, None, batch_size=3).translate_ids(src, cfg)
    # batches of 3 over 7 sentences: the last batch is padded to 3 rows, sources to 8 or 16
    # positions, the steps to a multiple of 16; sentences finish at different steps
    fixed = Translator(model, None, batch_size=3, fixed=FixedDecoder(model))
    same(fixed.translate_ids(src, cfg), want)


def test_fixed_state_refuses_what_it_cannot_hold(tiny):
    model = tiny()
    step, state = FixedDecoder(model).start(torch.tensor([[5, 6, 2], [7, 2, 0]]), steps=2)
    with pytest.raises(ValueError, match="one token per step"):
        step(torch.ones(2, 2, dtype=torch.long), state)
    step(torch.ones(2, 1, dtype=torch.long), state)
    step(torch.ones(2, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="sized for 2 steps"):
        step(torch.ones(2, 1, dtype=torch.long), state)


def test_weights_key_follows_values_not_identity(tiny):
    model = tiny()
    key = weights_key(model)
    assert weights_key(tiny()) == key  # the same values (same seed)
    with torch.no_grad():
        model.decoder.layers[0].ff.fc1.weight[0, 0] += 0.5  # in place, as an optimizer does
    assert weights_key(model) != key


def test_compiled_equals_eager_and_recompiles_for_new_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny(n_encoder_layers=1, n_decoder_layers=1)
    src = sources(n=4)
    cfg = CONFIGS[0]
    eager = Translator(model, None, batch_size=4)
    fixed = FixedDecoder(model, compile=True)
    compiled = Translator(model, None, batch_size=4, fixed=fixed)
    same(compiled.translate_ids(src, cfg), eager.translate_ids(src, cfg))
    compiled.translate_ids(src, cfg)
    assert fixed.compiles == 1  # the same shapes and weights: no new graph
    with torch.no_grad():  # new weights in place (frozen into the old graph as constants)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    same(compiled.translate_ids(src, cfg), eager.translate_ids(src, cfg))
    assert fixed.compiles == 2


def test_compile_with_int8_is_a_usage_error(capsys, trained):
    from tests.test_cli_translation import run

    out_dir, _, _ = trained
    rc, _, err = run(
        capsys, "translate", "--model", str(out_dir), "--compile", "--int8", stdin="x\n"
    )
    assert rc == 2 and "--compile and --int8 do not go together" in err
    assert len(err.strip().splitlines()) == 1
