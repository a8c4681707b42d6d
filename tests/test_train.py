"""The training loop: any task, bit-identical resume, validation on the training model as it is;
the translation task: it learns, and its checkpoints decode like the model in memory."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv import checkpoint
from qkv import loss as qkv_loss
from qkv.config import DecodeConfig, ModelConfig, TrainConfig
from qkv.loss import linear_cross_entropy, smoothed_cross_entropy
from qkv.models import from_config
from qkv.presets import PRESETS
from qkv.tasks import task_for
from qkv.train import Stopped, Trainer, inverse_sqrt, train
from qkv.translate import Translator


def test_training_lowers_loss(trained):
    out, trainer, logs = trained
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("step")]
    assert losses[-1] < losses[0] / 2, losses
    assert any("tok/s" in line and "ETA" in line for line in logs)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all("valid_bleu" in r for r in rows)


def test_validation_during_training_equals_a_fresh_load(trained):
    """The scores logged at the last step are those of last/'s weights loaded afresh, and
    validating never changed the training model's modules (no packing behind its back)."""
    out, trainer, _ = trained
    fresh = from_config(trainer.model_cfg)
    assert [type(m) for m in trainer.model.modules()] == [type(m) for m in fresh.modules()]
    model, _, _ = checkpoint.load(out / "last")
    with torch.no_grad():
        again = trainer.task.validate(model)
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["valid_bleu"] == pytest.approx(again["valid_bleu"], abs=1e-9)
    assert json.loads(last)["valid_loss"] == pytest.approx(again["valid_loss"], rel=1e-6)


def test_checkpoints_decode_like_the_model_in_memory(trained, corpus, tmp_path):
    out, trainer, _ = trained
    _, src, _ = corpus
    cfg = DecodeConfig(beam=4, nbest=2)
    model, tok, meta = checkpoint.load(out / "last")
    assert meta["task"] == "translation" and meta["src_lang"] == "de"
    in_memory = Translator(trainer.model.eval(), tok).translate(src[:10], cfg)
    types = [type(m) for m in trainer.model.modules()]
    checkpoint.save(tmp_path / "copy", model, tok, {"note": "copy"})
    again, tok2, meta = checkpoint.load(tmp_path / "copy")
    assert meta == {"note": "copy"}
    loaded = Translator(again, tok2).translate(src[:10], cfg)
    as_pairs = lambda r: [[(t.text, t.score) for t in n] for n in r]
    assert as_pairs(in_memory) == as_pairs(loaded)
    assert [type(m) for m in trainer.model.modules()] == types  # a Translator changes nothing


def test_averaged_is_the_mean_of_the_last_checkpoints(corpus, tmp_path):
    root, _, _ = corpus
    model_cfg, cfg = PRESETS["tiny"]
    cfg = cfg.replace(
        src_file=str(root / "train.de"),
        tgt_file=str(root / "train.en"),
        threads=1,
        max_steps=6,
        eval_every=2,
        eval_sentences=2,
        average_last=2,
    )
    snapshots = {}

    def keep(step):
        if step in (4, 6):
            snapshots[step] = {k: v.clone() for k, v in t.model.state_dict().items()}

    t = Trainer(task_for(cfg), model_cfg, cfg, tmp_path, log=lambda s: None)
    t.prepare(resume=False)
    t.run(on_step=keep)
    avg = load_file(str(tmp_path / "averaged" / "model.safetensors"))
    for k, v in avg.items():
        if "sinusoids" not in k:
            torch.testing.assert_close(v, (snapshots[4][k] + snapshots[6][k]) / 2)


class Killed(Exception):
    pass


