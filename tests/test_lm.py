"""The decoder alone: the language-model task, tokenizers, generation, the nanoGPT importer."""

import gzip
import json
import math
import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.cli import main
from qkv.config import ConfigError, DecodeConfig, ModelConfig, TrainConfig
from qkv.generate import Generator
from qkv.models import DecoderOnly
from qkv.presets import PRESETS
from qkv.tasks import task_for
from qkv.tokenizer import Characters, Subwords
from qkv.train import cosine, learning_rate
from qkv.train import train as train_task

ALPHABET = string.ascii_letters + " \n.,;:!?'-"
TEXT = (
    "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n" * 30
)


def lm_config(**overrides) -> ModelConfig:
    shape, _ = PRESETS["shakespeare-char"]
    base = dict(d_model=32, n_heads=4, d_ff=64, n_decoder_layers=2, vocab_size=40, max_len=48)
    return shape.replace(**{**base, **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = DecoderOnly(lm_config(output_bias=True)).eval()
    with torch.no_grad():  # an untrained model: keep it from ending (eos) or saying <unk>
        m.lm_head.bias[:4] = -1e4
    return m


# --- the model: causal, cached ----------------------------------------------------------------


def test_future_characters_leave_earlier_logits_unchanged(model):
    ids = torch.randint(4, 40, (2, 30))
    full = model(ids)
    for cut in (1, 7, 29):
        changed = ids.clone()
        changed[:, cut:] = torch.randint(4, 40, (2, 30 - cut))
        torch.testing.assert_close(model(changed)[:, :cut], full[:, :cut])
    # and the position really matters: the same token at two positions gets different logits
    same = torch.full((1, 5), 7)
    assert not torch.allclose(model(same)[0, 1], model(same)[0, 4])


def test_cached_generation_equals_the_full_forward_token_by_token(model):
    ids = torch.randint(4, 40, (3, 40))
    full = model(ids)
    cache = model.start()
    logits = [model.step(ids[:, :5], cache)]  # a prompt, then one token at a time
    logits += [model.step(ids[:, i : i + 1], cache) for i in range(5, 40)]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_equal_unpadded_ones(model):
    """Prompts of different lengths in one batch: the pads change nothing, step after step."""
    long, short = [5, 6, 7, 8, 9], [10, 11]
    cache = model.start(torch.tensor([0, 3]))
    first = model.step(torch.tensor([long, [0, 0, 0] + short]), cache)[:, -1]
    second = model.step(torch.tensor([[12], [13]]), cache)[:, -1]
    cache.select(torch.tensor([1, 1, 0]))  # beam search reorders rows: the pads follow
    third = model.step(torch.tensor([[14], [14], [15]]), cache)[:, -1]
    for row, (prompt, nxt, after) in enumerate([(long, 12, 15), (short, 13, 14)]):
        alone = model.start()
        want = [model.step(torch.tensor([prompt]), alone)[:, -1]]
        want.append(model.step(torch.tensor([[nxt]]), alone)[:, -1])
        want.append(model.step(torch.tensor([[after]]), alone)[:, -1])
        got = [first[row], second[row], third[2 if row == 0 else 0]]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w[0], atol=1e-5, rtol=1e-5)


# --- tokenizers -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=200))
def test_characters_round_trip_any_text_of_the_alphabet(text):
    tok = Characters.of(ALPHABET)
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids, default=4) >= 4
    assert tok.decode(ids) == text


BYTES = Subwords.train_bytes([TEXT], vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=200))
def test_byte_bpe_round_trips_any_text_of_the_alphabet(text):
    ids = BYTES.encode(text)
    assert BYTES.decode(ids) == text
    assert BYTES.unk_id not in ids


def test_byte_bpe_round_trips_any_unicode():
    for text in ["naïve café — 東京 🙂", "  two  spaces\n\n\ttab", "\x00\x01"]:
        assert BYTES.decode(BYTES.encode(text)) == text
    assert len(BYTES.encode(TEXT[:200])) < 120  # it learned merges: fewer tokens than bytes


