"""Model directories: config.json (model config, task, meta) + model.safetensors + the
tokenizer's files (+ trainer state in a training run's last/) + manifest.json.

Nothing is ever unpickled. A directory is written under a temporary name, fsynced and renamed
into place, so a killed process leaves either the old checkpoint or the new one, never half of
one. Its manifest, written last, holds every other file's size and SHA-256; `load` checks them,
so a file truncated or altered later (a bad disk, a careless copy) is named, not loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .config import ConfigError, ModelConfig, from_dict, read_json, to_dict
from .data import sha256
from .models import Model, from_config
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "qkv-1"
MANIFEST = "manifest.json"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names


class CheckpointError(Exception):
    """A model directory that cannot be used; one line naming it."""


@contextmanager
def atomic_dir(path: str | Path, keep: str | Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path` in one rename. With
    `keep`, the directory it replaces is kept there (and whatever `keep` held is dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in sorted(tmp.rglob("*")):  # make the bytes durable before the rename publishes them
        _fsync(f)
    _fsync(tmp)
    if keep is not None:
        old = Path(keep)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)  # the renames themselves
    if keep is None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (torch's span several), cut to `limit` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def manifest_text(directory: Path) -> str:
    """manifest.json's contents: the size and SHA-256 of every other file under `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in files
    }
    return json.dumps({"format": FORMAT, "files": entries}, indent=2)


def write_manifest(directory: Path) -> None:
    (directory / MANIFEST).write_text(manifest_text(directory), encoding="utf-8")


def add_file(directory: str | Path, name: str, text: str) -> None:
    """Add (or replace) one text file in an existing model directory, then its manifest, each
    written atomically: a crash between the two leaves the file unlisted, which `verify` allows."""
    directory = Path(directory)
    write_text_atomic(directory / name, text)
    if (directory / MANIFEST).is_file():
        write_text_atomic(directory / MANIFEST, manifest_text(directory))


def verify(path: str | Path) -> None:
    """CheckpointError naming the first file of a model directory that is missing, truncated or
    altered since its manifest was written. A directory without a manifest (written before
    manifests, or by hand) has nothing to be checked against and passes."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return
    try:
        files = read_json(path / MANIFEST)["files"]
    except (ConfigError, KeyError, TypeError):
        raise CheckpointError(f"{path / MANIFEST}: not a qkv manifest") from None
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in the checkpoint's manifest)")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{f}: {size:,} bytes where {entry['bytes']:,} were written (truncated or altered)"
            )
        if sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: contents changed since written (SHA-256 differs)")


def resolve(path: str | Path) -> Path:
    """A model directory, also accepting a training output directory (its best/ checkpoint) and
    recovering from a crash between the two renames of atomic_dir."""
    path = Path(path)
    for candidate in (path, path / "best", path.with_name(f".{path.name}.old")):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: not a qkv model directory (no config.json + model.safetensors)")


def save(
    path: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer | None,
    meta: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    keep: str | Path | None = None,
) -> Path:
    """Write a model directory atomically, its manifest last. `meta` says what the model is
    for: its "task" (the commands dispatch on it) and task details (languages, ...). `trainer`
    = {"json": {...}, "tensors": {...}}. `keep`: where the checkpoint it replaces goes. A write
    that fails (a full disk) leaves the previous checkpoint as it was: CheckpointError."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    try:
        with atomic_dir(path, keep) as tmp:
            config = {"format": FORMAT, "model": to_dict(cfg), "meta": meta or {}}
            (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            save_model(model, str(tmp / "model.safetensors"))
            if tokenizer is not None:
                tokenizer.save(tmp)
            if trainer is not None:
                (tmp / "trainer.json").write_text(json.dumps(trainer["json"], indent=2))
                save_file(trainer["tensors"], str(tmp / "trainer.safetensors"))
            write_manifest(tmp)
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({e.strerror or e}); the previous one is intact"
        ) from None
    return Path(path)


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and meta of a model directory."""
    path = resolve(path)
    try:
        config = read_json(path / "config.json")
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise CheckpointError(f"{path}/config.json: not a {FORMAT} config")
        return from_dict(ModelConfig, config["model"], source=f"{path}/config.json"), config.get(
            "meta", {}
        )
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Model, Tokenizer | None, dict]:
    """(model in eval mode, tokenizer or None, meta) from a model directory, its files checked
    against its manifest first."""
    path = resolve(path)
    verify(path)
    cfg, meta = read_config(path)
    model = from_config(cfg)
    load_weights(model, path)
    return model.to(device).eval(), load_tokenizer(path, cfg), meta


def load_weights(model: nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a model directory's weights into `model` (on `device`); CheckpointError, on one
    line, for an unreadable file, a tensor that is not floating point, or names that do not
    match the model."""
    file = path / "model.safetensors"
    try:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                dtype = f.get_slice(name).get_dtype()
                if dtype not in FLOAT_DTYPES:  # torch would cast integers without a word
                    raise CheckpointError(f"{file}: {name} holds {dtype}, not floating point")
        missing, unexpected = load_model(model, str(file), strict=False, device=str(device))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: cannot load ({one_line(e)})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: does not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys (checkpoint averaging)."""
    return {k: sum(sd[k].float() for sd in states) / len(states) for k in states[0]}


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """A training checkpoint's optimizer, RNG and loop state (None if it has none)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        return None
    try:
        return {
            "json": json.loads((path / "trainer.json").read_text()),
            "tensors": load_file(str(path / "trainer.safetensors")),
        }
    except Exception as e:  # bad JSON, a missing or corrupt safetensors file
        raise CheckpointError(f"{path}: unreadable trainer state ({one_line(e)})") from None


# --- optimizer state without pickle -------------------------------------------------------------


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer's state_dict as (JSON-able dict, flat tensor dict) for safetensors."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.contiguous()
            else:
                plain[f"{idx}.{key}"] = value
    return {"param_groups": sd["param_groups"], "plain": plain}, tensors


def optimizer_from_flat(
    opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["plain"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def copy_matching(model: nn.Module, path: str | Path) -> list[str]:
    """Copy into `model` every tensor of the model directory at `path` whose name and shape
    match (a translation model's `encoder.*` into an encoder-only model, say); the names copied.
    CheckpointError when nothing matches."""
    path = resolve(path)
    verify(path)
    try:
        saved = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}/model.safetensors: cannot load ({one_line(e)})") from None
    own = model.state_dict()
    copied = [k for k, v in saved.items() if k in own and own[k].shape == v.shape]
    if not copied:
        raise CheckpointError(f"{path}: no tensor fits this model (names or shapes differ)")
    with torch.no_grad():
        for k in copied:
            own[k].copy_(saved[k])
    return copied
