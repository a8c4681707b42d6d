"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU) against one
process with the same global batch: the same weights, the same validation, resumable with any
number of processes, files written once, and a dead process stops the others with a message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv import native
from qkv.cli import main

from .conftest import free_port

# QKV_NATIVE=0: each process decides by a quick timing whether each of qkv's C++ kernels beats
# PyTorch's (qkv/native.py); under load two processes can decide differently and round
# differently (1e-7), enough to move a rank statistic, and Adam amplifies it over steps. These
# tests compare processes, so all of them use PyTorch's kernels (the in-process runs too:
# `pytorch_kernels`).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "QKV_DIST_TIMEOUT": "60", "QKV_NATIVE": "0"}


@pytest.fixture(autouse=True)
def pytorch_kernels():
    with native.off():
        yield


def flags(corpus, out: Path, steps: int, accumulate: int, *extra: str) -> list[str]:
    root, _, _ = corpus
    return [
        "train",
        "--preset",
        "tiny",
        "--src",
        str(root / "train.de"),
        "--tgt",
        str(root / "train.en"),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--accumulate",
        str(accumulate),
        "--eval-every",
        "5",
        "--threads",
        "1",
        *extra,
    ]


def torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    cmd += ["--master_port", str(free_port()), "-m", "qkv", *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_and_two(args: list[str], root: Path, capsys) -> tuple[list[dict], list[dict]]:
    """`qkv train ARGS` by one process and by two: the same weights (to 1e-5); the validation
    rows of each, to compare."""
    assert main([*args, "--out", str(root / "one")]) == 0
    capsys.readouterr()
    torchrun([*args, "--out", str(root / "two")])
    assert_same_weights(root / "one", root / "two", atol=1e-5)
    return validation(root / "one"), validation(root / "two")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


def validation(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "minutes"} for r in rows]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_two_processes_take_the_same_steps_as_one(corpus, tmp_path, capsys):
    # 2 batches a step: one per process. 10 steps, two validations.
    assert main(flags(corpus, tmp_path / "one", 10, 2)) == 0
    capsys.readouterr()
    done = torchrun(flags(corpus, tmp_path / "two", 10, 2))
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = validation(tmp_path / "one"), validation(tmp_path / "two")
    assert [r["step"] for r in two] == [5, 10]
    for a, b in zip(one, two, strict=True):
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-5)
        assert b["valid_bleu"] == pytest.approx(a["valid_bleu"], abs=1e-6)
    # rank 0 alone writes and logs: the same files as one process, each line once
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert done.stderr.count("validation at step 10") == 1
    assert done.stderr.count("model: ") == 1


@pytest.mark.parametrize("accumulate", [3, 4])
def test_a_group_split_unevenly_or_accumulated_per_process_is_the_same_step(
    corpus, tmp_path, capsys, accumulate
):
    # 3: one process takes 2 batches, the other 1 and a batch that counts 0;
    # 4: each accumulates 2 before the all-reduce. One step: only summation order differs
    # (later steps amplify it through Adam's normalisation of near-zero gradients).
    assert main(flags(corpus, tmp_path / "one", 1, accumulate)) == 0
    capsys.readouterr()
    torchrun(flags(corpus, tmp_path / "two", 1, accumulate))
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)


def test_a_stopped_two_process_run_resumes_with_two_or_one_as_if_uninterrupted(
    corpus, tmp_path, capsys
):
    assert main(flags(corpus, tmp_path / "straight", 10, 2)) == 0
    torchrun(flags(corpus, tmp_path / "two", 6, 2))  # stops at 6 with last/ there, as a kill
    for name in ("resumed-two", "resumed-one"):
        subprocess.run(["cp", "-r", str(tmp_path / "two"), str(tmp_path / name)], check=True)
    resume = ["train", "--out", "OUT", "--resume", "--max-steps", "10"]
    torchrun([str(tmp_path / "resumed-two") if a == "OUT" else a for a in resume])
    capsys.readouterr()
    assert main([str(tmp_path / "resumed-one") if a == "OUT" else a for a in resume]) == 0
    assert "resumed from" in capsys.readouterr().err
    for name in ("resumed-two", "resumed-one"):
        assert_same_weights(tmp_path / "straight", tmp_path / name, atol=1e-5)