def test_character_vocabulary_is_sorted_after_the_specials():
    tok = Characters.of("cab\n")
    assert tok.encode("abc\n") == [5, 6, 7, 4]
    assert tok.vocab_size == 8 and tok.id_to_token(5) == "a"
    assert tok.unknown("abz!") == ["!", "z"]


# --- the task ---------------------------------------------------------------------------------


def lm_run(tmp_path, text=TEXT, **train):
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    shape, recipe = PRESETS["shakespeare-char"]
    settings = dict(
        dataset=None,
        text_file=str(path),
        block_size=32,
        max_tokens=16 * 32,
        lr=3e-3,
        warmup=10,
        max_minutes=0.0,
        max_steps=120,
        schedule="cosine",
        min_lr=1e-4,
        eval_every=60,
        save_every=60,
        log_every=1000,
    )
    cfg = recipe.replace(**{**settings, **train})
    model_cfg = shape.replace(d_model=48, n_heads=4, d_ff=96, n_decoder_layers=2)
    return train_task(task_for(cfg), model_cfg, cfg, tmp_path / "run", log=lambda m: None)


def test_a_tiny_model_learns_a_repeated_string(tmp_path):
    trainer = lm_run(tmp_path, text="abcdefghij" * 300)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_guess = math.log(trainer.model_cfg.vocab_size)  # 2.6 nats: uniform over 14 tokens
    assert rows[-1]["valid_loss"] < 0.05 < first_guess
    assert rows[-1]["valid_ppl"] == pytest.approx(math.exp(rows[-1]["valid_loss"]))
    # the best checkpoint is the lowest validation loss, and it generates the string on
    gen = generator(tmp_path / "run")
    out = gen.generate(["cdef"], DecodeConfig(strategy="greedy"), 12)[0]
    assert out.text == "ghijabcdefgh" and not out.ended


def generator(path) -> Generator:
    from qkv.checkpoint import load

    model, tok, meta = load(path)
    assert meta["task"] == "lm"
    return Generator(model, tok)


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    trainer = lm_run(tmp_path, max_steps=20, eval_every=10)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    weights = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    again = train_task(
        task_for(trainer.cfg),
        trainer.model_cfg,
        trainer.cfg,
        tmp_path / "run",
        resume=True,
        log=lambda m: None,
    )
    assert again.step == 20
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == weights


def test_validation_reports_nats_per_token_and_per_character(tmp_path):
    lm_run(tmp_path, tokenizer="bpe", vocab_size=300, max_steps=20, eval_every=20)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # BPE tokens hold more than one character: fewer nats per character than per token
    assert row["valid_nats_per_char"] < row["valid_loss"]
    assert row["valid_ppl"] == pytest.approx(math.exp(row["valid_loss"]))


