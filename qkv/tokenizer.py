"""Subwords: one joint BPE vocabulary for source and target, trained with HF `tokenizers`.

Text is NFC-normalised and split on whitespace the sentencepiece way (a leading '▁' marks a word
start), so decoding gives back the original text for ordinary input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as ModelConfig's defaults expect
PAD, BOS, EOS, UNK = 0, 1, 2, 3
# Every character of Latin-1 and Latin Extended-A (German, French, Czech, ...) and common
# typographic punctuation is in the vocabulary even if training text lacks it, so ordinary
# European text never decodes to <unk>. Other unseen characters do.
ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x180)]
ALPHABET += list("‘’‚“”„–—…•€™")


class Subwords:
    """Text <-> token ids, a thin wrapper over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"tokenizer: special token {s} must have id {i}")

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2
    ) -> Subwords:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIALS,
            initial_alphabet=ALPHABET,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Subwords:
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i) or "<unk>"

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i >= len(SPECIALS) or i == UNK]  # drop pad/bos/eos, keep unk
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
