"""qkv's C++ kernels (qkv/native.py) against PyTorch: decoding's attention (against its fused
kernel and the explicit math), MKL's packed product, search's log-softmax and scans, dropout's
mask and the training loss; where qkv uses each, and how the module is built and loaded."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import native
from qkv.attention import attention
from qkv.packed import PackedLinear

from .conftest import native_kernels


@contextmanager
def threads_set_to(n: int):
    """PyTorch's intra-op threads (which the kernels' at::parallel_for follow) set to n inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The hypothesis strategies the kernels' tests share: rows of scores or values, their width,
# spare columns (rows inside a wider buffer), PyTorch's thread count, a generator seed.
ROWS = st.integers(1, 40)
WIDTHS = st.integers(1, 300)
SPARE = st.integers(0, 3)
THREADS = st.sampled_from([1, 2])
SEEDS = st.integers(0, 2**16)


@pytest.fixture(scope="module")
def kernel():
    """The attention kernel, in use whatever its timing says (conftest.native_kernels)."""
    with native_kernels("attention") as module:
        yield module


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
    stored=st.sampled_from([0, 1, 3, 9]),  # 0: one row of keys per row; else a table into P
    seed=SEEDS,
)
def test_kernel_equals_the_explicit_math_and_sdpa(
    kernel, b, h, t, s, dh, masking, spare, stored, seed
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dh, generator=g) * 2
    # keys and values inside longer buffers, as a KV cache holds them
    p = stored or b
    k = torch.randn(p, h, s + spare, dh, generator=g)[:, :, :s] * 2
    v = torch.randn(p, h, s + spare, dh, generator=g)[:, :, :s]
    table = torch.randint(0, p, (b, s + spare), generator=g)[:, :s] if stored else None
    mask = None
    if masking != "none":
        mask = torch.rand(1 if masking == "shared" else b, 1, 1, s, generator=g) > 0.4
    ours = native.decode_attention(q, k, v, mask, table)
    assert ours is not None and ours.shape == (b, h, t, dh)
    if table is not None:  # each row's own keys, gathered by hand
        k = torch.stack(
            [torch.stack([k[table[i, j], :, j] for j in range(s)], 1) for i in range(b)]
        )
        v = torch.stack(
            [torch.stack([v[table[i, j], :, j] for j in range(s)], 1) for i in range(b)]
        )
    torch.testing.assert_close(ours, explicit(q, k, v, mask), atol=2e-6, rtol=1e-5)  # fp64
    torch.testing.assert_close(  # fp32 both, rounded differently
        ours, F.scaled_dot_product_attention(q, k, v, mask), atol=1e-5, rtol=1e-4
    )


def test_kernel_refuses_a_table_out_of_range(kernel):
    q, k = torch.randn(2, 1, 1, 8), torch.randn(3, 1, 4, 8)
    table = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])  # stored row 3 of 3
    with pytest.raises(RuntimeError, match="out of range"):
        native.decode_attention(q, k, k, None, table)


@pytest.mark.parametrize("seed", range(5))
def test_kernel_rows_without_keys_and_large_scores(kernel, seed):
    g = torch.Generator().manual_seed(seed)
    # scores in the thousands: exp needs the largest subtracted, and one fp32 step of a score
    # (1e-3) moves the weights by as much, in any fp32 kernel (SDPA's error is the same)
    q = torch.randn(3, 2, 1, 32, generator=g) * 40
    k, v = torch.randn(3, 2, 6, 32, generator=g) * 40, torch.randn(3, 2, 6, 32, generator=g)
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[1] = False  # row 1 may attend to nothing
    ours = native.decode_attention(q, k, v, mask)
    assert torch.isfinite(ours).all()
    assert (ours[1] == 0).all()  # as PyTorch's fused kernel
    torch.testing.assert_close(ours, explicit(q, k, v, mask), atol=1e-3, rtol=0)


def test_attention_takes_the_kernel_where_it_applies(kernel, monkeypatch):
    calls = []
    real = kernel.decode_attention

    class Spy:  # counts the calls the kernel computed (it declines some inputs itself: None)
        def decode_attention(self, *args):
            out = real(*args)
            if out is not None:
                calls.append(args[0].shape)
            return out

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
    # declined by the kernel itself, not raised: a mask per head, a table of another shape,
    # values not contiguous along Dh
    no_table = native._NO_TABLE
    with torch.inference_mode():
        assert real(q, k, v, pad.expand(2, 4, 1, 9), no_table) is None
        assert real(q, k, v, native._NO_MASK, torch.zeros(2, 3, dtype=torch.long)) is None
        assert real(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), pad, no_table) is None


def assert_decodes_alike(model, src, lengths, cfgs) -> None:
    """Each config decodes src to the same tokens, and scores within 1e-5, with qkv's C++
    kernels (as in use inside the test) and without (native.off)."""
    from qkv.search import decode, model_step

    def run(cfg):
        return decode(model_step(model), model.start(src), lengths, cfg, bos=1, eos=2, pad=0)

    for cfg in cfgs:
        with torch.inference_mode():
            ours = run(cfg)
            with native.off():
                theirs = run(cfg)
        assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in theirs]
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.score == pytest.approx(y.score, abs=1e-5)


def test_decoding_is_the_same_with_and_without_the_kernel(kernel, tiny):
    """Greedy and beam search over the KV cache (self-attention with one query, cross-attention
    with a sentence's beams grouped) give the same tokens and scores either way."""
    from qkv.config import DecodeConfig

    model = tiny()
    src = torch.randint(3, 23, (4, 7), generator=torch.Generator().manual_seed(0))
    src[1, 5:] = 0  # padding: the cross-attention mask hides it
    lengths = (src != 0).sum(1)

    greedy, beam = DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam=3, nbest=2)
    assert_decodes_alike(model, src, lengths, [greedy, beam])


