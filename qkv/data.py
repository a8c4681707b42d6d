"""Parallel text: reading it safely, finding named data sets, and batching by token count.

Every problem with an input file is a DataError whose message names the file (and line), so the
CLI can print one line and exit 2 before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(Exception):
    """Unusable input data; the message is one line naming the file."""


def _read_bytes(path: Path) -> bytes:
    """A file's bytes (gunzipped for .gz), without a UTF-8 byte order mark. DataError for a
    missing path, a directory, an unreadable file, a broken .gz, and for NUL bytes (text never
    holds them: a binary file handed over by mistake)."""
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        line = raw[:nul].count(b"\n") + 1
        raise DataError(f"{path}:{line}: a NUL byte: not a text file")
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a byte order mark is not text


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file (plain or .gz), without line ends."""
    path = Path(path)
    lines = _read_bytes(path).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise DataError(f"{path}:{i}: invalid UTF-8") from None
    if not out:
        raise DataError(f"{path}: empty file")
    return out


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (plain or .gz), line ends kept; DataError naming the file."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def tinyshakespeare_file(data_dir: str | Path | None = None) -> Path:
    """Tiny Shakespeare's input.txt: found locally, else downloaded into the cache and verified."""
    return dataset_file(
        "tinyshakespeare/input.txt", TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, data_dir
    )


Pair = tuple[str, str]


def read_parallel(src: str | Path, tgt: str | Path) -> list[Pair]:
    """Line-aligned source and target files -> sentence pairs."""
    a, b = read_lines(src), read_lines(tgt)
    if len(a) != len(b):
        raise DataError(f"{src} has {len(a)} lines but {tgt} has {len(b)}")
    return list(zip(a, b, strict=True))


def read_tsv(path: str | Path) -> list[Pair]:
    """source<TAB>target per line (further columns, e.g. attribution, are ignored)."""
    pairs = []
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue  # the manythings file ends with an empty line
        cols = line.split("\t")
        if len(cols) < 2:
            raise DataError(f"{path}:{i}: expected source<TAB>target")
        pairs.append((cols[0], cols[1]))
    return pairs


@dataclass
class Filtered:
    pairs: list[Pair]
    blank: int = 0
    too_long: int = 0


def clean_pairs(pairs: Sequence[Pair], max_chars: int = 1000) -> Filtered:
    """Drop pairs with a blank side or an over-long side, and count them."""
    out = Filtered([])
    for s, t in pairs:
        s, t = s.strip(), t.strip()
        if not s or not t:
            out.blank += 1
        elif len(s) > max_chars or len(t) > max_chars:
            out.too_long += 1
        else:
            out.pairs.append((s, t))
    return out


