"""Next-item prediction: reading interactions, the leave-one-out split, the losses, the ranking
metrics (against hand-computed values), causality, a toy sequence learned exactly, and the
commands' handling of bad input."""

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from qkv.checkpoint import load
from qkv.cli import main
from qkv.config import ConfigError, TrainConfig
from qkv.items import leave_one_out, read_interactions, seen_mask, unseen_negatives, windows
from qkv.models import DecoderOnly
from qkv.recommend import (
    evaluate,
    hit_rate,
    ndcg,
    next_item_scores,
    popularity,
    recommend,
    sample_negatives,
    sampled_ranks,
    target_ranks,
)
from qkv.tasks import task_for
from qkv.tasks.items import ItemBatch, item_loss
from qkv.tokenizer import ItemError, Items
from qkv.train import train

from .conftest import tiny_config


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def item_model(vocab=30, **overrides):
    torch.manual_seed(0)
    shape = dict(
        arch="decoder-only",
        n_encoder_layers=0,
        vocab_size=vocab,
        positions="learned",
        max_len=16,
    )
    return DecoderOnly(tiny_config(**{**shape, **overrides})).eval()


# --- reading and splitting ----------------------------------------------------------------------


def test_pairs_keep_file_order_and_csv_sorts_by_time_with_ties_in_file_order(tmp_path):
    pairs = write(tmp_path / "a.txt", ["1 10", "2 30", "1 11", "1 12", "2 31"])
    assert read_interactions(pairs) == {1: [10, 11, 12], 2: [30, 31]}
    csv = write(
        tmp_path / "b.csv",
        ["item,timestamp,user", "5,300,7", "6,100,7", "8,200,7", "9,200,7", "4,1,3"],
    )
    # user 7: 6 (t=100), then 8 and 9 tied at t=200 in file order, then 5 (t=300)
    assert read_interactions(csv) == {7: [6, 8, 9, 5], 3: [4]}
    gz = tmp_path / "c.csv.gz"
    gz.write_bytes(gzip.compress(b"UserId,ItemId,Time\n1,2,2024-01-02\n1,3,2024-01-01\n"))
    assert read_interactions(gz) == {1: [3, 2]}


def test_leave_one_out_never_lets_a_validation_or_test_item_into_training():
    # every (user, position) has its own item, so an item identifies where it came from
    users = {u: [100 * u + i for i in range(3 + 7 * u)] for u in range(1, 6)}
    items = Items([i for s in users.values() for i in s])
    data = leave_one_out(users, items, "toy")
    held_out = set(data.targets("valid")) | set(data.targets("test"))
    trained = {i for _, w in windows(data.train(), 4) for i in w}
    assert not trained & held_out
    # the model reads everything before a target: the test history holds the validation item
    for seq, hist, target in zip(
        data.sequences, data.history("test"), data.targets("test"), strict=True
    ):
        assert hist == seq[:-1] and target == seq[-1]
    # and every training item but each user's first is a target exactly once
    targets = [i for _, w in windows(data.train(), 4) for i in w[1:]]
    assert sorted(targets) == sorted(i for s in data.train() for i in s[1:])


def test_windows_are_cut_from_the_end_and_overlap_by_one():
    assert windows([[1, 2, 3, 4, 5, 6, 7]], 3) == [(0, [4, 5, 6, 7]), (0, [1, 2, 3, 4])]
    assert windows([[1, 2, 3, 4, 5]], 3) == [(0, [2, 3, 4, 5]), (0, [1, 2])]
    assert windows([[9]], 3) == []


def test_the_catalogue_round_trips_and_names_unknown_items(tmp_path):
    items = Items([30, 10, 20, 10])
    assert items.encode([10, 30]) == [Items.first, Items.first + 2]
    items.save(tmp_path)
    back = Items.load(tmp_path / Items.FILE)
    assert back.items == [10, 20, 30] and back.decode(back.encode([20, 10])) == "20 10"
    with pytest.raises(ItemError, match="not in the model's catalogue: 99 7"):
        items.encode([10, 99, 7])