def test_off_switch_and_a_failed_build(monkeypatch, capsys):
    monkeypatch.setenv("QKV_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernel() is None and native.gemm() is None
    assert native.decode_attention(*(torch.randn(1, 1, 1, 8) for _ in range(3)), None) is None

    monkeypatch.setenv("QKV_NATIVE", "1")
    monkeypatch.setattr(native, "_state", {})

    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(native, "_compile", broken)
    assert native.kernel() is None
    assert native.gemm() is None and native.pack_weight(torch.randn(4, 4)) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [  # one line for both kernels
        "qkv: C++ kernels unavailable (Ninja is required to load C++ extensions); using PyTorch's"
    ]
    q = torch.randn(2, 2, 1, 8)
    out, _ = attention(q, q, q)  # PyTorch's kernel instead
    torch.testing.assert_close(out, q)  # one key: its value


def test_pips_ninja_is_found_outside_an_activated_environment(monkeypatch, tmp_path):
    """`.venv/bin/python` without `activate`: the ninja that pip installed is not on PATH, and
    torch's extension builder looks for it there."""
    import ninja
    import torch.utils.cpp_extension as ext

    seen = {}
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setenv("QKV_CACHE", str(tmp_path))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(ext, "load", lambda **kw: seen.update(kw, path=native.os.environ["PATH"]))
    native._compile()
    assert seen["path"].split(native.os.pathsep)[0] == ninja.BIN_DIR
    assert seen["build_directory"].startswith(str(tmp_path))
    assert "-march=native" in seen["extra_cflags"]


def test_a_built_library_is_imported_without_torchs_builder(kernel, monkeypatch):
    """Once built, a process imports the library itself: torch's builder takes a lock on every
    load and waits for it without end, so a process killed in that window hung every later
    one (a SIGTERM'd server's test did, on a fresh clone)."""
    import torch.utils.cpp_extension as ext

    def builder(**kw):
        raise AssertionError("torch's builder ran")

    monkeypatch.setattr(ext, "load", builder)
    (native.build_dir() / "lock").touch()  # as a killed process leaves it
    try:
        module = native._compile()
    finally:
        (native.build_dir() / "lock").unlink()
    q = torch.randn(2, 2, 1, 32)
    torch.testing.assert_close(
        module.decode_attention(q, q, q, native._NO_MASK, native._NO_TABLE), q
    )


def test_a_stale_lock_is_removed_before_building(monkeypatch, tmp_path):
    import os

    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("QKV_CACHE", str(tmp_path))
    where = native.build_dir()
    where.mkdir(parents=True)
    lock = where / "lock"
    lock.touch()
    old = native.time.time() - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    seen = []
    monkeypatch.setattr(ext, "load", lambda **kw: seen.append(lock.exists()))
    native._compile()
    assert seen == [False]  # removed before torch's builder would wait for it
    assert (where / "built").exists()  # the next process imports the library directly
    lock.touch()  # a fresh lock (a build running elsewhere) is left to torch's builder
    (where / "built").unlink()
    native._compile()
    assert seen == [False, True]


def test_a_reorder_moves_the_table_not_the_keys(kernel, tiny):
    """Where the kernel reads the cache, beam search's reorder (rows reordered, duplicated,
    dropped) changes only the table; steps after it equal the full forward over the reordered
    rows, one token at a time (the kernel) and several (PyTorch's kernel, gathering through the
    table), also once the cache has grown past its first capacity (the stored rows copied as
    they are, the table widened, as when a reorder makes more rows than are stored: beam
    search's first)."""
    from tests.test_models import batch

    model = tiny()
    src, tgt = batch()
    index = torch.tensor([2, 0, 0])  # reordered, row 0 twice, row 1 dropped
    with torch.no_grad():
        cache = model.start(src)
        model.step(tgt[:, :4], cache)
        stored = cache.self_attn[0].stored()[0]
        cache.select(index)
        c = cache.self_attn[0]
        assert c.stored()[0].data_ptr() == stored.data_ptr()  # no key moved
        assert c.table is not None and c.table[:, :4].tolist() == [[2] * 4, [0] * 4, [0] * 4]
        torch.testing.assert_close(c.k, stored[index])  # per row, through the table
        steps = [model.step(tgt[index, i : i + 1], cache) for i in range(4, 7)]
        want = model(src[index], tgt[index])
        torch.testing.assert_close(torch.cat(steps, 1), want[:, 4:], atol=1e-5, rtol=1e-5)
        assert c.table[:, 4:].tolist() == [[0] * 3, [1] * 3, [2] * 3]  # new keys: its own row
        cache.select(torch.tensor([2, 1]))
        more = torch.randint(3, 20, (2, 12))
        got = model.step(more, cache)  # 19 positions: past the first capacity of 16
        assert c.table is not None and c.table.shape == (2, 19)
        assert c.table[:, :7].tolist() == [[0] * 4 + [2] * 3, [0] * 4 + [1] * 3]  # not moved
        assert c.table[:, 7:].tolist() == [[0] * 12, [1] * 12]
        assert c.stored()[0].shape[0] == 3  # the three stored rows, none gathered
        rows = index[torch.tensor([2, 1])]
        want = model(src[rows], torch.cat([tgt[rows], more], 1))
        torch.testing.assert_close(got, want[:, 7:], atol=1e-5, rtol=1e-5)
    with native.off(), torch.no_grad():  # elsewhere the rows are copied
        cache = model.start(src)
        model.step(tgt[:, :4], cache)
        cache.select(index)
        assert cache.self_attn[0].table is None


@pytest.fixture(scope="module")
def mkl():
    """MKL's packed product, in use whatever its timing says (conftest.native_kernels)."""
    with native_kernels("gemm") as module:
        yield module


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 300),  # decoding's rows change whenever a sentence ends
    n=st.integers(1, 300),
    k=st.integers(1, 300),
    bias=st.booleans(),
    spare=st.integers(0, 5),  # rows inside a wider buffer
    layout=st.sampled_from(["rows", "(m, 1, k)", "transposed"]),
    threads=THREADS,
    seed=SEEDS,
)
def test_packed_product_equals_linear_at_any_rows(mkl, m, n, k, bias, spare, layout, threads, seed):
    """Packed once (for the 160 rows the layout is tuned for), right for any number of rows, in
    any thread count, for x of any shape (..., k) and strides: x W^T + b as F.linear computes
    it, in fp64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    kept = None if b is None else b.clone()
    packed = native.pack_weight(w)
    x = torch.randn(m, k + spare, generator=g)[:, :k]
    if layout == "(m, 1, k)":  # a decoding step's (B, T, D)
        x = x[:, None]
    elif layout == "transposed":  # values not contiguous along k: copied inside
        x = x.t().contiguous().t()
    with threads_set_to(threads):
        got = native.packed_linear(x, packed, b, n)
    assert got.shape == (*x.shape[:-1], n) and got.is_contiguous()
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got, want.float(), atol=1e-4 * k**0.5, rtol=1e-5)
    if b is not None:
        assert torch.equal(b, kept)  # the bias, copied into the output, is left alone


def test_packed_product_leaves_its_bias_alone_with_one_row(mkl):
    """One row: the output starts as the bias broadcast, which with one row could be the bias
    tensor itself, written over by the product (it was, in a first version)."""
    w, b = torch.randn(8, 4), torch.randn(8)
    kept = b.clone()
    packed = native.pack_weight(w)
    for _ in range(3):
        x = torch.randn(1, 4)
        torch.testing.assert_close(native.packed_linear(x, packed, b, 8), x @ w.T + kept)
    assert torch.equal(b, kept)


# --- qkv's int8 product (csrc/int8_gemm.cpp) -----------------------------------------------------


@pytest.fixture(scope="module")
def int8():
    """qkv's int8 product, in use whatever its timing says (conftest.native_kernels)."""
    with native_kernels("int8") as module:
        yield module


