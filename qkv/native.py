"""Kernels qkv writes in C++ (qkv/csrc/), compiled on first use for the CPU at hand.

Eleven so far:
- Attention while decoding (`decode_attention`), each row's few new queries against its cached
  keys and values. PyTorch's fused CPU kernel calls a small matrix product per (row, head) and,
  with one query over a few dozen keys, spends most of its time in those calls
  (bench/decode_attention.py); the C++ loop does the same arithmetic in one pass per (row,
  head). It also reads a beam search's reordered KV cache through its table of stored rows, so
  that a reorder copies no keys (qkv/cache.py). qkv/attention.py calls it where it applies and
  falls back to PyTorch everywhere else.
- The packed linear layers' product (`pack_weight`, `packed_linear`): MKL's packed GEMM, the
  weight laid out once for its kernel instead of at every call, for any number of rows
  (qkv/packed.py uses it for fp32 inference; bench/packed_gemm.py measures it).
- int8 inference's product (`int8_pack`, `int8_linear`): each weight row in 8 bits, laid out
  once, and each input row quantized to 8 bits on the fly, multiplied on AMX's tiles where the
  CPU has them, else on AVX-512 VNNI's dot products. PyTorch's dynamic int8 product costs 40 us
  or more a call whatever the size, several times the arithmetic of a decoding step's small
  products (qkv/packed.py uses it for int8 weights; bench/int8_gemm.py measures it).
- Choosing from a step's scores (`log_softmax_`, `argmax`, `beam_topk`): the last position's
  log-softmax in one read of the logits, greedy's best token and beam search's best 2K
  extensions of a sentence's beams, each a scan that skips the chunks of scores that cannot
  win (qkv/search.py uses them; bench/choose_speed.py measures them).
- The loss of training's output layer (`smoothed_cross_entropy_rows`): a chunk of scores'
  label-smoothed cross-entropy and its gradient in two reads and one write of each row, where
  PyTorch's ops made six passes (qkv/loss.py uses it; bench/loss_speed.py measures it).
- The steps between a decoding step's products (`add_layer_norm`, `activate_`): a post-LN skip
  connection's add and layer norm in one call, and GELU or SiLU in place after MKL's product
  (qkv/layers.py and qkv/packed.py use them; bench/pointwise_speed.py measures them).
- A decoder layer's whole decoding step (`decoder_layer_step`): the kernels above (and PyTorch's
  int8 or oneDNN's bf16 product where the layer's weights are int8 or bf16) called in turn from
  C++, so that a layer is one call from Python rather than a few dozen (qkv/packed.py's
  PackedDecoderLayer uses it; bench/layer_step.py measures it).
- Dropout's mask for training (`dropout_mask`): drawn by a counter-based generator seeded from
  PyTorch's, in one pass, where PyTorch's route made four (qkv/dropout.py uses it;
  bench/dropout_speed.py measures it).
- Attention with dropout for training (`train_attention`): each (row, head) in fp32 buffers,
  forward and backward, the weights and the dropout mask made again in the backward pass from
  each query's log-sum-exp and the mask's seed. The explicit route was ten operators over
  (B, H, T, S) and the heads, one of them PyTorch's softmax, slow for rows under 16 keys
  (qkv/attention.py uses it; bench/train_kernels.py measures it).
- Dropout fused with what is next to it in training (`relu_dropout`, `add_dropout`): the
  feed-forward's relu and the skip connection's sum, one pass each way, the same masks and
  roundings as the separate ops (qkv/dropout.py; bench/train_kernels.py).
- The pre-LN norm under bf16 autocast (`layer_norm_bf16`): fp32 in, bf16 out, so that the next
  product's cast and its backward's are not two more passes (qkv/layers.py;
  bench/train_kernels.py).

The first use compiles the files (torch.utils.cpp_extension: a C++ compiler and ninja; about half
a minute) with -march=native into the qkv cache (~/.cache/qkv/native, or $QKV_CACHE/native),
one build per CPU (its model name and flags), compiler flags, sources and torch version. Then,
once per process, a quick measurement at a decoding shape checks that each kernel beats
PyTorch's (oneDNN's for the product) on this machine; where one does not, or anything fails (no
compiler, no ninja, no MKL in the PyTorch build), qkv uses PyTorch's and says so once.
QKV_NATIVE=0 turns them all off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # part of a build's identity
NAME = "qkv_native"  # the module's name, TORCH_EXTENSION_NAME in csrc/bindings.cpp
# A build takes about half a minute; a lock file this old was left by a killed one.
STALE_LOCK_S = 600
# Queries per row it takes: one per decoding step, or one per beam where a sentence's beams
# share its cross-attention keys (qkv/cache.py). More, and PyTorch's kernel does well.
MAX_QUERIES = 32

CFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",  # where the CPU has them (ignored elsewhere)
    "-fopenmp",  # at::parallel_for's threads
    "-funsafe-math-optimizations",  # reorder the sums to vectorize them; infinities still hold
    "-fno-math-errno",
]

# The activation kernel's use is its lower cost per call: PyTorch's (oneDNN's eltwise kernel)
# costs more per call but less per value, and on the Xeon of bench/README.md it lost at 164,000
# values (beam 5's 160 rows) and won at 688,000 (a batch's encoder layer; bench/
# pointwise_speed.py). Decoding steps have at most a few hundred thousand.
ACTIVATE_MAX = 1 << 18

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_off = False
_NO_MASK = torch.empty(0, dtype=torch.bool)
_NO_TABLE = torch.empty(0, dtype=torch.long)
_NO_BIAS = torch.empty(0)
_TRAIN_DTYPES = (torch.float32, torch.bfloat16)


# The training kernels `off` can turn off one by one (their wrappers below return None inside).
TRAINING_KERNELS = ("train_attention", "fused_dropouts", "layer_norm_bf16")
_off_kernels: set[str] = set()


@contextmanager
def off(*kernels: str) -> Iterator[None]:
    """PyTorch's kernel everywhere inside, or only in place of the named training kernels
    (TRAINING_KERNELS), the rest as usual (tests and benchmarks compare the two; not for use
    while other threads decode or train)."""
    global _off
    if unknown := set(kernels) - set(TRAINING_KERNELS):
        raise ValueError(f"native.off: no training kernel {sorted(unknown)}")
    before = _off, set(_off_kernels)
    _off = _off or not kernels
    _off_kernels.update(kernels)
    try:
        yield
    finally:
        _off = before[0]
        _off_kernels.clear()
        _off_kernels.update(before[1])


def enabled() -> bool:
    return os.environ.get("QKV_NATIVE", "1") != "0"


def _cpu_key() -> str:
    """The CPU model and flags: a build made with -march=native runs on that kind of CPU only."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [os.uname().machine]
    sources = [f.read_text() for f in [*SOURCES, *HEADERS]]
    text = "\n".join([*lines, *CFLAGS, *sources, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_dir() -> Path:
    root = Path(os.environ.get("QKV_CACHE", Path.home() / ".cache" / "qkv"))
    return root / "native" / _cpu_key()


def _say(message: str) -> None:
    print(f"qkv: {message}", file=sys.stderr, flush=True)


def _compile() -> ModuleType:
    """The module: built here once (torch's builder), then imported directly by every process.

    torch's builder takes a lock file in the build directory on every load, even when nothing
    needs building, and waits for it without end: a process killed inside that window (a
    SIGTERM'd server or training, a killed test) left every later qkv process hanging. So once
    a build has loaded, a marker file says so and later loads skip the builder; a lock older
    than STALE_LOCK_S is taken to be a killed build's and removed."""
    where = build_dir()
    library, marker = where / f"{NAME}.so", where / "built"
    if marker.exists() and library.exists():
        loaded = sys.modules.get(NAME)
        if loaded is not None and Path(loaded.__file__) == library:
            return loaded
        spec = importlib.util.spec_from_file_location(NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[NAME] = module
        return module
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # pip's ninja, in a virtual environment not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # torch says that ninja is missing
    where.mkdir(parents=True, exist_ok=True)
    lock = where / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    if not library.exists():
        _say("compiling qkv's C++ kernels for this CPU (once, about 30 s)")
    module = load(
        name=NAME,
        sources=[str(f) for f in SOURCES],
        build_directory=str(where),
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    tmp = where / f"built.{os.getpid()}"
    tmp.write_text(torch.__version__)
    tmp.replace(marker)  # atomic: a reader sees the marker whole or not at all
    return module


def _quicker(ours, theirs, margin: float = 1.0) -> bool:
    """Whether ours() beats theirs() here, `margin` times over: the fastest of 50 calls each,
    gradients off."""
    from .precision import best_of

    with torch.inference_mode():
        return best_of(ours, 50) * margin < best_of(theirs, 50)


def _faster(module: ModuleType) -> bool:
    """Whether the kernel beats PyTorch's here, at greedy decoding's shape for 32 sentences
    (8 heads of 64, 24 cached keys, no mask in either)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(32, 8, n, 64, generator=gen) for n in (1, 24, 24))
    return _quicker(
        lambda: module.decode_attention(q, k, v, _NO_MASK, _NO_TABLE),
        lambda: F.scaled_dot_product_attention(q, k, v),
    )


def _gemm_faster(module: ModuleType) -> bool:
    """Whether MKL's packed product beats oneDNN's packed one (what qkv.packed uses otherwise)
    here, at a decoding step's shape: 32 rows by a 1024 x 256 weight, no bias in either."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 256, generator=gen), torch.randn(1024, 256, generator=gen)
    ours, theirs = module.pack_weight(w), torch.ops.mkldnn._reorder_linear_weight(w, None)
    return _quicker(
        lambda: module.packed_linear(x, ours, _NO_BIAS, 1024),
        lambda: torch.ops.mkldnn._linear_pointwise(x, theirs, None, "none", [], ""),
    )


def _choose_faster(module: ModuleType) -> bool:
    """Whether the log-softmax beats PyTorch's here, at greedy decoding's shape: 32 rows of an
    8,000-token vocabulary. (The scans after it, argmax and beam_topk, beat PyTorch's by more
    than it does, bench/choose_speed.py; they go with it.)"""
    x = torch.randn(32, 8000, generator=torch.Generator().manual_seed(0))
    return _quicker(lambda: module.log_softmax_(x), lambda: torch.log_softmax(x, -1))


def _masks_faster(module: ModuleType) -> bool:
    """Whether the dropout mask beats PyTorch's route (qkv/dropout.py) here, at a training
    feed-forward's shape: 2,048 tokens by 1,024, fp32."""
    from .dropout import cut_and_scale, torch_mask

    x, gen = torch.empty(2048, 1024), torch.Generator().manual_seed(0)
    cut, scale = cut_and_scale(0.1, x.dtype)
    return _quicker(  # its own generator: a training's random stream must not see the check
        lambda: module.dropout_mask(x, cut, scale, 1), lambda: torch_mask(x, cut, scale, gen)
    )


def _train_attention_faster(module: ModuleType) -> bool:
    """Whether the training attention kernel, forward and backward, beats the explicit route it
    replaces (qkv/attention.py) here, at a training batch's shape: 64 sentences of 16 tokens,
    8 heads of 32, dropout 0.1, fp32."""
    from .dropout import cut_and_scale, torch_mask
    from .precision import best_of

    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(64, 8, 16, 32, generator=gen) for _ in range(4))
    cut, scale = cut_and_scale(0.1, torch.float32)

    def ours() -> None:
        out, lse = module.train_attention_forward(q, k, v, _NO_MASK, False, cut, scale, 1)
        module.train_attention_backward(g, q, k, v, _NO_MASK, False, cut, scale, 1, lse)

    def explicit() -> None:
        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
        weights = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(32)).softmax(-1)
        out = (weights * torch_mask(weights, cut, scale, gen)) @ qkv[2]
        torch.autograd.grad(out, qkv, g)

    return best_of(ours, 20) < best_of(explicit, 20)


def _loss_faster(module: ModuleType) -> bool:
    """Whether the chunk loss beats PyTorch's ops (qkv/loss.py) here, at a chunk of the fused
    loss: 131 rows of an 8,000-token vocabulary, fp32, with its gradient."""
    from .loss import torch_chunk_loss

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(131, 8000, generator=gen), torch.randint(0, 8000, (131,), generator=gen)
    g = torch.empty_like(x)
    return _quicker(
        lambda: module.smoothed_cross_entropy_rows(x, t, 0.1, g),
        lambda: torch_chunk_loss(x, t, 0.1, g),
    )


def _pointwise_faster(module: ModuleType) -> bool:
    """Whether the skip connection's add and layer norm beat PyTorch's two ops here, at greedy
    decoding's shape for 32 sentences of a d256 model. (The activation beats PyTorch's gelu_ at
    decoding's sizes too, bench/pointwise_speed.py; it goes with them.)"""
    gen = torch.Generator().manual_seed(0)
    x, y, w, b = (
        torch.randn(*shape, generator=gen) for shape in ((32, 256), (32, 256), (256,), (256,))
    )
    return _quicker(
        lambda: module.add_layer_norm(x, y, w, b, 1e-5),
        lambda: F.layer_norm(x + y, (256,), w, b, 1e-5),
    )


def _int8_faster(module: ModuleType) -> bool:
    """Whether qkv's int8 product beats PyTorch's dynamic int8 one (on the engine
    qkv.packed.int8_engine takes) here by INT8_ENGINE_MARGIN, at a greedy step's two costliest
    products: 32 rows by a 1024 x 256 feed-forward weight and by the 8k-word output layer,
    summed. (The margin keeps the choice the same from one process to the next where the two
    are close: they round differently, so a flip would change some outputs. On the Xeon of
    bench/README.md qkv's was 1.6x and 2.9x faster at these two on AMX, and 0.36x and 0.62x
    with AMX turned off, on AVX-512 VNNI alone: bench/int8_gemm.py.)"""
    from .packed import INT8_ENGINE_MARGIN, int8_engine, prepack_int8, quantize_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=gen)
    ours, theirs = [], []
    for n in (1024, 8000):
        w = torch.randn(n, 256, generator=gen)
        q, scale = quantize_rows(w)
        packed, sums = module.int8_pack(q)
        ours.append(
            lambda p=packed, s=scale, c=sums, n=n: module.int8_linear(x, p, s, c, _NO_BIAS, n)
        )
        prepacked = prepack_int8(w, None, int8_engine())
        theirs.append(lambda p=prepacked: torch.ops.quantized.linear_dynamic(x, p, True))
    with warnings.catch_warnings():  # PyTorch's quantized ops are deprecated, still served
        warnings.simplefilter("ignore")
        return _quicker(
            lambda: [f() for f in ours], lambda: [f() for f in theirs], INT8_ENGINE_MARGIN
        )


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _built() -> ModuleType | None:
    """The compiled module (built once per machine, loaded once per process), or None where the
    kernels are off or fail to build."""
    if "built" not in _state:
        with _lock:
            if "built" not in _state:
                module = None
                if enabled():
                    try:
                        module = _compile()
                    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's
                        _say(f"C++ kernels unavailable ({_first_line(e)}); using PyTorch's")
                _state["built"] = module
    return _state["built"]


def _checked(key: str, check) -> ModuleType | None:
    """_built() if check(module) says it is usable here, else None; decided once per process."""
    if key not in _state:
        module = _built()
        with _lock:
            if key not in _state:
                if module is not None:
                    try:
                        reason = check(module)
                    except Exception as e:
                        reason = f"failed its check ({_first_line(e)})"
                    if reason:
                        _say(reason)
                        module = None
                _state[key] = module
    return _state[key]


def _speed_checked(key: str, faster, what: str) -> ModuleType | None:
    """_checked with a speed check: the module where `faster(module)`, else None and one line
    saying that `what` is slower than PyTorch's here."""

    if key in _state:  # decided: the common case, on every call of a kernel's wrapper
        return _state[key]

    def check(module: ModuleType) -> str | None:
        return None if faster(module) else f"{what} is slower than PyTorch's here: unused"

    return _checked(key, check)


def kernel() -> ModuleType | None:
    """The module, for its attention kernel; None where it is off, fails to build, or is not
    faster here."""
    return _speed_checked("module", _faster, "the decoding attention kernel")


def gemm() -> ModuleType | None:
    """The module, for its packed product; None where it is off, fails to build, this PyTorch
    lacks MKL's packed GEMM, or oneDNN's is faster here."""

    def check(module: ModuleType) -> str | None:
        if not module.gemm_available():
            return "no MKL packed GEMM in this PyTorch: packed layers use oneDNN's"
        if not _gemm_faster(module):
            return "MKL's packed GEMM is slower than oneDNN's here: packed layers use oneDNN's"
        return None

    return _checked("gemm", check)


def choose() -> ModuleType | None:
    """The module, for its log-softmax and scans; None where it is off, fails to build, or its
    log-softmax is not faster here."""
    return _speed_checked("choose", _choose_faster, "the log-softmax kernel")


def losses() -> ModuleType | None:
    """The module, for the chunk loss; None where it is off, fails to build, or is not faster
    here."""
    return _speed_checked("loss", _loss_faster, "the loss kernel")


def train_attentions() -> ModuleType | None:
    """The module, for attention with dropout in training; None where it is off, fails to build,
    or is not faster here."""
    return _speed_checked(
        "train_attention", _train_attention_faster, "the training attention kernel"
    )


def masks() -> ModuleType | None:
    """The module, for dropout's mask; None where it is off, fails to build, or is not faster
    here."""
    return _speed_checked("masks", _masks_faster, "the dropout mask kernel")


def pointwise() -> ModuleType | None:
    """The module, for the post-LN skip connection and the activation; None where it is off,
    fails to build, or is not faster here."""
    return _speed_checked("pointwise", _pointwise_faster, "the add-and-norm kernel")


def int8() -> ModuleType | None:
    """The module, for its int8 product; None where it is off, fails to build, was built for a
    CPU without AVX-512 VNNI, or is not faster than PyTorch's here."""

    def check(module: ModuleType) -> str | None:
        if not module.int8_available():
            return "no AVX-512 VNNI here: int8 layers use PyTorch's product"
        if not _int8_faster(module):
            return "qkv's int8 product is slower than PyTorch's here: unused"
        return None

    return _checked("int8", check)


def layer_steps() -> ModuleType | None:
    """The module, for a decoder layer's step in C++; None where the attention kernel, which it
    calls, is not in use here. (It computes what the Python route computes, with the same
    kernels, so it needs no measurement of its own.)"""
    if "step" not in _state:  # decided once; the attention kernel said why where it is off
        _state["step"] = _built() if kernel() is not None else None
    return _state["step"]


def _inference_fp32(*tensors: Tensor) -> bool:
    """What the kernel needs of its inputs: CPU, fp32, no gradients, not inside torch.compile,
    and not switched off (`off`)."""
    if _off or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for x in tensors:  # is_cpu, a cheaper read than device.type, on every decoding step
        if not x.is_cpu or x.dtype != torch.float32 or (grad and x.requires_grad):
            return False
    return True


def reads_tables(x: Tensor) -> bool:
    """Whether attention over keys like x (a KVCache's) runs in the kernel, which reads a beam
    search's reordered cache through its table; PyTorch's kernels would gather it every step,
    so a cache reorders its rows instead where this is False."""
    return _inference_fp32(x) and kernel() is not None


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, table: Tensor | None = None
) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v by the C++ kernel, or None where it does not apply (then the
    caller uses PyTorch's): CPU, fp32, no gradients, not inside torch.compile, at most
    MAX_QUERIES queries per row, a contiguous last dimension, and a mask (True = may attend)
    that only hides keys, the same for every head and query: (B or 1, 1, 1, S). (The kernel
    itself checks the last three, and returns None where they fail: in Python those checks
    cost a few microseconds at every layer of every step.)

    q (B, H, T, Dh); k, v (B, H, S, Dh), or a KVCache's stored rows (P, H, S, Dh) read through
    `table` (B, S) long (qkv.attention.attention says how). Returns (B, H, T, Dh)."""
    if q.dim() != 4 or q.shape[2] > MAX_QUERIES or not _inference_fp32(q, k, v):
        return None
    module = kernel()
    if module is None:
        return None
    mask = _NO_MASK if mask is None else mask
    return module.decode_attention(q, k, v, mask, _NO_TABLE if table is None else table)


def packs() -> bool:
    """Whether fp32 weights pack for MKL's product here: not where it is off, unbuilt, missing
    or slower (qkv.packed then packs for oneDNN), nor inside `off()` (so tests can build both
    kinds of packed layer)."""
    return not _off and gemm() is not None


def pack_weight(w: Tensor) -> Tensor | None:
    """w (N, K), an fp32 nn.Linear weight, packed for `packed_linear`; None where not `packs()`."""
    return _built().pack_weight(w.detach().float().contiguous()) if packs() else None


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """x (..., K) W^T + bias for W packed by `pack_weight` (n = its rows): (..., n), fp32."""
    return _built().packed_linear(x, packed, _NO_BIAS if bias is None else bias, n)


def int8_packs() -> bool:
    """Whether int8 weights pack for qkv's int8 product here (else PyTorch's): not where it is
    off, unbuilt, missing or slower, nor inside `off()`."""
    return not _off and int8() is not None


def int8_pack(q: Tensor) -> tuple[Tensor, Tensor]:
    """q (N, K) int8, a weight quantized by rows (qkv.packed.quantize_rows), laid out for
    `int8_linear`: (the packed weight, each column's sum of its weights)."""
    packed, sums = _built().int8_pack(q.contiguous())
    return packed, sums


def int8_linear(
    x: Tensor, packed: Tensor, scale: Tensor, sums: Tensor, bias: Tensor | None, n: int
) -> Tensor:
    """x (..., K) W^T + bias for W = q * scale[:, None] packed by `int8_pack` (n = its rows),
    each row of x quantized to 8 bits on the fly: (..., n), fp32."""
    return _built().int8_linear(x, packed, scale, sums, _NO_BIAS if bias is None else bias, n)


def _rows(x: Tensor) -> bool:
    """Whether x is (N, V) rows the scans take: fp32 on the CPU, no gradients, each row
    contiguous, and the kernels on here."""
    return x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1 and _inference_fp32(x)


def log_softmax_(x: Tensor) -> bool:
    """Turn x (N, V) into its rows' log-softmax in place; False (x untouched) where the kernel
    does not apply (then the caller uses PyTorch's)."""
    module = choose() if _rows(x) else None
    if module is None:
        return False
    module.log_softmax_(x)
    return True


def argmax(x: Tensor) -> Tensor | None:
    """(N, V) -> (N,): torch.argmax(x, -1) (first largest, NaN counting as largest), or None
    where the kernel does not apply."""
    module = choose() if _rows(x) else None
    return None if module is None else module.argmax_rows(x)


def beam_topk(log_probs: Tensor, scores: Tensor, want: int) -> tuple[Tensor, Tensor] | None:
    """log_probs (n * K, V), scores (n, K) -> the `want` best of
    (log_probs + scores.view(-1, 1)).view(n, K * V) per row and their positions (n, want) each,
    best first; None where the kernel does not apply or a score is NaN. Ties go to the lower
    position; where fewer than `want` are above -inf, the rest are -inf at position 0."""
    module = choose() if _rows(log_probs) and scores.dtype == torch.float32 else None
    if module is None:
        return None
    values, positions = module.beam_topk(log_probs, scores.reshape(-1), scores.shape[-1], want)
    if values is None:  # an undefined tensor: a NaN score
        return None
    return values, positions


def _training(*tensors: Tensor) -> bool:
    """What the training kernels need: CPU tensors of fp32 or bf16 (autocast's), not inside
    torch.compile, and not switched off (`off`)."""
    if _off or torch.compiler.is_compiling():
        return False
    return all(x.is_cpu and x.dtype in _TRAIN_DTYPES for x in tensors)


def seed() -> int:
    """A kernel's random seed, drawn from PyTorch's generator (so torch.manual_seed and a saved
    generator state reproduce its masks)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (1,)))


def dropout_mask(x: Tensor, cut: int, scale: float) -> Tensor | None:
    """A mask like x (fp32 or bf16, on the CPU): `scale` where kept, 0 where dropped (probability
    cut / 65536), its seed drawn from PyTorch's generator (so torch.manual_seed and a saved
    generator state reproduce it); None where the kernel does not apply."""
    module = masks() if _training(x) else None
    if module is None:
        return None
    return module.dropout_mask(x, cut, scale, seed())


def fused_dropouts(*tensors: Tensor) -> ModuleType | None:
    """The module, for dropout fused with relu or with a skip connection's sum (qkv/dropout.py),
    where it takes `tensors` (contiguous, on the CPU, fp32 or bf16); None where it does not, or
    where dropout's mask kernel is not in use here (they draw their masks as it does)."""
    if "fused_dropouts" in _off_kernels or not _training(*tensors):
        return None
    return masks() if all(x.is_contiguous() for x in tensors) else None


