"""Tokenizers: text <-> token ids. One interface (`Tokenizer`), implemented by

- Subwords: one joint BPE vocabulary for source and target, trained with HF `tokenizers`. Text
  is NFC-normalised and split on whitespace the sentencepiece way (a leading '▁' marks a word
  start), so decoding gives back the original text for ordinary input;
- Subwords.train_bytes: byte-level BPE for language models: any text round-trips, no <unk>;
- Characters: one token per character (character-level language models);
- MarianVocab: an imported Marian (OPUS-MT) model's sentencepiece models and vocabulary;
- Items: not text at all, a catalogue of item ids (next-item models): "12 7 93" <-> indices.

`load_tokenizer(model_dir, config)` finds whichever a model directory holds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .config import ModelConfig


class Tokenizer(Protocol):
    """What the rest of qkv needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Source texts -> ids, without special tokens."""
        ...

    def encode_target_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Target texts (references) -> ids, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Target ids -> text; special tokens are dropped."""
        ...

    def id_to_token(self, i: int) -> str: ...

    def save(self, directory: Path) -> None:
        """Write what load_tokenizer reads back into a model directory."""
        ...


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as ModelConfig's defaults expect
PAD, BOS, EOS, UNK = 0, 1, 2, 3
# Every character of Latin-1 and Latin Extended-A (German, French, Czech, ...) and common
# typographic punctuation is in the vocabulary even if training text lacks it, so ordinary
# European text never decodes to <unk>. Other unseen characters do.
ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x180)]
ALPHABET += list("‘’‚“”„–—…•€™")


# CJK radicals, symbols and punctuation, kana, ideographs (with extension A), compatibility
# ideographs, full-width forms
CJK = "[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]"
BYTES = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback's tokens, HF tokenizers' spelling


def _with_byte_fallback(tok: HFTokenizer) -> HFTokenizer:
    """A trained BPE tokenizer with the 256 byte tokens appended to its vocabulary and byte
    fallback on: unknown characters encode as bytes and decode back (ByteFallback, then the
    word-start marks)."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    for i, b in enumerate(t for t in BYTES if t not in vocab):
        vocab[b] = first + i
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [{"type": "ByteFallback"}, spec["decoder"]],
    }
    return HFTokenizer.from_str(json.dumps(spec))


class Subwords:
    """Text <-> token ids, a thin wrapper over a `tokenizers.Tokenizer`."""

    FILE = "tokenizer.json"
    unk_id = UNK
    # the ids this tokenizer gives its special tokens, as ModelConfig fields
    special_ids = {"pad_id": PAD, "bos_id": BOS, "eos_id": EOS}

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        # "<pad>" or "</s>" typed in a sentence is text, not the special token: otherwise a
        # source could end itself early or mask its own words
        tok.encode_special_tokens = True
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"tokenizer: special token {s} must have id {i}")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8000,
        min_frequency: int = 2,
        byte_fallback: bool = False,
        split_cjk: bool = False,
    ) -> Subwords:
        """BPE over the texts. `byte_fallback`: 256 byte tokens <0x00>..<0xFF> join the
        vocabulary (within vocab_size), and a character that is not in it is spelled as its
        UTF-8 bytes instead of <unk>, decoded back to the character: for scripts with thousands
        of characters (Chinese), where training text never has them all. `split_cjk`: every
        Chinese/Japanese character and full-width punctuation mark is a token of its own (no
        merges: written without spaces, a whole sentence would otherwise be one "word" whose
        merges make rare multi-character tokens); decoding joins them without spaces."""
        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        if split_cjk:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Metaspace(),
                    pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
                ]
            )
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - (len(BYTES) if byte_fallback else 0),
            min_frequency=min_frequency,
            special_tokens=SPECIALS,
            initial_alphabet=ALPHABET,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(_with_byte_fallback(tok) if byte_fallback else tok)

    @classmethod
    def train_bytes(cls, texts: Iterable[str], vocab_size: int = 8000) -> Subwords:
        """Byte-level BPE (GPT-2's scheme): the 256 bytes are the base vocabulary, so any text,
        newlines and spaces included, encodes without <unk> and decodes back exactly."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Subwords:
        return cls(HFTokenizer.from_file(str(path)))

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / self.FILE))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    encode_target_batch = encode_batch  # one joint vocabulary

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i) or "<unk>"

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i >= len(SPECIALS) or i == UNK]  # drop pad/bos/eos, keep unk
        return self.tok.decode(ids, skip_special_tokens=False)


