"""Where a decoding step's time goes, module by module: the small random Marian model of
translate_speed.py, packed as `qkv translate` runs it (fp32, or `--precision bf16|int8`), the
encoder once and then 25 cached decoder steps for 32 sentences (one row each, as greedy feeds
them). Forward hooks time every module (inclusive: a layer's time holds its sublayers'); the
operators one step dispatches are counted with torch.profiler.

    .venv/bin/python bench/decode_breakdown.py --threads 1
    .venv/bin/python bench/decode_breakdown.py --threads 1 --precision bf16
"""

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import profile
from translate_speed import EOS, PAD, V, hf_model

from qkv import checkpoint
from qkv.allocator import keep_freed_memory
from qkv.marian import convert
from qkv.packed import pack

STEPS = 25
# operators that only make a view (no arithmetic, no copy)
VIEWS = {"view", "transpose", "reshape", "slice", "alias", "select", "expand", "as_strided"}
VIEWS |= {"unsqueeze", "squeeze", "chunk", "split", "narrow", "t", "permute", "_unsafe_view"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    ap.add_argument("--rows", type=int, default=24, help="modules listed")
    args = ap.parse_args()
    keep_freed_memory()  # as the `qkv` command runs
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="qkv-breakdown-"))
    hf_model("small").save_pretrained(tmp / "hf")
    model = checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0]
    model = pack(model, int8=args.precision == "int8", bf16=args.precision == "bf16")
    src = torch.randint(2, V - 1, (32, 21), generator=torch.Generator().manual_seed(1))
    src[:, -1] = EOS

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    started: dict[int, float] = {}
    hooks = []
    for name, module in model.named_modules():
        key = ".".join(p for p in name.split(".") if not p.isdigit()) or "model"

        def pre(m, a, key=key):
            started[id(m)] = time.perf_counter()

        def post(m, a, out, key=key):
            spent[key] += time.perf_counter() - started[id(m)]
            calls[key] += 1

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def decode() -> None:
        cache = model.start(src)
        tokens = torch.full((32, 1), PAD)
        for _ in range(STEPS):
            model.step(tokens, cache, last=True)

    with torch.inference_mode():
        decode()  # warm-up
        spent.clear()
        calls.clear()
        t0 = time.perf_counter()
        decode()
        total = time.perf_counter() - t0
        for hook in hooks:
            hook.remove()
        cache = model.start(src)
        tokens = torch.full((32, 1), PAD)
        for _ in range(3):
            model.step(tokens, cache, last=True)
        with profile() as prof:
            model.step(tokens, cache, last=True)
    top_level = [e for e in prof.events() if e.cpu_parent is None and "::" in e.name]
    computing = [e for e in top_level if e.name.split("::")[-1] not in VIEWS]

    print(
        f"small model, {args.precision}, {args.threads} threads, 32 sentences: encoder + "
        f"{STEPS} steps {total * 1e3:.1f} ms; one step dispatches {len(top_level)} operators, "
        f"{len(computing)} of them not views"
    )
    print(f"{'module (layers summed)':44} {'ms':>8} {'calls':>6} {'us / call':>10}")
    for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[: args.rows]:
        n = calls[key]
        print(f"{key:44} {seconds * 1e3:8.2f} {n:6} {seconds / n * 1e6:10.1f}")


if __name__ == "__main__":
    main()
