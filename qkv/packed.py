"""Linear layers for fast CPU inference: weights prepacked once, optionally in int8.

Decoding multiplies a few rows (one per sentence or beam) by every weight matrix at every step,
so the time goes into reading weights, and a plain matmul re-lays them out on each call. Packing
reorders each weight once into the blocked layout of oneDNN's GEMM (the fp32 linear that
`torch.compile`'s CPU backend uses for frozen weights): the same function, with float rounding
differences around 1e-6. `int8=True` instead quantizes each weight row to 8 bits and each input
row on the fly (dynamic quantization, fbgemm): about 4x fewer weight bytes and integer
arithmetic, at a small accuracy cost that bench/README.md measures in BLEU.

`pack(model)` swaps each large nn.Linear for a PackedLinear sharing its parameters, so state
dicts, checkpoints, weight tying and inspection see the same model. Small ones stay as they are:
the packed kernels cost about 50 us more per call (bench/linear_speed.py), more than they save
below ~130k weights (at d_model 256: the vocabulary projection, the feed-forward layers and the
fused q/k/v projection are packed; single 256x256 projections are not). A PackedLinear falls back to
F.linear whenever gradients are wanted, and repacks if its weight was changed in place, so a
packed model stays correct if someone trains it again. Self-attention's three projections are
packed as one matrix: one matmul per decoding step for q, k and v.

On other devices, or a PyTorch built without oneDNN, `pack` leaves the model as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention

MIN_WEIGHTS = 2**17  # smaller layers run faster unpacked (see above)


def available(int8: bool = False) -> bool:
    """Whether this PyTorch build has the packed CPU kernels."""
    if int8:
        return "fbgemm" in torch.backends.quantized.supported_engines
    return torch.backends.mkldnn.is_available()


class Packed:
    """y = x W^T + b where W (and b) stack the weights of `linears` (their outputs concatenated),
    computed on a packed copy that is rebuilt when any source weight changes in place."""

    def __init__(self, linears: Sequence[nn.Linear], int8: bool = False):
        self.linears = tuple(linears)  # a tuple, so nn.Module does not register them twice
        if len({m.bias is None for m in self.linears}) > 1:
            raise ValueError("Packed: the linear layers must all have a bias or all have none")
        self.int8 = int8
        self._packed: object = None
        self._bias: Tensor | None = None
        self._versions: tuple[int, ...] = ()

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        """The stacked weight (sum of N, D_in) and bias (None when the layers have none)."""
        weights = [m.weight for m in self.linears]
        biases = [m.bias for m in self.linears]
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        if biases[0] is None:
            return w, None
        return w, biases[0] if len(biases) == 1 else torch.cat(biases)

    def _repack(self) -> None:
        with torch.no_grad():
            w, b = self._weights()
            w = w.detach().float().contiguous()
            b = None if b is None else b.detach().float().contiguous()
            if self.int8:
                # per output row: the largest |w| maps to 127
                scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
                zero = torch.zeros(w.shape[0], dtype=torch.long)
                with warnings.catch_warnings():  # quantized tensors are deprecated, still served
                    warnings.simplefilter("ignore")
                    qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
                    self._packed = torch.ops.quantized.linear_prepack(qw, b)
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            self._bias = b
        self._versions = self._weight_versions()

    def _weight_versions(self) -> tuple[int, ...]:
        # in-place changes bump a tensor's version; tensors made under inference_mode have none
        return tuple(-1 if m.weight.is_inference() else m.weight._version for m in self.linears)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, *self._weights())
        if self._packed is None or self._versions != self._weight_versions():
            self._repack()
        x2 = x.reshape(-1, x.shape[-1])  # the kernels' fast path is 2-D
        if self.int8:
            # reduce_range: 7-bit activations, so int8 products cannot saturate without VNNI
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self._bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose inference runs packed."""

    def __init__(self, linear: nn.Linear, int8: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, so tying survives
        self.packed = Packed([self], int8)

    def forward(self, x: Tensor) -> Tensor:
        return self.packed(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", int8" if self.packed.int8 else ", packed")


def pack(model: nn.Module, int8: bool = False, min_weights: int = MIN_WEIGHTS) -> nn.Module:
    """Swap model's linear layers with at least `min_weights` weights for packed ones, in place,
    for inference; returns the model (in eval mode). Packing twice, or a model that is not on
    the CPU, changes nothing."""
    model.eval()
    if not available(int8) or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.numel() >= min_weights:
                setattr(parent, name, PackedLinear(child, int8))
        if (
            isinstance(parent, MultiHeadAttention)
            and 3 * parent.q_proj.weight.numel() >= min_weights
        ):
            parent.packed_qkv = Packed([parent.q_proj, parent.k_proj, parent.v_proj], int8)
    return model
