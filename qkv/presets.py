"""Named starting points for `qkv train --preset NAME`: a model shape and a training recipe.
Every field can still be overridden by a flag or a JSON config."""

from __future__ import annotations

from .config import ModelConfig, TrainConfig

# The small translation model (d=256, 3+3 layers, 8k joint BPE), tuned for a 2-core CPU budget:
# small batches give many updates per minute, which matters more than batch size here.
_SMALL = ModelConfig(
    d_model=256,
    n_heads=8,
    d_ff=1024,
    n_encoder_layers=3,
    n_decoder_layers=3,
    dropout=0.1,
    norm_first=True,
    max_len=160,
)
# A known budget of 3,000 updates (or 90 minutes, whichever comes first): a peak rate of 3e-3
# decaying to zero at the end (cosine), the last five validated checkpoints averaged. Peaks of
# 1e-3, 2e-3 and 3e-3 on the same schedule ended at validation losses of 1.934 / 1.819 / 1.807
# (De-En) and 2.104 / 1.961 / 1.929 (En-De), and 37.4 / 38.8 / 39.0 and 34.7 / 36.2 / 36.6 test
# BLEU at alpha 0.6 (bench/README.md).
_MULTI30K = TrainConfig(
    dataset="multi30k",
    vocab_size=8000,
    max_tokens=2048,
    lr=3e-3,
    warmup=400,
    schedule="cosine",
    min_lr=0.0,
    max_steps=3000,
    max_minutes=90.0,
    eval_every=200,
    save_every=200,
    eval_sentences=500,
    average_last=5,
    # the length penalty, measured on the validation set after training (qkv/tuning.py):
    # 1.3-2.0 beat the customary 0.6 by 0.6-1.8 validation BLEU on Multi30k in both directions
    tune_alphas=(0.6, 1.0, 1.3, 1.6, 2.0),
    precision="auto",  # bf16 only where the machine has the units and it measures faster
)

_TATOEBA = _MULTI30K.replace(
    dataset="tatoeba",
    byte_fallback=True,
    split_cjk=True,
    # a short budget (a few hundred updates on 2 cores): brief warmup, cosine to the end
    lr=1e-3,
    warmup=100,
    min_lr=1e-5,
    max_steps=0,
    max_minutes=25.0,
    average_last=3,
)

PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "multi30k-de-en": (_SMALL, _MULTI30K.replace(src_lang="de", tgt_lang="en")),
    "multi30k-en-de": (_SMALL, _MULTI30K.replace(src_lang="en", tgt_lang="de")),
    "multi30k-fr-en": (_SMALL, _MULTI30K.replace(src_lang="fr", tgt_lang="en")),
    "multi30k-en-fr": (_SMALL, _MULTI30K.replace(src_lang="en", tgt_lang="fr")),
    # English <-> Chinese on Tatoeba's 29k short pairs (the explainers' "I love you" -> 我爱你):
    # the small model with more dropout for the smaller data, byte fallback so no Chinese
    # character is ever <unk>, BLEU on Chinese with sacreBLEU's zh tokenizer (qkv.data.tatoeba
    # for the split).
    "tatoeba-en-zh": (_SMALL.replace(dropout=0.3), _TATOEBA.replace(src_lang="en", tgt_lang="zh")),
    "tatoeba-zh-en": (_SMALL.replace(dropout=0.3), _TATOEBA.replace(src_lang="zh", tgt_lang="en")),
    "tiny": (
        ModelConfig(
            d_model=64,
            n_heads=4,
            d_ff=128,
            n_encoder_layers=2,
            n_decoder_layers=2,
            dropout=0.0,
            max_len=64,
        ),
        TrainConfig(
            vocab_size=300,
            max_tokens=512,
            lr=3e-3,
            warmup=20,
            eval_every=100,
            save_every=50,
            eval_sentences=50,
            max_steps=200,
            max_tokens_per_sentence=48,
        ),
    ),
    # A character-level GPT on Tiny Shakespeare (nanoGPT's shape: learned positions, GELU,
    # pre-LN, tied output, no embedding scale), sized for 15 minutes of a 2-core CPU: small
    # batches of short windows, many updates (pilots in bench/README.md).
    "shakespeare-char": (
        ModelConfig(
            arch="decoder-only",
            d_model=192,
            n_heads=4,
            d_ff=768,
            n_encoder_layers=0,
            n_decoder_layers=4,
            dropout=0.0,
            activation="gelu",
            positions="learned",
            scale_embedding=False,
            max_len=128,
        ),
        TrainConfig(
            task="lm",
            dataset="tinyshakespeare",
            tokenizer="char",
            block_size=128,
            max_tokens=16 * 128,
            lr=3e-3,
            warmup=100,
            schedule="cosine",
            min_lr=1e-4,
            betas=(0.9, 0.99),
            weight_decay=0.1,
            label_smoothing=0.0,
            max_minutes=15.0,
            eval_every=250,
            save_every=250,
            log_every=50,
        ),
    ),
    # Sentiment of movie-review sentences, an encoder trained from scratch on SST-2's 67k
    # phrases for 20 minutes of a 2-core CPU, with word dropout (pilots in bench/README.md).
    "sst2": (
        ModelConfig(
            arch="encoder-only",
            d_model=256,
            n_heads=4,
            d_ff=512,
            n_encoder_layers=2,
            n_decoder_layers=0,
            dropout=0.3,
            max_len=80,
        ),
        TrainConfig(
            task="classify",
            dataset="sst2",
            vocab_size=8000,
            max_tokens=4096,
            lr=3e-4,
            warmup=100,
            schedule="cosine",
            min_lr=1e-5,
            weight_decay=0.01,
            label_smoothing=0.0,
            token_dropout=0.1,
            max_tokens_per_sentence=64,
            max_minutes=20.0,
            eval_every=100,
            save_every=100,
            average_last=5,
            log_every=50,
        ),
    ),
    # Semantic similarity: a bi-encoder trained from scratch on STS-B's scored pairs (CoSENT),
    # pooled by a frequency-weighted mean (SIF weights). It peaks after about a minute and then
    # overfits the 5,749 pairs (a 30-minute run: best at step 100, 66.9 dev Spearman, then
    # 57-59 to the end), so the budget is 5 minutes; best/ keeps the peak (bench/README.md,
    # also with --paraphrases true and --init-from a translation model).
    "stsb": (
        ModelConfig(
            arch="encoder-only",
            d_model=256,
            n_heads=4,
            d_ff=1024,
            n_encoder_layers=3,
            n_decoder_layers=0,
            dropout=0.1,
            pooling="weighted",
            max_len=80,
        ),
        TrainConfig(
            task="similarity",
            dataset="stsb",
            vocab_size=12000,
            max_tokens=2048,
            lr=1e-4,
            warmup=100,
            schedule="cosine",
            min_lr=1e-6,
            weight_decay=0.01,
            label_smoothing=0.0,
            max_tokens_per_sentence=64,
            max_minutes=5.0,
            eval_every=25,
            save_every=25,
            log_every=50,
        ),
    ),
    # Next-item recommendation on MovieLens-1M: SASRec's shape (learned positions, the last 200
    # items, item embeddings tied with the output) twice as wide, trained with full softmax
    # cross-entropy ("SASRec+") in small batches: 16 windows a step learn far faster per minute
    # than SASRec's 128 at the same items/s (pilots in bench/README.md).
    "ml-1m": (
        ModelConfig(
            arch="decoder-only",
            d_model=128,
            n_heads=2,
            d_ff=512,
            n_encoder_layers=0,
            n_decoder_layers=2,
            dropout=0.2,
            attention_dropout=0.0,  # PyTorch's CPU attention dropout costs a quarter of a step
            positions="learned",
            max_len=200,
        ),
        TrainConfig(
            task="items",
            dataset="ml-1m",
            block_size=200,
            max_tokens=16 * 200,
            lr=3e-3,
            warmup=100,
            schedule="cosine",
            min_lr=1e-5,
            weight_decay=0.0,
            label_smoothing=0.0,
            max_minutes=60.0,
            eval_every=1000,
            save_every=500,
            log_every=100,
        ),
    ),
}