# --- metrics, by hand ---------------------------------------------------------------------------


def test_ranks_count_ties_against_the_target_and_skip_excluded_items():
    #                     0     1     2    3    4    5    6
    scores = torch.tensor([[-9.0, 0.5, 0.9, 0.5, 0.1, 0.7, 0.5]])
    excluded = torch.tensor([[True, False, False, False, False, True, False]])
    target = torch.tensor([3])
    # above or tied with 0.5, not excluded, not the target: items 1, 2 and 6 (5 is excluded)
    assert target_ranks(scores, target, excluded).tolist() == [3]
    ranks = torch.tensor([0, 3, 9, 10, 200])
    assert hit_rate(ranks, 10) == pytest.approx(3 / 5)
    assert hit_rate(ranks, 1) == pytest.approx(1 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / 5
    assert ndcg(ranks, 10) == pytest.approx(expected)
    # a model that scores everything alike ranks last, not first
    flat = torch.zeros(1, 7)
    assert target_ranks(flat, target, torch.zeros(1, 7, dtype=torch.bool)).tolist() == [6]


def test_sampled_negatives_are_unseen_distinct_and_fixed_by_the_seed():
    v, first = 60, Items.first
    excluded = torch.zeros(3, v, dtype=torch.bool)
    excluded[:, :first] = True
    excluded[0, 10:40] = True
    excluded[1, 5:50] = True
    target = torch.tensor([7, 55, 30])
    # the score is the item's own index: rank = candidates above the target, countable by hand
    scores = torch.arange(v, dtype=torch.float).expand(3, v)
    g = torch.Generator().manual_seed(3)
    ranks = sampled_ranks(scores, target, excluded, 10, g)
    allowed = (~excluded).clone()
    allowed[torch.arange(3), target] = False
    assert int(allowed[1].sum()) == 10  # row 1 has 10 candidates (4, 50..59 but 55): all drawn
    # so row 1's target (55) ranks below exactly 56..59; row 0's (7) beats at most 4..6
    assert ranks[1] == 4 and ranks[0] >= 10 - 3
    again = sampled_ranks(scores, target, excluded, 10, torch.Generator().manual_seed(3))
    assert torch.equal(ranks, again)
    # the negatives themselves: never excluded (seen), never the target, no item twice
    for seed in range(5):
        neg = sample_negatives(excluded, target, 10, torch.Generator().manual_seed(seed))
        assert neg.shape == (3, 10)
        assert not excluded.gather(1, neg).any() and not (neg == target[:, None]).any()
        assert all(len(set(row.tolist())) == 10 for row in neg)

    # the training negatives (bce) never hit the user's own items
    seen = seen_mask([[4, 5, 6], list(range(4, 59))], v)
    neg = unseen_negatives(seen, (8, 3), first, torch.Generator().manual_seed(0))
    assert not seen.gather(1, neg.view(2, -1)).any()
    assert neg[1].eq(59).all()  # the only item user 2 has not seen


def test_the_popularity_baseline_counts_histories():
    pop = popularity([[4, 5, 5], [5, 6]], 8)
    assert pop[:4].eq(-math.inf).all() and pop[4:].tolist() == [1, 3, 1, 0]


# --- the model and its losses -------------------------------------------------------------------


def test_later_items_never_change_earlier_predictions_and_padding_changes_nothing():
    model = item_model()
    x = torch.tensor([[5, 9, 12, 7, 20, 11]])
    y = x.clone()
    y[0, 3:] = torch.tensor([25, 6, 8])
    hx, hy = model.decoder(x), model.decoder(y)
    torch.testing.assert_close(hx[:, :3], hy[:, :3])
    assert not torch.allclose(hx[:, 3:], hy[:, 3:])
    # right-padding a short history in a batch leaves its scores as they were alone
    alone = next_item_scores(model, [[5, 9, 12]], 16)
    batched = next_item_scores(model, [[5, 9, 12], [5, 9, 12, 7, 20, 11]], 16)
    torch.testing.assert_close(alone[0], batched[0])
    # only the last block_size items are read
    torch.testing.assert_close(
        next_item_scores(model, [[8, 8, 8, 5, 9, 12]], 3), next_item_scores(model, [[5, 9, 12]], 3)
    )


def test_the_two_losses_equal_their_formulas():
    model = item_model()
    x, y = torch.tensor([[5, 9, 12]]), torch.tensor([[9, 12, 0]])
    h = model.decoder(x)[0, :2]
    e = model.lm_head.weight
    logits = h @ e[Items.first :].T
    ce = F.cross_entropy(logits, y[0, :2] - Items.first, reduction="sum")
    torch.testing.assert_close(item_loss(model, ItemBatch(x, y, 2)), ce)
    neg = torch.tensor([[[20, 21], [22, 23], [4, 4]]])
    pos_s, neg_s = (h * e[y[0, :2]]).sum(-1), torch.einsum("nd,nkd->nk", h, e[neg[0, :2]])
    bce = -(F.logsigmoid(pos_s).sum() + F.logsigmoid(-neg_s).sum())
    torch.testing.assert_close(item_loss(model, ItemBatch(x, y, 2, neg)), bce)


# --- learning -----------------------------------------------------------------------------------


def periodic_users(n_users=40, seed=0):
    """Each user repeats one of five item triples (a b c a b c ...) from some phase."""
    g = torch.Generator().manual_seed(seed)
    users = {}
    for u in range(n_users):
        triple = [10 + 3 * (u % 5) + k for k in range(3)]
        phase, length = (int(x) for x in torch.randint(0, 3, (2,), generator=g))
        users[u] = [triple[(phase + i) % 3] for i in range(10 + 3 * length)]
    return users


def items_train_config(path, **overrides):
    base = dict(
        task="items",
        dataset=None,
        interactions_file=str(path),
        block_size=12,
        max_tokens=512,
        lr=3e-3,
        warmup=10,
        label_smoothing=0.0,
        max_steps=150,
        eval_every=75,
        save_every=75,
        log_every=1000,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def items_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("items")
    users = periodic_users()
    write(d / "events.txt", [f"{u} {i}" for u, seq in users.items() for i in seq])
    cfg = items_train_config(d / "events.txt")
    shape = tiny_config(n_decoder_layers=1, positions="learned", dropout=0.0)
    train(task_for(cfg), shape, cfg, d / "run", log=lambda _: None)
    return d


def test_a_periodic_sequence_is_learned_to_hit_rate_at_1_of_1(items_dir):
    model, items, meta = load(items_dir / "run")
    assert meta["task"] == "items" and isinstance(items, Items)
    users = periodic_users()
    data = leave_one_out(users, items, "toy")
    # ranked against every item, seen ones included: the cycle's next item is first for all
    scores = next_item_scores(model, data.history("test"), meta["block_size"])
    specials = torch.zeros_like(scores, dtype=torch.bool)
    specials[:, : Items.first] = True
    ranks = target_ranks(scores, torch.tensor(data.targets("test")), specials)
    assert hit_rate(ranks, 1) == 1.0
    top = recommend(model, items, [[13, 14]], 12, k=1, exclude_seen=False)
    assert top[0][0].item == 15
    report = evaluate(model, data, "test", 12, popular=True)
    assert report.systems["qkv"]["hr10"] == 1.0 and report.systems["qkv"]["ndcg10"] == 1.0
    assert report.systems["most popular"]["ndcg10"] < 0.9


def test_bce_with_sampled_negatives_also_learns_the_toy(tmp_path):
    write(tmp_path / "e.txt", [f"{u} {i}" for u, seq in periodic_users().items() for i in seq])
    cfg = items_train_config(tmp_path / "e.txt", item_loss="bce", negatives=4, max_steps=150)
    shape = tiny_config(n_decoder_layers=1, positions="learned", dropout=0.0)
    trainer = train(task_for(cfg), shape, cfg, tmp_path / "run", log=lambda _: None)
    assert trainer.best >= 0.9  # validation NDCG@10, seen items excluded


def test_recommend_and_evaluate_commands(items_dir, tmp_path, capsys):
    run = str(items_dir / "run")
    assert main(["recommend", "--model", run, "10", "11", "--k", "3", "--repeat"]) == 0
    rows = [r.split("\t") for r in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3 and rows[0][0] == "12"
    scores = [float(s) for _, s in rows]
    assert scores == sorted(scores, reverse=True)
    hist = write(tmp_path / "h.txt", ["10 11", "16 17 18 16"])
    assert main(["recommend", "--model", run, "--input", str(hist), "--json", "--k", "2"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["history"] for o in out] == [[10, 11], [16, 17, 18, 16]]
    assert 10 not in out[0]["items"] and 11 not in out[0]["items"]  # seen: not again
    why = tmp_path / "why"
    assert main(["recommend", "--model", run, "13", "14", "13", "--explain", str(why)]) == 0
    capsys.readouterr()
    assert (why / "attention.html").is_file() and (why / "contributions.png").is_file()
    assert main(["evaluate", "--model", run]) == 0
    printed = capsys.readouterr().out
    assert "full ranking over all items" in printed and "most popular" in printed


def test_train_command_on_a_csv_of_events(tmp_path, capsys):
    rows = ["user,item,timestamp"]
    for u, seq in periodic_users(12).items():
        rows += [f"{u},{item},{1000 + t}" for t, item in enumerate(seq)]
    path = write(tmp_path / "events.csv", rows)
    out = tmp_path / "run"
    # --interactions alone names the task (and its preset's shape)
    argv = ["train", "--interactions", str(path), "--out", str(out)]
    argv += ["--block-size", "8", "--d-model", "32", "--max-steps", "4", "--eval-every", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "12 users, 15 items" in err and "valid_ndcg10" in err
    _, items, meta = load(out)
    assert meta["block_size"] == 8 and items.n_items == 15


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("a.txt", ["1 10", "1 x11", "1 12"], "item id must be an integer, got 'x11'"),
        ("a.txt", ["u1 10"], "user id must be an integer"),
        ("a.txt", ["1 10", "1 11", "1 12", "2 10"], "user 2 has 1 interaction(s)"),
        ("a.txt", [], "empty file"),
        ("a.txt", ["1 10 5"], "expected 'user item'"),
        ("a.csv", ["user,item", "1,10"], "no timestamp column"),
        ("a.csv", ["user,item,timestamp", "1,10"], "2 field(s), the header has 3"),
        ("a.csv", ["user,item,timestamp", "1,10,yesterday"], "neither a number nor ISO"),
    ],
)
def test_bad_interactions_are_one_line_exit_2_and_write_nothing(
    tmp_path, capsys, name, lines, message
):
    path = write(tmp_path / name, lines)
    out = tmp_path / "run"
    code = main(["train", "--task", "items", "--interactions", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not out.exists()


def test_bad_recommend_input_is_one_line_exit_2(items_dir, tmp_path, capsys):
    run = str(items_dir / "run")
    cases = [
        (["recommend", "--model", run, "10", "999"], "not in the model's catalogue: 999"),
        (["recommend", "--model", run, "10", "abc"], "must be integers, got 'abc'"),
        (["recommend", "--model", run, "10", "--k", "0"], "--k must be >= 1"),
        (["evaluate", "--model", run, "--split", "dev"], "valid or test"),
        (["explain", "--model", run, "10 11"], "next-item model: explain with qkv recommend"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_items_config_needs_interactions():
    with pytest.raises(ConfigError, match="no interactions"):
        TrainConfig(task="items", dataset=None)
    with pytest.raises(ConfigError, match="negatives must be positive"):
        TrainConfig(task="items", dataset="ml-1m", negatives=0)