class _LayerNormBf16(torch.autograd.Function):
    """layer_norm_bf16 and its backward (csrc/layer_norm.cpp)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _built().layer_norm_bf16(x, weight, _NO_BIAS if bias is None else bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        dx, dw, db = _built().layer_norm_bf16_backward(dy, x, mean, rstd, weight, ctx.has_bias)
        return dx, dw, db if ctx.has_bias else None, None


def layer_norm_bf16(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor | None:
    """norm(x) rounded to bf16, in one pass each way (csrc/layer_norm.cpp), where bf16 autocast
    is on and the next product would cast it anyway: x fp32 contiguous on the CPU, the norm's
    weight fp32 over the last dimension. None where it does not apply."""
    if "layer_norm_bf16" in _off_kernels or not torch.is_autocast_enabled("cpu"):
        return None
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    if x.dtype != torch.float32 or not x.is_contiguous() or not _training(x):
        return None
    w, b = norm.weight, norm.bias
    if w is None or w.dtype != torch.float32 or norm.normalized_shape != (x.shape[-1],):
        return None
    if masks() is None:  # built, on, and the training kernels in use here
        return None
    return _LayerNormBf16.apply(x, w, b, norm.eps)


class _TrainAttention(torch.autograd.Function):
    """train_attention_forward and its backward: q, k, v's gradients, the weights and the
    dropout mask recomputed rather than stored."""

    @staticmethod
    def forward(ctx, q, k, v, keep, causal, cut, scale, seed):
        out, lse = train_attentions().train_attention_forward(
            q, k, v, keep, causal, cut, scale, seed
        )
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.args = (causal, cut, scale, seed)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, keep, lse = ctx.saved_tensors
        if grad.dtype != q.dtype or grad.stride(-1) != 1:
            grad = grad.to(q.dtype).contiguous()
        module = train_attentions()
        dq, dk, dv = module.train_attention_backward(grad, q, k, v, keep, *ctx.args, lse)
        return dq, dk, dv, None, None, None, None, None


def train_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, p: float
) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) with dropout p on the weights, times v, by the C++ kernel with
    its own backward (csrc/train_attention.cpp): q (B, H, T, Dh), k and v (B, H, S, Dh), fp32
    or bf16; mask bool broadcastable to (B, H, T, S), True = may attend; is_causal: also hide
    later keys (top-left aligned). The mask's seed comes from PyTorch's generator. None where
    the kernel does not apply."""
    if "train_attention" in _off_kernels or not _training(q, k, v):
        return None
    module = train_attentions()
    if module is None or not q.dtype == k.dtype == v.dtype or q.dim() != 4:
        return None
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or not q.shape[-1] == k.shape[-1] <= 256:
        return None  # the kernel's shapes: one head dimension, no broadcasting
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    keep = _NO_MASK
    if mask is not None:
        if mask.dtype != torch.bool:
            return None
        keep = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    from .dropout import cut_and_scale

    cut, scale = cut_and_scale(p, torch.float32)  # applied in fp32 inside, whatever q's dtype
    return _TrainAttention.apply(q, k, v, keep, is_causal, cut, scale, seed())


