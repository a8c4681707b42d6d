"""Linear layers for fast CPU inference: weights prepacked once, optionally in int8.

Decoding multiplies a few rows (one per sentence or beam) by every weight matrix at every step,
so the time goes into reading weights, and a plain matmul re-lays them out on each call. Packing
reorders each fp32 weight once into the blocked layout of MKL's packed GEMM (qkv/native.py;
`torch.compile`'s CPU backend packs frozen fp32 weights the same way), or, where that is missing
or slower, of oneDNN's GEMM: the same function, with float rounding differences around 1e-6.
`int8=True` instead quantizes each weight row to 8 bits and each input row on the fly (dynamic
quantization): about 4x fewer weight bytes and integer arithmetic, at a small accuracy cost that
bench/README.md measures in BLEU. It runs on qkv's int8 product where the CPU has AVX-512 VNNI
and it is faster here (qkv/native.py; each input row with its own scale), else on PyTorch's
(fbgemm's or oneDNN's kernel, whichever `int8_engine` measures faster here; one scale for the
whole input, 7 bits). `bf16=True` keeps a bfloat16 copy of each weight
(packed for oneDNN's bf16 GEMM where the CPU has bf16 units, else a plain bf16 matmul) and casts
each input to bf16 and each output back to fp32 (qkv/precision.py says when that is faster).

`pack(model)` is an explicit inference step, called by the commands that serve inference, never
on a model that is training. It swaps each large nn.Linear for a PackedLinear, each self-attention
for a PackedAttention (one stacked q/k/v matrix, packed when large), each feed-forward for a
PackedFeedForward (the activation applied with the first packed product, fp32 or bf16), and
each decoder layer for a PackedDecoderLayer (its decoding step one call into C++); all share
the original parameters, so state dicts, checkpoints, weight tying and inspection see the
same model.
The packed copies are made once, inside `pack`, so the packed model is read-only and serves any
number of decodes at once. oneDNN's, fbgemm's and the bf16 packed kernels cost about 50 us more
per call (bench/linear_speed.py), more than they save below ~130k weights, so they take only
the large layers, the small ones staying plain fp32; MKL's packed product and qkv's int8 one
are faster at every size (bench/packed_gemm.py, bench/int8_gemm.py), so where they are in use
every fp32 or int8 layer packs for them, and with PyTorch's int8 or bf16 the small layers pack
for MKL's fp32 product (once the C++ layer step took the Python out of
an int8 decoding step, plain F.linear on the small layers was its largest cost, bench/
README.md). With gradients on a packed layer computes with its live weights (F.linear); a
packed model refuses to run in training mode, since its packed copies would not follow an
optimizer's updates.

`pack` also readies qkv's C++ kernels (qkv/native.py: compiled on first use; the attention
kernel for decoding, add-and-norm and the activation, and MKL's product), so that a server's
first request does not wait for them.
On other devices, or a PyTorch built without oneDNN, `pack` leaves the model as it is.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .attention import MultiHeadAttention
from .cache import KVCache
from .decoder import DecoderLayer
from .layers import ACTIVATIONS, FeedForward

# Smaller layers run faster unpacked (see above; measured on one AVX2 CPU): the default of pack's
# min_weights, which $QKV_PACK_MIN_WEIGHTS overrides for another machine (or 0: pack them all).
MIN_WEIGHTS = 2**17


# oneDNN applies these to the product's fp32 accumulator before writing it (its "post-op"): a
# feed-forward's first product and its activation in one pass (PackedFeedForward).
POST_OPS = {F.relu: ("relu", ""), F.gelu: ("gelu", "none"), F.silu: ("swish", "")}
# MKL's packed product (qkv/native.py) has no post-op: the activation follows it, in place, by
# qkv's C++ kernel where it applies (PyTorch's gelu_, oneDNN's eltwise primitive, costs more per
# call at decoding's sizes, bench/pointwise_speed.py).
ACTIVATE_IN_PLACE = {
    "relu": torch.relu_,
    "gelu": lambda y: native.activate_(y, "gelu") or torch.ops.aten.gelu_(y),
    "swish": lambda y: native.activate_(y, "silu") or F.silu(y, inplace=True),
}


def min_weights_default(fp32: bool = False, int8: bool = False) -> int:
    """pack's min_weights unless given: $QKV_PACK_MIN_WEIGHTS, else MIN_WEIGHTS, or 0 for fp32
    weights where MKL's packed product is in use (qkv/native.py), which beats the plain product
    at every size (bench/packed_gemm.py), and for int8 weights where qkv's int8 product is, which
    costs little more per call than its arithmetic (bench/int8_gemm.py)."""
    if "QKV_PACK_MIN_WEIGHTS" in os.environ:
        return int(os.environ["QKV_PACK_MIN_WEIGHTS"])
    if (fp32 and native.packs()) or (int8 and native.int8_packs()):
        return 0
    return MIN_WEIGHTS


def available(int8: bool = False) -> bool:
    """Whether this PyTorch build has the packed CPU kernels."""
    if int8:
        return "fbgemm" in torch.backends.quantized.supported_engines
    return torch.backends.mkldnn.is_available()


class Packed:
    """y = x W^T + b where W (and b) stack the weights of `linears` (their outputs concatenated),
    computed on a packed copy made once, at construction."""

    def __init__(
        self,
        linears: Sequence[nn.Linear],
        int8: bool = False,
        reorder: bool = True,
        bf16: bool = False,
    ):
        """reorder=False keeps the stacked copy as it is (plain F.linear): for matrices too small
        to gain from the packed kernels, stacking alone still saves work on every call."""
        self.linears = tuple(linears)  # a tuple, so nn.Module does not register them twice
        if len({m.bias is None for m in self.linears}) > 1:
            raise ValueError("Packed: the linear layers must all have a bias or all have none")
        if int8 and bf16:
            raise ValueError("Packed: int8 or bf16, not both")
        self.int8, self.bf16, self.reorder = int8, bf16, reorder or int8
        self._packed = None
        self.mkl = False  # fp32 packed for MKL's product (qkv/native.py) rather than oneDNN's
        # int8 on qkv's product (qkv/native.py; _packed: the packed weight, its rows' scales
        # and its columns' sums) rather than PyTorch's
        self.native_int8 = False
        with torch.no_grad():
            w, b = self._weights()
            dtype = torch.bfloat16 if bf16 else torch.float32
            w = w.detach().to(dtype).contiguous()
            self._bias = None if b is None else b.detach().to(dtype).contiguous()
            self._stacked = w
            if not self.reorder:
                return
            if int8 and native.int8_packs():
                q, scale = quantize_rows(w)
                packed, sums = native.int8_pack(q)
                self._packed, self.native_int8 = (packed, scale, sums), True
            elif int8:
                self._packed = prepack_int8(w, self._bias, int8_engine())
            elif bf16:
                self._packed = _bf16_packed(w, self._bias)
            elif (mkl := native.pack_weight(w)) is not None:
                self._packed, self.mkl = mkl, True
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        """The stacked weight (sum of N, D_in) and bias (None when the layers have none)."""
        weights = [m.weight for m in self.linears]
        biases = [m.bias for m in self.linears]
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        if biases[0] is None:
            return w, None
        return w, biases[0] if len(biases) == 1 else torch.cat(biases)

    def fuses(self, x: Tensor) -> bool:
        """Whether a call on x runs a packed fp32 or bf16 kernel, which takes a post-op (oneDNN
        applies it inside its kernel; after MKL's product it is applied in place)."""
        return (
            self._packed is not None
            and not self.int8
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
        )

    def __call__(self, x: Tensor, post_op: tuple[str, str] | None = None) -> Tensor:
        """y = x W^T + b. `post_op` (a POST_OPS value, only where `fuses(x)`): the activation
        applied inside the kernel, and in bf16 the result left in bf16 (the next packed product
        takes it as it is)."""
        if self.mkl and x.dtype == torch.float32 and x.is_cpu and not torch.is_grad_enabled():
            # fp32 inference on MKL's packed product (every layer, where it is in use): first,
            # with the fewest checks, since it runs for every layer at every decoding step
            if torch.compiler.is_compiling():  # a C++ call would break the graph
                y = F.linear(x, self._stacked, self._bias)
            else:
                y = native.packed_linear(x, self._packed, self._bias, self._stacked.shape[0])
            if post_op is not None:
                ACTIVATE_IN_PLACE[post_op[0]](y)
            return y
        attr, algorithm = post_op or ("none", "")
        # a fused product's bf16 output (PackedFeedForward) goes to the next one as it is
        handed_bf16 = self.bf16 and x.dtype == torch.bfloat16 and self.fuses(x)
        if not handed_bf16 and (
            torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
        ):
            return F.linear(x, *self._weights())
        if self.bf16:  # bf16 in, fp32 out: everything around the matmul stays fp32
            x2 = x.reshape(-1, x.shape[-1]).bfloat16()
            if self._packed is None:
                y = F.linear(x2, self._stacked, self._bias)
            else:
                y = torch.ops.mkldnn._linear_pointwise(
                    x2, self._packed, self._bias, attr, [], algorithm
                )
                if post_op is not None:
                    return y.view(*x.shape[:-1], y.shape[-1])
            return y.float().view(*x.shape[:-1], y.shape[-1])
        if not self.reorder:
            return F.linear(x, self._stacked, self._bias)
        if self.native_int8:  # the shapes are handled in C++
            return native.int8_linear(x, *self._packed, self._bias, self._stacked.shape[0])
        x2 = x.reshape(-1, x.shape[-1])  # the kernels' fast path is 2-D
        if self.int8:
            # reduce_range: 7-bit activations, so int8 products cannot saturate without VNNI
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
        else:
            y = torch.ops.mkldnn._linear_pointwise(
                x2, self._packed, self._bias, attr, [], algorithm
            )
        return y.view(*x.shape[:-1], y.shape[-1])


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) fp32 in 8 bits, row by row: (q (N, K) int8, scale (N,) fp32), w ~ q * scale
    with each row's largest |w| at 127."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def prepack_int8(w: Tensor, bias: Tensor | None, engine: str) -> object:
    """w (N, K) fp32 quantized by rows (`quantize_rows`' scales) and prepacked for PyTorch's
    dynamic int8 product (torch.ops.quantized.linear_dynamic) on `engine`, bias inside."""
    scale = quantize_rows(w)[1].double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, still served
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        with _quantized_engine(engine):
            return torch.ops.quantized.linear_prepack(qw, bias)


@contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """PyTorch's quantized engine set to `engine` inside (a process-wide setting, read when a
    weight is prepacked; the packed weight then runs on that engine's kernel wherever it is
    called)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


# oneDNN's int8 engine is taken only where it is this much faster than fbgemm's (the default):
# a wide margin keeps the choice the same from one process to the next, where timings close
# together could flip it (the engines round differently, so a flip changes some outputs).
INT8_ENGINE_MARGIN = 1.1


@cache
def int8_engine() -> str:
    """The quantized engine whose dynamic int8 products are faster here, decided once per
    process: fbgemm's (PyTorch's default on x86), or oneDNN's where it is at least
    INT8_ENGINE_MARGIN times faster over the two products a greedy step spends most of its int8
    time on, 32 rows by the 8k-word output layer and by a 1024 x 256 feed-forward weight. On the
    Xeon of bench/README.md (AMX) oneDNN's took 340 us for the two where fbgemm's took 548 at 1
    thread, and 242 against 359 at 2 (bench/int8_engines.py); elsewhere fbgemm's may win."""
    from .precision import best_of

    engines = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
    if len(engines) < 2:
        return torch.backends.quantized.engine
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=gen)
    weights = [torch.randn(n, 256, generator=gen) for n in (8000, 1024)]
    times = dict.fromkeys(engines, 0.0)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        for w in weights:
            for engine in engines:
                try:
                    packed = prepack_int8(w, None, engine)
                    times[engine] += best_of(
                        lambda p=packed: torch.ops.quantized.linear_dynamic(x, p, True), 20
                    )
                except RuntimeError:  # an engine this build lists but cannot run here
                    times[engine] = float("inf")
    return "onednn" if times["onednn"] * INT8_ENGINE_MARGIN < times["fbgemm"] else "fbgemm"


