"""CTranslate2 alone, greedy on translate_speed.py's small random Marian model (256 sentences,
batch 32, 25 forced output tokens), at 1 and 2 threads, fp32 and int8, each in a fresh process
(as translate_speed.py runs it), with OpenMP's default wait policy or with `--wait-policy
ACTIVE` (threads spin between parallel regions instead of sleeping). Written when CTranslate2
ran slower at 2 threads than at 1 in translate_speed.py on a 2-core VM, to see whether the
benchmark's setup (other engines' processes) or CTranslate2 itself caused it.

    .venv/bin/python bench/ct2_threads.py
    .venv/bin/python bench/ct2_threads.py --wait-policy ACTIVE
"""

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import translate_speed as ts


def one(tmp: Path, kind: str, threads: int) -> None:
    run_args = argparse.Namespace(sentences=256, batch=32, src_len=20, out_len=25, threads=threads)
    run = ts.ct2_engine(tmp / kind, kind == "int8", run_args)
    run(1, 1)  # warm-up
    t0 = time.perf_counter()
    run(1, 8)
    rate = 256 / (time.perf_counter() - t0)
    print(f"CTranslate2 {kind} greedy, {threads} threads: {rate:6.1f} sentences/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--wait-policy", choices=["default", "ACTIVE", "PASSIVE"], default="default")
    args = ap.parse_args()
    if args.wait_policy != "default":  # inherited by each process's OpenMP when it starts
        os.environ["OMP_WAIT_POLICY"] = args.wait_policy
    tmp = Path(tempfile.mkdtemp(prefix="qkv-ct2-"))
    ts.hf_model("small").save_pretrained(tmp / "hf")
    if ts.ct2_convert(tmp / "hf", tmp / "fp32", None) is None:
        raise SystemExit("ct2_threads.py: error: ctranslate2 is not installed")
    ts.ct2_convert(tmp / "hf", tmp / "int8", "int8")
    print(f"OMP_WAIT_POLICY: {args.wait_policy}")
    ctx = mp.get_context("spawn")
    for threads in (1, 2, 1, 2):
        for kind in ("fp32", "int8"):
            proc = ctx.Process(target=one, args=(tmp, kind, threads))
            proc.start()
            proc.join()


if __name__ == "__main__":
    main()
