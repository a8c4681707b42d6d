"""The Multi30k De→En preset on a GPU, bf16 autocast, for a fixed time: target tokens/s, the time
to reach the CPU run's best validation BLEU (37.79, bench/README.md, 2,800 steps on 2 cores), an
MFU estimate against the card's bf16 peak, and peak memory. Run by bench/gpu.sh.

    .venv/bin/python bench/gpu_train.py --minutes 5 --out bench/runs/gpu
    .venv/bin/python bench/gpu_train.py --device cpu --steps 4 --out /tmp/gpu-smoke   # the script
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qkv.models import count_parameters
from qkv.presets import PRESETS
from qkv.tasks import task_for
from qkv.train import train

CPU_BEST_BLEU = 37.79
# dense bf16 peak, FLOP/s, by the name CUDA reports (without sparsity)
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/runs/gpu")
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=0, help="a step budget instead (0: none)")
    p.add_argument("--eval-every", type=int, default=200)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model_cfg, cfg = PRESETS["multi30k-de-en"]
    cfg = cfg.replace(
        precision="bf16" if device.type == "cuda" else "fp32",
        max_minutes=0.0 if args.steps else args.minutes,
        max_steps=args.steps,
        eval_every=args.eval_every,
        eval_sentences=500,
        log_every=50,
        tune_alphas=(),  # a throughput check: no decoding sweep at the end
    )
    logs: list[str] = []

    def log(line: str) -> None:
        logs.append(line)
        print(line, flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.monotonic()
    trainer = train(task_for(cfg), model_cfg, cfg, out / "run", device=device, log=log)
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    reached = next((r for r in rows if r["valid_bleu"] >= CPU_BEST_BLEU), None)
    progress = [x for x in logs if " tok/s " in x]
    tok_s = [float(x.split(" tok/s")[0].rsplit("| ", 1)[1].replace(",", "")) for x in progress]
    # training FLOPs per target token: about 6 x parameters (forward 2, backward 4); source
    # tokens ride along in the encoder, so this undercounts a little
    params = count_parameters(trainer.model)
    flops = 6 * params * (sum(tok_s) / len(tok_s) if tok_s else 0.0)
    peak = peak_flops(name)
    result = {
        "device": name,
        "torch": torch.__version__,
        "steps": trainer.step,
        "minutes": wall / 60,
        "parameters": params,
        "target_tokens_per_s_mean": sum(tok_s) / len(tok_s) if tok_s else None,
        "best_valid_bleu": max(r["valid_bleu"] for r in rows),
        "minutes_to_cpu_best_bleu": reached["minutes"] if reached else None,
        "steps_to_cpu_best_bleu": reached["step"] if reached else None,
        "mfu_estimate": flops / peak if peak else None,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }
    (out / "gpu_train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
