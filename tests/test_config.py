import json

import pytest

from qkv.config import ConfigError, ModelConfig, load_json


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
