"""The length penalty tuned on held-out data (qkv/tuning.py): the alpha with the best BLEU wins,
decoding.json is checked on reading and listed in the manifest, and what it holds becomes the
default of the commands and the server (a flag or request field still wins); training a
translation model with tune_alphas writes it for best/ and averaged/."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from qkv import checkpoint, tuning
from qkv.checkpoint import CheckpointError
from qkv.cli import main
from qkv.config import DecodeConfig
from qkv.server import Limits, create_app
from qkv.translate import Translator

from .conftest import tiny_run

REFS = ["the dog runs now", "a cat sleeps", "the red dog sleeps"]
PAIRS = [(f"src {i}", r) for i, r in enumerate(REFS)]


def fake_translate(good: set[float]):
    """References for an alpha in `good`, else each reference cut to its first word."""

    def translate(sources, cfg: DecodeConfig):
        assert cfg.strategy == "beam" and cfg.beam == 5
        return REFS if cfg.alpha in good else [r.split()[0] for r in REFS]

    return translate


def test_the_alpha_with_the_best_bleu_wins():
    logs: list[str] = []
    tuned = tuning.tune_alpha(fake_translate({1.3}), PAIRS, "en", (0.6, 1.3, 2.0), log=logs.append)
    assert tuned.alpha == 1.3 and tuned.bleu[1.3] == pytest.approx(100.0)
    assert tuned.bleu[0.6] < 1 and tuned.bleu[2.0] < 1
    assert (tuned.beam, tuned.sentences) == (5, 3) and len(logs) == 3
    # a tie goes to the smaller alpha, whatever the order they were given in
    assert tuning.tune_alpha(fake_translate({1.0, 1.3}), PAIRS, "en", (1.3, 1.0)).alpha == 1.0
    with pytest.raises(ValueError):
        tuning.tune_alpha(fake_translate({1.0}), PAIRS, "en", ())


def configs_seen(monkeypatch) -> list[DecodeConfig]:
    """Every DecodeConfig Translator.translate is called with from now on (it still runs)."""
    seen: list[DecodeConfig] = []
    real = Translator.translate

    def spy(self, sentences, cfg):
        seen.append(cfg)
        return real(self, sentences, cfg)

    monkeypatch.setattr(Translator, "translate", spy)
    return seen


@pytest.fixture
def model_dir(trained, tmp_path):
    out, _, _ = trained
    d = tmp_path / "model"
    shutil.copytree(checkpoint.resolve(out), d)
    return d


def test_decoding_json_is_written_listed_and_checked(model_dir):
    assert tuning.read(model_dir) == {}
    tuned = tuning.Tuned(1.3, {0.6: 30.0, 1.3: 31.5}, 5, 3)
    tuning.save(model_dir, tuned, "toy val")
    data = json.loads((model_dir / tuning.FILE).read_text())
    assert data["tuned"] == {
        "on": "toy val",
        "sentences": 3,
        "beam": 5,
        "bleu": {"0.6": 30.0, "1.3": 31.5},
    }
    assert tuning.read(model_dir) == {"alpha": 1.3, "penalty": "gnmt"}
    checkpoint.verify(model_dir)  # listed in the manifest with its new size and hash
    (model_dir / tuning.FILE).write_text(json.dumps({"alpha": 1.0}))
    with pytest.raises(CheckpointError, match="decoding.json"):
        checkpoint.verify(model_dir)  # changed after the manifest was written


@pytest.mark.parametrize(
    "content, match",
    [
        ({"beam": 3}, "unknown key"),
        ({"alpha": 11}, "alpha must be between 0 and 10"),
        ({"penalty": "long"}, "penalty must be one of"),
        ([1.0], "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_decoding_json_is_one_line_naming_it(model_dir, capsys, content, match):
    f = model_dir / tuning.FILE
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError, match=match):
        tuning.read(model_dir)
    code = main(["translate", "--model", str(model_dir), "--input", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "decoding.json" in err and match in err


def test_the_commands_default_to_the_stored_alpha_and_flags_win(
    model_dir, corpus, monkeypatch, tmp_path
):
    seen = configs_seen(monkeypatch)
    src = tmp_path / "in.de"
    src.write_text("\n".join(corpus[1][:3]) + "\n")
    run = [
        "translate",
        "--model",
        str(model_dir),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(run) == 0 and seen[-1].alpha == DecodeConfig().alpha  # no decoding.json
    tuning.save(model_dir, tuning.Tuned(1.7, {1.7: 1.0}, 5, 3), "toy")
    assert main(run) == 0 and (seen[-1].alpha, seen[-1].beam) == (1.7, 5)
    assert main([*run, "--alpha", "0.2"]) == 0 and seen[-1].alpha == 0.2
    assert main([*run, "--greedy"]) == 0 and seen[-1].strategy == "greedy"


def test_qkv_tune_writes_the_best_alpha(model_dir, corpus, tmp_path, capsys):
    _, src, tgt = corpus
    (tmp_path / "dev.de").write_text("\n".join(src[:20]) + "\n")
    (tmp_path / "dev.en").write_text("\n".join(tgt[:20]) + "\n")
    files = ["--src", str(tmp_path / "dev.de"), "--ref", str(tmp_path / "dev.en")]
    base = ["tune", "--model", str(model_dir), *files, "--alphas", "0,2.5"]
    assert main([*base, "--dry-run"]) == 0
    assert not (model_dir / tuning.FILE).exists()
    assert main(base) == 0
    out = capsys.readouterr().out
    data = json.loads((model_dir / tuning.FILE).read_text())
    scores = data["tuned"]["bleu"]
    assert set(scores) == {"0", "2.5"} and data["tuned"]["sentences"] == 20
    assert scores[f"{data['alpha']:g}"] == max(scores.values())
    assert f"alpha {data['alpha']:g}: BLEU" in out and "written to" in out
    checkpoint.load(model_dir)  # still a valid model directory, manifest and all
    for bad in (["--alphas", "11"], ["--src", files[1]], ["--limit", "0"]):
        assert main(["tune", "--model", str(model_dir), *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_the_server_defaults_to_the_stored_alpha(model_dir, corpus, monkeypatch):
    seen: list[DecodeConfig] = []
    real = Translator.translate_ids

    def spy(self, sources, cfg, trees=None):
        seen.append(cfg)
        return real(self, sources, cfg, trees)

    monkeypatch.setattr(Translator, "translate_ids", spy)
    tuning.save(model_dir, tuning.Tuned(1.4, {1.4: 1.0}, 5, 3), "toy")
    app = create_app([str(model_dir)], "cpu", Limits())
    try:
        with TestClient(app) as client:
            texts = corpus[1][:2]
            assert client.post("/v1/translate", json={"texts": texts}).status_code == 200
            assert seen[-1].alpha == 1.4 and seen[-1].strategy == "beam"
            r = client.post("/v1/translate", json={"texts": texts, "alpha": 0.3})
            assert r.status_code == 200 and seen[-1].alpha == 0.3
            model = client.get("/v1/models").json()["models"][0]
            assert model["decoding"] == {"alpha": 1.4, "penalty": "gnmt"}
    finally:
        app.state.close()


def test_training_tunes_best_and_averaged(corpus, tmp_path):
    _, logs = tiny_run(
        corpus, tmp_path, max_steps=60, eval_every=30, average_last=2, tune_alphas=(0.0, 1.0)
    )
    for name in ("best", "averaged"):
        data = json.loads((tmp_path / name / tuning.FILE).read_text())
        assert data["alpha"] in (0.0, 1.0) and data["tuned"]["on"] == "validation"
        assert data["tuned"]["bleu"][f"{data['alpha']:g}"] == max(data["tuned"]["bleu"].values())
        assert any(f"{name}/decoding.json: alpha" in line for line in logs)
        checkpoint.load(tmp_path / name)
    assert not (tmp_path / "last" / tuning.FILE).exists()  # resuming trains; it decodes nothing


def test_tuning_keeps_and_decodes_with_the_other_stored_fields(model_dir, corpus, monkeypatch):
    seen = configs_seen(monkeypatch)
    (model_dir / tuning.FILE).write_text(json.dumps({"alpha": 1.0, "no_repeat_ngram": 2}))
    _, src, tgt = corpus
    pairs = list(zip(src[:10], tgt[:10], strict=True))
    tuned = tuning.tune_model_dir(model_dir, pairs, "en", (0.0, 2.0), "toy")
    assert [(c.alpha, c.no_repeat_ngram) for c in seen] == [(0.0, 2), (2.0, 2)]
    assert tuning.read(model_dir) == {"alpha": tuned.alpha, "no_repeat_ngram": 2, "penalty": "gnmt"}
