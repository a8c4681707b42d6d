import pytest
import torch

from qkv.inspect import attention_modules, record_attention


def test_recorded_weights_shapes_and_rows(tiny):
    model = tiny()
    src = torch.randint(3, 20, (2, 9))
    src[1, 6:] = 0
    tgt = torch.randint(3, 20, (2, 5))
    plain = model(src, tgt)
    with torch.no_grad(), record_attention(model) as rec:
        out = model(src, tgt)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)  # recording changes nothing
    assert sorted(rec) == sorted(attention_modules(model))
    assert len(rec) == 2 + 2 * 2
    for path, ws in rec.items():
        (w,) = ws
        kind = path.split(".")[-1]
        t = 9 if path.startswith("encoder") else 5
        s = 5 if kind == "self_attn" and path.startswith("decoder") else 9
        assert w.shape == (2, 4, t, s), path
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, t))
        if s == 9:  # source padding gets no weight
            assert (w[1, :, :, 6:] == 0).all()
    dec_self = rec.last("decoder.layers.1.self_attn")
    assert (dec_self.triu(1) == 0).all()  # the future is hidden
    # after the block, modules no longer record and run the fused kernel
    assert all(m.recorder is None for m in attention_modules(model).values())


def test_recording_during_incremental_decoding(tiny):
    model = tiny()
    src = torch.randint(3, 20, (1, 6))
    cache = model.start(src)
    with torch.no_grad(), record_attention(model) as rec:
        for tok in [1, 5, 7]:
            model.step(torch.tensor([[tok]]), cache)
    steps = rec["decoder.layers.0.self_attn"]
    assert [w.shape[-1] for w in steps] == [1, 2, 3]
    assert all(w.shape == (1, 4, 1, 6) for w in rec["decoder.layers.0.cross_attn"])


def test_recorder_removed_after_error(tiny):
    model = tiny()
    with pytest.raises(RuntimeError, match="boom"), record_attention(model):
        raise RuntimeError("boom")
    assert all(m.recorder is None for m in attention_modules(model).values())
