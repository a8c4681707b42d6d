import pytest
import torch

from qkv.models import DecoderOnly, EncoderDecoder, EncoderOnly, count_parameters

ARCH_VARIANTS = [
    dict(),
    dict(norm_first=False),
    dict(positions="learned"),
    dict(activation="gelu", share_embeddings=True),
    dict(tie_output=False, output_bias=True, tgt_vocab_size=31),
]


def batch(b=3, s=9, t=7, vocab=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (b, s), generator=g)
    tgt = torch.randint(3, vocab, (b, t), generator=g)
    tgt[:, 0] = 1
    return src, tgt


@pytest.mark.parametrize("variant", ARCH_VARIANTS, ids=str)
def test_future_tokens_do_not_change_earlier_outputs(tiny, variant):
    model = tiny(**variant)
    src, tgt = batch()
    logits = model(src, tgt)
    assert logits.shape == (3, 7, model.config.target_vocab)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(3, 20, (3, 3))
    logits2 = model(src, changed)
    torch.testing.assert_close(logits2[:, :4], logits[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits2[:, 4:], logits[:, 4:])


@pytest.mark.parametrize("variant", ARCH_VARIANTS[:2], ids=str)
def test_source_padding_changes_nothing(tiny, variant):
    model = tiny(**variant)
    src, tgt = batch(b=1)
    padded = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
    # and in a batch with a longer sentence
    other = torch.randint(3, 20, (1, 14))
    both = torch.cat([padded, other])
    torch.testing.assert_close(
        model(both, tgt.repeat(2, 1))[:1], model(src, tgt), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("variant", ARCH_VARIANTS, ids=str)
def test_incremental_decoding_equals_full_forward(tiny, variant):
    model = tiny(**variant)
    src, tgt = batch()
    src[1, -3:] = 0  # padding in the source too
    full = model(src, tgt)
    # one token at a time
    cache = model.start(src)
    steps = [model.step(tgt[:, i : i + 1], cache) for i in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # several at once: 3, then 1, then 3
    cache = model.start(src)
    parts = [model.step(tgt[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 7)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 7


def test_incremental_after_select_equals_full(tiny):
    model = tiny()
    src, tgt = batch()
    cache = model.start(src)
    model.step(tgt[:, :4], cache)
    index = torch.tensor([2, 0, 0, 1])  # reorder, duplicate and drop rows, as beam search does
    cache.select(index)
    got = model.step(tgt[index, 4:], cache)
    want = model(src[index], tgt[index])[:, 4:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the cache keeps growing past its first capacity after a select
    more = torch.randint(3, 20, (4, 20))
    got = model.step(more, cache)
    want = model(src[index], torch.cat([tgt[index], more], 1))[:, 7:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_cache_with_room_reserved_never_grows(tiny):
    """start(src, steps): the self-attention caches make room for `steps` positions at the
    first append, so later steps (a beam search's expansion to K rows aside) copy no key; and
    steps one at a time still equal the full forward."""
    model = tiny()
    src, tgt = batch()
    tgt = torch.cat([tgt, torch.randint(3, 20, (3, 20))], 1)  # 27 positions
    with torch.no_grad():
        cache = model.start(src, steps=27)
        rows = torch.tensor([0, 0, 1, 1, 2, 2])
        steps = [model.step(tgt[:, :1], cache)]
        cache.select(rows)  # two beams a sentence: more rows than stored
        steps.append(model.step(tgt[rows, 1:2], cache))
        c = cache.self_attn[0]
        storage = c.stored()[0].data_ptr()
        steps += [model.step(tgt[rows, i : i + 1], cache) for i in range(2, 27)]
        assert c.stored()[0].data_ptr() == storage and c._k.shape[2] == 27
        # position-major storage: one step's keys of a row are one block, all heads together
        assert c._k[3, :, 26].is_contiguous() and c._v[3, :, 26].is_contiguous()
        want = model(src[rows], tgt[rows])
    torch.testing.assert_close(torch.cat([steps[0][rows], *steps[1:]], 1), want)
    unreserved = model.start(src)
    model.step(tgt[:, :17], unreserved)  # past the default first room of 16: it grew
    assert unreserved.self_attn[0]._k.shape[2] == 34


def test_beams_share_their_sentence_cross_attention_rows(tiny):
    from qkv.inspect import record_attention

    model = tiny()
    src, tgt = batch()
    src[1, -3:] = 0  # a padded source: its mask must follow its keys
    k = 4
    cache = model.start(src)
    cache.select(torch.arange(3).repeat_interleave(k))  # beam search's start: K rows each
    assert [c.rows for c in cache.cross_attn] == [3, 3] and cache.cross_attn[0].group == k
    rows = torch.arange(3).repeat_interleave(k)
    with record_attention(model) as rec:
        got = model.step(tgt[rows, :4], cache)
    with record_attention(model) as want_rec:
        want = model(src[rows], tgt[rows, :4])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    name = "decoder.layers.1.cross_attn"
    torch.testing.assert_close(rec[name][0], want_rec[name][0], atol=1e-6, rtol=1e-5)
    # reorder among beams and drop sentence 1: the shared rows follow the sentences
    index = torch.tensor([3, 3, 1, 0, 8, 9, 11, 11])
    cache.select(index)
    assert [c.rows for c in cache.cross_attn] == [2, 2] and cache.memory_mask.shape[0] == 2
    rows = rows[index]
    tokens = torch.cat([tgt[rows, :4], tgt[:2, 4:].repeat(4, 1)], 1)
    got = model.step(tokens[:, 4:], cache)
    torch.testing.assert_close(got, model(src[rows], tokens)[:, 4:], atol=1e-5, rtol=1e-5)


def test_one_model_serves_two_decodes_at_once(tiny):
    model = tiny()
    src, tgt = batch()
    a, b = model.start(src[:1]), model.start(src[1:])
    outs_a, outs_b = [], []
    for i in range(tgt.shape[1]):  # interleaved steps
        outs_a.append(model.step(tgt[:1, i : i + 1], a))
        outs_b.append(model.step(tgt[1:, i : i + 1], b))
    torch.testing.assert_close(torch.cat(outs_a, 1), model(src[:1], tgt[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs_b, 1), model(src[1:], tgt[1:]), atol=1e-5, rtol=1e-5)


def test_decoder_only_causal_cache_and_padding(tiny):
    model = tiny(arch="decoder-only")
    assert isinstance(model, DecoderOnly)
    _, ids = batch(t=10)
    full = model(ids)
    cache = model.start()
    steps = torch.cat(
        [model.step(ids[:, :6], cache)]
        + [model.step(ids[:, i : i + 1], cache) for i in range(6, 10)],
        1,
    )
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    changed = ids.clone()
    changed[:, 5:] = 4
    torch.testing.assert_close(model(changed)[:, :5], full[:, :5], atol=1e-5, rtol=1e-5)
    # right padding with a padding mask leaves real positions unchanged
    from qkv.masks import padding_mask

    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    got = model(padded, padding_mask(padded, 0))[:, :10]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_encoder_only_pooling_ignores_padding(tiny):
    model = tiny(arch="encoder-only", n_classes=3)
    assert isinstance(model, EncoderOnly)
    src, _ = batch(b=1)
    x, pooled = model.encode(src)
    torch.testing.assert_close(pooled, x.mean(1))
    padded = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(model.encode(padded)[1], pooled, atol=1e-5, rtol=1e-5)
    assert model(src).shape == (1, 3)
    lm = tiny(arch="encoder-only")
    assert lm(src).shape == (1, src.shape[1], 23)


def test_tying_and_sharing(tiny):
    model = tiny(share_embeddings=True)
    assert isinstance(model, EncoderDecoder)
    assert model.encoder.embed.token is model.decoder.embed.token
    assert model.lm_head.weight is model.decoder.embed.token.weight
    untied = tiny(tie_output=False)
    assert untied.lm_head.weight is not untied.decoder.embed.token.weight
    assert count_parameters(untied) == count_parameters(tiny()) + 23 * 32


def test_max_len_is_enforced(tiny):
    model = tiny(max_len=8)
    src, tgt = batch(s=9)
    with pytest.raises(ValueError, match="max_len"):
        model(src, tgt)