# --- named data sets ---------------------------------------------------------------------------

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"
MULTI30K_LANGS = ("de", "en", "fr", "cs")
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
# sha256 of the official files (data/task1/raw/ in github.com/multi30k/dataset)
MULTI30K_SHA256 = {
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where named data sets are looked up, in order: the flag, $QKV_DATA, ../shared/data."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("QKV_DATA"):
        dirs.append(Path(os.environ["QKV_DATA"]))
    dirs += [
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    return dirs


def cache_dir() -> Path:
    return Path(os.environ.get("QKV_CACHE", Path.home() / ".cache" / "qkv"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, expected_sha256: str, timeout: float = 60.0) -> Path:
    """Fetch url to dest (atomically), checking its sha256; a mismatch leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        got = sha256(tmp)
        if got != expected_sha256:
            raise DataError(
                f"{url}: checksum mismatch (got {got[:12]}…, want {expected_sha256[:12]}…)"
            )
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"{url}: download failed ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def multi30k_file(
    split: str, lang: str, data_dir: str | Path | None = None, base_url: str = MULTI30K_URL
) -> Path:
    """Path of one Multi30k file: found locally, else downloaded into the cache and verified."""
    if split not in MULTI30K_SPLITS:
        raise DataError(
            f"multi30k has no split {split!r} (choose from {', '.join(MULTI30K_SPLITS)})"
        )
    if lang not in MULTI30K_LANGS:
        raise DataError(
            f"multi30k has no language {lang!r} (choose from {', '.join(MULTI30K_LANGS)})"
        )
    name = f"{split}.{lang}.gz"
    return dataset_file(f"multi30k/{name}", base_url + name, MULTI30K_SHA256[name], data_dir)


def dataset_file(
    relative: str, url: str, expected_sha256: str, data_dir: str | Path | None = None
) -> Path:
    """A data set's file: `relative` under the first data directory that has it, else the copy
    in the cache if its checksum is right, else downloaded from `url` into the cache."""
    for d in data_dirs(data_dir):
        if (d / relative).is_file():
            return d / relative
    cached = cache_dir() / relative
    if cached.is_file() and sha256(cached) == expected_sha256:
        return cached
    return download(url, cached, expected_sha256)


def local_dataset_file(relative: str, data_dir: str | Path | None = None) -> Path:
    """A data set that is not downloaded (its labelled splits come from several releases):
    `relative` under the first data directory that has it, else DataError saying where."""
    for d in data_dirs(data_dir):
        if (d / relative).is_file():
            return d / relative
    raise DataError(
        f"{relative}: not found under the data directories (--data-dir, $QKV_DATA, "
        "../shared/data); it is not downloaded: give your copy's parent with --data-dir"
    )


def multi30k(split: str, src: str, tgt: str, data_dir: str | Path | None = None) -> list[Pair]:
    return read_parallel(multi30k_file(split, src, data_dir), multi30k_file(split, tgt, data_dir))


# Tatoeba English-Mandarin pairs (manythings.org's cmn-eng): not downloaded (the export changes
# over time, so no checksum could hold); no official split, so one is made here: the distinct
# English sentences shuffled with TATOEBA_SEED, 90% / 5% / 5% to train / valid / test, each with
# all its translations (the file repeats an English sentence with different Chinese ones, and a
# test sentence whose twin is in training would measure memory, not translation).
TATOEBA_FILE = "cmn-eng/cmn.txt.gz"
TATOEBA_LANGS = ("en", "zh")
TATOEBA_SPLITS = ("train", "valid", "test")
TATOEBA_SEED = 20141  # fixed: the split is part of the data set's definition here


def split_by_source(pairs: Sequence[Pair], seed: int = TATOEBA_SEED) -> dict[str, list[Pair]]:
    """train / valid / test (90 / 5 / 5% of the distinct first sides, shuffled with `seed`), all
    pairs of one first side in one split; pairs keep their file order within a split."""
    firsts = sorted({a for a, _ in pairs})
    random.Random(seed).shuffle(firsts)
    cut_valid, cut_test = round(len(firsts) * 0.90), round(len(firsts) * 0.95)
    where = {
        a: "train" if i < cut_valid else "valid" if i < cut_test else "test"
        for i, a in enumerate(firsts)
    }
    out: dict[str, list[Pair]] = {name: [] for name in TATOEBA_SPLITS}
    for a, b in pairs:
        out[where[a]].append((a, b))
    return out


def tatoeba(split: str, src: str, tgt: str, data_dir: str | Path | None = None) -> list[Pair]:
    """One split of the English-Chinese Tatoeba pairs, in the direction src -> tgt."""
    if split not in TATOEBA_SPLITS:
        raise DataError(f"tatoeba has no split {split!r} (choose from {', '.join(TATOEBA_SPLITS)})")
    if {src, tgt} != set(TATOEBA_LANGS):
        raise DataError(f"tatoeba pairs English and Chinese: en->zh or zh->en, not {src}->{tgt}")
    # English TAB translation TAB attribution (CC-BY 2.0 France; it stays in the file)
    pairs = split_by_source(read_tsv(local_dataset_file(TATOEBA_FILE, data_dir)))[split]
    return pairs if src == "en" else [(b, a) for a, b in pairs]


# A named parallel data set's splits: (validation, default test) split names.
PARALLEL_SPLITS = {"multi30k": ("val", "test_2016_flickr"), "tatoeba": ("valid", "test")}


def parallel(
    dataset: str, split: str, src: str, tgt: str, data_dir: str | Path | None = None
) -> list[Pair]:
    """A split of a named parallel data set (multi30k or tatoeba) as (source, target) pairs."""
    if dataset == "tatoeba":
        return tatoeba(split, src, tgt, data_dir)
    return multi30k(split, src, tgt, data_dir)


# --- batching ----------------------------------------------------------------------------------


@dataclass
class Example:
    src: list[int]
    tgt: list[int]  # without bos/eos


def token_batches(
    examples: Sequence[Example], max_tokens: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Indices of examples grouped into batches of about `max_tokens` (padded) tokens.

    Sorting by length before cutting batches keeps padding small; shuffling the *batches* with
    a seed derived from (seed, epoch) keeps training order random but reproducible, so a resumed
    run can skip exactly the batches it has already seen.
    """
    rng = np.random.default_rng([seed, epoch])
    lengths = np.array([max(len(e.src), len(e.tgt)) + 2 for e in examples])
    # random tie-break among equal lengths, then stable sort by length
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(int(i))
        longest = longest_if_added
    if current:
        batches.append(current)
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


@dataclass
class Seq2SeqBatch:
    src: Tensor  # (B, S) source ids ending in eos, padded
    tgt_in: Tensor  # (B, T) the decoder's inputs: bos + target
    tgt_out: Tensor  # (B, T) what each position should predict: target + eos
    tokens: int  # real target tokens (eos included): what the loss is summed over

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        return Seq2SeqBatch(
            self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.tokens
        )


def collate(examples: Sequence[Example], pad: int, bos: int, eos: int) -> Seq2SeqBatch:
    """Pad a list of examples into tensors, with the model's special ids (ModelConfig's)."""
    b = len(examples)
    t = max(len(e.tgt) for e in examples) + 1
    src = pad_batch([e.src for e in examples], pad, eos)
    tgt_in = torch.full((b, t), pad, dtype=torch.long)
    tgt_out = torch.full((b, t), pad, dtype=torch.long)
    for i, e in enumerate(examples):
        tgt_in[i, : len(e.tgt) + 1] = torch.tensor([bos] + e.tgt)
        tgt_out[i, : len(e.tgt) + 1] = torch.tensor(e.tgt + [eos])
    return Seq2SeqBatch(src, tgt_in, tgt_out, sum(len(e.tgt) + 1 for e in examples))


def pad_batch(seqs: list[list[int]], pad: int, eos: int) -> Tensor:
    """Token id lists, each followed by eos, right-padded into (B, S)."""
    s = max(len(x) for x in seqs) + 1
    out = torch.full((len(seqs), s), pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : len(x) + 1] = torch.tensor(x + [eos])
    return out


def hide_tokens(ids: Tensor, rate: float, unk: int, pad: int, eos: int) -> Tensor:
    """Word dropout: each real token (not padding, not eos) replaced by `unk` with probability
    `rate`, so a classifier cannot lean on one word alone (Iyyer et al. 2015)."""
    if rate <= 0:
        return ids
    hide = (torch.rand(ids.shape) < rate) & (ids != pad) & (ids != eos)
    return ids.masked_fill(hide, unk)
