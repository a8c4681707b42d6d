import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv.embedding import sinusoids
from qkv.layers import FeedForward, Residual
from qkv.masks import causal_mask, padding_mask
from qkv.models import from_config

from .conftest import tiny_config


def test_sinusoids_by_hand():
    table = sinusoids(50, 8)
    pos, i = 7, 1  # frequency 1 / 10000^(2i/D)
    angle = pos / 10000 ** (2 * i / 8)
    assert table[pos, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 4 + i].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(table[0, :4], torch.zeros(4)) and torch.equal(table[0, 4:], torch.ones(4))


def test_masks():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True] * 3]
    # two new queries after two cached keys: bottom-right aligned
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True] * 4]
    assert padding_mask(torch.tensor([[5, 0]]), 0).shape == (1, 1, 1, 2)
    with pytest.raises(ValueError):
        causal_mask(3, 2)


def test_residual_pre_and_post():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    f = torch.nn.Linear(8, 8)
    pre, post = Residual(8, norm_first=True), Residual(8, norm_first=False)
    torch.testing.assert_close(pre(x, f), x + f(pre.norm(x)))
    torch.testing.assert_close(post(x, f), post.norm(x + f(x)))
    pre.skip = False
    torch.testing.assert_close(pre(x, f), f(pre.norm(x)))


def test_feedforward_activation():
    ff = FeedForward(4, 6, activation="gelu")
    x = torch.randn(5, 4)
    torch.testing.assert_close(ff(x), ff.fc2(torch.nn.functional.gelu(ff.fc1(x))))
    with pytest.raises(ValueError, match="activation"):
        FeedForward(4, 6, activation="tanh")


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_learns_copy_task(norm_first):
    """Both layer-norm placements learn to copy a random sequence: from log(10) = 2.3 nats to a
    tenth of a nat or less (both reach < 0.05 on one thread; the margin absorbs seeds and
    rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=13, d_model=64, d_ff=128, norm_first=norm_first)
    model = from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    loss_fn = torch.nn.CrossEntropyLoss()
    last = []
    for _ in range(300):
        src = torch.randint(3, 13, (32, 8))
        tgt_in = torch.cat([torch.ones(32, 1, dtype=torch.long), src], 1)
        tgt_out = torch.cat([src, torch.full((32, 1), 2)], 1)
        loss = loss_fn(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = (last + [loss.item()])[-20:]
    torch.set_num_threads(threads)
    # the mean of the last 20 batches: one batch's loss alone spikes now and then
    assert sum(last) / len(last) < 0.25, last


def test_dropout_statistics_and_gradient():
    """qkv's CPU dropout: drops about p of the elements, scales the rest so the mean is kept,
    passes the gradient through the same mask, and is the identity in eval mode."""
    from qkv.dropout import Dropout, dropout

    torch.manual_seed(0)
    x = torch.full((400, 1000), 2.0, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 * 65536 / (65536 - 6554)))
    assert abs(y.mean().item() - 2.0) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 65536 / (65536 - 6554))
    # different calls draw different masks; odd sizes work
    assert not torch.equal(dropout(x, 0.5) != 0, dropout(x, 0.5) != 0)
    assert dropout(torch.ones(7, 3), 0.3).shape == (7, 3)
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_dropout_in_bf16_keeps_the_mean():
    """In bf16 (autocast training) the kept values are scaled without a bias: a scale rounded
    to bf16's 8 bits (1.109375 for 1/0.9) with the drop probability left at 0.1 would shrink
    them all by 0.16%, ten times the tolerance here; the probability moves to match the scale."""
    from qkv.dropout import cut_and_scale, dropout

    cut, scale = cut_and_scale(0.1, torch.bfloat16)
    assert scale == torch.tensor(scale, dtype=torch.bfloat16).item()  # exact in bf16
    assert abs(scale * (65536 - cut) / 65536 - 1) < 1.6e-5
    assert abs(cut / 65536 - 0.1) < 0.002
    assert cut_and_scale(0.1, torch.float32) == (6554, 65536 / (65536 - 6554))
    torch.manual_seed(0)
    x = (torch.rand(1 << 22) + 1).bfloat16()  # values spread over [1, 2): roundings vary
    y = dropout(x, 0.1)
    kept = y != 0
    ratio = (y[kept].double() / x[kept].double()).mean().item()
    assert abs(ratio / scale - 1) < 1e-4  # each kept value scaled, rounded without a bias
    assert abs((~kept).double().mean().item() - cut / 65536) < 0.001  # dropped as often as said
    assert abs(y.double().mean().item() / x.double().mean().item() - 1) < 0.002


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_compiles_in_one_graph(dtype):
    """torch.compile takes dropout whole: its mask's cut and scale are constants to it. (In
    bf16, dynamo once traced into the scale's rounding, struct.pack, and died of a
    RecursionError; bench/README.md, the compiled training step.) Compiled, it draws PyTorch's
    mask (`torch_mask`), as eager does without qkv's C++ kernels."""
    from qkv import native
    from qkv.dropout import dropout

    x = torch.rand(4096, dtype=dtype) + 1
    compiled = torch.compile(lambda t: dropout(t, 0.1), backend="eager", fullgraph=True)
    torch.manual_seed(3)
    with native.off():
        want = dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(compiled(x), want)  # the same draws, cut and scale as eager


