"""Packed and int8 linear layers compute what nn.Linear computes (int8: within the quantization
error bound), and a packed model is the same model: same outputs, state dict, tying, gradients."""

import pytest
import torch
from torch import nn

from qkv.attention import MultiHeadAttention
from qkv.layers import FeedForward
from qkv.packed import (
    Packed,
    PackedAttention,
    PackedFeedForward,
    PackedLinear,
    available,
    pack,
)

pytestmark = pytest.mark.skipif(not available(), reason="PyTorch built without oneDNN")


def _linear(d_in=48, d_out=40, bias=True):
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(bias, gemm_route):
    lin = _linear(bias=bias)
    packed = PackedLinear(lin)
    assert packed.packed.mkl == (gemm_route == "mkl")
    xs = (torch.randn(7, 48), torch.randn(3, 5, 48), torch.randn(5, 3, 48).transpose(0, 1))
    # rows whose values are not contiguous, rows that overlap (an expanded input)
    xs += (torch.randn(48, 7).t(), torch.randn(1, 48).expand(4, 48))
    for x in xs:
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)


ENGINES = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]


@pytest.mark.skipif(not available(int8=True), reason="no fbgemm")
@pytest.mark.parametrize("engine", ENGINES)
def test_int8_within_quantization_error_bound(engine, monkeypatch):
    """On either of PyTorch's int8 engines (qkv.packed.int8_engine picks the faster one), and
    the process's engine setting left as it was. (qkv's int8 product: tests/test_native.py.)"""
    import qkv.packed
    from qkv import native

    monkeypatch.setattr(qkv.packed, "int8_engine", lambda: engine)
    before = torch.backends.quantized.engine
    lin = _linear(d_in=64, d_out=32)
    x = torch.randn(9, 64) * 3
    with torch.inference_mode():
        with native.off():  # PyTorch's product
            packed = PackedLinear(lin, int8=True)
        assert not packed.packed.native_int8
        got = packed(x)
        want = lin(x)
    assert torch.backends.quantized.engine == before
    w = lin.weight.detach()
    # Weights: per row, step = max|w| / 127. Inputs: per tensor, 7 bits (0..127) over
    # [min(x, 0), max(x, 0)]. Rounding errs by at most half a step in each factor.
    sw = w.abs().amax(dim=1) / 127  # (N,)
    sx = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    bound = (x.abs() @ (sw[:, None] / 2 * torch.ones_like(w)).T) + (sx / 2) * (
        w.abs().sum(dim=1) + sw * w.shape[1] / 2
    )
    err = (got - want).abs()
    assert (err <= bound * 1.01 + 1e-5).all()
    assert err.max() > 0  # it really is quantized
    assert err.mean() < 0.05 * want.abs().mean()


def test_fused_projections_are_concatenated_outputs():
    a, b, c = _linear(d_out=8), _linear(d_out=16), _linear(d_out=24, bias=True)
    fused = Packed([a, b, c])
    x = torch.randn(4, 48)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.cat([a(x), b(x), c(x)], -1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="bias"):
        Packed([a, _linear(bias=False)])


def test_packed_once_refuses_training_and_keeps_gradients():
    lin = _linear()
    packed = PackedLinear(lin)
    x = torch.randn(4, 48)
    packed.train()
    with pytest.raises(RuntimeError, match="inference"):
        packed(x)
    packed.eval()
    packed(x).sum().backward()  # with gradients enabled it is nn.Linear's math, live weights
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(40, 48))


@pytest.mark.parametrize("int8", [False, True])
def test_packed_model_is_the_same_model(tiny, int8, gemm_route):
    if int8 and not available(int8=True):
        pytest.skip("no fbgemm")
    if int8 and gemm_route == "mkl":
        pytest.skip("int8 packs for fbgemm only")
    plain, model = tiny(), tiny()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    pack(model, int8, min_weights=0)
    assert model.lm_head.weight is model.decoder.embed.token.weight  # tying survives
    assert all(torch.equal(keys[k], v) for k, v in model.state_dict().items())
    assert set(keys) == set(model.state_dict())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) > 10
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 23, (3, 7), generator=g)
    tgt = torch.randint(3, 23, (3, 5), generator=g)
    with torch.inference_mode():
        want = plain(src, tgt)
        got = model(src, tgt)
        # incremental decoding through the fused q/k/v path
        cache = model.start(src)
        steps = torch.cat([model.step(tgt[:, i : i + 1], cache) for i in range(5)], 1)
    tol = 0.1 if int8 else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    torch.testing.assert_close(steps, want, atol=tol, rtol=0)
    if int8:
        assert not torch.allclose(got, want, atol=1e-4, rtol=0)
    # a packed model does not train (its packed copies would go stale) ...
    with pytest.raises(RuntimeError, match="inference"):
        model.train()(src, tgt)
    # ... but gradients through it (e.g. for saliency) are nn.Linear's
    model.eval()
    model(src, tgt).sum().backward()
    plain(src, tgt).sum().backward()
    name = "decoder.layers.0.self_attn.q_proj.weight"
    grads = dict(model.named_parameters())[name].grad, dict(plain.named_parameters())[name].grad
    torch.testing.assert_close(*grads)


