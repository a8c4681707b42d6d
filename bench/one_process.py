"""Why bench/translate_speed.py runs each engine in its own process: qkv's greedy speed (small
random Marian model, 128 sentences, batch 32, 25 forced tokens) alone, then in the same process
after HF `generate` ran, after a CTranslate2 translator was created, and after it translated.

    .venv/bin/python bench/one_process.py      # needs ctranslate2
"""

import tempfile
import time
from pathlib import Path

import torch
from translate_speed import EOS, PAD, V, ct2_convert, hf_model, token_name

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.marian import convert
from qkv.packed import pack
from qkv.search import greedy, model_step


def main() -> None:
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="qkv-one-process-"))
    hf = hf_model("small")
    hf.save_pretrained(tmp / "hf")
    model = pack(checkpoint.load(convert(tmp / "hf", tmp / "qkv"))[0])
    src = torch.randint(2, V - 1, (128, 21), generator=torch.Generator().manual_seed(1))
    src[:, -1] = EOS
    cfg = DecodeConfig(strategy="greedy", max_len_a=0, max_len_b=25, min_len=25, at_max="stop")
    kw = dict(bos=PAD, eos=EOS, pad=PAD)

    def qkv_rates() -> list[float]:
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in src.split(32):
                    greedy(model_step(model), model.start(x), torch.full((32,), 21), cfg, **kw)
            rates.append(round(128 / (time.perf_counter() - t0), 1))
        return rates

    print("qkv greedy sentences/s, 3 runs each")
    qkv_rates()  # warm-up
    print("alone:                    ", qkv_rates())
    with torch.inference_mode():
        x = src[:32]
        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), min_new_tokens=25,
                    max_new_tokens=25, num_beams=1, do_sample=False)  # fmt: skip
    print("after HF generate:        ", qkv_rates())
    import ctranslate2

    ct2_dir = ct2_convert(tmp / "hf", tmp / "ct2", None)
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", intra_threads=2)
    print("CTranslate2 loaded:       ", qkv_rates())
    tokens = [[token_name(i) for i in row] for row in src[:32].tolist()]
    translator.translate_batch(tokens, beam_size=1, min_decoding_length=25, max_decoding_length=25)
    print("after a CTranslate2 batch:", qkv_rates())


if __name__ == "__main__":
    main()