def smoothed_cross_entropy_rows(
    scores: Tensor, target: Tensor, eps: float, grad: Tensor | None
) -> float | None:
    """qkv.loss.chunk_loss by the C++ kernel: scores (rows, V) fp32 or bf16 on the CPU with
    contiguous rows, target (rows,) long, grad like scores (fp32 or bf16, it may be scores) or
    None; the summed loss, or None where the kernel does not apply."""
    given = [scores] if grad is None else [scores, grad]
    if scores.dim() != 2 or target.dtype != torch.long or not _training(*given):
        return None
    if any(x.stride(1) != 1 for x in given):  # rows of contiguous scores
        return None
    module = losses()
    if module is None:
        return None
    grad = _NO_BIAS if grad is None else grad
    return module.smoothed_cross_entropy_rows(scores, target.contiguous(), eps, grad)


def add_layer_norm(x: Tensor, y: Tensor, norm: torch.nn.LayerNorm) -> Tensor | None:
    """norm(x + y) for x, y (..., D) alike, by the C++ kernel (one call, where PyTorch's took
    two); None where it does not apply: fp32 inference on the CPU and a norm over the last
    dimension with weights. (Few checks: this runs three times per layer per decoding step.)"""
    weight, bias = norm.weight, norm.bias  # each a module attribute lookup: once
    if weight is None or x.shape != y.shape or not _inference_fp32(x, y, weight):
        return None
    if norm.normalized_shape != x.shape[-1:]:
        return None
    module = pointwise()
    if module is None:
        return None
    return module.add_layer_norm(x, y, weight, _NO_BIAS if bias is None else bias, norm.eps)