def killed_then_resumed(run, tmp_path, kill_at: int) -> None:
    """Run straight; run again killed after step kill_at, then resume: the same last weights."""
    run(tmp_path / "straight")

    def kill(step):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", on_step=kill)
    run(tmp_path / "killed", resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- the loop with a task that is not translation ----------------------------------------------


@dataclass
class CountBatch:
    ids: torch.Tensor  # (B, T)
    tokens: int

    def to(self, device):
        return CountBatch(self.ids.to(device), self.tokens)


class Counting:
    """A stub task: a decoder-only model learns to continue sequences that count up mod 10."""

    name, metric, maximize, tokenizer = "counting", "valid_loss", False, None

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 10, (64,), generator=g)
        self.data = (starts[:, None] + torch.arange(9)) % 10 + 3  # ids 3..12
        self.seed = seed

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        out.mkdir(parents=True, exist_ok=True)
        return base.replace(arch="decoder-only", vocab_size=13, n_encoder_layers=0)

    def init_model(self, model) -> None:
        pass

    def batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(64, generator=torch.Generator().manual_seed(self.seed + epoch))
        return [order[i : i + 16].tolist() for i in range(0, 64, 16)]

    def collate(self, indices):
        ids = self.data[indices]
        return CountBatch(ids, ids[:, 1:].numel())

    def loss(self, model, batch):
        logits = model(batch.ids[:, :-1])
        return smoothed_cross_entropy(logits.reshape(-1, 13), batch.ids[:, 1:].reshape(-1), 0.0)

    def validate(self, model):
        batch = self.collate(list(range(64)))
        return {"valid_loss": self.loss(model, batch).item() / batch.tokens}

    def meta(self):
        return {"modulus": 10}


def test_the_loop_trains_another_task_and_resumes_bit_identically(tmp_path):
    model_cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.1, max_len=16)
    cfg = TrainConfig(
        task="translation",  # the loop never looks at the task name in the config
        threads=1,
        lr=3e-3,
        warmup=10,
        max_steps=60,
        save_every=10,
        eval_every=20,
        log_every=10,
    )

    runs = []

    def run(out, **extra):
        runs.append(train(Counting(seed=3), model_cfg, cfg, out, log=lambda s: None, **extra))

    killed_then_resumed(run, tmp_path, kill_at=47)
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(r)["valid_loss"] for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns to count
    meta = checkpoint.read_config(tmp_path / "straight" / "best")[1]
    assert meta["task"] == "counting" and meta["modulus"] == 10
    assert runs[0].best == min(losses)


class SlowStart(Counting):
    """Counting with one-time set-up that takes 100 s of the (fake) clock."""

    def __init__(self, seed: int, clock: list[float]):
        super().__init__(seed)
        self.clock = clock

    def before_training(self, device, log) -> None:
        self.clock[0] += 100.0


def test_set_up_before_training_is_not_charged_to_the_time_budget(tmp_path, monkeypatch):
    clock = [0.0]
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + clock[0])
    model_cfg = ModelConfig(d_model=16, n_heads=2, d_ff=32, max_len=16)
    cfg = TrainConfig(threads=1, max_steps=5, max_minutes=1.0, eval_every=100, log_every=100)
    trainer = train(SlowStart(0, clock), model_cfg, cfg, tmp_path, log=lambda s: None)
    assert clock[0] == 100.0  # the hook ran
    assert trainer.step == 5 and trainer.elapsed < 60  # charged, it would stop after one step


def test_the_training_kernels_are_ready_before_the_clock_starts(tmp_path, monkeypatch):
    """On a CPU, dropout's and the loss's C++ kernels are built and checked before the time
    budget starts (a first build takes about 40 s), for any task: here each first decision
    costs 100 s of a fake clock, which inside the budget would stop training after one step."""
    from qkv import native

    clock = [0.0]
    real_clock = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_clock() + clock[0])
    fresh = {k: v for k, v in native._state.items() if k not in ("masks", "loss")}
    monkeypatch.setattr(native, "_state", fresh)
    decided = []
    real_checked = native._checked

    def checked(key, check):
        if key not in native._state:
            decided.append(key)
            clock[0] += 100.0
        return real_checked(key, check)

    monkeypatch.setattr(native, "_checked", checked)
    model_cfg = ModelConfig(d_model=16, n_heads=2, d_ff=32, max_len=16, dropout=0.1)
    cfg = TrainConfig(threads=1, max_steps=5, max_minutes=1.0, eval_every=100, log_every=100)
    trainer = train(Counting(0), model_cfg, cfg, tmp_path, log=lambda s: None)
    assert {"masks", "loss"} <= set(decided)
    assert trainer.step == 5 and trainer.elapsed < 60