def two_ranks_under_way(corpus, tmp_path: Path) -> list[subprocess.Popen]:
    """Two processes started as torchrun would (its environment variables), without torchrun,
    training without end; returned once the first checkpoint is written."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "qkv", *flags(corpus, tmp_path / "run", 100000, 2)]
        procs.append(
            subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        )
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "last").exists():  # training is under way
        if time.monotonic() > deadline or procs[0].poll() is not None:
            for p in procs:
                p.kill()
                p.wait()
            raise AssertionError("the two processes did not start training")
        time.sleep(0.2)
    return procs


def test_a_process_that_dies_stops_the_other_with_one_line(corpus, tmp_path):
    """Two processes started as torchrun would (its environment variables), without torchrun,
    so nothing but qkv decides what the survivor does when its peer is killed."""
    procs = two_ranks_under_way(corpus, tmp_path)
    try:
        procs[1].send_signal(signal.SIGKILL)
        code = procs[0].wait(90)  # not forever: the peer's socket closes, or the timeout
        err = procs[0].stderr.read().strip().splitlines()
        assert code == 1, err[-5:]
        assert err[-1].startswith("qkv: error: the process group broke"), err[-5:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_last_saved(corpus, tmp_path):
    """A signal only rank 1 caught (a preempted node) reaches rank 0 through the step's
    all-reduce: both save-and-stop after the same step, last/ holds it, and --resume works."""
    procs = two_ranks_under_way(corpus, tmp_path)
    try:
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(90) for p in procs]
        errs = [p.stderr.read().strip().splitlines() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert codes == [128 + signal.SIGTERM] * 2, [e[-3:] for e in errs]
    step = json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())["step"]
    for err in errs:
        assert err[-1].startswith(f"qkv: SIGTERM: stopped after step {step} "), err[-3:]
    torchrun(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", str(step + 2)])
    assert json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())["step"] == step + 2


def test_a_language_model_too_with_its_validation_shared(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question.\n" * 200, encoding="utf-8")
    args = ["train", "--task", "lm", "--text", str(text), "--max-steps", "6", "--eval-every", "3"]
    args += ["--block-size", "32", "--max-tokens", "256", "--accumulate", "2", "--threads", "1"]
    args += ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-decoder-layers", "1"]
    args += ["--dropout", "0"]
    one, two = one_and_two(args, tmp_path, capsys)
    for a, b in zip(one, two, strict=True):
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-6)


def test_a_classifier_too_with_its_validation_shared(tmp_path, capsys):
    from .test_sentences import toy_classification, write

    train_tsv = write(tmp_path / "train.tsv", toy_classification(300, 0))
    valid_tsv = write(tmp_path / "valid.tsv", toy_classification(90, 1))
    args = ["train", "--task", "classify", "--tsv", str(train_tsv), "--valid-tsv", str(valid_tsv)]
    args += ["--max-steps", "6", "--eval-every", "3", "--max-tokens", "256", "--accumulate", "2"]
    args += ["--vocab-size", "300", "--threads", "1", "--dropout", "0", "--token-dropout", "0"]
    args += ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-encoder-layers", "1"]
    one, two = one_and_two(args, tmp_path, capsys)
    for a, b in zip(one, two, strict=True):
        assert b["valid_accuracy"] == a["valid_accuracy"]
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-6)


def test_a_next_item_model_too_with_its_validation_shared(tmp_path, capsys):
    from .test_items import periodic_users, write

    users = periodic_users(n_users=600)  # 3 batches of users to validate: shared 2 and 1
    events = write(tmp_path / "events.txt", [f"{u} {i}" for u, s in users.items() for i in s])
    args = ["train", "--interactions", str(events), "--max-steps", "6", "--eval-every", "3"]
    args += ["--block-size", "12", "--max-tokens", "192", "--accumulate", "2", "--threads", "1"]
    args += ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-decoder-layers", "1"]
    args += ["--dropout", "0"]
    one, two = one_and_two(args, tmp_path, capsys)
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, abs=1e-6)  # full and sampled ranks: the same negatives


def test_a_bi_encoder_too_with_its_validation_shared(tmp_path, capsys):
    from .test_sentences import toy_pairs, write

    train_tsv = write(tmp_path / "train.tsv", toy_pairs(400, 0))
    valid_tsv = write(tmp_path / "valid.tsv", toy_pairs(300, 1))
    args = ["train", "--task", "similarity", "--tsv", str(train_tsv)]
    args += ["--valid-tsv", str(valid_tsv), "--score-range", "0,3", "--vocab-size", "300"]
    args += ["--max-steps", "6", "--eval-every", "3", "--max-tokens", "256", "--accumulate", "2"]
    args += ["--threads", "1", "--dropout", "0", "--d-model", "32", "--n-heads", "2"]
    args += ["--d-ff", "64", "--n-encoder-layers", "1"]
    one, two = one_and_two(args, tmp_path, capsys)
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, abs=1e-4)  # Spearman, Pearson x 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QKV_DIST_TIMEOUT": "ten"}, "$QKV_DIST_TIMEOUT must be a number >= 0, got 'ten'"),
        ({"QKV_DIST_TIMEOUT": "0"}, "$QKV_DIST_TIMEOUT must be > 0 seconds"),
        ({"RANK": "first"}, "$RANK must be a number >= 0, got 'first'"),
    ],
)
def test_a_bad_distributed_environment_is_one_line(
    corpus, tmp_path, capsys, monkeypatch, env, message
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(flags(corpus, tmp_path / "run", 1, 2)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qkv: error: {message}"
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_process_that_joined_a_group_leaves_with_its_code_and_its_output_flushed():
    # DDP keeps gloo's threads alive to the end of the process; leaving through os._exit skips
    # their teardown (qkv/distributed.py, exit_if_joined), so the streams must be flushed first.
    script = (
        "import sys\n"
        "from qkv import distributed\n"
        "distributed.exit_if_joined(5)\n"  # not joined: returns
        "distributed._joined = True\n"
        "print('saved', end='')\n"
        "print('warned', end='', file=sys.stderr)\n"
        "distributed.exit_if_joined(3)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "saved", "warned")
