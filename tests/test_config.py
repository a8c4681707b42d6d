import json

import pytest

from qkv.config import ConfigError, DecodeConfig, ModelConfig, TrainConfig, load_json


def test_json_round_trip():
    cfg = ModelConfig(d_model=64, n_heads=4, norm_first=False, tgt_vocab_size=100)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.d_head == 16 and cfg.target_vocab == 100


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(dropout=1.5), "dropout"),
        (dict(arch="rnn"), "arch must be one of"),
        (dict(n_heads="8"), "n_heads must be int"),
        (dict(norm_first=1), "norm_first must be bool"),
        (dict(vocab_size=True), "vocab_size must be int"),
        (dict(d_model=0), "d_model must be positive"),
        (dict(arch="encoder-only", n_encoder_layers=0), "n_encoder_layers"),
        (dict(share_embeddings=True, tgt_vocab_size=10), "share_embeddings"),
        (dict(eos_id=9000), "eos_id"),
        (dict(positions="rotary"), "positions"),
    ],
)
def test_bad_values_give_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_unknown_keys_fail_loudly(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"d_model": 64, "n_head": 4}))
    with pytest.raises(ConfigError, match="unknown key.*n_head") as e:
        load_json(ModelConfig, path)
    assert "\n" not in str(e.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_json(ModelConfig, path)
    with pytest.raises(ConfigError, match="no such file"):
        load_json(ModelConfig, tmp_path / "missing.json")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beam=0), "beam must be >= 1"),
        (dict(beam=2, nbest=3), "nbest must be between 1 and the beam size"),
        (dict(strategy="greedy", nbest=2), "nbest > 1 needs beam search"),
        (dict(strategy="top"), "strategy must be one of"),
        (dict(penalty="linear"), "penalty must be one of"),
        (dict(at_max="cut"), "at_max must be one of"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(max_len_a=0, max_len_b=0), "no output could be produced"),
        (dict(seed="1"), "seed must be int"),
        (dict(seed=-1), "seed must be between 0 and"),
        (dict(alpha=800.0), "alpha must be between 0 and 10"),  # overflowed (schemathesis)
        (dict(alpha=-1.0), "alpha must be between 0 and 10"),
        (dict(min_len=2**64), "min_len must be at most 2147483647"),  # overflowed (schemathesis)
        (dict(max_len_b=2**63), "max_len_b must be at most"),
        (dict(max_len_a=float("nan")), "max_len_a must be at most"),
        (dict(no_repeat_ngram=2**31), "no_repeat_ngram must be at most"),
    ],
)
def test_decode_config_bad_values_give_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        DecodeConfig(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=0), "lr must be positive"),
        (dict(max_tokens="4096"), "max_tokens must be int"),
        (dict(warmup=-1), "warmup must be >= 0"),
        (dict(betas=(0.9, 1.2)), "betas"),
        (dict(task="parsing"), "task must be one of"),
        (dict(eval_beam=0), "eval_beam must be positive"),
    ],
)
def test_train_config_bad_values_give_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_run_config_file_lays_over_the_preset(tmp_path):
    from qkv.config import apply_file
    from qkv.presets import PRESETS

    model, train = PRESETS["tiny"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"d_model": 32}, "train": {"lr": 0.01}}))
    m, t = apply_file(model, train, path)
    assert (m.d_model, t.lr) == (32, 0.01)
    assert (m.n_heads, t.warmup) == (model.n_heads, train.warmup)  # the rest from the preset
