"""qkv's C++ attention kernel for decoding (qkv/native.py) against PyTorch's fused kernel and the
explicit math, and where qkv.attention uses it."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import native
from qkv.attention import attention


@pytest.fixture(scope="module")
def kernel():
    module = native.kernel()
    assert module is not None, "the kernel should build and be used on the test machine"
    return module


def explicit(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh)) v, written out; rows with no key give zeros, as SDPA's do."""
    scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    w = scores.softmax(-1).nan_to_num(0.0)
    return (w @ v.double()).float()


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 5),
    h=st.integers(1, 4),
    t=st.integers(1, native.MAX_QUERIES),
    s=st.integers(1, 40),
    dh=st.sampled_from([8, 32, 48, 64, 128]),  # 32, 64, 128 unrolled; the others at run time
    masking=st.sampled_from(["none", "rows", "shared"]),
    spare=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_explicit_math_and_sdpa(kernel, b, h, t, s, dh, masking, spare, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dh, generator=g) * 2
    # keys and values inside longer buffers, as a KV cache holds them
    k = torch.randn(b, h, s + spare, dh, generator=g)[:, :, :s] * 2
    v = torch.randn(b, h, s + spare, dh, generator=g)[:, :, :s]
    mask = None
    if masking != "none":
        mask = torch.rand(1 if masking == "shared" else b, 1, 1, s, generator=g) > 0.4
    ours = native.decode_attention(q, k, v, mask)
    assert ours is not None and ours.shape == (b, h, t, dh)
    torch.testing.assert_close(ours, explicit(q, k, v, mask), atol=2e-6, rtol=1e-5)  # fp64
    torch.testing.assert_close(  # fp32 both, rounded differently
        ours, F.scaled_dot_product_attention(q, k, v, mask), atol=1e-5, rtol=1e-4
    )


def test_kernel_rows_without_keys_and_large_scores(kernel):
    q = torch.randn(3, 2, 1, 32) * 40  # scores in the hundreds: exp needs the largest subtracted
    k, v = torch.randn(3, 2, 6, 32) * 40, torch.randn(3, 2, 6, 32)
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[1] = False  # row 1 may attend to nothing
    ours = native.decode_attention(q, k, v, mask)
    assert torch.isfinite(ours).all()
    assert (ours[1] == 0).all()  # as PyTorch's fused kernel
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, mask))


def test_attention_takes_the_kernel_where_it_applies(kernel, monkeypatch):
    calls = []
    real = kernel.decode_attention

    class Spy:
        def decode_attention(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setitem(native._state, "module", Spy())
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pad = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])[:, None, None]
    with torch.inference_mode():
        out, _ = attention(q, k, v, pad)
    assert calls == [q.shape]
    with native.off(), torch.inference_mode():
        torch_out, _ = attention(q, k, v, pad)
    assert len(calls) == 1
    torch.testing.assert_close(out, torch_out)
    # not where it does not apply: weights wanted, dropout, causal, a mask per query, gradients,
    # bf16, too many queries
    attention(q, k, v, pad, need_weights=True)
    attention(q, k, v, pad, dropout=0.1)
    attention(q, k[:, :, :1], v[:, :, :1], is_causal=True)
    attention(q, k, v, pad.expand(2, 4, 1, 9))
    attention(q.requires_grad_(), k, v)
    attention(q.detach().bfloat16(), k.bfloat16(), v.bfloat16())
    many = torch.randn(2, 4, native.MAX_QUERIES + 1, 16)
    attention(many, k, v)
    assert len(calls) == 1


def test_decoding_is_the_same_with_and_without_the_kernel(kernel, tiny):
    """Greedy and beam search over the KV cache (self-attention with one query, cross-attention
    with a sentence's beams grouped) give the same tokens and scores either way."""
    from qkv.config import DecodeConfig
    from qkv.search import decode, model_step

    model = tiny()
    src = torch.randint(3, 23, (4, 7), generator=torch.Generator().manual_seed(0))
    src[1, 5:] = 0  # padding: the cross-attention mask hides it
    lengths = (src != 0).sum(1)

    def run(cfg):
        step = model_step(model)
        return decode(step, model.start(src), lengths, cfg, bos=1, eos=2, pad=0)

    for cfg in (DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam=3, nbest=2)):
        with torch.inference_mode():
            ours = run(cfg)
            with native.off():
                theirs = run(cfg)
        assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in theirs]
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.score == pytest.approx(y.score, abs=1e-5)


def test_off_switch_and_a_failed_build(monkeypatch, capsys):
    monkeypatch.setenv("QKV_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernel() is None
    assert native.decode_attention(*(torch.randn(1, 1, 1, 8) for _ in range(3)), None) is None

    monkeypatch.setenv("QKV_NATIVE", "1")
    monkeypatch.setattr(native, "_state", {})

    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(native, "_compile", broken)
    assert native.kernel() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "qkv: decoding attention kernel unavailable (Ninja is required to load C++ "
        "extensions); using PyTorch's"
    ]
    q = torch.randn(2, 2, 1, 8)
    out, _ = attention(q, q, q)  # PyTorch's kernel instead
    torch.testing.assert_close(out, q)  # one key: its value