@contextmanager
def amx_allowed(module, allowed: bool):
    """int8_linear on AMX where the CPU has it (allowed), or on AVX-512 VNNI alone."""
    before = module.int8_allow_amx(allowed)
    try:
        yield
    finally:
        module.int8_allow_amx(before)


def int8_by_definition(x, q, scale, bias):
    """x (m, k) W^T + b as csrc/int8_gemm.cpp defines it for W = q * scale[:, None], computed
    here in fp64 from that definition: each row of x in u8, its range [min, max] stretched to
    take in 0, scale_x = (max - min) / 255, zero = round(-min / scale_x), x ~ (u - zero) *
    scale_x; then exact integer dot products."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    sx = (hi - lo) * torch.tensor(1 / 255, dtype=torch.float32)
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    inv = 1 / sx
    zero = torch.round(-lo * inv).clamp(0, 255)
    u = (torch.round(x * inv) + zero).clamp(0, 255)
    y = ((u - zero).double() @ q.double().T) * sx.double() * scale.double()
    return y if bias is None else y + bias.double()


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 70),  # past one and two of AMX's 16-row tiles, and VNNI's 6-row ones
    n=st.integers(1, 300),  # columns in blocks of 16 (and pairs of blocks), with a tail
    k=st.integers(1, 300),  # inputs in tiles of 64, padded
    bias=st.booleans(),
    layout=st.sampled_from(["rows", "(m, 1, k)", "transposed"]),
    amx=st.booleans(),
    threads=THREADS,
    seed=SEEDS,
)
def test_int8_product_is_its_definition(int8, m, n, k, bias, layout, amx, threads, seed):
    """For any rows, widths and depths, x of any shape (..., k) and strides, on AMX or VNNI, in
    any thread count: the product its definition gives, computed independently in fp64."""
    from qkv.packed import quantize_rows

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    q, scale = quantize_rows(w)
    packed, sums = native.int8_pack(q)
    x = torch.randn(m, k, generator=g) * 3
    if layout == "(m, 1, k)":  # a decoding step's (B, T, D)
        x = x[:, None]
    elif layout == "transposed":  # values not contiguous along k
        x = x.t().contiguous().t()
    with amx_allowed(int8, amx), threads_set_to(threads):
        got = native.int8_linear(x, packed, scale, sums, b, n)
    assert got.shape == (*x.shape[:-1], n) and got.is_contiguous()
    if m == 0:
        return
    want = int8_by_definition(x.reshape(m, k), q, scale, b).view(*x.shape[:-1], n)
    torch.testing.assert_close(got, want.float(), atol=1e-4 * k**0.5, rtol=1e-5)


def test_int8_product_is_within_its_rounding_of_fp32(int8):
    """Against fp32's product, an oracle that shares nothing with the definition: each error is
    at most what rounding both factors by half a step gives, sum_k (sx / 2 |w_k| + sw / 2
    |x_k| + sx sw / 4); and rows that are all zeros, all positive, all negative, or one large
    value among small ones are within it too."""
    from qkv.packed import quantize_rows

    g = torch.Generator().manual_seed(7)
    w = torch.randn(200, 96, generator=g)
    x = torch.randn(8, 96, generator=g)
    x[0] = 0
    x[1] = x[1].abs()
    x[2] = -x[2].abs()
    x[3, 5] = 1000.0
    b = torch.randn(200, generator=g)
    q, scale = quantize_rows(w)
    packed, sums = native.int8_pack(q)
    for amx in (True, False):
        with amx_allowed(int8, amx):
            got = native.int8_linear(x, packed, scale, sums, b, 200).double()
        want = x.double() @ w.double().T + b.double()
        sx = ((x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255).double()[:, None]
        sw = scale.double()[None, :]
        bound = (sx / 2) * w.abs().double().sum(1) + (sw / 2) * x.abs().double().sum(1, True)
        bound = bound + sx * sw / 4 * 96
        assert ((got - want).abs() <= bound * 1.001 + 1e-5).all()
        torch.testing.assert_close(got[0], b.double())  # a row of zeros is the bias, exactly


def test_int8_product_of_a_row_not_finite_is_nan(int8):
    """A row of x with a NaN or an infinity gives NaNs (8 bits cannot hold it, and a finite
    answer would hide it), on AMX and VNNI; the other rows are as without it."""
    from qkv.packed import quantize_rows

    g = torch.Generator().manual_seed(8)
    w, x = torch.randn(40, 70, generator=g), torch.randn(5, 70, generator=g)
    q, scale = quantize_rows(w)
    packed, sums = native.int8_pack(q)
    clean = native.int8_linear(x, packed, scale, sums, None, 40)
    x[1, 3], x[3, 69] = float("nan"), float("-inf")
    for amx in (True, False):
        with amx_allowed(int8, amx):
            got = native.int8_linear(x, packed, scale, sums, None, 40)
        assert got[[1, 3]].isnan().all()
        assert torch.equal(got[[0, 2, 4]], clean[[0, 2, 4]])


def test_int8_pack_lays_out_blocks_of_16_columns_by_groups_of_4_inputs(int8):
    """The layout int8_gemm.cpp documents (and AMX reads as its tiles): block of 16 columns,
    then group of 4 inputs (padded to 64), then column, then the group's 4 values; zeros in the
    padding; and each column's sum of its weights."""
    q = torch.randint(-127, 128, (20, 70), dtype=torch.int8, generator=torch.Generator())
    packed, sums = native.int8_pack(q)
    padded = torch.zeros(32, 128, dtype=torch.int8)
    padded[:20, :70] = q
    want = padded.view(2, 16, 32, 4).permute(0, 2, 1, 3).reshape(-1)
    assert torch.equal(packed, want)
    assert torch.equal(sums, padded.int().sum(1))


