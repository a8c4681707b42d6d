"""Sequences of items (products bought, films watched, pages visited): reading interactions,
the leave-one-out split, training windows, and the masks and padding that ranking and training
share. The catalogue of item ids is `qkv.tokenizer.Items`; the task is `qkv.tasks.items`, the
rankings and their metrics `qkv.recommend`.

Data: `user item` lines in time order, or a CSV with user, item and timestamp columns. Split
leave-one-out per user: the last item is the test target, the one before it the validation
target, the rest is training. Each user's training sequence is cut from its end into windows,
so every training item is a target once.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor

from .data import DataError, local_dataset_file, read_text
from .tokenizer import PAD, Items

ML1M_FILE = "ml-1m/ml-1m.txt.gz"
USER_COLUMNS = ("user", "user_id", "userid")
ITEM_COLUMNS = ("item", "item_id", "itemid", "movie_id", "movieid", "product_id")
TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date")


# --- reading interactions ----------------------------------------------------------------------


def read_interactions(path: str | Path) -> dict[int, list[int]]:
    """Each user's items in time order, users in order of first appearance. `user item` lines
    (whitespace-separated, already in time order), or a .csv (.csv.gz) with a header naming
    user, item and timestamp columns: sorted by timestamp, ties keep file order."""
    path = Path(path)
    text = read_text(path)
    is_csv = path.name.removesuffix(".gz").endswith(".csv")
    return _read_csv(path, text) if is_csv else _read_pairs(path, text)


def _integer(path: Path, line: int, what: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{line}: {what} id must be an integer, got {value!r}") from None


def _read_pairs(path: Path, text: str) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{n}: expected 'user item', got {len(fields)} field(s)")
        user, item = _integer(path, n, "user", fields[0]), _integer(path, n, "item", fields[1])
        users.setdefault(user, []).append(item)
    return users


def _column(path: Path, header: list[str], names: tuple[str, ...], what: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise DataError(
        f"{path}: no {what} column in the header {','.join(header)} (one of {', '.join(names)})"
    )


def _time(path: Path, line: int, value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        try:
            t = datetime.fromisoformat(value.strip()).timestamp()
        except ValueError:
            raise DataError(
                f"{path}:{line}: timestamp {value!r} is neither a number nor ISO"
            ) from None
    if not math.isfinite(t):
        raise DataError(f"{path}:{line}: timestamp {value!r} is not a finite number")
    return t


def _read_csv(path: Path, text: str) -> dict[int, list[int]]:
    try:
        return _csv_events(path, list(csv.reader(io.StringIO(text, newline=""))))
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None


def _csv_events(path: Path, rows: list[list[str]]) -> dict[int, list[int]]:
    header = rows[0] if rows else None
    if not header:
        raise DataError(f"{path}: empty file")
    u = _column(path, header, USER_COLUMNS, "user")
    i = _column(path, header, ITEM_COLUMNS, "item")
    t = _column(path, header, TIME_COLUMNS, "timestamp")
    events: dict[int, list[tuple[float, int]]] = {}
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) <= max(u, i, t):
            raise DataError(f"{path}:{n}: {len(row)} field(s), the header has {len(header)}")
        user = _integer(path, n, "user", row[u])
        events.setdefault(user, []).append(
            (_time(path, n, row[t]), _integer(path, n, "item", row[i]))
        )
    if not events:
        raise DataError(f"{path}: a header and no interactions")
    # sorted() is stable: equal timestamps keep their order in the file
    return {
        user: [item for _, item in sorted(ev, key=lambda e: e[0])] for user, ev in events.items()
    }


def ml1m_file(data_dir: str | Path | None = None) -> Path:
    """MovieLens-1M in the SASRec format (research use only: it is read where it lies)."""
    return local_dataset_file(ML1M_FILE, data_dir)


# --- leave-one-out ---------------------------------------------------------------------------


TARGET = {"valid": -2, "test": -1}  # where each split's target sits in a user's sequence


@dataclass
class Histories:
    """Every user's items (vocabulary indices, time order) and what leave-one-out makes of them:
    training = all but the last two, validation target = the second to last, test = the last."""

    users: list[int]
    sequences: list[list[int]]

    def history(self, split: str) -> list[list[int]]:
        """What the model reads to predict `split`'s target ("valid" or "test")."""
        return [s[: TARGET[split]] for s in self.sequences]

    def targets(self, split: str) -> list[int]:
        return [s[TARGET[split]] for s in self.sequences]

    def train(self) -> list[list[int]]:
        return [s[:-2] for s in self.sequences]


def leave_one_out(users: dict[int, list[int]], items: Items, source: str) -> Histories:
    """Encode each user's items; DataError for a user too short to split (3 items at least)."""
    for user, seq in users.items():
        if len(seq) < 3:
            raise DataError(
                f"{source}: user {user} has {len(seq)} interaction(s); leave-one-out needs at "
                "least 3 (training, validation, test)"
            )
    return Histories(list(users), [items.encode(s) for s in users.values()])


def windows(sequences: list[list[int]], size: int) -> list[tuple[int, list[int]]]:
    """Training windows of at most size + 1 items (size inputs, each predicting the next), cut
    from each sequence's end backwards, with the index of the sequence they come from;
    consecutive windows overlap by one item so that every item but a sequence's first is a
    target exactly once."""
    out = []
    for n, seq in enumerate(sequences):
        end = len(seq)
        while end >= 2:
            out.append((n, seq[max(0, end - size - 1) : end]))
            end -= size
    return out


# --- padding and masks ----------------------------------------------------------------------


def right_pad(seqs: list[list[int]], pad: int = PAD) -> Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def unseen_negatives(
    seen: Tensor,
    shape: tuple[int, ...],
    first: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, *shape) items (indices from `first` on) drawn uniformly, with replacement, from those
    the row's user has not seen (`seen` (B, vocab) is True for the user's items); a user who
    has seen every item gets draws from all of them."""
    allowed = (~seen).float()
    allowed[:, :first] = 0.0
    allowed[allowed.sum(1) == 0, first:] = 1.0
    n = math.prod(shape)
    return torch.multinomial(allowed, n, replacement=True, generator=generator).view(-1, *shape)


def seen_mask(seqs: list[list[int]], vocab: int) -> Tensor:
    """(B, vocab): True where the row's sequence holds the item."""
    mask = torch.zeros(len(seqs), vocab, dtype=torch.bool)
    for row, s in enumerate(seqs):
        mask[row, s] = True
    return mask
