"""Two measurements behind qkv serve's design (bench/README.md, "Serving"):

1. A small matmul (8x256 by 256x1024) in the main thread, then in a second thread after the
   main thread has run PyTorch's parallel ops: why every model call of the server, loading
   included, runs on one thread.
2. The De→En model's beam-5 throughput on Multi30k test sentences in arrival order, 64, 32 and
   16 at a time: whether batch size or sorting decides the server's throughput.

    .venv/bin/python bench/serve_findings.py --model bench/runs/multi30k-de-en
"""

from __future__ import annotations

import argparse
import gzip
import os
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def matmul_us() -> float:
    a, w = torch.randn(8, 256), torch.randn(1024, 256)
    for _ in range(100):
        torch.nn.functional.linear(a, w)
    start = time.perf_counter()
    for _ in range(5000):
        torch.nn.functional.linear(a, w)
    return (time.perf_counter() - start) / 5000 * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(ROOT / "bench/runs/multi30k-de-en"))
    p.add_argument(
        "--data-dir", default=os.environ.get("QKV_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--sentences", type=int, default=512)
    args = p.parse_args()

    main_us = matmul_us()
    box: list[float] = []
    t = threading.Thread(target=lambda: box.append(matmul_us()))
    t.start()
    t.join()
    print(f"matmul 8x256 by 256x1024: main thread {main_us:.0f} us, second thread {box[0]:.0f} us")

    from qkv.checkpoint import load
    from qkv.config import DecodeConfig
    from qkv.packed import pack
    from qkv.translate import Translator

    path = Path(args.data_dir) / "multi30k" / "test_2016_flickr.de.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [line.strip() for line in f][: args.sentences]
    model, tok, _ = load(args.model)
    translator, cfg = Translator(pack(model), tok, batch_size=64), DecodeConfig()
    translator.translate(texts[:64], cfg)  # warm-up
    for size in (64, 32, 16):
        start = time.perf_counter()
        for i in range(0, len(texts), size):
            translator.translate(texts[i : i + size], cfg)
        rate = len(texts) / (time.perf_counter() - start)
        print(f"beam 5, arrival order, {size} at a time: {rate:.1f} sentences/s")


if __name__ == "__main__":
    main()
