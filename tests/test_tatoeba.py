"""English <-> Chinese: the Tatoeba split, subwords that never lose a Chinese character, and
BLEU with sacreBLEU's Chinese tokenizer."""

import gzip

import pytest
from sacrebleu.metrics import BLEU

from qkv.data import DataError, split_by_source, tatoeba
from qkv.evaluate import bleu, score
from qkv.tokenizer import UNK, Subwords


def write_file(root, lines: list[str]):
    (root / "cmn-eng").mkdir(parents=True, exist_ok=True)
    text = "\ufeff" + "\n".join(lines) + "\n\n"  # the real file: a BOM, an empty last line
    (root / "cmn-eng" / "cmn.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))


def synthetic(n: int = 400) -> list[str]:
    """English sentences, many repeated with different translations, as the real file does."""
    lines = []
    for i in range(n):
        english = f"Sentence number {i % 150}."
        lines.append(f"{english}\t第{i}句。\tCC-BY 2.0 (France) Attribution: tatoeba.org #{i}")
    return lines


def test_no_english_sentence_is_in_two_splits(tmp_path):
    write_file(tmp_path, synthetic())
    splits = {name: tatoeba(name, "en", "zh", tmp_path) for name in ("train", "valid", "test")}
    english = {name: {a for a, _ in pairs} for name, pairs in splits.items()}
    assert not english["train"] & english["valid"]
    assert not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    assert sum(len(p) for p in splits.values()) == 400  # every pair somewhere, once
    assert len(english["valid"]) > 0 and len(english["test"]) > 0
    assert len(splits["train"]) > 0.8 * 400
    # zh->en is the same split, reversed
    assert tatoeba("test", "zh", "en", tmp_path) == [(b, a) for a, b in splits["test"]]


def test_the_split_depends_on_the_seed_only():
    pairs = [(f"e{i % 97}", f"z{i}") for i in range(500)]
    a, b = split_by_source(pairs, seed=1), split_by_source(list(reversed(pairs)), seed=1)
    assert {x for x, _ in a["test"]} == {x for x, _ in b["test"]}  # not on the file order
    assert {x for x, _ in a["test"]} != {x for x, _ in split_by_source(pairs, seed=2)["test"]}


def test_the_real_file_when_present():
    try:
        splits = {n: tatoeba(n, "en", "zh") for n in ("train", "valid", "test")}
    except DataError:
        pytest.skip("../shared/data/cmn-eng is not here")
    assert sum(len(p) for p in splits.values()) == 29_155
    seen = [{a for a, _ in p} for p in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_bad_lines_and_directions(tmp_path):
    write_file(tmp_path, ["Hi.\t嗨。\tattribution", "no tab here"])
    with pytest.raises(DataError, match=r"cmn.txt.gz:2: expected source<TAB>target"):
        tatoeba("train", "en", "zh", tmp_path)
    write_file(tmp_path, synthetic())
    with pytest.raises(DataError, match="en->zh or zh->en"):
        tatoeba("train", "en", "de", tmp_path)
    with pytest.raises(DataError, match="no split 'val'"):
        tatoeba("val", "en", "zh", tmp_path)


def test_chinese_round_trips_and_is_never_unknown():
    texts = ["我爱你。", "你好吗？", "I love you.", "How are you?"] * 20
    tok = Subwords.train(texts, vocab_size=1000, byte_fallback=True)
    assert 256 < tok.vocab_size <= 1000  # the 256 byte tokens count within the asked size
    for text in ["我爱你。", "猫喜欢鱼，狗不喜欢。", "I love 北京 and 🙂!", "<0xE7> stays text"]:
        ids = tok.encode(text)
        assert UNK not in ids
        assert tok.decode(ids) == text
    # without byte fallback the unseen characters are lost
    plain = Subwords.train(texts, vocab_size=1000)
    assert UNK in plain.encode("猫")


def test_byte_fallback_survives_saving(tmp_path):
    tok = Subwords.train(["我爱你。"] * 5, vocab_size=300, byte_fallback=True)
    tok.save(tmp_path)
    again = Subwords.load(tmp_path / Subwords.FILE)
    assert again.decode(again.encode("猫和狗")) == "猫和狗"


def test_chinese_bleu_uses_the_zh_tokenizer():
    hyps, refs = ["我爱你们。", "他很高兴"], ["我爱你。", "他很高兴。"]
    s = score(hyps, refs, "zh")
    assert "tok:zh" in s.bleu_signature
    assert s.bleu == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [refs]).score)
    assert bleu(hyps, refs, "zh") == pytest.approx(s.bleu)
    # the default tokenizer sees each unspaced sentence as one word: a different, wrong score
    assert bleu(hyps, refs) != pytest.approx(s.bleu)
    assert "tok:13a" in score(["a b c d"], ["a b c d"], "en").bleu_signature


def test_split_cjk_makes_every_chinese_character_a_token():
    texts = ["我不知道他为什么没来。", "我爱你。", "I do not know why he did not come."] * 30
    tok = Subwords.train(texts, vocab_size=1000, byte_fallback=True, split_cjk=True)
    pieces = [tok.id_to_token(i) for i in tok.encode("我不知道。")]
    assert [p for p in pieces if p != "▁"] == ["我", "不", "知", "道", "。"]  # never merged
    merged = Subwords.train(texts, vocab_size=1000, byte_fallback=True)
    assert len(merged.encode("我不知道。")) < len(tok.encode("我不知道。"))  # plain BPE merges
    for text in ["我爱你。", "I love 北京 and Tom's 3 cats！", "猫和狗"]:
        assert tok.decode(tok.encode(text)) == text  # no spaces appear between characters
