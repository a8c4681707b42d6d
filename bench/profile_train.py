"""Where a qkv training step's time goes: torch.profiler over 8 steps of the multi30k-de-en
preset's model on real Multi30k De-En token batches (2048 tokens), dropout 0.1, AdamW; in fp32,
or with `--precision bf16` in bf16 autocast as `qkv train --precision bf16` runs it.

    .venv/bin/python bench/profile_train.py
    .venv/bin/python bench/profile_train.py --precision bf16 --threads 1
    .venv/bin/python bench/profile_train.py --shapes   # each operator by its input shapes
"""

import torch
from timing import profiler_flags
from torch.profiler import profile

from qkv.allocator import keep_freed_memory
from qkv.data import collate, multi30k, token_batches
from qkv.loss import seq2seq_loss
from qkv.models import EncoderDecoder
from qkv.presets import PRESETS
from qkv.tasks.translation import encode_pairs
from qkv.tokenizer import Subwords


def training_step(bf16: bool, batches: int, compiled: bool = False):
    """The multi30k-de-en preset's model on the first `batches` real Multi30k De-En token batches
    of 2048, and one training step as qkv/train.py runs it (autocast in bf16, AdamW); `compiled`:
    the encoder and decoder through torch.compile (inductor, dynamic shapes), the loss eager."""
    model_cfg, _ = PRESETS["multi30k-de-en"]
    pairs = multi30k("train", "de", "en")[:6000]
    tok = Subwords.train([s for s, _ in pairs] + [t for _, t in pairs], 8000)
    examples, _ = encode_pairs(tok, pairs, 250)
    cut = token_batches(examples, 2048, 0, 0)[:batches]
    data = [collate([examples[i] for i in b], 0, 1, 2) for b in cut]
    torch.manual_seed(0)
    model = EncoderDecoder(model_cfg.replace(vocab_size=tok.vocab_size, share_embeddings=True))
    model.train()
    if compiled:
        model.encoder.compile(dynamic=True)
        model.decoder.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-9, fused=True)

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = seq2seq_loss(model, batch, 0.1)
        (loss / batch.tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, data


def main() -> None:
    args = profiler_flags(__doc__, 12)
    keep_freed_memory()  # as the `qkv` command runs
    step, data = training_step(args.precision == "bf16", 11)
    for batch in data[:3]:  # warm-up
        step(batch)
    with profile(record_shapes=args.shapes) as p:
        for batch in data[3:]:
            step(batch)
    table = p.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
