"""Import a Hugging Face MarianMTModel: same logits, same greedy and beam outputs, offline."""

import json

import pytest
import torch
import transformers  # noqa: E402  (a test-only dependency, in the [test] extra)

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.marian import MarianImportError, convert
from qkv.packed import pack
from qkv.search import decode, model_step

V, PAD, EOS = 60, 59, 0
MAX_NEW = 24


def random_marian(vocab: int, std: float = 0.1) -> transformers.MarianMTModel:
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=vocab - 1,
        eos_token_id=EOS,
        decoder_start_token_id=vocab - 1,
        activation_function="swish",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        forced_eos_token_id=None,
    )
    model = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():
        # larger random weights than HF's init, so outputs depend on the input, and a bias on
        # eos so that some outputs end before the length limit and others are cut by it
        for name, p in model.named_parameters():
            if "layer_norm" not in name and "embed_positions" not in name:
                p.normal_(0, std)
        model.final_logits_bias.zero_()
        model.final_logits_bias[0, EOS] = 2.0
    return model


@pytest.fixture(scope="module")
def hf_model():
    return random_marian(V)


@pytest.fixture(scope="module")
def converted_dir(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    hf_model.save_pretrained(root / "hf")
    return convert(root / "hf", root / "qkv")


@pytest.fixture(scope="module")
def converted(converted_dir):
    model, _, meta = checkpoint.load(converted_dir)
    assert meta["imported_from"] == "marian"
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    lengths = [9, 4, 12, 6, 1]
    src = torch.full((len(lengths), max(lengths) + 1), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(1, V - 1, (n,), generator=g)
        src[i, n] = EOS
    return src, torch.tensor(lengths) + 1


def test_logits_agree(hf_model, converted):
    src, _ = batch()
    tgt = torch.randint(1, V - 1, (src.shape[0], 7), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = PAD  # Marian starts decoding from the pad token
    with torch.no_grad():
        want = hf_model(
            input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt
        ).logits
        got = converted(src, tgt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sentence_embeddings_of_an_imported_model_match_hf_encoder_mean_pooled(hf_model, converted):
    from qkv.sentences import embed

    src, _ = batch()
    mask = (src != PAD).long()
    with torch.no_grad():
        hidden = hf_model.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
        want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        got = embed(converted, src, "mean")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _hf_outputs(seqs: torch.Tensor, pad: int = PAD) -> list[list[int]]:
    out = []
    for row in seqs.tolist():
        row = row[1:]  # drop the start token; cut at eos, or at the length limit
        out.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != pad])
    return out


def both_searches(hf, model, src, lengths, beam: int, max_new: int, pad: int = PAD):
    """HF generate's outputs and qkv's, for the same search: greedy or beam, length penalty 1,
    at most max_new tokens (the settings `qkv translate --penalty power --alpha 1 --at-max
    stop` gives)."""
    with torch.no_grad():
        hf_out = hf.generate(
            input_ids=src,
            attention_mask=(src != pad).long(),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=max_new,
            length_penalty=1.0,
            early_stopping=False,
            bad_words_ids=[[pad]],
            min_length=0,
        )
        cfg = DecodeConfig(
            strategy="greedy" if beam == 1 else "beam",
            beam=beam,
            alpha=1.0,
            penalty="power",
            max_len_a=0,
            max_len_b=max_new,  # HF's max_new_tokens
            at_max="stop",
        )
        hyps = decode(model_step(model), model.start(src), lengths, cfg, bos=pad, eos=EOS, pad=pad)
    return _hf_outputs(hf_out, pad), [n[0].tokens for n in hyps]


@pytest.fixture(scope="module")
def packed(converted_dir):
    """The converted model with prepacked linear layers, as qkv translate runs it."""
    model, _, _ = checkpoint.load(converted_dir)
    return pack(model, min_weights=0)  # every layer, small as they are here


@pytest.mark.parametrize("packed_weights", [False, True])
@pytest.mark.parametrize("max_new", [MAX_NEW, 3])  # 3: some outputs are cut by the limit
@pytest.mark.parametrize("beam", [1, 4])
def test_search_outputs_identical(hf_model, converted, packed, beam, max_new, packed_weights):
    if packed_weights:
        converted = packed
    src, lengths = batch()
    want, ours = both_searches(hf_model, converted, src, lengths, beam, max_new)
    if max_new == MAX_NEW:
        assert len({len(w) for w in want}) > 1  # varied output lengths
    else:
        assert any(len(w) == max_new for w in want)  # cut by the limit
    assert ours == want


@pytest.mark.parametrize("beam", [1, 4])
def test_search_outputs_identical_over_a_large_vocabulary(beam, tmp_path):
    """Rows long enough for search's block-wise argmax and top-k (qkv.search.BLOCK), with a
    last, shorter block: still HF's outputs."""
    vocab = 2601  # 40 blocks of 64 and a block of 41; beam 4 ranks 4 x 2601 scores per sentence
    hf = random_marian(vocab, std=0.2)  # larger weights, so outputs depend on the input
    hf.save_pretrained(tmp_path / "hf")
    model = pack(checkpoint.load(convert(tmp_path / "hf", tmp_path / "qkv"))[0])
    pad = vocab - 1
    src = torch.randint(1, pad, (6, 10), generator=torch.Generator().manual_seed(3))
    src[:, -1] = EOS
    want, ours = both_searches(hf, model, src, torch.full((6,), 10), beam, MAX_NEW, pad)
    assert len({tuple(w) for w in want}) > 2  # outputs that differ
    assert ours == want


def test_bin_weights_read_without_pickle(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model, _, _ = checkpoint.load(convert(tmp_path / "hf", tmp_path / "qkv"))
    src, _ = batch()
    tgt = torch.full((src.shape[0], 1), PAD)
    with torch.no_grad():
        want = hf_model(
            input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt
        ).logits
        torch.testing.assert_close(model(src, tgt), want, atol=1e-4, rtol=1e-4)
    # a pickle carrying an object (not just tensors) is refused
    torch.save({"x": torch.zeros(1), "evil": object()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(MarianImportError, match="cannot be read safely"):
        convert(tmp_path / "hf", tmp_path / "qkv2")


def test_bad_directories(tmp_path):
    with pytest.raises(MarianImportError, match="no config.json"):
        convert(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5}))
    with pytest.raises(MarianImportError, match="lacks"):
        convert(tmp_path, tmp_path / "out")


def test_cli_import_and_translate_text(hf_model, tmp_path, capsys):
    import sentencepiece as spm

    from qkv.cli import main

    text = ["ein kleiner Test", "noch ein Satz hier", "kleiner Satz"] * 10
    (tmp_path / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=20,
        model_type="unigram",
        minloglevel=2,
    )
    hf = tmp_path / "hf"
    hf_model.save_pretrained(hf)
    for name in ("source.spm", "target.spm"):
        (hf / name).write_bytes((tmp_path / "sp.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {"</s>": EOS, "<unk>": 1, "<pad>": PAD}
    for p in pieces:
        vocab.setdefault(p, len(vocab) - 1)
    (hf / "vocab.json").write_text(json.dumps(vocab))
    assert main(["import-marian", str(hf), "--out", str(tmp_path / "qkv")]) == 0
    model, tok, _ = checkpoint.load(tmp_path / "qkv")
    (ids,) = tok.encode_target_batch(["noch ein kleiner Satz"])
    assert tok.decode(ids) == "noch ein kleiner Satz"
    capsys.readouterr()
    lines = ["ein kleiner Test", "noch ein Satz", "Satz hier"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    hf_flags = ["--penalty", "power", "--alpha", "1", "--at-max", "stop", "--max-len-a", "0"]
    for beam in ("1", "3"):
        argv = ["translate", "--model", str(tmp_path / "qkv"), "--input", str(tmp_path / "in.txt")]
        assert main([*argv, "--beam", beam, *hf_flags, "--max-len-b", "8"]) == 0
        printed = capsys.readouterr().out.splitlines()
        # HF generate on the same ids, with max_new_tokens=8, decoded by the same vocabulary
        src = [ids + [EOS] for ids in tok.encode_batch(lines)]
        width = max(map(len, src))
        ids = torch.tensor([s + [PAD] * (width - len(s)) for s in src])
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=(ids != PAD).long(),
                num_beams=int(beam),
                do_sample=False,
                max_new_tokens=8,
                length_penalty=1.0,
                early_stopping=False,
                bad_words_ids=[[PAD]],
            )
        assert printed == [tok.decode(t) for t in _hf_outputs(out)]
    assert main(["import-marian", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


class DigitsTokenizer:
    """A stand-in for Marian's sentencepiece vocabulary: "5 7 9" <-> ids [5, 7, 9]."""

    vocab_size, unk_id = V, 1

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]

    encode_target_batch = encode_batch

    def decode(self, ids):
        return " ".join(str(i) for i in ids if i not in (PAD, EOS))

    def id_to_token(self, i):
        return str(i)


def test_probe_uses_marian_ids(hf_model, converted):
    """The probe's loss on an imported model is HF's loss on the same pairs: Marian's padding,
    start and end ids (59, 59, 0), not qkv's 0/1/2."""
    from qkv.probe import Prober
    from qkv.translate import Translator

    g = torch.Generator().manual_seed(4)
    pairs = []
    for n, m in ((5, 3), (2, 6), (7, 7)):
        src, tgt = (
            torch.randint(1, V - 1, (n,), generator=g),
            torch.randint(1, V - 1, (m,), generator=g),
        )
        pairs.append((" ".join(map(str, src.tolist())), " ".join(map(str, tgt.tolist()))))
    prober = Prober(Translator(converted, DigitsTokenizer()), pairs, log=lambda m: None)
    ours = prober.loss()
    src = [[int(w) for w in s.split()] + [EOS] for s, _ in pairs]
    labels = [[int(w) for w in t.split()] + [EOS] for _, t in pairs]
    width_s, width_t = max(map(len, src)), max(map(len, labels))
    ids = torch.tensor([s + [PAD] * (width_s - len(s)) for s in src])
    lab = torch.tensor([t + [-100] * (width_t - len(t)) for t in labels])
    with torch.no_grad():
        want = hf_model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=lab).loss
    assert ours == pytest.approx(want.item(), rel=1e-5)
