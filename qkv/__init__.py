"""qkv: attention and the Transformer, for real work, with the inner workings visible."""

from .attention import MultiHeadAttention, attention
from .cache import DecoderCache, KVCache
from .config import ConfigError, DecodeConfig, ModelConfig, TrainConfig
from .generate import Generator
from .inspect import record_attention
from .models import DecoderOnly, EncoderDecoder, EncoderOnly, from_config
from .packed import pack
from .recurrent import RecurrentEncoderDecoder
from .search import decode, model_step
from .sentences import SentenceEncoder, embed, semantic_search, similarity

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecodeConfig",
    "DecoderCache",
    "DecoderOnly",
    "EncoderDecoder",
    "EncoderOnly",
    "Generator",
    "KVCache",
    "ModelConfig",
    "SentenceEncoder",
    "MultiHeadAttention",
    "RecurrentEncoderDecoder",
    "TrainConfig",
    "attention",
    "decode",
    "embed",
    "from_config",
    "model_step",
    "pack",
    "record_attention",
    "semantic_search",
    "similarity",
]