def test_packed_int8_layers_take_qkvs_product_where_it_is_in_use(int8):
    """A PackedLinear in int8 runs qkv's product where it is in use (its output the
    definition's, on the weight quantized by rows), and PyTorch's elsewhere."""
    from qkv.packed import quantize_rows

    lin = torch.nn.Linear(64, 40)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        ours = PackedLinear(lin, int8=True)
        assert ours.packed.native_int8
        q, scale = quantize_rows(lin.weight)
        want = int8_by_definition(x.reshape(15, 64), q, scale, lin.bias).view(3, 5, 40)
        torch.testing.assert_close(ours(x), want.float(), atol=1e-4, rtol=1e-5)
        with native.off():
            theirs = PackedLinear(lin, int8=True)
        assert not theirs.packed.native_int8 and theirs.packed.int8


# --- choosing from a step's scores (csrc/choose.cpp) --------------------------------------------


@pytest.fixture(scope="module")
def scans():
    """The log-softmax and scans, in use whatever their timing says (conftest.native_kernels)."""
    with native_kernels("choose") as module:
        yield module


def scores(rows: int, width: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """Distinct scores, many ties (small integers), mostly -inf (edits and forced tokens), or
    large ones (exp overflows unless the largest is taken out first)."""
    if kind == "ties":
        return torch.randint(0, 4, (rows, width), generator=g).float()
    x = torch.randn(rows, width, generator=g) * 4
    if kind == "few finite":
        x[:, 3:] = float("-inf")
    if kind == "large":
        x = x * 1e3
    return x


KINDS = st.sampled_from(["distinct", "ties", "few finite", "large"])


@settings(max_examples=60, deadline=None)
@given(
    rows=ROWS,
    width=WIDTHS,  # chunks of 64 and a shorter last one
    kind=KINDS,
    spare=SPARE,
    threads=THREADS,
    seed=SEEDS,
)
def test_log_softmax_and_argmax_are_torchs(scans, rows, width, kind, spare, threads, seed):
    g = torch.Generator().manual_seed(seed)
    x = scores(rows, width + spare, kind, g)[:, :width]
    with threads_set_to(threads):
        best = native.argmax(x)
        mine = x.clone()
        assert native.log_softmax_(mine)
    assert torch.equal(best, x.argmax(-1))  # the first largest
    want = x.double().log_softmax(-1).float()
    torch.testing.assert_close(mine, want, atol=2e-6 * (1 + want.abs().max().item()), rtol=1e-6)


def test_log_softmax_and_argmax_of_nan_and_infinite_rows_are_torchs(scans):
    x = torch.randn(5, 200)
    x[0] = float("-inf")  # nothing allowed: NaN everywhere, argmax 0
    x[1, 7] = x[1, 150] = float("nan")  # NaN: NaN everywhere, argmax the first NaN
    x[2, 60:70] = float("inf")  # +inf: NaN everywhere, argmax the first +inf
    x[3, 64:] = float("-inf")  # a chunk of -inf after a finite one
    x[4, 199] = 1e30
    assert torch.equal(native.argmax(x), x.argmax(-1))
    mine = x.clone()
    native.log_softmax_(mine)
    torch.testing.assert_close(mine, x.log_softmax(-1), equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 6),
    want=st.integers(1, 12),
    width=WIDTHS,
    kind=KINDS,
    unused=st.booleans(),  # beams at -inf: a search's first step
    threads=THREADS,
    seed=SEEDS,
)
def test_beam_topk_is_the_stable_sort_of_the_sums(
    scans, n, k, want, width, kind, unused, threads, seed
):
    """The best `want` of score + log-prob over a sentence's K x V extensions: values as the sum
    (log_probs + scores) computes them, best first, ties to the lower position; past the finite
    ones, -inf at position 0."""
    g = torch.Generator().manual_seed(seed)
    log_probs = scores(n * k, width, kind, g)
    beams = -torch.rand(n, k, generator=g) * 10
    if unused:
        beams[:, 1:] = float("-inf")
    whole = (log_probs + beams.view(-1, 1)).view(n, k * width)
    with threads_set_to(threads):
        values, positions = native.beam_topk(log_probs.clone(), beams, want)
    order = whole.sort(dim=1, descending=True, stable=True)
    m = min(want, k * width)
    finite = order.values[:, :m] > float("-inf")
    assert torch.equal(values[:, :m][finite], order.values[:, :m][finite])
    assert torch.equal(positions[:, :m][finite], order.indices[:, :m][finite])
    rest = torch.ones_like(values, dtype=torch.bool)
    rest[:, :m] = ~finite
    assert (values[rest] == float("-inf")).all() and (positions[rest] == 0).all()


def test_beam_topk_leaves_nan_to_pytorch(scans):
    log_probs, beams = torch.randn(4, 100), torch.zeros(2, 2)
    log_probs[3, 40] = float("nan")
    assert native.beam_topk(log_probs, beams, 3) is None
    beams[1, 1] = float("-inf")  # the NaN's beam unused: its row is never read
    assert native.beam_topk(log_probs, beams, 3) is not None
    beams[0, 0] = float("nan")
    assert native.beam_topk(log_probs, beams, 3) is None


