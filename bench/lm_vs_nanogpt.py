"""qkv's language model beside nanoGPT (../shared/anchors/nanoGPT), on one machine, alternated.

    python bench/lm_vs_nanogpt.py race      # wall time to validation loss 1.88 (CPU recipe shape)
    python bench/lm_vs_nanogpt.py steps     # training ms/step at equal settings
    python bench/lm_vs_nanogpt.py generate  # tokens/s for 500 new characters, identical weights
    python bench/lm_vs_nanogpt.py all

nanoGPT runs from a scratch copy (its folder is read-only); its prepare.py gets a stub `requests`
module (it downloads nothing when input.txt lies beside it). Results go to bench/runs/lm-bench/
as JSON, and a summary is printed. Nothing here is a test: run it alone on an idle machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QKV_SHARED", ROOT.parent / "shared"))
ANCHOR = SHARED / "anchors" / "nanoGPT"
TEXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
SCRATCH = Path(os.environ.get("NANOGPT_SCRATCH", "/tmp/qkv-bench-nanogpt"))
OUT = ROOT / "bench" / "runs" / "lm-bench"
PY = sys.executable

# nanoGPT README's CPU recipe, and the same model shape in qkv with its own recipe (a higher
# learning rate, a cosine over a 1.3-minute budget, validation on 16k tokens every 100 steps)
NANO_RECIPE = shlex.split(
    "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
    "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
    "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
)
QKV_SHAPE = shlex.split(
    "--d-model 128 --d-ff 512 --n-heads 4 --n-decoder-layers 4 --block-size 64 --bias false"
)
QKV_RECIPE = shlex.split(
    "--max-tokens 768 --lr 3e-3 --min-lr 1e-4 --warmup 50 --max-minutes 1.3 "
    "--eval-every 100 --eval-tokens 16384 --log-every 100"
)
TARGET = 1.88


def scratch() -> Path:
    """A writable copy of nanoGPT with the character data prepared."""
    data = SCRATCH / "data" / "shakespeare_char"
    if (data / "train.bin").is_file():
        return SCRATCH
    shutil.copytree(ANCHOR, SCRATCH, dirs_exist_ok=True)
    shutil.copy(TEXT, data / "input.txt")
    (SCRATCH / "stub").mkdir(exist_ok=True)
    (SCRATCH / "stub" / "requests.py").write_text("")  # prepare.py imports it, never calls it
    env = {**os.environ, "PYTHONPATH": str(SCRATCH / "stub")}
    subprocess.run([PY, "prepare.py"], cwd=data, env=env, check=True, capture_output=True)
    return SCRATCH


def stamped(cmd: list[str], cwd: Path, env: dict | None = None) -> list[tuple[float, str]]:
    """Run a command; every output line with its time since launch."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    assert p.stdout is not None
    for line in p.stdout:
        lines.append((time.monotonic() - t0, line.rstrip()))
    if p.wait():
        raise RuntimeError(f"{cmd[:4]} failed:\n" + "\n".join(x for _, x in lines[-20:]))
    lines.append((time.monotonic() - t0, "<exit>"))
    return lines


def race_nanogpt() -> dict:
    nano = scratch()
    shutil.rmtree(nano / "out-race", ignore_errors=True)
    lines = stamped([PY, "train.py", *NANO_RECIPE, "--out_dir=out-race"], nano)
    evals = []
    for t, line in lines:  # "step 250: train loss 2.4293, val loss 2.4447"
        if line.startswith("step ") and "val loss" in line:
            evals.append((t, int(line.split()[1].rstrip(":")), float(line.split()[-1])))
    return race_result("nanoGPT", lines, evals)


def race_result(system: str, lines: list[tuple[float, str]], evals: list[tuple]) -> dict:
    """A run's wall time, last validation, and the first validation at or below TARGET;
    `evals` holds (seconds since launch, step, validation loss)."""
    hit = next(((t, s, v) for t, s, v in evals if v <= TARGET), None)
    return {
        "system": system,
        "wall_s": lines[-1][0],
        "final_val": evals[-1][2],
        "final_step": evals[-1][1],
        "reached_at_s": hit[0] if hit else None,
        "reached_at_step": hit[1] if hit else None,
        "evals": evals,
    }


def race_qkv() -> dict:
    out = OUT / "race-qkv"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "qkv.cli", "train", "--preset", "shakespeare-char", "--out", str(out)]
    env = {**os.environ, "QKV_DATA": str(SHARED / "data")}
    lines = stamped([*cmd, *QKV_SHAPE, *QKV_RECIPE], ROOT, env)
    evals = []
    for t, line in lines:  # "validation at step 100: valid_loss 2.599, ..."
        if line.startswith("validation at step"):
            step = int(line.split()[3].rstrip(":"))
            evals.append((t, step, float(line.split("valid_loss ")[1].split(",")[0])))
    return race_result("qkv", lines, evals)


def race(rounds: int = 2) -> dict:
    runs = []
    for r in range(rounds):
        for fn in (race_nanogpt, race_qkv):
            runs.append(fn())
            x = runs[-1]
            print(
                f"race round {r + 1} {x['system']}: wall {x['wall_s']:.0f} s, final val "
                f"{x['final_val']:.4f} at step {x['final_step']}, <= {TARGET} at "
                f"{x['reached_at_s'] and round(x['reached_at_s'])} s",
                flush=True,
            )
    return {"runs": runs}


# --- training steps at equal settings ------------------------------------------------------


