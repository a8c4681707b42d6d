import math

import pytest
import torch

from qkv.inspect import (
    AttentionKind,
    ablate,
    attention_kind,
    attention_modules,
    head_stats,
    mask_heads,
    record_attention,
    record_hidden,
)


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


def test_nested_blocks_restore_the_outer_block(tiny):
    model = tiny()
    attn = attention_modules(model)["decoder.layers.0.cross_attn"]
    with mask_heads(model, {"decoder.layers.0.cross_attn": [0]}):
        with mask_heads(model, {"decoder.layers.0.cross_attn": [2]}):
            assert attn.head_mask.tolist() == [0.0, 1.0, 0.0, 1.0]  # both silenced inside
        assert attn.head_mask.tolist() == [0.0, 1.0, 1.0, 1.0]  # the outer block still holds
    assert attn.head_mask is None
    residual = model.encoder.layers[1].attn_residual
    with ablate(model, bypass=["encoder.layers.1"]):
        with ablate(model, no_skip=["encoder.layers.1.attn_residual"]):
            assert residual.bypass and not residual.skip
        assert residual.bypass and residual.skip
    assert not residual.bypass and residual.skip


def test_head_stats_hand_computed():
    w = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]])  # (1, 2, 2, 2)
    entropy, top = head_stats(w)
    torch.testing.assert_close(entropy, torch.tensor([math.log(2) / 2, math.log(2)]))
    torch.testing.assert_close(top, torch.tensor([0.75, 0.5]))
    entropy, top = head_stats(w, torch.tensor([[True, False]]))  # the second query is padding
    torch.testing.assert_close(entropy, torch.tensor([0.0, math.log(2)]))
    torch.testing.assert_close(top, torch.tensor([1.0, 0.5]))


def test_attention_kinds_and_hidden_states(tiny):
    model = tiny()
    kinds = {p: attention_kind(p) for p in attention_modules(model)}
    assert kinds["encoder.layers.1.self_attn"] is AttentionKind.ENCODER_SELF
    assert kinds["decoder.layers.0.self_attn"] is AttentionKind.DECODER_SELF
    assert kinds["decoder.layers.0.cross_attn"] is AttentionKind.CROSS
    assert f"{AttentionKind.CROSS}" == "cross"
    src = torch.randint(3, 20, (2, 7))
    with torch.no_grad(), record_hidden(list(model.encoder.layers)) as rec:
        memory, _ = model.encode(src)
    assert [len(r) for r in rec] == [1, 1]
    # the last layer's output, through the final LayerNorm, is the encoder's output
    torch.testing.assert_close(model.encoder.norm(rec[-1][0]), memory)
    assert all(not m._forward_hooks for m in model.encoder.layers)  # hooks removed
