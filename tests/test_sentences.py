"""The encoder at work: sentence embeddings, similarity and search, the classification and
similarity tasks, their metrics, and their commands' handling of bad input."""

import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

from qkv.checkpoint import load
from qkv.cli import main
from qkv.config import ConfigError, ModelConfig, TrainConfig
from qkv.data import pad_batch
from qkv.evaluate import class_report, pearson, ranks, spearman
from qkv.models import EncoderDecoder, EncoderOnly
from qkv.sentences import SentenceEncoder, embed, semantic_search, similarity
from qkv.tasks import task_for
from qkv.tasks.similarity import cosent, read_scored
from qkv.tokenizer import Subwords
from qkv.train import train

from .conftest import tiny_config


def encoder_config(**overrides) -> ModelConfig:
    base = dict(arch="encoder-only", n_decoder_layers=0, vocab_size=40, max_len=40)
    return tiny_config(**{**base, **overrides})


@pytest.fixture(params=["encoder-only", "encoder-decoder"])
def any_encoder(request):
    torch.manual_seed(0)
    if request.param == "encoder-only":
        return EncoderOnly(encoder_config()).eval()
    return EncoderDecoder(tiny_config(vocab_size=40, max_len=40)).eval()


# --- embeddings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_padding_does_not_change_a_sentence_embedding(any_encoder, pooling):
    ids = [5, 9, 12, 7, 2]
    alone = embed(any_encoder, torch.tensor([ids]), pooling)
    padded = embed(any_encoder, torch.tensor([ids + [0] * 6]), pooling)
    torch.testing.assert_close(alone, padded)
    # and pooling is not blind: another sentence gets another vector
    other = embed(any_encoder, torch.tensor([[5, 9, 13, 7, 2]]), pooling)
    assert not torch.allclose(alone, other, atol=1e-4)


def test_mean_pooling_is_the_mean_of_the_real_tokens_vectors():
    torch.manual_seed(0)
    model = EncoderOnly(encoder_config()).eval()
    ids = torch.tensor([[5, 9, 12, 2, 0, 0]])
    x, pooled = model.encode(ids)
    torch.testing.assert_close(pooled[0], x[0, :4].mean(0))


def test_weighted_pooling_is_the_token_weighted_mean_and_ignores_padding():
    torch.manual_seed(0)
    model = EncoderOnly(encoder_config(pooling="weighted")).eval()
    model.token_weight.uniform_(0.1, 1.0)
    ids = torch.tensor([[5, 9, 12, 2, 0, 0]])
    x, pooled = model.encode(ids)
    w = model.token_weight[ids[0, :4]]
    torch.testing.assert_close(pooled[0], (x[0, :4] * w[:, None]).sum(0) / w.sum())
    torch.testing.assert_close(embed(model, ids[:, :4]), pooled)  # padding: no effect


def word_tokenizer(words: list[str]) -> Subwords:
    return Subwords.train([" ".join(words)] * 3, vocab_size=300, min_frequency=1)


SENTENCES = ["a red dog runs", "the cat sleeps", "a dog", "blue green red cat sleeps now", "x"]


@pytest.fixture
def sentence_encoder():
    tok = word_tokenizer(" ".join(SENTENCES).split())
    torch.manual_seed(0)
    model = EncoderOnly(encoder_config(vocab_size=tok.vocab_size)).eval()
    return SentenceEncoder(model, tok, batch_size=2)


def test_a_batch_embeds_as_each_sentence_alone(sentence_encoder):
    together = sentence_encoder.encode(SENTENCES)
    for i, s in enumerate(SENTENCES):
        torch.testing.assert_close(together[i], sentence_encoder.encode([s])[0])


def test_identical_sentences_have_cosine_one_and_similarity_is_symmetric(sentence_encoder):
    a, b = ["the cat sleeps", "a red dog runs"], ["the cat sleeps", "a dog"]
    ab, ba = sentence_encoder.similarity(a, b), sentence_encoder.similarity(b, a)
    assert ab[0].item() == pytest.approx(1.0, abs=1e-5)
    assert ab[1].item() < 0.9999
    torch.testing.assert_close(ab, ba)
    e = sentence_encoder.encode(a)
    torch.testing.assert_close(similarity(e, e).diagonal(), torch.ones(2))