def test_search_takes_the_scans_and_decodes_as_without_them(scans, tiny, monkeypatch):
    """Greedy and beam search on a model give the same tokens and scores with the C++
    log-softmax and scans as with PyTorch's ops, and do call them."""
    from qkv.config import DecodeConfig

    calls = []
    for name in ("log_softmax_", "argmax", "beam_topk"):
        real = getattr(native, name)
        monkeypatch.setattr(
            native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    model = tiny()
    src = torch.randint(3, 23, (4, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((4,), 7)

    greedy, beam = DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam=3, nbest=3)
    assert_decodes_alike(model, src, lengths, [greedy, beam])
    assert {"log_softmax_", "argmax", "beam_topk"} <= set(calls)


def test_beam_one_is_greedy_even_with_tied_scores(scans, tiny):
    """Ties go to the lower token in both greedy and beam search's scan, so a beam of one is
    greedy even where scores tie (as bf16 logits often do: 56 of 1,000 Multi30k sentences
    differed between the two under torch.topk's tie order, bench/README.md)."""
    from qkv.config import DecodeConfig
    from qkv.search import beam_search, greedy, log_softmax

    model = tiny()
    src = torch.randint(3, 23, (8, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.full((8,), 7)

    def step(tokens, cache):  # logits rounded to halves: ties everywhere
        logits = model.step(tokens, cache, last=True)[:, -1]
        return log_softmax((logits * 2).round() / 2)

    kw = dict(bos=1, eos=2, pad=0)
    with torch.inference_mode():
        one = greedy(step, model.start(src), lengths, DecodeConfig(), **kw)
        beam = beam_search(step, model.start(src), lengths, DecodeConfig(beam=1), **kw)
    assert [h.tokens for h in one] == [b[0].tokens for b in beam]


# --- dropout's mask (csrc/dropout_mask.cpp) ------------------------------------------------------


@pytest.fixture(scope="module")
def masks():
    """The dropout mask kernel, in use whatever its timing says (conftest.native_kernels)."""
    with native_kernels("masks") as module:
        yield module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cut", [0, 1, 6554, 32768, 65535, 65536])
def test_dropout_mask_drops_cut_in_65536_and_scales_the_rest(masks, dtype, cut):
    x = torch.empty(1 << 22, dtype=dtype)
    mask = masks.dropout_mask(x, cut, 1.25, 7)
    assert mask.dtype == dtype and mask.shape == x.shape
    kept = mask != 0
    assert (mask[kept] == 1.25).all()
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - cut / 65536) < 5e-4 + 2e-6 * (cut > 0)  # 4M draws: sd under 2.5e-4


def test_dropout_mask_is_a_function_of_its_seed_alone(masks):
    """The same seed: the same mask, at any thread count, and a shorter mask is the start of a
    longer one; another seed, another mask; draws within and across blocks uncorrelated."""
    x = torch.empty(3, 1000)
    with threads_set_to(1):
        one = masks.dropout_mask(torch.empty(100_003), 32768, 2.0, 11)
    with threads_set_to(2):
        two = masks.dropout_mask(torch.empty(100_003), 32768, 2.0, 11)
    assert torch.equal(one, two)
    assert torch.equal(masks.dropout_mask(x, 32768, 2.0, 11).view(-1), one[:3000])
    other = masks.dropout_mask(torch.empty(100_003), 32768, 2.0, 12)
    assert 0.45 < (other == one).double().mean().item() < 0.55
    kept = (one != 0).double()
    for lag in (1, 64, 128, 256, 4096):  # next element, the same word's next lane, next block
        agree = (kept[lag:] == kept[:-lag]).double().mean().item()
        assert abs(agree - 0.5) < 0.01, lag


def test_dropout_draws_the_c_mask_from_torchs_generator(masks, monkeypatch):
    """qkv.dropout takes the C++ mask where it applies; torch.manual_seed reproduces it."""
    from qkv.dropout import dropout

    calls = []
    real = native.dropout_mask
    monkeypatch.setattr(native, "dropout_mask", lambda *a: calls.append(1) or real(*a))
    x = torch.ones(50, 70, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.3), y) and len(calls) == 2
    assert not torch.equal(dropout(x, 0.3), y)  # the generator moved on
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient goes through the same mask


# --- the chunk loss of training's output layer (csrc/cross_entropy.cpp) --------------------------


@pytest.fixture(scope="module")
def loss_kernel():
    """The chunk loss kernel, in use whatever its timing says (conftest.native_kernels)."""
    with native_kernels("loss") as module:
        yield module


@settings(max_examples=60, deadline=None)
@given(
    rows=ROWS,
    width=WIDTHS,
    eps=st.sampled_from([0.0, 0.1, 0.3]),
    scores_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    grad=st.sampled_from(["none", "fp32", "bf16", "in place"]),
    spare=SPARE,
    threads=THREADS,
    seed=SEEDS,
)
def test_chunk_loss_and_gradient_are_the_smoothed_cross_entropy(
    loss_kernel, rows, width, eps, scores_dtype, grad, spare, threads, seed
):
    """Against F.cross_entropy(label_smoothing=eps) and its gradient in fp64, on the scores as
    given (bf16 ones widened exactly); the gradient written in its own dtype."""
    from qkv.loss import chunk_loss

    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(rows, width + spare, generator=g) * 4).to(scores_dtype)[:, :width]
    target = torch.randint(0, width, (rows,), generator=g)
    exact = scores.double().requires_grad_()
    want = F.cross_entropy(exact, target, reduction="sum", label_smoothing=eps)
    (want_grad,) = torch.autograd.grad(want, exact)
    if grad == "in place" and scores_dtype != torch.float32:
        grad = "bf16"
    out = {
        "none": None,
        "fp32": torch.empty(rows, width),
        "bf16": torch.empty(rows, width, dtype=torch.bfloat16),
        "in place": scores,
    }[grad]
    with threads_set_to(threads):
        got = chunk_loss(scores.clone() if grad != "in place" else scores, target, eps, out)
    assert isinstance(got, float)  # the kernel's answer, not PyTorch's
    assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-4 * rows)
    if out is not None:
        tol = 1e-6 if out.dtype == torch.float32 else 8e-3  # bf16 keeps 8 bits
        torch.testing.assert_close(out.double(), want_grad, atol=tol, rtol=tol)


def test_chunk_loss_refuses_a_target_out_of_range(loss_kernel):
    scores, target = torch.randn(2, 5), torch.tensor([1, 5])
    with pytest.raises(RuntimeError, match="target out of range"):
        native.smoothed_cross_entropy_rows(scores, target, 0.1, None)


def test_the_quick_checks_leave_torchs_generator_alone(monkeypatch):
    """Each kernel's once-per-process check runs inside whatever first needs it (a training's
    first dropout, say): it must not draw from PyTorch's default generator, or a run that made
    the check and one that did not (a resumed one in the same process) would drop different
    units. (The dropout check once did, and a resume stopped being bit-identical.)"""
    monkeypatch.setattr(native, "_state", {"built": native._compile()})  # decide afresh
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    checks = (native.kernel, native.gemm, native.choose, native.masks, native.losses)
    for check in (*checks, native.pointwise):
        check()
    assert torch.equal(torch.rand(3), want)


@pytest.fixture(scope="module")
def pointwise():
    """Add-and-norm and the activation, in use whatever their timing says."""
    with native_kernels("pointwise") as module:
        yield module


