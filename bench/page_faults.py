"""Page faults per training step, with glibc's default malloc settings and with freed memory
kept for reuse (`qkv.allocator.keep_freed_memory`, what the `qkv` command sets): the
multi30k-de-en preset's model on real Multi30k De-En token batches of 2048, each setting in its
own process (the setting is process-wide), fp32 and bf16 autocast. Faults are counted
(getrusage), seconds per step are timed over the same 7 steps after 3 of warm-up.

    .venv/bin/python bench/page_faults.py
    .venv/bin/python bench/page_faults.py --threads 1 --precisions bf16
"""

import argparse
import resource
import subprocess
import sys
import time

import torch

from qkv.allocator import keep_freed_memory
from qkv.data import collate, multi30k, token_batches
from qkv.loss import seq2seq_loss
from qkv.models import EncoderDecoder
from qkv.presets import PRESETS
from qkv.tasks.translation import encode_pairs
from qkv.tokenizer import Subwords


def one(keep: bool, precision: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if keep:
        assert keep_freed_memory()
    model_cfg, _ = PRESETS["multi30k-de-en"]
    pairs = multi30k("train", "de", "en")[:6000]
    tok = Subwords.train([s for s, _ in pairs] + [t for _, t in pairs], 8000)
    examples, _ = encode_pairs(tok, pairs, 250)
    cut = token_batches(examples, 2048, 0, 0)[:10]
    data = [collate([examples[i] for i in b], 0, 1, 2) for b in cut]
    torch.manual_seed(0)
    model = EncoderDecoder(model_cfg.replace(vocab_size=tok.vocab_size, share_embeddings=True))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-9, fused=True)

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = seq2seq_loss(model, batch, 0.1)
        (loss / batch.tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in data[:3]:
        step(batch)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for batch in data[3:]:
        step(batch)
    seconds = (time.perf_counter() - t0) / 7
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 7
    name = "kept for reuse" if keep else "glibc default"
    print(f"{precision:5} {name:15} {faults:10,.0f} {seconds:8.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--one", nargs=2, metavar=("KEEP", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0] == "keep", args.one[1], args.threads)
    print(f"{args.threads} threads; {'precision':5} {'freed memory':15} {'faults/step':>10} s/step")
    for precision in args.precisions.split(","):
        for keep in ("default", "keep"):
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--one",
                keep,
                precision,
            ]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