def _bf16_packed(w: Tensor, bias: Tensor | None) -> Tensor | None:
    """w (bf16) reordered for oneDNN's bf16 GEMM, or None where that kernel is missing or
    refuses (CPUs without bf16 units): the caller then multiplies the plain bf16 copy."""
    from .precision import bf16_units

    if not bf16_units(torch.device("cpu")):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        probe = torch.zeros(1, w.shape[1], dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
    except RuntimeError:
        return None
    return packed


def _refuse_training(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(
            "a packed model is for inference: train the unpacked model (qkv.pack is the last step)"
        )


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose inference runs packed."""

    def __init__(self, linear: nn.Linear, int8: bool = False, bf16: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, so tying survives
        self.packed = Packed([self], int8, bf16=bf16)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        _refuse_training(self)
        return self.packed(x)

    def extra_repr(self) -> str:
        kind = "int8" if self.packed.int8 else "bf16" if self.packed.bf16 else "packed"
        return f"{super().extra_repr()}, {kind}"


class PackedFeedForward(FeedForward):
    """A FeedForward (same submodules and parameters) whose first product applies the activation
    inside oneDNN's kernel where both products run packed, fp32 or bf16: one pass over the hidden
    activations instead of two, and in bf16 no fp32 copy of them between the products (the
    activation is applied to the fp32 accumulator before its rounding to bf16, a little closer
    to fp32 than rounding first). After an int8 first product, the activation follows in place
    (qkv's C++ kernel where it applies). Elsewhere (small layers, gradients) it is FeedForward."""

    def __init__(self, ff: FeedForward):
        nn.Module.__init__(self)
        self.fc1, self.fc2 = ff.fc1, ff.fc2  # pack() packs them afterwards, as any large linear
        self.activation, self.dropout = ff.activation, ff.dropout
        self.post_op = POST_OPS.get(ff.activation)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if (
            isinstance(fc1, PackedLinear)
            and isinstance(fc2, PackedLinear)
            and self.post_op is not None
            and fc1.packed.fuses(x)
            and fc2.packed.fuses(x)
        ):
            _refuse_training(self)
            return fc2(fc1.packed(x, self.post_op))
        if (
            isinstance(fc1, PackedLinear)
            and fc1.packed.int8
            and self.post_op is not None
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
        ):  # int8's product has no post-op: the activation follows it in place
            _refuse_training(self)
            hidden = fc1(x)
            ACTIVATE_IN_PLACE[self.post_op[0]](hidden)
            return fc2(hidden)
        return super().forward(x)


class PackedAttention(MultiHeadAttention):
    """A MultiHeadAttention (same submodules and parameters) whose self-attention q/k/v
    projection runs as one packed matrix: one matmul per decoding step for q, k and v."""

    def __init__(
        self, attn: MultiHeadAttention, int8: bool = False, reorder: bool = True, bf16: bool = False
    ):
        nn.Module.__init__(self)
        self.n_heads, self.d_head, self.dropout = attn.n_heads, attn.d_head, attn.dropout
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.out_proj = attn.out_proj
        self.recorder, self.head_mask = attn.recorder, attn.head_mask
        self.packed_qkv = Packed([self.q_proj, self.k_proj, self.v_proj], int8, reorder, bf16)
        self.eval()

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _refuse_training(self)
        q, k, v = self.packed_qkv(x).chunk(3, dim=-1)  # (B, T, D) each
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)


def _given(mask: Tensor | None) -> bool:
    """Whether an attention mask is one the attention kernel takes: none, or keys hidden alike
    for every head and query of a row, (B or 1, 1, 1, S) bool."""
    return mask is None or (
        mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
    )


class PackedDecoderLayer(DecoderLayer):
    """A DecoderLayer (same submodules and parameters) whose decoding step, one new position
    per row over a KV cache, is one call into C++ where the attention kernel is in use and
    every linear map is packed for MKL's product, in int8, in bf16 for oneDNN's product, or
    plain fp32 (qkv/csrc/decoder_step.cpp: the same kernels as the Python route, without
    Python between them; bench/layer_step.py measures the difference). Elsewhere (training,
    oneDNN's fp32 product, a prompt's several positions, inspection's recorders and head
    masks, ablations) it is DecoderLayer."""

    def __init__(self, layer: DecoderLayer):
        nn.Module.__init__(self)
        self.self_attn, self.attn_residual = layer.self_attn, layer.attn_residual
        self.cross_attn, self.cross_residual = layer.cross_attn, layer.cross_residual
        self.ff, self.ff_residual = layer.ff, layer.ff_residual
        self.eval()
        self._like = torch.empty(0, self.self_attn.n_heads, 0, self.self_attn.d_head)
        self._weights = self._gathered()

    def _gathered(self) -> object | None:
        """The layer's weights gathered for the C++ step (native's decoder_layer_weights), or
        None where it cannot take them: the C++ kernels unbuilt, a linear map packed for
        oneDNN's fp32 product or in bf16 without bf16 units, an activation other than ReLU,
        GELU and SiLU."""
        module = native._built()
        names = {f: name for name, f in ACTIVATIONS.items()}
        activation = names.get(self.ff.activation)
        if module is None or activation is None:
            return None
        attn, cross = self.self_attn, self.cross_attn
        maps = [attn.packed_qkv if isinstance(attn, PackedAttention) else None, attn.out_proj]
        if cross is not None:
            maps += [cross.q_proj, cross.out_proj]
        maps += [self.ff.fc1, self.ff.fc2]
        kinds, tensors, biases, widths, int8s = [], [], [], [], []
        for m in maps:
            p = m.packed if isinstance(m, PackedLinear) else m
            if isinstance(p, Packed) and p.mkl:
                kind, tensor, bias = "mkl", p._packed, p._bias
            elif isinstance(p, Packed) and p.native_int8:
                kind, tensor, bias = "qkv_int8", p._packed[0], p._bias
            elif isinstance(p, Packed) and p.int8:
                kind, tensor, bias = "int8", None, None
            elif isinstance(p, Packed) and not p.reorder and not p.bf16:
                kind, tensor, bias = "plain", p._stacked, p._bias
            elif isinstance(p, Packed) and p.bf16 and p._packed is not None:
                kind, tensor, bias = "bf16", p._packed, p._bias
            elif type(p) is nn.Linear:
                kind, tensor, bias = "plain", p.weight.detach(), p.bias
            else:  # oneDNN's fp32 product, bf16 without bf16 units, q/k/v not stacked
                return None
            kinds.append(kind)
            tensors.append(torch.empty(0) if tensor is None else tensor)
            biases.append(torch.empty(0) if bias is None else bias.detach())
            widths.append(p._stacked.shape[0] if isinstance(p, Packed) else p.out_features)
            int8s.append(
                p._packed if kind == "int8" else p._packed[1:] if kind == "qkv_int8" else None
            )
        residuals = [self.attn_residual, self.cross_residual, self.ff_residual]
        norms = [r.norm for r in residuals if r is not None]
        norm_tensors = [
            t.detach() if t is not None else torch.empty(0)
            for norm in norms
            for t in (norm.weight, norm.bias)
        ]
        post_op, algorithm = POST_OPS[self.ff.activation]
        return module.decoder_layer_weights(
            kinds,
            tensors,
            biases,
            widths,
            int8s,
            norm_tensors,
            activation,
            self.attn_residual.norm_first,
            norms[0].eps,
            post_op,
            algorithm,
        )

    def _steps_in_cpp(
        self,
        x: Tensor,
        self_cache: KVCache | None,
        cross_cache: KVCache | None,
        self_mask: Tensor | None,
        memory_mask: Tensor | None,
    ) -> bool:
        """Whether this call is a decoding step the C++ layer step takes."""
        if self._weights is None:
            return False
        # a KVCache's self-attention (qkv.fixed's caches are written by position tensors)
        if not isinstance(self_cache, KVCache) or self_cache.static:
            return False
        if x.shape[1] != 1 or not x.is_contiguous():
            return False
        if native.layer_steps() is None or not native._inference_fp32(x):
            return False
        attn, cross = self.self_attn, self.cross_attn
        if attn.recorder is not None or attn.head_mask is not None or not _given(self_mask):
            return False
        if cross is not None and (
            cross.recorder is not None
            or cross.head_mask is not None
            or not isinstance(cross_cache, KVCache)
            or not cross_cache.length
            or not _given(memory_mask)
        ):
            return False
        residuals = (self.attn_residual, self.cross_residual, self.ff_residual)
        return all(r is None or (r.skip and not r.bypass) for r in residuals)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        self_mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        if not is_causal and self._steps_in_cpp(x, self_cache, cross_cache, self_mask, memory_mask):
            assert self_cache is not None
            k, v, table, position = self_cache.room(x.shape[0], 1, self._like)
            cross, group = None, 1
            if cross_cache is not None:
                cross, group = (cross_cache.k, cross_cache.v, memory_mask), cross_cache.group
            return native.decoder_layer_step(
                self._weights, x, (k, v, table, self_mask), position, cross, group
            )
        return super().forward(
            x,
            memory,
            memory_mask,
            self_mask,
            is_causal=is_causal,
            self_cache=self_cache,
            cross_cache=cross_cache,
        )


def pack(
    model: nn.Module, int8: bool = False, min_weights: int | None = None, bf16: bool = False
) -> nn.Module:
    """Swap model's linear layers with at least `min_weights` weights (and attention layers
    whose q/k/v matrix has that many) for packed ones, in place, for inference; returns the
    model in eval mode. int8 or bf16: those layers' weights in that format (see above).
    Packing twice, or a model that is not on the CPU, changes nothing."""
    if int8 and bf16:
        raise ValueError("pack: int8 or bf16, not both")
    model.eval()
    if not available(int8) or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    # decoding's attention kernel, add-and-norm and activation, and MKL's product: built (once
    # per machine) and checked now, not inside the first decode (a server's first request)
    native.kernel()
    native.pointwise()
    fp32 = not (int8 or bf16)
    min_weights = min_weights_default(fp32, int8) if min_weights is None else min_weights
    # int8's and bf16's small layers: MKL's fp32 product (see above)
    small_fp32 = (int8 or bf16) and native.packs()
    # self-attention first (cross-attention never projects q/k/v together), then the linears,
    # including those inside the new PackedAttentions
    # every self-attention gets one stacked q/k/v matrix (else each step concatenates them);
    # only large ones are reordered for the packed kernels
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MultiHeadAttention and name == "self_attn":
                big = 3 * child.q_proj.weight.numel() >= min_weights
                reorder = big or small_fp32
                setattr(parent, name, PackedAttention(child, int8 and big, reorder, bf16 and big))
    for parent in list(model.modules()):  # their linears are packed by the loop below
        for name, child in list(parent.named_children()):
            if type(child) is FeedForward:
                setattr(parent, name, PackedFeedForward(child))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.weight.numel() >= min_weights:
                setattr(parent, name, PackedLinear(child, int8, bf16))
            elif small_fp32:
                setattr(parent, name, PackedLinear(child))
    # last: a decoder layer's step in C++ takes its linear maps as packed above
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DecoderLayer:
                setattr(parent, name, PackedDecoderLayer(child))
    return model
