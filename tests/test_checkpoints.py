"""Never lose work: checkpoints carry a manifest that load verifies; a damaged last/ falls back to
previous/ on resume; a full disk leaves the previous checkpoint intact; non-finite steps are
skipped and, in a row, stop training; resuming a finished run changes nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qkv import checkpoint
from qkv.checkpoint import CheckpointError
from qkv.config import ModelConfig, TrainConfig
from qkv.data import DataError
from qkv.train import BAD_STEPS_LIMIT, Diverged, train

from .test_train import Counting

MODEL = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.1, max_len=16)


def config(**overrides) -> TrainConfig:
    base = dict(threads=1, lr=3e-3, warmup=10, max_steps=30, save_every=10, eval_every=10)
    return TrainConfig(**{**base, "log_every": 1000, **overrides})


def run(out, cfg=None, task=None, logs=None, **extra):
    log = logs.append if logs is not None else (lambda _: None)
    return train(task or Counting(seed=3), MODEL, cfg or config(), out, log=log, **extra)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(out)
    return out


def test_every_checkpoint_file_is_in_its_manifest_and_load_verifies_them(straight, tmp_path):
    manifest = json.loads((straight / "last" / checkpoint.MANIFEST).read_text())
    names = {p.name for p in (straight / "last").iterdir()} - {checkpoint.MANIFEST}
    assert set(manifest["files"]) == names >= {"config.json", "model.safetensors", "trainer.json"}
    checkpoint.load(straight / "best")  # intact: loads

    damaged = tmp_path / "damaged"
    shutil.copytree(straight / "best", damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a weight: safetensors itself would load it
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: contents changed"):
        checkpoint.load(damaged)
    (damaged / "model.safetensors").write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="bytes where .* were written"):
        checkpoint.load(damaged)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not a qkv model directory"):
        checkpoint.load(damaged)


def test_a_damaged_last_checkpoint_resumes_from_previous_bit_identically(straight, tmp_path):
    out = tmp_path / "killed"

    class Killed(Exception):
        pass

    def kill(step):
        if step == 25:
            raise Killed

    with pytest.raises(Killed):
        run(out, on_step=kill)
    assert checkpoint.load_trainer_state(out / "previous")["json"]["step"] == 10
    (out / "last" / "trainer.safetensors").write_bytes(b"\0" * 64)  # step 20's, damaged
    logs = []
    run(out, logs=logs, resume=True)
    assert any("last/ is unusable" in s and "resumed from previous/" in s for s in logs), logs
    assert any("step 10" in s for s in logs if s.startswith("resumed from"))
    assert same_weights(out / "last", straight / "last")


def test_nothing_to_resume_from_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    run(out, cfg=config(max_steps=10))
    for name in ("last", "previous"):
        if (out / name).exists():
            (out / name / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="nothing to resume from"):
        run(out, resume=True)


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, cfg=config(max_steps=10))
    before = weights(out / "last")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous one is intact"):
        run(out, cfg=config(max_steps=20), resume=True)
    monkeypatch.undo()
    after = weights(out / "last")
    assert all(torch.equal(before[k], after[k]) for k in before)
    checkpoint.verify(out / "last")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class Poisoned(Counting):
    """Counting whose loss is NaN at the steps given (1-based), or always."""

    def __init__(self, bad_steps=None):
        super().__init__(seed=3)
        self.bad, self.calls = bad_steps, 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        if model.training and (self.bad is None or self.calls in self.bad):
            return loss * float("nan")
        return loss


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
    logs = []
    trainer = run(tmp_path / "run", task=Poisoned({4, 5}), logs=logs)
    skipped = [s for s in logs if "non-finite" in s]
    assert len(skipped) == 2 and "step 4" in skipped[0] and "(2 in a row)" in skipped[1]
    assert trainer.step == 30 and trainer.bad_steps == 0
    w = weights(tmp_path / "run" / "last")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_non_finite_steps_in_a_row_stop_training_keeping_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(out, cfg=config(max_steps=10))
    before = weights(out / "last")
    with pytest.raises(Diverged, match=f"{BAD_STEPS_LIMIT} steps in a row"):
        run(out, cfg=config(max_steps=30), task=Poisoned(None), resume=True)
    after = weights(out / "last")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resuming_a_finished_run_says_so_and_changes_nothing(straight, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(straight, out)
    logs = []
    trainer = run(out, logs=logs, resume=True)
    assert trainer.step == 30
    assert any("already spent" in s for s in logs)
    for name in ("last", "best"):
        assert same_weights(out / name, straight / name)