def test_translation_builds_the_kernels_before_training_on_a_cpu(monkeypatch):
    from qkv import native
    from qkv.tasks.translation import Translation

    calls = []
    monkeypatch.setattr(native, "kernel", lambda: calls.append(1))
    task = Translation.__new__(Translation)  # the hook needs no data
    task.before_training(torch.device("meta"), print)
    assert calls == []
    task.before_training(torch.device("cpu"), print)
    assert calls == [1]


class Unhandled(Exception):
    pass


@pytest.fixture
def guarded():
    """SIGTERM and SIGINT raise Unhandled here unless something else catches them (without
    this, a signal the trainer failed to catch would end the test process)."""
    calls = []

    def guard(signum, frame):
        calls.append(signum)
        raise Unhandled(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, guard) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield calls, guard
    for sig, handler in old.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_last_and_stops_and_the_resume_is_bit_identical(tmp_path, guarded, sig):
    """SIGTERM (a preempted job) or Ctrl-C at step 13: the step ends, last/ holds step 13 (no
    periodic save would have: every 100), Stopped names the signal, the handlers are put back;
    resuming gives the weights of a run never stopped."""
    _, guard = guarded
    model_cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.1, max_len=16)
    cfg = TrainConfig(threads=1, lr=3e-3, warmup=5, max_steps=20, save_every=100, eval_every=100)
    run = lambda out, **kw: train(Counting(seed=3), model_cfg, cfg, out, log=lambda s: None, **kw)
    run(tmp_path / "straight")

    def stop(step):
        if step == 13:
            os.kill(os.getpid(), sig)

    with pytest.raises(Stopped) as stopped:
        run(tmp_path / "stopped", on_step=stop)
    assert stopped.value.signum == sig and signal.Signals(sig).name in str(stopped.value)
    assert "step 13" in str(stopped.value) and "--resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is guard and signal.getsignal(signal.SIGINT) is guard
    assert checkpoint.load_trainer_state(tmp_path / "stopped" / "last")["json"]["step"] == 13
    assert not (tmp_path / "stopped" / "averaged").exists()  # a stopped run has not finished
    run(tmp_path / "stopped", resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_acts_at_once(tmp_path, guarded):
    calls, _ = guarded
    model_cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, max_len=16)
    cfg = TrainConfig(threads=1, max_steps=20, save_every=100, eval_every=100)

    sent = []

    def twice(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer: returns
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the old handler again: not waited for
            sent.append(2)

    with pytest.raises(Unhandled):
        train(Counting(seed=3), model_cfg, cfg, tmp_path, log=lambda s: None, on_step=twice)
    assert sent == [1] and calls == [signal.SIGTERM]


def test_qkv_train_stopped_by_sigterm_says_so_in_one_line_and_resumes(corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "qkv", "train", "--preset", "tiny", "--out", str(out),
            "--src", str(root / "train.de"), "--tgt", str(root / "train.en"), "--threads", "1",
            "--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000",
            "--log-every", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("step 3 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1].splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, lines + rest
    assert [r for r in rest if r.startswith("qkv:")] == rest[-1:], rest  # one line, no traceback
    assert "SIGTERM: stopped after step" in rest[-1] and "--resume" in rest[-1]
    stopped_at = checkpoint.load_trainer_state(out / "last")["json"]["step"]
    assert f"step {stopped_at} " in rest[-1] + " " and stopped_at >= 3
    resumed = subprocess.run(
        [sys.executable, "-m", "qkv", "train", "--out", str(out), "--resume", "--threads", "1",
         "--max-steps", str(stopped_at + 2)],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_trainer_state(out / "last")["json"]["step"] == stopped_at + 2


def test_resume_after_a_kill_matches_an_uninterrupted_run(corpus, tmp_path):
    root, _, _ = corpus
    model_cfg, cfg = PRESETS["tiny"]
    model_cfg = model_cfg.replace(dropout=0.1)  # so the random state must be restored too
    cfg = cfg.replace(
        src_file=str(root / "train.de"),
        tgt_file=str(root / "train.en"),
        threads=1,  # bit-identical needs one thread: reductions are ordered differently across
        max_steps=24,
        save_every=8,
        eval_every=12,
        eval_sentences=5,
    )

    def run(out, **extra):
        if "resume" in extra:  # killed at step 19: the last checkpoint is step 16's
            assert checkpoint.load_trainer_state(out / "last")["json"]["step"] == 16
        return train(task_for(cfg), model_cfg, cfg, out, log=lambda s: None, **extra)

    killed_then_resumed(run, tmp_path, kill_at=19)


def test_atomic_dir_keeps_the_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with checkpoint.atomic_dir(target) as d:
        (d / "x").write_text("old")
    with pytest.raises(RuntimeError), checkpoint.atomic_dir(target) as d:
        (d / "x").write_text("half-written")
        raise RuntimeError("killed")
    assert (target / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_schedule_warms_up_then_decays():
    assert inverse_sqrt(50, 100) == pytest.approx(0.5)
    assert inverse_sqrt(100, 100) == pytest.approx(1.0)
    assert inverse_sqrt(400, 100) == pytest.approx(0.5)
    assert inverse_sqrt(4, 0) == pytest.approx(0.5)  # no warmup: decay from the first step


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_torch(eps):
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).requires_grad_()
    target = torch.randint(0, 50, (37,))
    target[:5] = 7  # repeated targets
    want = torch.nn.functional.cross_entropy(logits, target, reduction="sum", label_smoothing=eps)
    (want_grad,) = torch.autograd.grad(want * 2.5, logits)
    got = smoothed_cross_entropy(logits, target, eps)
    (got_grad,) = torch.autograd.grad(got * 2.5, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    small = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: smoothed_cross_entropy(x, torch.tensor([0, 5, 5, 2]), eps), (small,)
    )


@pytest.fixture(params=["pytorch", "c++"])
def loss_route(request):
    """Each chunk's loss by PyTorch's ops (qkv's C++ kernels off) or by qkv's C++ kernel
    (forced on, whatever its timing says)."""
    from .conftest import kernel_or_pytorch

    with kernel_or_pytorch("loss", request.param == "c++"):
        yield request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_linear_cross_entropy_equals_the_plain_route(eps, bias, monkeypatch, loss_route):
    """The fused projection + loss, chunk by chunk (chunks of 8 rows over 37, so the last is
    short), against F.linear then PyTorch's own label-smoothed cross-entropy: the loss and the
    gradients of h, the weight (tied: it also feeds an embedding lookup) and the bias."""
    monkeypatch.setattr(qkv_loss, "CHUNK_SCORES", 8 * 50)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    if bias:
        torch.nn.init.normal_(head.bias)
    h = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    target[:5] = 7
    ids = torch.tensor([3, 7, 7])

    def grads(loss_fn):
        head.zero_grad()
        h.grad = None
        loss = loss_fn() + (torch.nn.functional.embedding(ids, head.weight) ** 2).sum()
        (loss * 2.5).backward()
        bias_grad = head.bias.grad.clone() if bias else None
        return loss.detach(), h.grad.clone(), head.weight.grad.clone(), bias_grad

    def plain():
        return torch.nn.functional.cross_entropy(
            head(h), target, reduction="sum", label_smoothing=eps
        )

    got = grads(lambda: linear_cross_entropy(h, head.weight, head.bias, target, eps))
    for a, b in zip(got, grads(plain), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no gradients wanted: the value alone
        value = linear_cross_entropy(h, head.weight, head.bias, target, eps)
        torch.testing.assert_close(value, plain())
    loss = linear_cross_entropy(h, head.weight, head.bias, target, eps)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # its gradients were handed over once
        loss.backward()


@pytest.mark.parametrize("n, chunk_rows", [(70, 16), (300, 256), (384, 128)])
def test_linear_cross_entropy_in_bf16_autocast_matches_the_plain_route_in_autocast(
    n, chunk_rows, monkeypatch, loss_route
):
    """Under bf16 autocast both routes multiply in bf16 and take the softmax in fp32: their
    losses and gradients agree to bf16's rounding, and the gradients come back in fp32. The
    fused route pads the rows to a multiple of ROW_QUANTUM (128) there: 70 rows in one padded
    chunk, 300 in a full chunk of 256 and a padded one, 384 in three chunks without padding."""
    monkeypatch.setattr(qkv_loss, "CHUNK_SCORES", chunk_rows * 300)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300)
    h = torch.randn(n, 32, requires_grad=True)
    target = torch.randint(0, 300, (n,))
    out = []
    for fused in (False, True):
        head.zero_grad()
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy(h, head.weight, head.bias, target, 0.1)
            else:
                loss = smoothed_cross_entropy(head(h).float(), target, 0.1)
        loss.backward()
        assert loss.dtype == h.grad.dtype == head.weight.grad.dtype == torch.float32
        assert h.grad.shape == h.shape
        grads = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
        out.append((loss.detach(), *grads))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


_FAULTS = """
import resource, statistics, sys, torch
from qkv.allocator import keep_freed_memory
kept = keep_freed_memory()
step = lambda: torch.empty(16, 1 << 20).fill_(1.0)  # a 64 MB temporary, as a training step makes
for _ in range(3):  # glibc settles within the first few (a fault-free one may come before)
    step()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, statistics.median(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_serves_a_repeated_large_temporary_without_new_pages():
    """qkv.allocator: with glibc's defaults every 64 MB temporary arrives as 16,384 fresh 4 KB
    pages (one fault each); kept for reuse, once the heap has settled, the typical step takes
    none. The median step, because a CI machine once gave one fault-heavy step in five (the
    heap moved under another allocation); the mean would flag that. Each setting is
    process-wide, so each runs in its own interpreter."""
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "QKV_KEEP_FREED_MEMORY": setting}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
        )
        kept, faults = out.stdout.split()
        runs[setting] = kept, float(faults)
    assert runs["1"][0] == "True" and runs["0"][0] == "False"
    assert runs["1"][1] < 1000 < 10_000 < runs["0"][1]


def test_bf16_autocast_trains_with_fp32_weights_and_a_loss_near_fp32(corpus, tmp_path):
    """--precision bf16: the forward pass in bfloat16 (its first loss within bf16's rounding of
    fp32's), weights and optimizer state still fp32, and the loss goes down."""
    from .conftest import tiny_run

    runs = {}
    for precision in ("fp32", "bf16"):
        trainer, logs = tiny_run(
            corpus,
            tmp_path / precision,
            max_steps=8,
            eval_every=8,
            log_every=1,
            precision=precision,
        )
        runs[precision] = [float(x.split("loss ")[1].split()[0]) for x in logs if "tok/s" in x]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert all(
            s.dtype == torch.float32
            for group in trainer.opt.state.values()
            for s in group.values()
            if torch.is_tensor(s) and s.is_floating_point()
        )
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)
    assert bf16[-1] < bf16[0]
    assert bf16 != fp32  # autocast did run in bf16
