"""Fixed-shape decoding (qkv/fixed.py) against the eager path, the reference: same tokens and
scores, eager and compiled; compiled graphs thrown away when the weights change."""

from pathlib import Path

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


def test_beam_search_on_a_state_started_without_its_group_is_refused(tiny):
    # started for greedy (group 1), the state holds one row per sentence: beam search's first
    # select asks for K, which it once took silently and decoded garbage
    from qkv.search import beam_search, max_steps

    model = tiny()
    src = torch.tensor([[5, 6, 2], [7, 2, 0]])
    cfg = DecodeConfig(strategy="beam", beam=3, max_len_b=4)
    lengths = torch.tensor([3, 2])
    step, state = FixedDecoder(model).start(src, max_steps(cfg, lengths, None))
    with pytest.raises(ValueError, match="pass the beam size as the group"):
        beam_search(step, state, lengths, cfg, bos=1, eos=2, pad=0)


def test_weights_key_follows_values_not_identity(tiny):
    model = tiny()
    key = weights_key(model)
    assert weights_key(tiny()) == key  # the same values (same seed)
    with torch.no_grad():
        model.decoder.layers[0].ff.fc1.weight[0, 0] += 0.5  # in place, as an optimizer does
    assert weights_key(model) != key


@pytest.mark.parametrize("freeze", [False, True], ids=["weights-as-inputs", "frozen"])
def test_compiled_equals_eager_and_follows_new_weights(tiny, tmp_path, monkeypatch, freeze):
    """Compiled == eager; after an in-place change of every weight (as an optimizer makes) still
    == eager: weights as graph inputs are read afresh (no new graph), frozen ones are constants
    of the old graph, so the fingerprint check must throw it away and compile again."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny(n_encoder_layers=1, n_decoder_layers=1)
    src = sources(n=4)
    cfg = CONFIGS[0]
    eager = Translator(model, None, batch_size=4)
    fixed = FixedDecoder(model, compile=True, freeze=freeze)
    compiled = Translator(model, None, batch_size=4, fixed=fixed)
    same(compiled.translate_ids(src, cfg), eager.translate_ids(src, cfg))
    compiled.translate_ids(src, cfg)
    assert fixed.compiles == 1  # the same shapes and weights: no new graph
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    same(compiled.translate_ids(src, cfg), eager.translate_ids(src, cfg))
    assert fixed.compiles == (2 if freeze else 1)


COMPILE_ONCE = """
import json, sys, torch
from torch._dynamo.utils import counters
from qkv.config import DecodeConfig
from qkv.fixed import FixedDecoder
from qkv.models import from_config
from qkv.translate import Translator
from tests.conftest import tiny_config
torch.manual_seed(0)
model = from_config(tiny_config(n_encoder_layers=1, n_decoder_layers=1)).eval()
fixed = FixedDecoder(model, compile=True)
cfg = DecodeConfig(strategy="greedy", max_len_a=1.0, max_len_b=4)
out = Translator(model, None, batch_size=4, fixed=fixed).translate_ids([[5, 6, 7, 2]] * 4, cfg)
print(json.dumps({"tokens": out[0][0].tokens, **counters["inductor"]}))
"""


def test_a_second_process_takes_the_compiled_graph_from_the_disk_cache(tmp_path):
    """`qkv translate --compile` run twice: the second process finds the first one's graph in
    inductor's on-disk cache (a hit, no miss) instead of lowering it again. (With frozen
    weights inductor bypasses that cache: each process would lower every graph again.)"""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_ONCE], env=env, capture_output=True, text=True,
            timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["tokens"] == second["tokens"]
    assert first.get("fxgraph_cache_miss", 0) >= 1, first
    assert second.get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in second, second


def test_compile_with_int8_is_a_usage_error(capsys, trained):
    from tests.test_cli_translation import run

    out_dir, _, _ = trained
    rc, _, err = run(
        capsys, "translate", "--model", str(out_dir), "--compile", "--int8", stdin="x\n"
    )
    assert rc == 2 and "--compile and --int8 do not go together" in err
    assert len(err.strip().splitlines()) == 1
