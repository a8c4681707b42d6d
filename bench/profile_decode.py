"""Where qkv's decoding time goes: torch.profiler over greedy and beam-5 search on the small
random Marian model of translate_speed.py (batch 32, 20+eos source tokens, 25 forced outputs),
packed as `qkv translate` runs it: fp32, or with `--precision bf16` bf16 weights, or with
`--precision int8` 8-bit ones (`qkv translate --int8`).

    .venv/bin/python bench/profile_decode.py
    .venv/bin/python bench/profile_decode.py --precision bf16 --threads 1
    .venv/bin/python bench/profile_decode.py --threads 1 --shapes   # each operator by its shapes
    .venv/bin/python bench/profile_decode.py --threads 1 --precision int8

torch.profiler sees PyTorch's operators only, not qkv's C++ kernels (MKL's product, qkv's int8
product, a decoder layer's C++ step). For those, `--plain SECONDS` decodes greedily for that
long with no profiler of its own, under an outside one:

    perf record -g -o /tmp/perf.data .venv/bin/python bench/profile_decode.py --threads 1 \
        --precision int8 --plain 20
    perf report -i /tmp/perf.data --no-children --sort dso,symbol
"""

import tempfile
import time
from pathlib import Path

import torch
from timing import profiler_flags
from torch.profiler import profile
from translate_speed import EOS, PAD, V, forced, hf_model

from qkv import checkpoint
from qkv.allocator import keep_freed_memory
from qkv.marian import convert
from qkv.packed import pack
from qkv.search import beam_search, greedy, max_steps, model_step


def main() -> None:
    args = profiler_flags(
        __doc__,
        10,
        ("fp32", "bf16", "int8"),
        lambda ap: ap.add_argument("--plain", type=float, help="seconds of greedy, no profiler"),
    )
    keep_freed_memory()  # as the `qkv` command runs
    tmp = Path(tempfile.mkdtemp(prefix="qkv-profile-"))
    hf_model("small").save_pretrained(tmp / "hf")
    model = checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0]
    model = pack(model, int8=args.precision == "int8", bf16=args.precision == "bf16")
    src = torch.randint(2, V - 1, (32, 21), generator=torch.Generator().manual_seed(1))
    src[:, -1] = EOS
    lengths = torch.full((32,), 21)
    kw = dict(bos=PAD, eos=EOS, pad=PAD)

    def run(beam: int) -> None:
        with torch.inference_mode():
            cfg = forced(beam)
            state = model.start(src, max_steps(cfg, lengths, None))  # as qkv translate
            if beam == 1:
                greedy(model_step(model), state, lengths, cfg, **kw)
            else:
                beam_search(model_step(model), state, lengths, cfg, **kw)

    if args.plain:
        run(1)  # warm-up
        start, decodes = time.perf_counter(), 0
        while time.perf_counter() - start < args.plain:
            run(1)
            decodes += 1
        print(f"greedy: {decodes} decodes, {(time.perf_counter() - start) / decodes * 1e3:.1f} ms")
        return
    for beam in (1, 5):
        run(beam)  # warm-up
        with profile(record_shapes=args.shapes) as p:
            for _ in range(3):
                run(beam)
        print(f"beam {beam}" if beam > 1 else "greedy")
        table = p.key_averages(group_by_input_shape=args.shapes)
        print(
            table.table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40
            )
        )


if __name__ == "__main__":
    main()