def decoder_layer_step(
    weights: object,
    x: Tensor,
    self_attn: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    position: int,
    cross_attn: tuple[Tensor, Tensor, Tensor | None] | None,
    group: int,
) -> Tensor:
    """One decoder layer's step for x (B, 1, D) in C++ (qkv/csrc/decoder_step.cpp says what
    each argument holds; None stands for a mask or table that is not there), on `weights`
    gathered by the module's decoder_layer_weights. The caller has checked that it applies
    (qkv/packed.py's PackedDecoderLayer): `layer_steps()`, fp32 inference on the CPU."""
    k, v, table, keep = self_attn
    self_args = [k, v, _NO_TABLE if table is None else table, _NO_MASK if keep is None else keep]
    cross_args = []
    if cross_attn is not None:
        ck, cv, memory_keep = cross_attn
        cross_args = [ck, cv, _NO_MASK if memory_keep is None else memory_keep]
    return _state["step"].decoder_layer_step(
        weights,
        x,
        self_args,
        position,
        cross_args,
        group,
        pointwise() is not None,
        ACTIVATE_MAX,
    )


def activate_(x: Tensor, kind: str) -> bool:
    """x = gelu(x) (the erf form) or silu(x), in place, by the C++ kernel; False (x untouched)
    where it does not apply: fp32 inference on the CPU, x contiguous, at most ACTIVATE_MAX
    values."""
    if kind not in ("gelu", "silu") or x.numel() > ACTIVATE_MAX or not x.is_contiguous():
        return False
    if not _inference_fp32(x):
        return False
    module = pointwise()
    if module is None:
        return False
    module.activate_(x, kind)
    return True