def test_with_mkls_product_every_fp32_layer_packs(tiny, gemm_route, monkeypatch):
    """MKL's packed product beats the plain one at every size, so pack's default packs all fp32
    layers where it is in use, int8's and bf16's small layers too, and only large ones
    elsewhere (oneDNN)."""
    monkeypatch.delenv("QKV_PACK_MIN_WEIGHTS", raising=False)
    model = pack(tiny(d_model=32, d_ff=64))
    cross = model.decoder.layers[0].cross_attn.q_proj  # 32 x 32
    assert isinstance(cross, PackedLinear) == (gemm_route == "mkl")
    for kind in ("int8", "bf16"):  # large layers only in kind's format
        if kind == "int8" and not available(int8=True):
            continue
        small = pack(tiny(d_model=32, d_ff=64), **{kind: True}).decoder.layers[0]
        if gemm_route == "mkl":  # the small ones in MKL's fp32 product
            assert small.ff.fc1.packed.mkl and small.self_attn.packed_qkv.mkl
        else:  # plain
            assert type(small.ff.fc1) is nn.Linear and not small.self_attn.packed_qkv.reorder


def test_with_qkvs_int8_product_every_layer_packs_in_int8(tiny, monkeypatch):
    """qkv's int8 product costs little more per call than its arithmetic, so where it is in
    use pack's default puts every layer in int8, the small ones too."""
    from qkv import native

    from .conftest import native_kernels

    monkeypatch.delenv("QKV_PACK_MIN_WEIGHTS", raising=False)
    with native_kernels("int8"):
        model = pack(tiny(d_model=32, d_ff=64), int8=True)
    layer = model.decoder.layers[0]
    for m in (layer.cross_attn.q_proj, layer.ff.fc1, layer.self_attn.out_proj):
        assert isinstance(m, PackedLinear) and m.packed.native_int8
    assert layer.self_attn.packed_qkv.native_int8
    with native.off():  # PyTorch's int8: the small ones are not
        model = pack(tiny(d_model=32, d_ff=64), int8=True)
    assert type(model.decoder.layers[0].cross_attn.q_proj) is nn.Linear


def test_small_layers_stay_plain(tiny):
    model = pack(tiny(d_model=32, d_ff=4096), min_weights=2**17)
    ff = model.decoder.layers[0].ff
    assert isinstance(ff.fc1, PackedLinear) and isinstance(ff.fc2, PackedLinear)  # 32 x 4096
    attn = model.decoder.layers[0].self_attn  # 32 x 32: q/k/v stacked, not reordered
    assert type(attn.q_proj) is nn.Linear and isinstance(attn, PackedAttention)
    assert not attn.packed_qkv.reorder
    assert type(model.decoder.layers[0].cross_attn) is MultiHeadAttention


def test_model_built_under_inference_mode():
    with torch.inference_mode():  # parameters without version counters
        lin = _linear()
        x = torch.randn(3, 48)
        torch.testing.assert_close(PackedLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


def test_pack_swaps_self_attention_for_a_fused_projection(tiny):
    model = pack(tiny(), min_weights=0)
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attn, PackedAttention)
    assert type(layer.cross_attn) is MultiHeadAttention  # never projects q/k/v together


def _bf16_packs() -> bool:
    return Packed([_linear()], bf16=True)._packed is not None


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("bf16", [False, True])
def test_feed_forward_applies_its_activation_with_the_first_product(activation, bf16, gemm_route):
    """oneDNN applies it inside its kernel; after MKL's product (fp32) it is applied in place,
    without the FeedForward's own call either way."""
    if bf16 and gemm_route == "mkl":
        pytest.skip("bf16 packs for oneDNN only")
    if bf16 and not _bf16_packs():
        pytest.skip("no packed bf16 kernel on this CPU")
    torch.manual_seed(0)
    ff = FeedForward(48, 96, activation=activation).eval()
    packed = pack(nn.ModuleDict({"ff": ff}), min_weights=0, bf16=bf16)["ff"]
    assert isinstance(packed, PackedFeedForward)

    def boom(x):
        raise AssertionError("the activation ran apart from the product")

    packed.activation = boom  # the fused path never calls it
    x = torch.randn(5, 3, 48)
    with torch.inference_mode():
        got, want = packed(x), ff(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = 3e-2 if bf16 else 1e-5  # bf16: weights and the hidden activations rounded
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
    if bf16 and activation == "relu":  # rounding and relu commute: the unfused bf16 route exactly
        packed.activation, packed.post_op = ff.activation, None
        with torch.inference_mode():
            assert torch.equal(packed(x), got)


@pytest.mark.parametrize("case", ["gradients", "int8"])
def test_feed_forward_unfused_with_gradients_or_int8(case):
    if case == "int8" and not available(int8=True):
        pytest.skip("no fbgemm")
    torch.manual_seed(0)
    ff = FeedForward(48, 96, activation="gelu").eval()
    packed = pack(nn.ModuleDict({"ff": ff}), int8=case == "int8", min_weights=0)["ff"]
    calls = []
    packed.activation = lambda x: calls.append(1) or torch.nn.functional.gelu(x)
    x = torch.randn(4, 48, requires_grad=case == "gradients")
    if case == "gradients":  # the plain route on the live weights, gradients flowing
        torch.testing.assert_close(packed(x), ff(x))
        packed(x).sum().backward()
        assert x.grad is not None
        assert calls  # the activation ran on its own
    else:  # int8's product has no post-op: the activation follows it, in place
        with torch.inference_mode():
            expected = packed.fc2(torch.nn.functional.gelu(packed.fc1(x)))
            torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)


def test_int8_engine_is_one_this_pytorch_supports():
    from qkv.packed import int8_engine

    assert int8_engine() in torch.backends.quantized.supported_engines


def test_pack_decides_the_decoding_kernels_before_the_first_decode(tiny, monkeypatch):
    """pack() makes each decoding kernel's once-per-process decision (build, speed check), so a
    server's first request does not: attention's, and add-and-norm's with the activation."""
    from qkv import native

    monkeypatch.setattr(native, "_state", {"built": native._compile()})
    pack(tiny())
    assert {"module", "pointwise"} <= native._state.keys()