@given(
    st.floats(min_value=-7e4, max_value=7e4, allow_nan=False),
    st.floats(min_value=-3e38, max_value=3e38, allow_nan=False),
)
def test_dropout_rounds_its_scale_as_torch_does(small, large):
    # cut_and_scale rounds in plain Python; fp16 beyond its largest value (65504) and into its
    # subnormals, bf16 over fp32's whole range
    from qkv.dropout import _rounded

    for x, dtype in ((small, torch.float16), (small, torch.bfloat16), (large, torch.bfloat16)):
        assert _rounded(x, dtype) == torch.tensor(x).to(dtype).item()


# --- dropout fused with relu or a skip connection's sum, and layer norm to bf16 ---------------


@pytest.fixture(scope="module")
def fused():
    """The fused training kernels in use (conftest.native_kernels), whatever their timings."""
    from .conftest import native_kernels

    with native_kernels("masks") as module:
        yield module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 33), (1000,), (2, 300, 17)])
def test_relu_and_skip_dropout_equal_the_unfused_route(fused, dtype, shape):
    """One pass each way, the same mask (the same seed from PyTorch's generator) and the same
    roundings as relu, dropout and + as separate ops: identical outputs and gradients."""
    import torch.nn.functional as F

    from qkv.dropout import add_dropout, dropout, relu_dropout

    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).requires_grad_()
    r = torch.randn(shape, requires_grad=True)  # the fp32 residual stream
    g, gr = torch.randn(shape).to(dtype), torch.randn(shape)
    for seed in (5, 6):
        torch.manual_seed(seed)
        y = relu_dropout(x, 0.1)
        assert type(y.grad_fn).__name__ == "_ReluDropoutBackward"
        got = (y, *torch.autograd.grad(y, x, g))
        torch.manual_seed(seed)
        y = dropout(F.relu(x), 0.1)
        want = (y, *torch.autograd.grad(y, x, g))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

        torch.manual_seed(seed)
        out = add_dropout(r, x, 0.1)
        assert type(out.grad_fn).__name__ == "_AddDropoutBackward" and out.dtype == torch.float32
        got = (out, *torch.autograd.grad(out, (r, x), gr))
        torch.manual_seed(seed)
        out = r + dropout(x, 0.1)
        want = (out, *torch.autograd.grad(out, (r, x), gr))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fused_dropouts_are_the_identity_at_eval(fused):
    from qkv.dropout import add_dropout, relu_dropout

    x, r = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(relu_dropout(x, 0.3, training=False), torch.relu(x))
    assert torch.equal(add_dropout(r, x, 0.3, training=False), r + x)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_to_bf16_is_the_norm_then_the_cast(fused, bias):
    """Under bf16 autocast a pre-LN norm writes bf16: within one bf16 step of F.layer_norm's
    output cast to bf16 (the statistics summed in another order), gradients of x, the weight and
    the bias within fp32's rounding of autograd's through the norm and the cast."""
    from qkv import native

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(256, bias=bias)
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = (torch.randn(5, 9, 256) * 3 + 1).requires_grad_()
    g = torch.randn(5, 9, 256).bfloat16()
    assert native.layer_norm_bf16(x, norm) is None  # autocast off: the plain norm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = native.layer_norm_bf16(x, norm)
    assert y.dtype == torch.bfloat16
    want = norm(x).bfloat16()
    step = want.float().abs() * 2**-7 + 1e-30  # one bf16 step (8 significant bits)
    assert ((y.float() - want.float()).abs() <= step).all()
    assert (y != want).float().mean() < 0.01
    params = [x, norm.weight] + ([norm.bias] if bias else [])
    for a, b in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def test_pre_ln_layer_in_bf16_training_matches_the_unfused_route(fused):
    """A pre-LN encoder layer's training step under bf16 autocast with the fused kernels (norm
    to bf16, relu and skip dropouts) against PyTorch's ops with the same masks: outputs and
    gradients within bf16's rounding. (Attention takes the explicit route in both: the
    training kernel draws its mask in fp32, the explicit route in bf16, test_native.py.)"""
    from qkv import native
    from qkv.encoder import EncoderLayer

    torch.manual_seed(0)
    layer = EncoderLayer(32, 4, 64, dropout=0.1).train()
    x = torch.randn(3, 11, 32, requires_grad=True)
    results = []
    for fused_on in (True, False):
        torch.manual_seed(1)
        off = ("train_attention",) if fused_on else native.TRAINING_KERNELS
        with native.off(*off):
            out = run_layer(layer, x)
        grads = torch.autograd.grad(out.float().sum(), [x, *layer.parameters()])
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)
    for u, w in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, w, atol=0.05 * w.abs().max().item(), rtol=0.05)


def run_layer(layer, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)