def nano_stepper(block: int = 64, batch: int = 12):
    import numpy as np

    sys.path.insert(0, str(scratch()))
    from model import GPT, GPTConfig  # nanoGPT's, from the scratch copy

    torch.manual_seed(0)
    cfg = dict(block_size=block, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    m = GPT(GPTConfig(**cfg, bias=False))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    data = np.memmap(scratch() / "data/shakespeare_char/train.bin", dtype=np.uint16, mode="r")

    def step() -> None:  # train.py's loop body: get_batch, forward, backward, clip, step
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def qkv_stepper(block: int = 64, batch: int = 12):
    from qkv.presets import PRESETS
    from qkv.tasks.lm import LanguageModel
    from qkv.train import Trainer

    shape, recipe = PRESETS["shakespeare-char"]
    shape = shape.replace(d_model=128, d_ff=512, n_heads=4, n_decoder_layers=4, bias=False)
    recipe = recipe.replace(
        block_size=block, max_tokens=block * batch, lr=1e-3, max_minutes=0.0, max_steps=10**6
    )
    t = Trainer(LanguageModel(recipe), shape, recipe, OUT / "steps-qkv", log=lambda m: None)
    t.prepare(False)
    t.model.train()
    batches = iter(t.task.batches(0) * 10)
    return lambda: t._step([next(batches)], 1e-3)  # the loop's own step: collate .. optimizer


def steps(rounds: int = 8, n: int = 60) -> dict:
    """Alternate short stretches of each (this machine's speed drifts by 20% within minutes);
    the median stretch of each system gives the ratio."""
    makers = {"nanoGPT": nano_stepper, "qkv": qkv_stepper}
    fns = {k: f() for k, f in makers.items()}
    for fn in fns.values():
        for _ in range(30):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n * 1000)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        f"ms/step (median of {rounds} stretches of {n}): nanoGPT {med['nanoGPT']:.1f}, qkv "
        f"{med['qkv']:.1f}; qkv steps/s = {med['nanoGPT'] / med['qkv']:.2f}x nanoGPT's",
        flush=True,
    )
    return {"ms_per_step": times, "ratio": med["nanoGPT"] / med["qkv"]}


# --- generation on identical weights ---------------------------------------------------------


def generation(rounds: int = 2, new: int = 500) -> dict:
    """Train nanoGPT briefly with a 1024-character context (prompt + 500 fit, so nanoGPT's
    crop never happens and both see the same context), import it, generate greedily."""
    from qkv.checkpoint import load
    from qkv.config import DecodeConfig
    from qkv.generate import Generator
    from qkv.nanogpt import convert
    from qkv.packed import pack

    nano = scratch()
    ckpt = nano / "out-gen" / "ckpt.pt"
    if not ckpt.is_file():
        args = [a for a in NANO_RECIPE if not a.startswith(("--block_size", "--max_iters"))]
        args = [a for a in args if not a.startswith("--lr_decay_iters")]
        extra = "--block_size=1024 --batch_size=4 --max_iters=250 --lr_decay_iters=250 "
        extra += "--out_dir=out-gen --eval_interval=250 --always_save_checkpoint=True"
        stamped([PY, "train.py", *args, *shlex.split(extra)], nano)
    convert(ckpt, TEXT, OUT / "gen-qkv")
    model, tok, _ = load(OUT / "gen-qkv")
    gen = Generator(pack(model), tok)  # as `qkv generate` runs it
    sys.path.insert(0, str(nano))
    from model import GPT, GPTConfig

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    ref = GPT(GPTConfig(**saved["model_args"]))
    ref.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    ref.eval()
    stoi = {c: i for i, c in enumerate(tok.chars)}
    greedy = DecodeConfig(strategy="greedy")
    results = {}
    for batch in (1, 8):
        times: dict[str, list[float]] = {"nanoGPT": [], "qkv": []}
        for _ in range(rounds):
            t0 = time.perf_counter()
            with torch.no_grad():  # top_k=1 is greedy: only the argmax survives
                idx = ref.generate(torch.full((batch, 1), stoi["\n"]), new, top_k=1)
            times["nanoGPT"].append(time.perf_counter() - t0)
            theirs = ["".join(tok.chars[i] for i in row[1:].tolist()) for row in idx]
            t0 = time.perf_counter()
            ours = [g.text for g in gen.generate(["\n"] * batch, greedy, new)]
            times["qkv"].append(time.perf_counter() - t0)
        same = ours == theirs
        tps = {k: batch * new / min(v) for k, v in times.items()}
        results[f"batch{batch}"] = {"seconds": times, "tokens_per_s": tps, "identical": same}
        print(
            f"generate {new} at batch {batch}: nanoGPT {tps['nanoGPT']:.0f} tok/s, qkv "
            f"{tps['qkv']:.0f} tok/s = {tps['qkv'] / tps['nanoGPT']:.1f}x; identical: {same}",
            flush=True,
        )
    results["sample"] = ours[0][:300]
    return results


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    os.environ.setdefault("QKV_DATA", str(SHARED / "data"))  # Tiny Shakespeare, for qkv
    OUT.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (x.split(":", 1)[1].strip() for x in cpu.splitlines() if "Model name" in x), "?"
    )
    info = {
        "cpu": model_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(info, flush=True)
    jobs = {"race": race, "steps": steps, "generate": generation}
    for name, fn in jobs.items():
        if what in (name, "all"):
            result = {**info, **fn()}
            (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
