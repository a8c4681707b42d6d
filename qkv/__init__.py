"""qkv: attention and the Transformer, for real work, with the inner workings visible."""

from .attention import MultiHeadAttention, attention
from .cache import DecoderCache, KVCache
from .config import ConfigError, ModelConfig
from .inspect import record_attention
from .models import DecoderOnly, EncoderDecoder, EncoderOnly, from_config
from .packed import pack

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecoderCache",
    "DecoderOnly",
    "EncoderDecoder",
    "EncoderOnly",
    "KVCache",
    "ModelConfig",
    "MultiHeadAttention",
    "attention",
    "from_config",
    "pack",
    "record_attention",
]