def test_semantic_search_in_chunks_equals_brute_force():
    torch.manual_seed(0)
    corpus, queries = torch.randn(1000, 16), torch.randn(4, 16)
    hits = semantic_search(queries, corpus, k=7, chunk=64)
    full = similarity(queries, corpus)
    for q, found in enumerate(hits):
        want = full[q].topk(7)
        assert [i for i, _ in found] == want.indices.tolist()
        np.testing.assert_allclose([s for _, s in found], want.values.numpy(), atol=1e-6)


# --- metrics and losses -------------------------------------------------------------------------


def test_correlations_match_hand_computed_values():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    # Pearson: cov 6.0 / sqrt(10 * 5.2); Spearman: y's ranks 1, 2, 3.5, 5, 3.5 -> 8 / sqrt(95)
    assert pearson(x, y) == pytest.approx(6.0 / math.sqrt(52.0))
    assert ranks(y).tolist() == [1.0, 2.0, 3.5, 5.0, 3.5]
    assert spearman(x, y) == pytest.approx(8.0 / math.sqrt(95.0))
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # monotone: rank-perfect
    assert pearson(x, [v**3 for v in x]) < 0.99


def test_class_report_matches_hand_computed_values():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "pos", "neg", "pos", "neu"]
    r = class_report(gold, pred, ["neg", "neu", "pos"])
    assert r.confusion.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]
    assert r.accuracy == pytest.approx(400 / 6)
    by = {row[0]: row[1:] for row in r.per_class()}
    # pos: precision 2/3, recall 2/3; neg: 1/2, 1/2; neu: 1, 1
    assert by["pos"][:2] == pytest.approx((200 / 3, 200 / 3))
    assert by["neg"] == pytest.approx((50.0, 50.0, 50.0, 2))
    assert by["neu"] == pytest.approx((100.0, 100.0, 100.0, 1))
    assert "confusion" in r.summary()


def test_cosent_matches_the_formula_and_rewards_the_right_order():
    cos = torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64)
    gold = torch.tensor([4.0, 1.0, 1.0])
    # ordered pairs (hi, lo): (0, 1), (0, 2); the tie (1, 2) adds nothing
    want = math.log(1 + math.exp(20 * (0.2 - 0.9)) + math.exp(20 * (0.5 - 0.9)))
    assert cosent(cos, gold).item() == pytest.approx(want, rel=1e-5)
    wrong = cosent(torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64), gold)
    assert wrong.item() > 5 * cosent(cos, gold).item()


# --- training: a tiny classifier and a tiny bi-encoder -----------------------------------------

POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "film", "was", "very", "plot", "and", "acting", "it"]


