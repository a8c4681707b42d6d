"""The stack on a GPU, checked in under 3 minutes: exits non-zero on the first failure.

    .venv/bin/python bench/gpu_check.py            # on a machine with CUDA
    .venv/bin/python bench/gpu_check.py cpu        # the same checks on the CPU (tests the script)

Checks, all on CUDA: incremental decoding == the full forward; greedy == beam 1; sampling is
reproducible on the GPU's generator; `record_attention` rows sum to 1 and `mask_heads` silences
a head; the training loop runs a few steps on a stub translation corpus in bf16 autocast, and
its validation decodes on the GPU. Prints one line per check and the device's name.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from qkv.config import DecodeConfig, ModelConfig, TrainConfig
from qkv.inspect import mask_heads, record_attention
from qkv.models import from_config
from qkv.search import decode, model_step
from qkv.tasks import task_for
from qkv.train import train


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        sys.exit(2)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    t0 = time.monotonic()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, d_model=128, n_heads=4, d_ff=256, dropout=0.0, max_len=64)
    model = from_config(cfg).to(dev).eval()
    src = torch.randint(3, 500, (4, 11), device=dev)
    src[1, 7:] = cfg.pad_id
    tgt = torch.randint(3, 500, (4, 9), device=dev)
    tgt[:, 0] = cfg.bos_id
    with torch.no_grad():
        full = model(src, tgt)
        cache = model.start(src)
        steps = torch.cat([model.step(tgt[:, i : i + 1], cache) for i in range(tgt.shape[1])], 1)
        err = (full - steps).abs().max().item()
        check("incremental decoding == full forward", err < 1e-3, f"max |diff| {err:.1e}")

        lengths = (src != cfg.pad_id).sum(1)
        kw = dict(bos=cfg.bos_id, eos=cfg.eos_id, pad=cfg.pad_id, max_positions=cfg.max_len)
        base = DecodeConfig(max_len_a=0, max_len_b=12, beam=1)
        greedy = decode(
            model_step(model), model.start(src), lengths, base.replace(strategy="greedy"), **kw
        )
        beam1 = decode(model_step(model), model.start(src), lengths, base, **kw)
        same = [g[0].tokens for g in greedy] == [b[0].tokens for b in beam1]
        check("greedy == beam 1", same)
        beam5 = decode(
            model_step(model), model.start(src), lengths, base.replace(beam=5, nbest=3), **kw
        )
        check("beam 5 n-best", all(len(n) == 3 for n in beam5))
        sample = base.replace(strategy="sample", seed=3, temperature=2.0)
        a = decode(model_step(model), model.start(src), lengths, sample, **kw)
        b = decode(model_step(model), model.start(src), lengths, sample, **kw)
        check(
            "sampling reproducible for a seed", [x[0].tokens for x in a] == [y[0].tokens for y in b]
        )

        with record_attention(model) as rec:
            model(src, tgt)
        w = rec["decoder.layers.0.cross_attn"][0]
        rows = w.sum(-1)
        check(
            "record_attention rows sum to 1",
            bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-4)),
        )
        with mask_heads(model, {"decoder.layers.2.cross_attn": [0, 1, 2, 3]}):
            masked = model(src, tgt)
        check("mask_heads changes the output", not torch.allclose(masked, full))
        check("mask_heads restores on exit", bool(torch.allclose(model(src, tgt), full)))

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        words = ["eins", "zwei", "drei", "vier", "rot", "blau", "Hund", "Katze"]
        g = torch.Generator().manual_seed(0)
        lines = [
            " ".join(words[i] for i in torch.randint(0, 8, (5,), generator=g)) for _ in range(200)
        ]
        (root / "src.txt").write_text("\n".join(lines) + "\n")
        (root / "tgt.txt").write_text("\n".join(line.upper() for line in lines) + "\n")
        tcfg = TrainConfig(
            src_file=str(root / "src.txt"),
            tgt_file=str(root / "tgt.txt"),
            dataset=None,
            vocab_size=200,
            max_tokens=512,
            max_steps=20,
            eval_every=20,
            eval_sentences=10,
            log_every=10,
        )
        logs: list[str] = []
        # bf16 on the GPU (--precision bf16: autocast, pinned-memory batches); on a CPU
        # without bf16 units autocast is slow, so fp32 there
        if dev.type == "cuda":
            tcfg = tcfg.replace(precision="bf16")
        trainer = train(task_for(tcfg), cfg, tcfg, root / "run", device=dev, log=logs.append)
        check(
            f"training{' in bf16 autocast' if dev.type == 'cuda' else ''}",
            trainer.step == 20,
            logs[-1],
        )
        check(
            "parameters stay on the device",
            all(p.device.type == dev.type for p in trainer.model.parameters()),
        )
    print(f"all checks passed in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