def test_lm_batches_are_random_windows_fixed_per_epoch(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    cfg = TrainConfig(task="lm", dataset=None, text_file=str(path), tokenizer="char", block_size=16)
    task = task_for(cfg)
    task.prepare(lm_config(), tmp_path / "out", False, lambda m: None)
    assert task.batches(0) == task.batches(0) != task.batches(1)
    batch = task.collate(task.batches(0)[0])
    assert batch.x.shape == batch.y.shape == (cfg.max_tokens // 16, 16)
    assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # y is x shifted by one
    assert len(task.valid_ids) == len(TEXT) - int(len(TEXT) * 0.9)  # nanoGPT's 90/10 split


def test_validation_subsets_spread_over_the_whole_text():
    from qkv.tasks.lm import spread

    assert spread(list(range(10)), 0) == list(range(10)) == spread(list(range(10)), 12)
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread(list(range(100)), 4) == [0, 25, 50, 75]


def test_cosine_schedule_ends_at_min_lr():
    assert cosine(0.0, 1, 0, 0.1) == 1.0 and cosine(1.0, 50, 0, 0.1) == pytest.approx(0.1)
    assert cosine(0.5, 50, 0, 0.0) == pytest.approx(0.5)
    assert cosine(0.9, 5, 10, 0.0) == 0.5  # still warming up
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=0, schedule="cosine", max_steps=100)
    assert learning_rate(cfg, 100, 0.0) == pytest.approx(1e-4)
    # a minutes budget: half the time used is half-way down the cosine
    timed = cfg.replace(max_steps=0, max_minutes=2.0)
    assert learning_rate(timed, 1, 60.0) == pytest.approx(1e-4 + 0.5 * 9e-4)
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(schedule="cosine")


# --- generation -------------------------------------------------------------------------------


def test_generation_equals_teacher_forcing_the_continuation(model):
    tok = Characters.of(ALPHABET[:36])
    gen = Generator(model, tok)
    out = gen.generate(["abc"], DecodeConfig(strategy="greedy"), 20)[0]
    ids = torch.tensor([tok.encode("abc") + out.tokens])
    with torch.no_grad():
        log_probs = model(ids).log_softmax(-1)[0, 2:-1]  # predictions of the generated tokens
    assert log_probs.argmax(-1).tolist() == out.tokens[: len(log_probs)]
    chosen = log_probs.gather(1, torch.tensor(out.tokens)[:, None]).sum()
    assert len(out.tokens) == 20 and not out.ended
    assert out.log_prob == pytest.approx(float(chosen), abs=1e-3)


def test_generation_reserves_its_cache_once(model, monkeypatch):
    """The generator gives the cache room for the prompt and every new token, so each layer's
    cache is laid out once, at its first append, and never copied into a larger one (a prompt
    of 3 and 20 new tokens pass the default first room of 16)."""
    from qkv.cache import KVCache

    grows = []
    real = KVCache._grow
    monkeypatch.setattr(
        KVCache,
        "_grow",
        lambda self, like, room, rows: grows.append(room) or real(self, like, room, rows),
    )
    out = Generator(model, Characters.of(ALPHABET[:36])).generate(
        ["abc"], DecodeConfig(strategy="greedy"), 20
    )[0]
    assert len(out.tokens) == 20
    assert len(grows) == len(model.decoder.layers) and min(grows) >= 3 + 20


def test_streaming_shows_the_same_text_and_batches_match_single_prompts(model):
    tok = Characters.of(ALPHABET[:36])
    gen = Generator(model, tok)
    seen: dict[int, str] = {}
    cfg = DecodeConfig(strategy="greedy")
    prompts = ["abc", "hello", "xyz", "hellp"]  # two lengths: two batches
    batched = gen.generate(prompts, cfg, 15, lambda i, text: seen.__setitem__(i, text))
    assert [seen[i] for i in range(4)] == [g.text for g in batched]
    alone = [gen.generate([p], cfg, 15)[0].text for p in prompts]
    assert [g.text for g in batched] == alone


def test_sampling_is_reproducible_for_a_seed(model):
    tok = Characters.of(ALPHABET[:36])
    gen = Generator(model, tok)
    cfg = DecodeConfig(strategy="sample", seed=5, top_k=10)
    a = [g.text for g in gen.generate(["ab"] * 4, cfg, 30)]
    assert a == [g.text for g in gen.generate(["ab"] * 4, cfg, 30)]
    assert a != [g.text for g in gen.generate(["ab"] * 4, cfg.replace(seed=6), 30)]
    assert len(set(a)) > 1  # rows of one batch draw independently
    two_batches = Generator(model, tok, batch_size=2).generate(["ab"] * 4, cfg, 30)
    assert two_batches[0].text != two_batches[2].text  # and so do rows of different batches


def test_generation_past_the_context_slides(model):
    tok = Characters.of(ALPHABET[:36])
    gen = Generator(model, tok)  # context 48
    cfg = DecodeConfig(strategy="sample", seed=3)  # sampled: varied text, unlike a random greedy
    long = gen.generate(["abc"], cfg, 100)[0]
    assert len(long.tokens) == 100 and long.slid == 3  # 45 + 24 + 24 + 7 new tokens
    # up to the context the output is the plain one
    short = gen.generate(["abc"], cfg, 45)[0]
    assert long.tokens[:45] == short.tokens and short.slid == 0
    # the next 24 tokens continue the last half of the context (segment 1 draws with seed + 1)
    seen = tok.decode((tok.encode("abc") + long.tokens)[:48][-24:])
    again = gen.generate([seen], cfg.replace(seed=4), 24)[0]
    assert again.tokens == long.tokens[45:69] and again.slid == 0
    # beam search stops at the context instead
    beam = gen.generate(["abc"], DecodeConfig(strategy="beam", beam=3), 100)[0]
    assert len(beam.tokens) == 48 - 3


# --- the nanoGPT importer, against Hugging Face's GPT-2 (the same architecture) ----------------


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_import_matches_hf_gpt2(tmp_path, bias):
    transformers = pytest.importorskip("transformers")
    from qkv.checkpoint import load
    from qkv.nanogpt import convert

    text = "hello world, the quick brown fox\n"
    n_chars = len(set(text))
    hf_cfg = transformers.GPT2Config(
        vocab_size=n_chars,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu",  # exact GELU, as nanoGPT's nn.GELU()
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases: random ones test their mapping
        for name, p in hf.transformer.named_parameters():
            if name.endswith(".bias"):  # none in nanoGPT's default: zero ones compute the same
                p.normal_(0, 0.1) if bias else p.zero_()
    # nanoGPT's layout: nn.Linear (out, in) where GPT-2 has Conv1D (in, out)
    sd = {}
    for k, v in hf.transformer.state_dict().items():
        if k.endswith((".attn.bias", ".masked_bias")) or (not bias and "bias" in k):
            continue
        conv = any(k.endswith(f"{m}.weight") for m in ("c_attn", "c_proj", "c_fc"))
        sd["transformer." + k] = v.t().contiguous() if conv else v
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, bias=bias, vocab_size=n_chars)
    ckpt, text_file = tmp_path / "ckpt.pt", tmp_path / "input.txt"
    torch.save({"model": sd, "model_args": args, "iter_num": 0}, ckpt)
    text_file.write_text(text)
    convert(ckpt, text_file, tmp_path / "qkv")
    model, tok, meta = load(tmp_path / "qkv")
    ids = torch.tensor([tok.encode("the fox, hello")])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids - 4).logits
    torch.testing.assert_close(ours[..., 4:], theirs, atol=1e-4, rtol=1e-4)
    assert ours[..., :4].max() < -1000  # the special tokens are never predicted
    assert meta["task"] == "lm"
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias") and "lm_head" not in n]
    assert bool(biases) == bias