class Characters:
    """One token per character: the specials (ids 0..3), then the given characters in order."""

    FILE = "characters.json"
    unk_id = UNK
    special_ids = {"pad_id": PAD, "bos_id": BOS, "eos_id": EOS}

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("characters must be distinct single characters")
        self.chars = list(chars)
        self.ids = {c: i for i, c in enumerate(self.chars, len(SPECIALS))}

    @classmethod
    def of(cls, text: str) -> Characters:
        """The vocabulary of a text: its distinct characters, sorted (as nanoGPT's char model)."""
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, path: str | Path) -> Characters:
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["characters"])

    def to_str(self) -> str:
        return json.dumps({"characters": self.chars}, ensure_ascii=False)

    def save(self, directory: Path) -> None:
        (Path(directory) / self.FILE).write_text(self.to_str(), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """The characters of text that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.ids.keys())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, UNK) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    encode_target_batch = encode_batch

    def id_to_token(self, i: int) -> str:
        return self.chars[i - len(SPECIALS)] if i >= len(SPECIALS) else SPECIALS[i]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(SPECIALS)
        return "".join(self.chars[i - n] if i >= n else "\ufffd" for i in ids if i >= UNK)


class MarianVocab:
    """Marian's tokenization: sentencepiece pieces (source.spm, target.spm) looked up in
    vocab.json (and target_vocab.json when the target has its own)."""

    DIR = "marian"
    FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json")

    def __init__(self, directory: str | Path, cfg: ModelConfig):
        import sentencepiece as spm  # optional: only imported models need it

        d = self.directory = Path(directory)
        self.src_sp = spm.SentencePieceProcessor(model_file=str(d / "source.spm"))
        tgt = d / "target.spm"
        self.tgt_sp = spm.SentencePieceProcessor(
            model_file=str(tgt if tgt.is_file() else d / "source.spm")
        )
        self.vocab: dict[str, int] = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        tv = d / "target_vocab.json"
        self.tgt_vocab = json.loads(tv.read_text(encoding="utf-8")) if tv.is_file() else self.vocab
        self.tgt_pieces = {i: p for p, i in self.tgt_vocab.items()}
        self.specials = {cfg.pad_id, cfg.eos_id, cfg.bos_id}
        self.unk_id = self.vocab.get("<unk>", 1)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def _ids(sp, vocab: dict[str, int], texts: Sequence[str]) -> list[list[int]]:
        unk = vocab.get("<unk>", 1)
        return [[vocab.get(p, unk) for p in sp.encode(t, out_type=str)] for t in texts]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._ids(self.src_sp, self.vocab, texts)

    def encode_target_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._ids(self.tgt_sp, self.tgt_vocab, texts)

    def id_to_token(self, i: int) -> str:
        return self.tgt_pieces.get(i, "<unk>")

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self.tgt_pieces.get(i, "<unk>") for i in ids if i not in self.specials]
        return self.tgt_sp.decode_pieces(pieces)

    def save(self, directory: Path) -> None:
        (Path(directory) / self.DIR).mkdir(exist_ok=True)
        for f in self.FILES:
            if (self.directory / f).is_file():
                shutil.copyfile(self.directory / f, Path(directory) / self.DIR / f)


class ItemError(ValueError):
    """An item id that is not an integer, or not in the catalogue; the message is one line."""


class Items:
    """Item ids <-> vocabulary indices: the specials first (ids 0..3, as for text, so the model
    config's pad/bos/eos stay valid), then the items in increasing id order."""

    FILE = "items.json"
    unk_id = SPECIALS.index("<unk>")
    special_ids = {"pad_id": 0, "bos_id": 1, "eos_id": 2}
    first = len(SPECIALS)  # index of the first item

    def __init__(self, items: list[int]):
        self.items = sorted(set(items))
        self.index = {item: i for i, item in enumerate(self.items, self.first)}

    @classmethod
    def load(cls, path: str | Path) -> Items:
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["items"])

    def to_str(self) -> str:
        return json.dumps({"items": self.items})

    def save(self, directory: Path) -> None:
        (Path(directory) / self.FILE).write_text(self.to_str(), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self.first + len(self.items)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def unknown(self, items: list[int]) -> list[int]:
        return [i for i in items if i not in self.index]

    def encode(self, items: list[int]) -> list[int]:
        """Item ids -> indices; DataError naming the ids the model has never seen."""
        missing = self.unknown(items)
        if missing:
            shown = " ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ItemError(f"item(s) not in the model's catalogue: {shown}")
        return [self.index[i] for i in items]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(parse_history(t)) for t in texts]

    encode_target_batch = encode_batch

    def item_of(self, index: int) -> int:
        return self.items[index - self.first]

    def id_to_token(self, i: int) -> str:
        return str(self.item_of(i)) if i >= self.first else SPECIALS[i]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(self.item_of(i)) for i in ids if i >= self.first)


def parse_history(text: str, source: str = "history") -> list[int]:
    """Item ids separated by spaces or commas; ItemError on anything that is not an integer."""
    ids = []
    for field in text.replace(",", " ").split():
        try:
            ids.append(int(field))
        except ValueError:  # "x12", and digits int() refuses ("²")
            raise ItemError(f"{source}: item ids must be integers, got {field!r}") from None
    return ids


def load_tokenizer(directory: str | Path, cfg: ModelConfig) -> Tokenizer | None:
    """The tokenizer saved in a model directory, or None if it has none."""
    d = Path(directory)
    if (d / Subwords.FILE).is_file():
        return Subwords.load(d / Subwords.FILE)
    if (d / Characters.FILE).is_file():
        return Characters.load(d / Characters.FILE)
    if (d / Items.FILE).is_file():
        return Items.load(d / Items.FILE)
    if (d / MarianVocab.DIR / "vocab.json").is_file():
        return MarianVocab(d / MarianVocab.DIR, cfg)
    return None
