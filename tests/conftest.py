import pytest
import torch

from qkv.config import ModelConfig
from qkv.models import from_config


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=23,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        max_len=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    def build(**overrides):
        torch.manual_seed(0)
        return from_config(tiny_config(**overrides)).eval()

    return build