def test_nanogpt_import_refuses_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "c.pt").write_text("not a checkpoint\n")
    (tmp_path / "t.txt").write_text("abc")
    argv = ["import-nanogpt", str(tmp_path / "c.pt"), "--text", str(tmp_path / "t.txt")]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "weights_only=True" in err


def test_nanogpt_import_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abc")
    args = dict(vocab_size=3, n_layer=1, n_head=2, n_embd=8, block_size=4, bias=False)
    cases = [{"model": {}, "model_args": dict(vocab_size=3)}, {"model": {}, "model_args": args}]
    for i, saved in enumerate(cases):  # no shape at all; a shape but no weights
        torch.save(saved, tmp_path / f"c{i}.pt")
        argv = ["import-nanogpt", str(tmp_path / f"c{i}.pt"), "--text", str(tmp_path / "t.txt")]
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "nanoGPT" in err
    assert not (tmp_path / "o").exists()


def test_nanogpt_import_refuses_the_wrong_text(tmp_path):
    torch.save({"model": {}, "model_args": dict(vocab_size=65)}, tmp_path / "c.pt")
    (tmp_path / "t.txt").write_text("abc")
    assert (
        main(
            [
                "import-nanogpt",
                str(tmp_path / "c.pt"),
                "--text",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


# --- the command line: bad input is one line and exit 2 ----------------------------------------


def bad_text_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "ok.txt").write_text(TEXT)
    (tmp_path / "ok.txt.gz").write_bytes(gzip.compress(TEXT.encode()))
    (tmp_path / "valid_outside.txt").write_text(TEXT + "Zebra ~ 42\n")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text", "empty.txt"], "empty.txt: empty file"),
        (["--text", "bad.txt"], "bad.txt:2: invalid UTF-8"),
        (["--text", "short.txt"], "short.txt: 8 tokens, shorter than one window"),
        (["--text", "ok.txt", "--valid-text", "valid_outside.txt"], "not in the training text"),
        (["--text", "missing.txt"], "missing.txt: no such file"),
    ],
)
def test_bad_text_gives_one_line_and_exit_2(tmp_path, capsys, flags, message, monkeypatch):
    bad_text_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--task", "lm", "--tokenizer", "char", "--block-size", "64"]
    assert main([*argv, *flags, "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("qkv: error:")
    assert not (tmp_path / "run" / "last").exists()


def test_generate_from_the_command_line(tmp_path, capsys):
    lm_run(tmp_path, text="abcdefghij" * 300, max_steps=60)
    model = str(tmp_path / "run")
    assert main(["generate", "--model", model, "cde", "--greedy", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "cdefghij\n"
    assert main(["generate", "--model", model, "c€", "--greedy"]) == 2
    assert "does not know: ['€']" in capsys.readouterr().err
    assert main(["generate", "--model", model, "ab", "--beam", "3", "--top-k", "4"]) == 2
    assert main(["generate", "--model", model, "ab", "--max-len-b", "4"]) == 2
    capsys.readouterr()
    assert main(["translate", "--model", model]) == 2  # a language model does not translate
    assert "a model for lm, not for translation" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("ab\nfgh\n")
    argv = ["generate", "--model", model, "--input", str(tmp_path / "p.txt"), "--jsonl"]
    assert main([*argv, "--greedy", "--max-new-tokens", "3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["cde", "ija"]
    (tmp_path / "p.txt").write_text("ab\n\nfgh\n")  # a blank line: named, nothing generated
    assert main([*argv, "--greedy"]) == 2
    assert "prompt 2: the prompt is empty" in capsys.readouterr().err


# --- attention visible: explain and probe ------------------------------------------------------


def test_explain_shows_causal_self_attention_over_prompt_and_output(model, tmp_path):
    from qkv.explain import explain_generation, write_artifacts
    from qkv.inspect import AttentionKind

    gen = Generator(model, Characters.of(ALPHABET[:35] + " "))
    e = explain_generation(gen, "abc d", DecodeConfig(strategy="greedy"), 10)
    assert list(e.attention) == [AttentionKind.DECODER_SELF]  # no encoder, no cross-attention
    layers = e.attention[AttentionKind.DECODER_SELF]
    assert len(layers) == 2 and layers[0].shape == (4, 15, 15)  # (H, T, T) over 5 + 10 tokens
    for w in layers:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 15))  # each row sums to 1
        assert w.triu(1).abs().max() == 0  # no weight on the future
    assert (
        e.tgt_in[:5] == ["a", "b", "c", "␣", "d"]
        and e.translation == gen.generate(["abc d"], DecodeConfig(strategy="greedy"), 10)[0].text
    )
    written = write_artifacts(e, tmp_path)
    assert {p.name for p in written} == {"decoder_self.png", "attention.html"}
    assert '"default_kind": "decoder self"' in (tmp_path / "attention.html").read_text()


def test_probe_measures_a_language_model(model, tmp_path):
    from qkv.probe_lm import probe_lm, write_lm_report

    ids = torch.randint(4, 40, (48 * 6 + 1,))
    r = probe_lm(model, ids, windows=4, receptive_windows=2, log=lambda m: None)
    assert r.windows == 4 and len(r.single_head) == 2 * 4  # layers x heads
    assert len(r.focus["entropy"]) == 2 and len(r.focus["previous"][0]) == 4
    # masking every head changes the loss; masking none is the baseline
    assert r.pruning[0]["removed"] == 0 and r.pruning[0]["loss"] == pytest.approx(r.loss)
    assert {a["ablation"] for a in r.ablations} >= {"remove layer", "skip attention sublayer"}
    strict, loose = r.receptive_field[0.1], r.receptive_field[0.01]
    assert strict[0] == pytest.approx(1.0)  # the embeddings: a position sees only itself
    assert loose[-1] > loose[0] and max(loose) <= 48  # deeper sees further, never the future
    report = write_lm_report(r, tmp_path)
    assert "previous" in report.read_text() and (tmp_path / "receptive_field.png").is_file()
