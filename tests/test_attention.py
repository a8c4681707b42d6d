import math

import pytest
import torch

from qkv.attention import MultiHeadAttention, attention
from qkv.masks import causal_mask, padding_mask


def test_hand_computed_2x2():
    # One head, Dh = 2, two queries and two keys; scores / sqrt(2) worked out by hand.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]])[None, None]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    # q0.k = [1, 1] -> equal weights; q1.k = [0, 1] -> softmax([0, 1/sqrt 2])
    e = math.exp(1 / math.sqrt(2))
    w1 = [1 / (1 + e), e / (1 + e)]
    expected_w = torch.tensor([[0.5, 0.5], w1])
    expected_out = torch.tensor([[2.0, 3.0], [w1[0] * 1 + w1[1] * 3, w1[0] * 2 + w1[1] * 4]])
    for need in (False, True):
        out, w = attention(q, k, v, need_weights=need)
        torch.testing.assert_close(out[0, 0], expected_out)
        if need:
            torch.testing.assert_close(w[0, 0], expected_w)
    # causal: query 0 only sees key 0
    out, w = attention(q, k, v, is_causal=True, need_weights=True)
    torch.testing.assert_close(w[0, 0], torch.tensor([[1.0, 0.0], w1]))
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("case", ["none", "padding", "causal", "causal+padding", "t!=s", "cached"])
def test_fused_equals_explicit(dtype, tol, case):
    g = torch.Generator().manual_seed(0)
    b, h, dh = 3, 4, 16
    t, s = (5, 9) if case in ("t!=s", "cached") else (7, 7)
    q = torch.randn(b, h, t, dh, generator=g).to(dtype)
    k = torch.randn(b, h, s, dh, generator=g).to(dtype)
    v = torch.randn(b, h, s, dh, generator=g).to(dtype)
    ids = torch.tensor([[5] * s, [5] * (s - 2) + [0] * 2, [5] * 3 + [0] * (s - 3)])
    mask, is_causal = None, False
    if "padding" in case or case == "t!=s":
        mask = padding_mask(ids, 0)
    if "causal" in case:
        is_causal = True
    if case == "cached":  # 5 new queries after 4 cached positions
        mask = causal_mask(t, s)
    fused, none = attention(q, k, v, mask, is_causal=is_causal)
    explicit, w = attention(q, k, v, mask, is_causal=is_causal, need_weights=True)
    assert none is None
    assert w.shape == (b, h, t, s)
    torch.testing.assert_close(fused.float(), explicit.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(w.float().sum(-1), torch.ones(b, h, t), atol=tol, rtol=tol)
    if mask is not None:
        assert (w.masked_select(~mask.expand_as(w)) == 0).all()


@pytest.mark.parametrize("rows", [4, 80])
def test_one_query_steps_equal_sdpa(rows, monkeypatch):
    """Decoding steps (one query per row, a cache slice as keys) where qkv's C++ kernel is off
    (tests/test_native.py tests it): whichever branch the CPU rule picks equals SDPA. 4 x 8
    heads is under the rule's threshold, 80 x 8 over it; the calls are counted so each size is
    known to take the branch it should."""
    import importlib

    from qkv import native

    qa = importlib.import_module("qkv.attention")  # the module, not the function qkv exports

    calls = {"fused": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["fused"] += 1
        return sdpa(*args, **kwargs)

    torch.manual_seed(0)
    q = torch.randn(rows, 8, 1, 16)
    k, v = torch.randn(rows, 8, 32, 16)[:, :, :11], torch.randn(rows, 8, 11, 16)  # cache slice
    mask = padding_mask(torch.tensor([[5] * 11, [5] * 6 + [0] * 5] * (rows // 2)), 0)
    monkeypatch.setattr(qa.F, "scaled_dot_product_attention", counting)
    with native.off():
        out, weights = attention(q, k, v, mask)
    monkeypatch.undo()
    assert weights is None
    explicit = rows * 8 >= qa.EXPLICIT_MIN_ROWS_X_HEADS
    assert calls["fused"] == (0 if explicit else 1)
    want = sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    # and the explicit math itself, whichever branch ran above
    got, _ = attention(q, k, v, mask, need_weights=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_causal_with_t_not_s_is_refused_with_its_own_message():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_causal with T != S"):
        attention(q, k, k, mask, is_causal=True)


def test_weights_are_before_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    _, w = attention(q, k, v, dropout=0.5, need_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_dropout_zeroes_weights_and_scales_the_rest(dtype):
    # Training's attention on the CPU (the explicit math with qkv's dropout mask): with the values
    # the identity, the output is the dropped-out weights themselves, each 0 or w / (1 - p),
    # about p of them 0, and the gradient reaches q through the kept ones only.
    torch.manual_seed(0)
    p, s = 0.25, 16
    q, k = torch.randn(64, 4, s, 8), torch.randn(64, 4, s, 8)
    q, k, v = q.to(dtype).requires_grad_(), k.to(dtype), torch.eye(s).expand(64, 4, s, s).to(dtype)
    _, w = attention(q, k, v, need_weights=True)
    out, _ = attention(q, k, v, dropout=p)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.01
    kept = (out.float() / (w.float() / (1 - p)))[~dropped]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kept, torch.ones_like(kept), atol=tol, rtol=0)
    out.float().sum().backward()  # the weights sum to 1, so all of q's gradient comes from drops
    assert q.grad.abs().sum() > 0
    unscaled = attention(q.detach(), k, v, dropout=p)[0]
    assert not torch.equal(unscaled == 0, dropped)  # a fresh mask each call


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_matches_torch(bias):
    torch.manual_seed(0)
    d, h = 32, 4
    ours = MultiHeadAttention(d, h, bias=bias).eval()
    ref = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(
                torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias])
            )
            ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 5, d)
    mem = torch.randn(2, 7, d)
    ids = torch.tensor([[3] * 7, [3] * 4 + [0] * 3])
    # self-attention, causal
    want, want_w = ref(x, x, x, attn_mask=~causal_mask(5), average_attn_weights=False)
    got = ours(x, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # cross-attention with key padding (torch: True = ignore)
    want, want_w = ref(x, mem, mem, key_padding_mask=ids == 0, average_attn_weights=False)
    got = ours(x, mem, padding_mask(ids, 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the explicit branch's weights equal torch's per-head weights
    from qkv.inspect import record_attention

    with record_attention(ours) as rec:
        got = ours(x, mem, padding_mask(ids, 0))
    torch.testing.assert_close(rec.last("")[:, :, :, :], want_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_head_mask_silences_one_head_only():
    torch.manual_seed(0)
    d, h = 16, 4
    mha = MultiHeadAttention(d, h).eval()
    x = torch.randn(2, 5, d)
    captured = {}

    def hook(_, inputs, __):
        captured["concat"] = inputs[0].clone()

    mha.out_proj.register_forward_hook(hook)
    full = mha(x)
    heads_full = captured["concat"].view(2, 5, h, d // h)
    mha.head_mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    masked = mha(x)
    heads_masked = captured["concat"].view(2, 5, h, d // h)
    assert torch.equal(heads_masked[:, :, 1], torch.zeros(2, 5, d // h))
    for i in (0, 2, 3):
        assert torch.equal(heads_masked[:, :, i], heads_full[:, :, i])
    # the output changes by exactly head 1's contribution through out_proj
    w1 = mha.out_proj.weight[:, d // h : 2 * d // h]
    torch.testing.assert_close(full - masked, heads_full[:, :, 1] @ w1.T, atol=1e-6, rtol=1e-5)
    mha.head_mask = torch.ones(h)
    torch.testing.assert_close(mha(x), full)


def test_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