def toy_classification(n: int, seed: int) -> list[str]:
    """Sentences whose label is whether they hold a positive or a negative word."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    return rows


def write(path, rows: list[str]):
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def toy_train_config(**overrides) -> TrainConfig:
    base = dict(
        dataset=None,
        vocab_size=400,
        max_tokens=256,
        lr=3e-3,
        warmup=10,
        label_smoothing=0.0,
        max_steps=120,
        eval_every=60,
        save_every=60,
        log_every=1000,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    write(d / "train.tsv", ["sentence\tlabel", *toy_classification(300, 0)])
    write(d / "valid.tsv", toy_classification(60, 1))
    cfg = toy_train_config(
        task="classify",
        tsv_file=str(d / "train.tsv"),
        valid_tsv_file=str(d / "valid.tsv"),
        max_steps=400,
        eval_every=100,
    )
    shape = encoder_config(d_model=32, n_encoder_layers=1, dropout=0.0)
    torch.manual_seed(0)
    train(task_for(cfg), shape, cfg, d / "run", log=lambda _: None)
    return d


def test_a_tiny_classifier_learns_a_separable_task_with_a_wide_margin(classifier_dir):
    model, tok, meta = load(classifier_dir / "run")
    assert meta["task"] == "classify" and meta["labels"] == ["neg", "pos"]
    rows = [r.split("\t") for r in toy_classification(40, 2)]
    probs = SentenceEncoder(model, tok).probabilities([t for t, _ in rows])
    gold = torch.tensor([meta["labels"].index(y) for _, y in rows])
    chosen = probs.gather(1, gold[:, None])[:, 0]
    assert (probs.argmax(-1) == gold).all()
    assert chosen.min().item() > 0.9  # not a coin flip that happens to land right


def test_classify_and_evaluate_commands(classifier_dir, tmp_path, capsys):
    run = str(classifier_dir / "run")
    inputs = write(tmp_path / "in.txt", ["the film was good", "the plot was awful"])
    assert main(["classify", "--model", run, "--input", str(inputs), "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["label"] for o in out] == ["pos", "neg"]
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    test = write(tmp_path / "test.tsv", toy_classification(40, 3))
    png = tmp_path / "confusion.png"
    assert main(["evaluate", "--model", run, "--tsv", str(test), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 100.00 % of 40" in printed and "precision" in printed
    assert png.read_bytes()[:4] == b"\x89PNG"


def toy_pairs(n: int, seed: int) -> list[str]:
    """Pairs scored by how many of their three words are shared (0..3)."""
    rng, rows = random.Random(seed), []
    vocab = POSITIVE + NEGATIVE + FILLER
    for _ in range(n):
        a = rng.sample(vocab, 3)
        shared = rng.randint(0, 3)
        b = a[:shared] + rng.sample([w for w in vocab if w not in a], 3 - shared)
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{shared}")
    return rows


def test_a_tiny_bi_encoder_learns_to_rank_pairs(tmp_path):
    write(tmp_path / "train.tsv", toy_pairs(400, 0))
    write(tmp_path / "valid.tsv", toy_pairs(80, 1))
    cfg = toy_train_config(
        task="similarity",
        tsv_file=str(tmp_path / "train.tsv"),
        valid_tsv_file=str(tmp_path / "valid.tsv"),
        score_range=(0.0, 3.0),
        max_steps=150,
        eval_every=150,
    )
    shape = encoder_config(d_model=32, n_encoder_layers=1, dropout=0.0, pooling="weighted")
    torch.manual_seed(0)
    t = train(task_for(cfg), shape, cfg, tmp_path / "run", log=lambda _: None)
    assert t.best > 80  # Spearman x 100 on held-out pairs
    # weighted pooling's weights come from the training pairs' token frequencies p: a / (a + p)
    weights, task = t.model.token_weight, t.task
    ids = [i for e in task.train_set for i in e.src + e.tgt]
    counts = np.bincount(ids, minlength=len(weights))
    most, least = int(counts.argmax()), int(np.where(counts > 0, counts, 10**9).argmin())
    assert weights[most] == pytest.approx(1e-3 / (1e-3 + counts[most] / len(ids)), rel=1e-4)
    assert weights[most] < weights[least] < 1.0 and weights[0] == 1.0  # pad: never seen
    enc = SentenceEncoder(*load(tmp_path / "run")[:2])
    a, b = ["good film plot", "bad sad poor"], ["plot film good", "the and it"]
    ab = enc.similarity(a, b)
    torch.testing.assert_close(ab, enc.similarity(b, a))
    assert ab[0] > ab[1]


def test_init_from_copies_a_translation_models_encoder(tmp_path):
    from qkv.checkpoint import save

    tok = word_tokenizer(POSITIVE + NEGATIVE + FILLER)
    torch.manual_seed(3)
    mt = EncoderDecoder(tiny_config(vocab_size=tok.vocab_size, d_model=32, max_len=40))
    save(tmp_path / "mt", mt, tok, {"task": "translation"})
    write(tmp_path / "train.tsv", toy_classification(60, 0))
    cfg = toy_train_config(
        task="classify", tsv_file=str(tmp_path / "train.tsv"), init_from=str(tmp_path / "mt")
    )
    task = task_for(cfg)
    shape = task.prepare(encoder_config(d_model=64), tmp_path / "run", False, lambda _: None)
    assert shape.d_model == 32 and shape.vocab_size == tok.vocab_size  # the started-from shape
    from qkv.checkpoint import copy_matching
    from qkv.models import from_config

    model = from_config(shape)
    copied = copy_matching(model, tmp_path / "mt")
    assert "encoder.layers.0.self_attn.q.weight" in copied or any("layers.0" in c for c in copied)
    src = torch.tensor([[5, 6, 7, 2]])
    mt.eval(), model.eval()
    torch.testing.assert_close(model.encode(src)[0], mt.encode(src)[0])


# --- commands over any encoder: embed, search ----------------------------------------------------


@pytest.fixture
def translation_model_dir(tmp_path):
    from qkv.checkpoint import save

    tok = word_tokenizer(" ".join(SENTENCES).split() + POSITIVE + FILLER)
    torch.manual_seed(0)
    mt = EncoderDecoder(tiny_config(vocab_size=tok.vocab_size, max_len=40))
    return save(tmp_path / "mt", mt, tok, {"task": "translation"})


def test_embed_writes_one_vector_per_line_from_a_translation_models_encoder(
    translation_model_dir, tmp_path, capsys
):
    inputs = write(tmp_path / "in.txt", SENTENCES)
    out = tmp_path / "emb.npy"
    args = ["embed", "--model", str(translation_model_dir), "--input", str(inputs)]
    assert main([*args, "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (len(SENTENCES), 32) and vectors.dtype == np.float32
    assert main(args) == 0  # JSON lines: the same numbers
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == SENTENCES
    np.testing.assert_allclose(rows[1]["embedding"], vectors[1], atol=1e-5)


def test_search_finds_the_exact_duplicate_first_and_reuses_the_corpus_embeddings(
    translation_model_dir, tmp_path, capsys
):
    rng = random.Random(0)
    words = " ".join(SENTENCES).split() + POSITIVE + FILLER
    corpus = [" ".join(rng.sample(words, 5)) for _ in range(200)]
    path = write(tmp_path / "corpus.txt", corpus)
    args = ["search", "--model", str(translation_model_dir), "--corpus", str(path), "--k", "3"]
    assert main([*args, corpus[37]]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0].split("\t")
    assert first[1] == "38" and first[2] == corpus[37] and float(first[0]) > 0.9999
    assert "embedded 200/200" in err
    cache = tmp_path / "corpus.txt.qkv-embeddings"
    assert cache.is_file()
    assert main([*args, corpus[5]]) == 0  # reused: nothing embedded again
    out, err = capsys.readouterr()
    assert "embedded" not in err and out.splitlines()[0].split("\t")[1] == "6"
    write(path, corpus[:100])  # a changed corpus is embedded afresh
    assert main([*args, corpus[5]]) == 0
    assert "embedded 100/100" in capsys.readouterr().err


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    "task, rows, message",
    [
        ("classify", ["only text, no label"], "expected text<TAB>label"),
        ("classify", [], "empty file"),
        ("classify", ["good film\tpos"] * 5, "one label only"),
        ("similarity", ["a b\tc d\thigh"] * 5, "is not a number"),
        ("similarity", ["a b\tc d\t7"] * 5, "outside the range [0, 5]"),
        ("similarity", ["a b\tc d"] * 5, "expected sentence1<TAB>sentence2<TAB>score"),
    ],
)
def test_bad_training_tsv_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, task, rows, message
):
    path = write(tmp_path / "train.tsv", rows)
    out = tmp_path / "run"
    code = main(["train", "--task", task, "--tsv", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not out.exists()


def test_a_label_unseen_in_training_at_evaluation_is_one_line_exit_2(
    classifier_dir, tmp_path, capsys
):
    bad = write(tmp_path / "test.tsv", ["the film was good\tpos", "meh\tneutral"])
    code = main(["evaluate", "--model", str(classifier_dir / "run"), "--tsv", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "'neutral', unseen in training" in err
    assert len(err.strip().splitlines()) == 1


def test_paraphrase_pairs_join_training_and_bad_ones_are_one_line(tmp_path, capsys):
    write(tmp_path / "train.tsv", toy_pairs(40, 0))
    para = write(tmp_path / "para.tsv", ["good film\tgreat film", "bad plot\tpoor plot"] * 40)
    cfg = toy_train_config(
        task="similarity",
        tsv_file=str(tmp_path / "train.tsv"),
        score_range=(0.0, 3.0),
        paraphrase_tsv=str(para),
        max_steps=4,
    )
    lines = []
    t = train(task_for(cfg), encoder_config(d_model=32), cfg, tmp_path / "run", log=lines.append)
    assert "80 paraphrase pairs" in lines[0] and len(t.task.para_set) == 80
    kinds = {t.task.collate(b).scores is None for b in t.task.batches(0)}
    assert kinds == {True, False}  # both kinds of batch in an epoch
    write(para, ["good film\tgreat film", "no second sentence"])
    args = ["train", "--task", "similarity", "--tsv", str(tmp_path / "train.tsv")]
    args += ["--score-range", "0,3", "--paraphrase-tsv", str(para), "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "para.tsv:2: expected sentence1<TAB>sentence2" in err and not (tmp_path / "x").exists()


def test_read_scored_names_the_line(tmp_path):
    path = write(tmp_path / "p.tsv", ["a\tb\t1", "c\td\tx"])
    with pytest.raises(Exception, match=r"p\.tsv:2: score 'x' is not a number"):
        read_scored(path, (0.0, 5.0))


def test_sentence_task_configs_are_checked():
    with pytest.raises(ConfigError, match="score_range"):
        TrainConfig(task="similarity", dataset="stsb", score_range=(5.0, 0.0))
    with pytest.raises(ConfigError, match="dataset sst2 is for task classify"):
        TrainConfig(task="similarity", dataset="sst2")
    with pytest.raises(ConfigError, match="paraphrases"):
        TrainConfig(task="classify", dataset="sst2", paraphrases=True)


def test_sst2_and_stsb_readers_follow_their_readmes(tmp_path):
    from qkv.tasks.classify import sst2
    from qkv.tasks.similarity import stsb

    (tmp_path / "sst2" / "glue").mkdir(parents=True)
    (tmp_path / "sst2" / "sentence").mkdir()
    (tmp_path / "stsb").mkdir()
    with gzip.open(tmp_path / "sst2/glue/dev.tsv.gz", "wt") as f:
        f.write("sentence\tlabel\nit 's a charming journey . \t1\nflat . \t0\n")
    with gzip.open(tmp_path / "sst2/sentence/test.tsv.gz", "wt") as f:
        f.write("0\tno movement , no yuks .\n")
    with gzip.open(tmp_path / "stsb/sts-test.csv.gz", "wt") as f:
        f.write('main-news\tx\t2012\t1\t3.2\tA "man" runs.\tA man ran.\tsrc\turl\n')
    assert sst2("glue/dev", tmp_path) == [
        ("it 's a charming journey .", "positive"),
        ("flat .", "negative"),
    ]
    assert sst2("sentence/test", tmp_path) == [("no movement , no yuks .", "negative")]
    (row,) = stsb("test", tmp_path)
    assert (row.a, row.b, row.score, row.genre) == ('A "man" runs.', "A man ran.", 3.2, "news")


def test_pad_batch_appends_eos_and_pads():
    assert pad_batch([[5, 6], [7]], pad=0, eos=2).tolist() == [[5, 6, 2], [7, 2, 0]]


# --- explain: attention, and each token's exact share of the score ------------------------------


def test_explain_classification_shares_add_up_to_the_logit(classifier_dir, tmp_path, capsys):
    from qkv.explain import explain_classification
    from qkv.inspect import AttentionKind

    model, tok, meta = load(classifier_dir / "run")
    sentence = "the film was awful and the plot was poor"
    e = explain_classification(model, tok, sentence, meta["labels"])
    assert e.translation.startswith("neg")
    ids = torch.tensor([tok.encode_batch([sentence])[0] + [model.config.eos_id]])
    logit = model(ids)[0, 0].item()  # "neg" is class 0
    bias = model.classifier.bias[0].item()
    assert sum(e.contributions) + bias == pytest.approx(logit, abs=1e-4)
    layers = e.attention[AttentionKind.ENCODER_SELF]
    assert len(layers) == 1 and layers[0].shape[-1] == len(e.src_tokens)
    torch.testing.assert_close(layers[0].sum(-1), torch.ones(layers[0].shape[:-1]))
    # the sentiment words carry the verdict, not the filler
    share = dict(zip(e.src_tokens, e.contributions, strict=True))
    assert max(share, key=share.get) in {t for t in e.src_tokens if "awful" in t or "poor" in t}
    out = tmp_path / "ex"
    assert (
        main(["explain", "--model", str(classifier_dir / "run"), sentence, "--out", str(out)]) == 0
    )
    assert capsys.readouterr().out.startswith("neg")
    for name in ("encoder_self.png", "contributions.png", "attention.html"):
        assert (out / name).is_file(), name


def test_explain_similarity_shares_add_up_to_the_cosine(tmp_path):
    from qkv.explain import explain_similarity

    tok = word_tokenizer(POSITIVE + NEGATIVE + FILLER)
    torch.manual_seed(0)
    model = EncoderOnly(encoder_config(vocab_size=tok.vocab_size, pooling="weighted")).eval()
    model.token_weight.uniform_(0.2, 1.0)
    a, b, cos = explain_similarity(model, tok, "the film was good", "the plot was nice")
    enc = SentenceEncoder(model, tok)
    assert cos == pytest.approx(enc.similarity(["the film was good"], ["the plot was nice"])[0])
    assert sum(a.contributions) == pytest.approx(cos, abs=1e-5)
    assert sum(b.contributions) == pytest.approx(cos, abs=1e-5)