@settings(max_examples=60, deadline=None)
@given(
    rows=ROWS,
    width=WIDTHS,
    bias=st.booleans(),
    spare=SPARE,
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    threads=THREADS,
    seed=SEEDS,
)
def test_add_layer_norm_is_layer_norm_of_the_sum(
    pointwise, rows, width, bias, spare, scale, threads, seed
):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width + spare, generator=g) * scale + 3 * scale)[:, :width]
    y = torch.randn(rows, width, generator=g) * scale
    norm = torch.nn.LayerNorm(width, bias=bias)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        if bias:
            norm.bias.normal_(generator=g)
        with threads_set_to(threads):
            got = native.add_layer_norm(x, y, norm)
        want = F.layer_norm(
            (x + y).double(),
            (width,),
            norm.weight.double(),
            norm.bias.double() if bias else None,
            1e-5,
        )
    assert got is not None and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "silu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_activation_in_place_is_torchs(pointwise, kind, threads):
    """GELU (erf) and SiLU over the whole float range that matters, and at the edges: as close
    to the fp64 result as PyTorch's own fp32 ops (within fp32's rounding); infinities and NaN
    as fp64's."""
    x = torch.cat(
        [
            torch.linspace(-20, 20, 40_001),
            torch.randn(5000) * 1e-3,
            torch.tensor([0.0, -0.0, 88.0, -88.0, 1e30, -1e30, float("inf"), float("nan")]),
        ]
    )
    mine = x.clone()
    with torch.no_grad(), threads_set_to(threads):
        assert native.activate_(mine, kind)
    exact = getattr(F, kind)(x.double())
    theirs = getattr(F, kind)(x)
    finite = exact.isfinite()
    err = (mine.double() - exact)[finite].abs()
    bound = (theirs.double() - exact)[finite].abs().max() + 1e-6 * exact[finite].abs()
    assert (err <= bound).all(), (x[finite][err > bound], err.max())
    # NaN and infinite results as fp64's (PyTorch's fp32 GELU gives NaN for +inf)
    torch.testing.assert_close(mine[~finite].double(), exact[~finite], equal_nan=True)


def test_the_activation_and_add_norm_refuse_what_they_do_not_take(pointwise):
    """Gradients, other dtypes, other shapes, strided or too large tensors to activate in
    place: None / False, x untouched, so the caller runs PyTorch's ops."""
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(4, 8, requires_grad=True)
    assert native.add_layer_norm(x, x, norm) is None  # training: autograd must see the ops
    with torch.no_grad():
        assert native.add_layer_norm(x.double(), x.double(), norm) is None
        assert native.add_layer_norm(x, x[:, :4], norm) is None
        norm4 = torch.nn.LayerNorm(4)  # strided rows are taken (copied inside), and right
        got = native.add_layer_norm(x.t(), 2 * x.t(), norm4)
        torch.testing.assert_close(got, norm4(3 * x.t()))
        for y in (x.t(), x.double(), torch.randn(native.ACTIVATE_MAX + 1)):
            before = y.clone()
            assert not native.activate_(y, "gelu")
            assert torch.equal(y, before)
        assert not native.activate_(x.clone(), "relu")


