"""Kill soak: SIGKILL a small training run at random moments, some of them while a checkpoint is
being written, resume it each time with `qkv train --resume`, and compare the final weights with
an uninterrupted run of the same seed, bit for bit.

    .venv/bin/python bench/kill_soak.py --kills 10 --out bench/runs/kill_soak

The run: the `tiny` preset (an encoder-decoder, 2+2 layers) on 2,000 pairs of a synthetic
German-English corpus, one thread (so every reduction is ordered the same way), a checkpoint
every 10 steps. Half the kills come at a random moment of training, half while the run writes its
1st to 4th checkpoint (the instant the checkpoint's temporary directory appears). Prints one
line per kill and the verdict; exit 1 if any resumed run differs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

WORDS = ["ein", "mann", "eine", "frau", "hund", "katze", "sieht", "hat", "das", "haus", "rot"]
GLOSS = ["a", "man", "a", "woman", "dog", "cat", "sees", "has", "the", "house", "red"]


def corpus(directory: Path, n: int = 2000) -> tuple[Path, Path]:
    rng = random.Random(0)
    src, tgt = [], []
    for _ in range(n):
        idx = [rng.randrange(len(WORDS)) for _ in range(rng.randint(3, 8))]
        src.append(" ".join(WORDS[i] for i in idx))
        tgt.append(" ".join(GLOSS[i] for i in idx))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.de").write_text("\n".join(src) + "\n")
    (directory / "train.en").write_text("\n".join(tgt) + "\n")
    return directory / "train.de", directory / "train.en"


def command(out: Path, src: Path, tgt: Path, steps: int, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "qkv.cli", "train", "--out", str(out)]
    if resume:
        return base + ["--resume"]
    return base + [
        "--preset", "tiny", "--src", str(src), "--tgt", str(tgt), "--threads", "1",
        "--max-steps", str(steps), "--save-every", "10", "--eval-every", "50",
        "--log-every", "1000", "--dropout", "0.1", "--overwrite",
    ]  # fmt: skip


STARTUP = 3.0  # seconds before training starts: imports, data, tokenizer


def step_of(out: Path) -> int:
    state = out / "last" / "trainer.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def kill_once(
    cmd: list[str], out: Path, during_write: bool, rng: random.Random, window: float
) -> str:
    """Start cmd and SIGKILL it: at a random moment within the first half of the `window`
    seconds it should still train (so every run makes some progress first), or while it writes
    its 1st to 4th checkpoint. Returns how it went."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    if during_write:
        wanted, seen, writing = rng.randint(1, 4), 0, False
        while proc.poll() is None and time.monotonic() - start < 300:
            now = (out / ".last.tmp").exists()
            if now and not writing:
                seen += 1
                if seen == wanted:
                    break
            writing = now
            time.sleep(0.0005)
        moment = f"while writing its checkpoint number {wanted}"
    else:
        time.sleep(STARTUP + rng.uniform(0.1, 0.5) * window)
        moment = f"after {time.monotonic() - start:.1f} s"
    if proc.poll() is not None:
        return f"finished before the kill ({moment})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed {moment}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="bench/runs/kill_soak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    src, tgt = corpus(root / "data")
    rng = random.Random(args.seed)

    straight = root / "straight"
    t0 = time.monotonic()
    subprocess.run(command(straight, src, tgt, args.steps, False), check=True, capture_output=True)
    per_step = max(time.monotonic() - t0 - STARTUP, 1.0) / args.steps
    reference = load_file(str(straight / "last" / "model.safetensors"))

    killed, kills, log = root / "killed", 0, []
    resume = False
    while step_of(killed) < args.steps:
        cmd = command(killed, src, tgt, args.steps, resume)
        if kills < args.kills:
            window = (args.steps - step_of(killed)) * per_step
            how = kill_once(cmd, killed, kills % 2 == 1, rng, window)
            if how.startswith("killed"):
                kills += 1
            log.append(f"kill {kills}: {how}; last/ holds step {step_of(killed)}")
            print(log[-1], flush=True)
        else:
            subprocess.run(cmd, check=True, capture_output=True)
        # killed before its first checkpoint: start again (what a user would do)
        resume = (killed / "last").is_dir() or (killed / "previous").is_dir()
    final = load_file(str(killed / "last" / "model.safetensors"))
    same = final.keys() == reference.keys() and all(
        torch.equal(final[k], reference[k]) for k in final
    )
    print(
        f"{kills} kills, resumed each time; final weights bit-identical to the straight run: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
