import random
import socket
from contextlib import contextmanager

import pytest
import torch

from qkv.config import ModelConfig
from qkv.models import from_config
from qkv.presets import PRESETS
from qkv.tasks import task_for
from qkv.train import train


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=23,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        max_len=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    def build(**overrides):
        torch.manual_seed(0)
        return from_config(tiny_config(**overrides)).eval()

    return build


WORDS = {
    "eins": "one",
    "zwei": "two",
    "drei": "three",
    "vier": "four",
    "fünf": "five",
    "rot": "red",
    "blau": "blue",
    "grün": "green",
    "Hund": "dog",
    "Katze": "cat",
    "läuft": "runs",
    "schläft": "sleeps",
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A toy language pair: word-for-word translation of 3-6 word sentences."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    src, tgt = [], []
    for _ in range(300):
        words = rng.choices(list(WORDS), k=rng.randint(3, 6))
        src.append(" ".join(words))
        tgt.append(" ".join(WORDS[w] for w in words))
    (root / "train.de").write_text("\n".join(src) + "\n", encoding="utf-8")
    (root / "train.en").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return root, src, tgt


def tiny_run(corpus, out, **overrides):
    root, _, _ = corpus
    model_cfg, cfg = PRESETS["tiny"]
    cfg = cfg.replace(
        src_file=str(root / "train.de"), tgt_file=str(root / "train.en"), threads=1, **overrides
    )
    logs: list[str] = []
    trainer = train(task_for(cfg), model_cfg, cfg, out, log=logs.append)
    return trainer, logs


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer, logs = tiny_run(corpus, out, max_steps=300, eval_every=150)
    return out, trainer, logs


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def native_kernels(*names: str):
    """qkv's C++ kernels, built (the test machine must build them) and in use inside, whatever
    the quick measurements in qkv/native.py would choose, so tests do not depend on timings:
    "attention" (`native.kernel`), "gemm" (MKL's packed product, `native.gemm`; skipped where
    this PyTorch lacks it), "choose" (the log-softmax and scans of search, `native.choose`),
    "masks" (dropout's mask, and dropout fused with relu or a skip connection's sum, and the
    bf16 layer norm, which go with it: `native.masks`), "train_attention" (attention with
    dropout in training, `native.train_attentions`), "loss" (the chunk loss, `native.losses`),
    "pointwise" (add-and-norm and the activation, `native.pointwise`), "step" (a decoder
    layer's step in C++, `native.layer_steps`; off inside unless named, so that a test of the
    kernels above sees them called from Python), "int8" (qkv's int8 product, `native.int8`;
    skipped where the CPU lacks AVX-512 VNNI; off inside unless named, so that int8 weights
    pack for PyTorch's product). Yields the module."""
    from qkv import native

    module = native._compile()
    if "gemm" in names and not module.gemm_available():
        pytest.skip("no MKL packed GEMM in this PyTorch")
    if "int8" in names and not module.int8_available():
        pytest.skip("no AVX-512 VNNI: qkv's int8 product is not built here")
    saved = dict(native._state)
    native._state["built"] = module
    native._state.update(
        {
            {
                "attention": "module",
                "gemm": "gemm",
                "choose": "choose",
                "masks": "masks",
                "train_attention": "train_attention",
                "loss": "loss",
                "pointwise": "pointwise",
                "step": "step",
                "int8": "int8",
            }[n]: module
            for n in names
        }
    )
    for off_unless_named in ("step", "int8"):
        if off_unless_named not in names:
            native._state[off_unless_named] = None
    try:
        yield module
    finally:
        native._state.clear()
        native._state.update(saved)


@contextmanager
def kernel_or_pytorch(name: str, on: bool):
    """The two routes a test runs both of: qkv's C++ kernel `name` in use (`native_kernels`),
    or all of qkv's kernels off, PyTorch's ops instead (`native.off`)."""
    from qkv import native

    with native_kernels(name) if on else native.off():
        yield


@pytest.fixture(params=["onednn", "mkl"])
def gemm_route(request):
    """Which kernel packed fp32 layers use: oneDNN's, or MKL's packed product (qkv/native.py),
    whatever the quick measurement in `native.gemm` would choose. Packs made inside the test
    take the route."""
    with kernel_or_pytorch("gemm", request.param == "mkl"):
        yield request.param
