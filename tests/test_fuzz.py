"""Properties over generated input (hypothesis): the tokenizers round-trip ordinary text and item
ids; the data readers and config loaders answer any bytes or any JSON with a value or their own
one-line error, never another exception; a DecodeConfig that constructs is one the search can
use."""

import contextlib
import functools
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.config import ConfigError, DecodeConfig, ModelConfig, TrainConfig, from_dict
from qkv.data import DataError, read_lines, read_tsv
from qkv.items import read_interactions
from qkv.tasks.classify import read_labelled
from qkv.tasks.similarity import read_scored
from qkv.tokenizer import ALPHABET, Characters, ItemError, Items, Subwords, parse_history

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORD = st.text(alphabet=ALPHABET, min_size=1, max_size=12)


@pytest.fixture(scope="module")
def subwords():
    texts = ["ein Mann fährt Fahrrad .", "a man rides a bike !", "Été, café – naïve?"] * 30
    return Subwords.train(texts, 300)


@FUZZ
@given(words=st.lists(WORD, min_size=1, max_size=12))
def test_subwords_give_back_ordinary_text(subwords, words):
    text = " ".join(words)
    assert subwords.decode(subwords.encode(text)) == text


@FUZZ
@given(text=st.text(max_size=200))
def test_characters_round_trip_their_alphabet(text):
    chars = Characters.of(text + "x")
    assert chars.decode(chars.encode(text)) == text


@FUZZ
@given(items=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=30), pick=st.data())
def test_items_round_trip_and_history_parsing_never_crashes(items, pick):
    catalogue = Items(items)
    history = pick.draw(st.lists(st.sampled_from(items), max_size=20))
    assert parse_history(catalogue.decode(catalogue.encode(history))) == history
    text = pick.draw(st.text(max_size=40))
    with contextlib.suppress(ItemError):
        parse_history(text)


READERS = [
    read_lines,
    read_tsv,
    read_labelled,
    functools.partial(read_scored, score_range=(0.0, 5.0)),
    read_interactions,
]


@FUZZ
@given(data=st.binary(max_size=300), reader=st.sampled_from(READERS), csv=st.booleans())
def test_readers_answer_any_bytes_with_data_or_a_data_error(tmp_path_factory, data, reader, csv):
    path = tmp_path_factory.mktemp("fuzz") / ("in.csv" if csv else "in.txt")
    path.write_bytes(data)
    try:
        reader(path)
    except DataError as e:
        assert "\n" not in str(e)


TEXTISH = st.text(alphabet=string.printable, max_size=200)


@FUZZ
@given(text=TEXTISH, reader=st.sampled_from(READERS), csv=st.booleans())
def test_readers_answer_any_text_with_data_or_a_data_error(tmp_path_factory, text, reader, csv):
    path = tmp_path_factory.mktemp("fuzz") / ("in.csv" if csv else "in.txt")
    path.write_text(text, encoding="utf-8")
    try:
        reader(path)
    except DataError as e:
        assert "\n" not in str(e)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


def config_dicts(cls):
    """Dicts over the config's own keys (values of any JSON type) and a stray key now and then."""
    keys = [f for f in cls.__dataclass_fields__]
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), JSON, max_size=5)


@FUZZ
@given(cls=st.sampled_from([ModelConfig, TrainConfig, DecodeConfig]), data=st.data())
def test_config_loaders_answer_any_json_with_a_config_or_a_config_error(cls, data):
    values = data.draw(config_dicts(cls))
    json.dumps(values, allow_nan=True)  # what a JSON file could hold
    try:
        config = from_dict(cls, values)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    # whatever constructs round-trips through JSON
    assert from_dict(cls, json.loads(json.dumps(config.__dict__))) == config


@FUZZ
@given(data=st.data())
def test_a_decode_config_that_constructs_is_usable(data):
    values = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "strategy": st.sampled_from(["greedy", "sample", "beam"]),
                "beam": st.integers(-2, 12),
                "nbest": st.integers(-2, 12),
                "temperature": st.floats(-1, 3) | st.just(float("nan")),
                "top_p": st.floats(-0.5, 1.5) | st.just(float("nan")),
                "top_k": st.integers(-3, 50),
                "max_len_a": st.floats(-1, 3),
                "max_len_b": st.integers(-3, 20),
            },
        )
    )
    try:
        cfg = DecodeConfig(**values)
    except ConfigError:
        return
    assert cfg.beam >= 1 and 1 <= cfg.nbest <= (cfg.beam if cfg.strategy == "beam" else 1)
    assert cfg.temperature > 0 and 0 < cfg.top_p <= 1 and cfg.top_k >= 0
    assert cfg.max_len_a > 0 or cfg.max_len_b > 0


def test_a_digit_int_refuses_is_a_one_line_item_error():
    # found by the property above: "²" passed str.isdigit and crashed the error message
    with pytest.raises(ItemError, match="got '²'"):
        parse_history("12 ²")


def test_special_token_names_typed_in_text_are_text(subwords):
    # found by the round-trip property: "<s>" in a sentence used to become the bos token
    ids = subwords.encode("a <pad> b </s> c <s>")
    assert not set(ids) & {0, 1, 2}
    assert subwords.decode(ids) == "a <pad> b </s> c <s>"