def test_post_ln_layers_take_the_kernels_and_decode_as_without_them(pointwise, tiny, monkeypatch):
    """A post-LN GELU model, packed as qkv translate runs it: greedy and beam search give the
    same tokens and scores with add-and-norm and the activation in C++ as with PyTorch's ops,
    and do call them; training's forward does not."""
    from qkv.config import DecodeConfig
    from qkv.packed import pack

    calls = []
    for name in ("add_layer_norm", "activate_"):
        real = getattr(native, name)
        monkeypatch.setattr(
            native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    model = tiny(norm_first=False, activation="gelu")
    src = torch.randint(3, 23, (4, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(src, src).sum().backward()  # gradients: PyTorch's ops, and they flow
    assert "add_layer_norm" in calls and all(p.grad is not None for p in model.parameters())
    calls.clear()
    greedy, beam = DecodeConfig(strategy="greedy"), DecodeConfig(strategy="beam", beam=3, nbest=3)
    with native_kernels("gemm"):  # MKL's product, which the activation follows in place
        model = pack(model)
        assert_decodes_alike(model, src, torch.full((4,), 7), [greedy, beam])
    assert {"add_layer_norm", "activate_"} <= set(calls)


class _Counting:
    """The module, counting calls of its decoder_layer_step."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def decoder_layer_step(self, *args):
        self.calls += 1
        return self.module.decoder_layer_step(*args)


@contextmanager
def layer_step(on: bool):
    """MKL's product, the attention kernel and add-and-norm in use inside, with a decoder
    layer's step in C++ (counted: yields the counter) or from Python (yields None)."""
    names = ("attention", "gemm", "pointwise") + (("step",) if on else ())
    with native_kernels(*names) as module:
        if not on:
            yield None
            return
        counter = _Counting(module)
        native._state["step"] = counter
        yield counter


def with_norms_drawn(model):
    """model with each layer norm's weight and bias drawn at random (a new model's are all ones
    and zeros, alike in every layer: a mix-up between two norms would go unseen)."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model


def assert_same_hypotheses(ours, theirs) -> None:
    """The same tokens, and scores within 1e-5. The two routes run the same kernels and gave
    equal scores on an idle machine; with another process running, int8 and bf16 scores came
    out 2e-6 apart (most likely the products splitting their sums over threads differently
    from one call to the next)."""
    assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def decode_both_ways(model, src, lengths, cfg, **kw):
    """`decode` with the layer step in C++ and from Python: (ours, theirs, C++ calls)."""
    from qkv.search import decode, model_step

    start = kw.pop("start", {})
    out, calls = {}, None
    for on in (True, False):
        with layer_step(on) as counter, torch.inference_mode():
            state = model.start(src) if src is not None else model.start(**start)
            out[on] = decode(model_step(model), state, lengths, cfg, bos=1, eos=2, pad=0, **kw)
            if on:
                calls = counter.calls
    return out[True], out[False], calls


def padded_sources_both_ways(model, strategy: str):
    """decode_both_ways over 4 random sources of 7 tokens, one of them padded after 4 (the
    memory mask hides the rest): greedy, or beam search with 3 beams and all 3 kept."""
    from qkv.config import DecodeConfig

    src = torch.randint(3, 23, (4, 7), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = 0
    cfg = DecodeConfig(strategy=strategy, beam=3, nbest=3 if strategy == "beam" else 1)
    return decode_both_ways(model, src, (src != 0).sum(1), cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_first=False, activation="gelu"),  # Marian's: post-LN
        dict(),  # qkv's default: pre-LN, ReLU
        dict(norm_first=False, activation="silu", bias=False),
    ],
    ids=["post-ln-gelu", "pre-ln-relu", "no-bias-silu"],
)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_layer_step_in_cpp_decodes_as_the_python_route(tiny, overrides, strategy):
    """A packed encoder-decoder: the C++ layer step gives the same tokens and scores (within
    1e-5) as the same kernels called from Python, over padded sources (the memory mask), a
    cache that grows (no room reserved), and beam search's reordered cache (its table) with a
    sentence's beams sharing their cross-attention rows; and it is the route taken, once per
    layer per step."""
    from qkv.packed import pack

    with native_kernels("gemm"):
        model = pack(with_norms_drawn(tiny(**overrides)))
    ours, theirs, calls = padded_sources_both_ways(model, strategy)
    assert_same_hypotheses(ours, theirs)
    longest = max(len(h.tokens) for n in ours for h in n)
    assert longest > 16  # past the cache's first storage: it grew under the C++ step
    assert calls >= longest * len(model.decoder.layers)


def kind_of(packed) -> str:
    """How a Packed multiplies (as PackedDecoderLayer names it for the C++ step)."""
    if packed.native_int8:
        return "qkv_int8"
    return "int8" if packed.int8 else "bf16" if packed.bf16 else "mkl" if packed.mkl else "?"


@pytest.mark.parametrize("small", ["same", "mkl", "plain"])
@pytest.mark.parametrize("weights", ["int8", "qkv_int8", "bf16"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_layer_step_in_cpp_takes_int8_and_bf16_weights(tiny, weights, small, strategy):
    """Packed in int8 (on PyTorch's product or on qkv's) or bf16: every linear map, or (as
    pack's default does at a larger size with PyTorch's int8 or bf16) the feed-forward and
    q/k/v maps, 2,048 and 3,072 weights here, with the 1,024-weight ones in MKL's fp32 product,
    or plain fp32 where MKL's is not in use. The C++ step runs the same int8 product or oneDNN's
    bf16 one (the activation inside its first product) on the same packed weights, so tokens
    and scores (within 1e-5) are the Python route's, and it is the route taken."""
    from qkv.packed import pack
    from qkv.precision import bf16_units

    if weights == "bf16" and not bf16_units(torch.device("cpu")):
        pytest.skip("no bf16 units: bf16 weights take the Python layers")
    model = with_norms_drawn(tiny(norm_first=False, activation="gelu"))
    min_weights = 0 if small == "same" else 2048
    kernels = [*(["gemm"] if small == "mkl" else []), *(["int8"] if weights == "qkv_int8" else [])]
    with native_kernels(*kernels) if kernels else native.off():
        if small == "plain" and kernels:  # (native_kernels restores it)
            native._state["gemm"] = None  # no MKL: the small maps stay plain
        model = pack(model, min_weights=min_weights, int8="int8" in weights, bf16=weights == "bf16")
    linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    kinds = {kind_of(m.packed) for m in linears if isinstance(m, PackedLinear)}
    kinds |= {"plain"} if any(type(m) is torch.nn.Linear for m in linears) else set()
    assert kinds == ({weights} if small == "same" else {weights, small})
    ours, theirs, calls = padded_sources_both_ways(model, strategy)
    assert_same_hypotheses(ours, theirs)
    assert calls >= len(ours[0][0].tokens) * len(model.decoder.layers)


def test_the_layer_step_in_cpp_matches_the_full_forward(tiny):
    """Teacher-forced, step by step through the C++ layer step, a packed post-LN model's
    scores equal the unpacked model's full forward (causal mask, no cache) within 1e-5: an
    oracle that shares neither the cache nor the kernels."""
    from qkv.packed import pack

    full_model = with_norms_drawn(tiny(norm_first=False, activation="gelu"))
    gen = torch.Generator().manual_seed(2)
    src = torch.randint(3, 23, (3, 6), generator=gen)
    tgt = torch.randint(3, 23, (3, 9), generator=gen)
    with torch.inference_mode():
        expected = full_model(src, tgt)  # (B, T, V)
    with native_kernels("gemm"):
        model = pack(with_norms_drawn(tiny(norm_first=False, activation="gelu")))
    with layer_step(True) as counter, torch.inference_mode():
        cache = model.start(src)
        got = torch.cat([model.step(tgt[:, t : t + 1], cache) for t in range(tgt.shape[1])], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counter.calls == tgt.shape[1] * len(model.decoder.layers)


def test_a_language_models_prompts_take_the_layer_step(tiny):
    """A decoder-only model (no cross-attention) continuing left-padded prompts of different
    lengths: the prompt goes through Python (several positions at once), every later step
    through C++ with the padding hidden by the self-attention mask; the tokens, and the scores
    within 1e-5, are the Python route's."""
    from qkv.config import DecodeConfig
    from qkv.packed import pack

    with native_kernels("gemm"):
        model = pack(with_norms_drawn(tiny(arch="decoder-only", activation="silu")))
    prefix = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    offsets = (prefix == 0).sum(1)
    lengths = torch.full((3,), 4)
    cfg = DecodeConfig(strategy="greedy", max_len_a=0, max_len_b=12, min_len=12)
    ours, theirs, calls = decode_both_ways(
        model, None, lengths, cfg, prefix=prefix, start=dict(offsets=offsets)
    )
    assert_same_hypotheses(ours, theirs)
    assert calls > 0


def test_inspection_and_ablations_take_the_python_route(tiny):
    """Recording attention weights, silencing heads, removing a skip connection: each needs
    the Python modules, so the C++ step stands aside for the layer changed, and the outputs
    are the Python route's."""
    from qkv.config import DecodeConfig
    from qkv.packed import pack

    with native_kernels("gemm"):
        model = pack(tiny())
    src = torch.randint(3, 23, (2, 5), generator=torch.Generator().manual_seed(3))
    cfg = DecodeConfig(strategy="greedy", max_len_a=0, max_len_b=6, min_len=6)
    layer = model.decoder.layers[0]
    seen = []
    changes = [
        ("recorder", layer.self_attn, lambda m, w: seen.append(w.shape)),
        ("head_mask", layer.cross_attn, torch.tensor([1.0, 0.0, 1.0, 1.0])),
        ("skip", layer.ff_residual, False),
    ]
    lengths = torch.full((2,), 5)
    _, _, every_layer = decode_both_ways(model, src, lengths, cfg)
    for attr, module, value in changes:
        before = getattr(module, attr)
        setattr(module, attr, value)
        try:
            ours, theirs, calls = decode_both_ways(model, src, lengths, cfg)
        finally:
            setattr(module, attr, before)
        # the changed layer in Python at every step; the other layer still in C++
        assert calls == every_layer // 2, attr
        assert [h[0].tokens for h in ours] == [h[0].tokens for h in theirs]
    assert seen


# --- dropout's draws, as csrc/dropout_bits.h lays them out ---------------------------------------


def splitmix_draws(seed: int, n: int) -> list[int]:
    """Element e's 16-bit draw, computed here from the layout's definition: SplitMix64's word
    w = mix(seed + (w + 1) * golden gamma), element e taking lane (e % 256) // 64 of word
    (e // 256) * 64 + e % 64."""
    m = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    out = []
    for e in range(n):
        w = (e // 256) * 64 + e % 64
        word = mix((seed + (w + 1) * 0x9E3779B97F4A7C15) & m)
        out.append((word >> (16 * ((e % 256) // 64))) & 0xFFFF)
    return out


def test_dropout_mask_follows_its_definition(masks):
    """The C++ mask against the draws computed in Python: kept where the draw is >= the cut."""
    seed, n, cut = 12345, 1000, 30000
    draws = torch.tensor(splitmix_draws(seed, n))
    mask = masks.dropout_mask(torch.empty(n), cut, 2.0, seed)
    assert torch.equal(mask, torch.where(draws >= cut, 2.0, 0.0))


# --- attention with dropout for training (csrc/train_attention.cpp) -----------------------------


@pytest.fixture(scope="module")
def train_kernels():
    """The training attention kernel and dropout's mask, in use whatever their timings say."""
    with native_kernels("train_attention", "masks") as module:
        yield module


def explicit_attention(q, k, v, keep, causal, p, seed):
    """softmax(q k^T / sqrt(Dh)) -> dropout with the mask dropout_mask makes for `seed` over
    (B, H, T, S) -> times v, in fp64 (rows that see no key: zeros)."""
    from qkv.dropout import cut_and_scale

    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    t, s = scores.shape[-2:]
    hidden = torch.zeros(t, s, dtype=torch.bool)
    if causal:
        hidden = ~torch.ones(t, s, dtype=torch.bool).tril()
    if keep is not None:
        hidden = hidden | ~keep
    weights = scores.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0)
    if p > 0:
        cut, scale = cut_and_scale(p, torch.float32)
        mask = native.masks().dropout_mask(torch.empty(weights.shape), cut, scale, seed)
        weights = weights * mask.double()
    return weights @ v


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    t=st.integers(1, 20),
    s=st.integers(1, 40),
    dh=st.sampled_from([8, 32, 40, 64]),
    causal=st.booleans(),
    masked=st.booleans(),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    bf16=st.booleans(),
    threads=THREADS,
    seed=SEEDS,
)
def test_train_attention_against_its_definition(
    train_kernels, b, h, t, s, dh, causal, masked, p, bf16, threads, seed
):
    """Output and the gradients of q, k and v against the explicit math in fp64 on the same
    inputs and the same dropout mask: key padding (some rows seeing no key), causal, any head
    dimension, fp32 or bf16, 1 or 2 threads."""
    from qkv.dropout import cut_and_scale

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, k, v = (torch.randn(b, h, n, dh, generator=gen).to(dtype) for n in (t, s, s))
    g = torch.randn(b, h, t, dh, generator=gen).to(dtype)
    keep = torch.rand(b, 1, 1, s, generator=gen) > 0.3 if masked else None
    cut, scale = cut_and_scale(p, torch.float32)
    expanded = keep.expand(b, h, t, s) if keep is not None else torch.empty(0, dtype=torch.bool)
    with threads_set_to(threads):
        out, lse = train_kernels.train_attention_forward(q, k, v, expanded, causal, cut, scale, 9)
        grads = train_kernels.train_attention_backward(
            g, q, k, v, expanded, causal, cut, scale, 9, lse
        )
    inputs = [x.double().requires_grad_() for x in (q, k, v)]
    want = explicit_attention(*inputs, keep, causal, p, 9)
    wanted = torch.autograd.grad(want, inputs, g.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for got, ref in zip([out, *grads], [want, *wanted], strict=True):
        assert got.dtype == dtype and got.shape == ref.shape
        assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_attention_in_training_takes_the_kernel_and_its_seed(train_kernels):
    """qkv.attention with dropout goes through the kernel, its seed drawn from PyTorch's
    generator (torch.manual_seed reproduces it), gradients through autograd; the explicit
    route with the same seed agrees to fp32's rounding."""
    from qkv.attention import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, n, 16, requires_grad=True) for n in (7, 9, 9))
    mask = torch.rand(4, 1, 1, 9) > 0.2
    torch.manual_seed(3)
    out, _ = attention(q, k, v, mask, dropout=0.2)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_TrainAttentionBackward"
    out.sum().backward()
    torch.manual_seed(3)
    seed = native.seed()
    want = explicit_attention(q.detach(), k.detach(), v.detach(), mask, False, 0.2, seed)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    qq, kk, vv = (x.detach().double().requires_grad_() for x in (q, k, v))
    explicit_attention(qq, kk, vv, mask, False, 0.2, seed).sum().backward()
    for got, ref in ((q, qq), (k, kk), (v, vv)):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_off_turns_off_only_the_named_training_kernels(train_kernels):
    """native.off("train_attention"): attention takes the explicit route inside, the fused
    dropouts stay; unknown names are refused; outside, the kernel is back."""
    from qkv.attention import attention
    from qkv.dropout import relu_dropout

    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    with native.off("train_attention"):
        out, _ = attention(q, q, q, dropout=0.1)
        assert type(out.grad_fn).__name__ != "_TrainAttentionBackward"
        assert type(relu_dropout(q, 0.1).grad_fn).__name__ == "_ReluDropoutBackward"
    out, _ = attention(q, q, q, dropout=0.1)
    assert type(out.grad_fn).__name__ == "_TrainAttentionBackward"
    with pytest.raises(ValueError, match="no training kernel"), native.off("attention"):
        pass
