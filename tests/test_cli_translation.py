import gzip
import io
import sys

import pytest

from qkv.cli import main


def run(capsys, *argv, stdin: str | None = None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse errors
        rc = e.code
    finally:
        sys.stdin = sys.__stdin__
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("command", ["train", "translate", "evaluate"])
def test_help_has_an_example(capsys, command):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0 and "example" in out


def test_translate_stdin_files_and_nbest(capsys, trained, corpus, tmp_path):
    out_dir, _, _ = trained
    _, src, tgt = corpus
    rc, out, err = run(
        capsys, "translate", "--model", str(out_dir), "--beam", "3", stdin="\n".join(src[:3]) + "\n"
    )
    assert rc == 0 and err == ""
    assert len(out.splitlines()) == 3
    (tmp_path / "in.de").write_text("\n".join(src[:4]) + "\n")
    rc, out, _ = run(
        capsys,
        "translate",
        "--model",
        str(out_dir),
        "--input",
        str(tmp_path / "in.de"),
        "--output",
        str(tmp_path / "out.en"),
        "--nbest",
        "2",
        "--beam",
        "3",
    )
    assert rc == 0 and out == ""
    lines = (tmp_path / "out.en").read_text().splitlines()
    assert len(lines) == 8 and lines[0].startswith("0 ||| ") and lines[-1].startswith("3 ||| ")
    rc, out, _ = run(
        capsys,
        "translate",
        "--model",
        str(out_dir),
        "--sample",
        "--top-k",
        "3",
        "--seed",
        "1",
        stdin=src[0] + "\n",
    )
    assert rc == 0 and out.strip()


def test_translate_int8(capsys, trained, corpus):
    out_dir, _, _ = trained
    _, src, _ = corpus
    text = "\n".join(src[:5]) + "\n"
    rc, fp32, _ = run(capsys, "translate", "--model", str(out_dir), "--beam", "3", stdin=text)
    rc8, int8, err = run(
        capsys, "translate", "--model", str(out_dir), "--beam", "3", "--int8", stdin=text
    )
    assert rc == rc8 == 0 and err == ""
    # the toy model's layers are all below packed.MIN_WEIGHTS, so int8 leaves them as they are
    assert int8 == fp32 and len(int8.splitlines()) == 5


def test_evaluate_files(capsys, tmp_path):
    (tmp_path / "hyp").write_text("a man rides a bike .\ntwo dogs play\n")
    (tmp_path / "ref").write_text("a man rides a bike .\ntwo dogs play\n")
    rc, out, _ = run(
        capsys, "evaluate", "--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "ref")
    )
    assert rc == 0 and "BLEU 100.00" in out and "nrefs:1|case:mixed" in out and "chrF" in out


def test_train_cli_end_to_end_and_resume(capsys, corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "run"
    base = [
        "train",
        "--preset",
        "tiny",
        "--src",
        str(root / "train.de"),
        "--tgt",
        str(root / "train.en"),
        "--out",
        str(out),
        "--threads",
        "1",
        "--eval-sentences",
        "5",
    ]
    rc, _, err = run(
        capsys,
        *base,
        "--max-steps",
        "10",
        "--save-every",
        "5",
        "--eval-every",
        "10",
        "--log-every",
        "5",
    )
    assert rc == 0, err
    assert "step 10 | epoch 1" in err and "tgt tok/s" in err and "ETA" in err
    rc, _, err = run(capsys, *base, "--max-steps", "10")
    assert rc == 2 and "already holds a training run" in err
    rc, _, err = run(capsys, "train", "--out", str(out), "--resume", "--max-steps", "14")
    assert rc == 0, err
    assert "resumed from" in err and "done: step 14" in err


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "b.en").write_text("one\n")
    (tmp_path / "bad.de").write_bytes(b"ok\n\xff\n")
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "unknown.json").write_text('{"train": {"learning_rate": 1}}')
    (tmp_path / "hyp").write_text("x\n")
    (tmp_path / "ref").write_text("x\ny\n")
    return tmp_path


BAD = [
    (["train", "--out", "{o}", "--src", "{d}/missing.de", "--tgt", "{d}/b.en"], "no such file"),
    (["train", "--out", "{o}", "--src", "{d}/a.de", "--tgt", "{d}/b.en"], "has 2 lines but"),
    (
        ["train", "--out", "{o}", "--src", "{d}/bad.de", "--tgt", "{d}/a.de"],
        "bad.de:2: invalid UTF-8",
    ),
    (["train", "--out", "{o}", "--src", "{d}/a.de"], "both src_file and tgt_file"),
    (["train", "--out", "{o}", "--preset", "nope"], "unknown preset"),
    (["train", "--out", "{o}", "--lr", "-1"], "lr must be positive"),
    (["train", "--out", "{o}", "--d-model", "30"], "divisible"),
    (["train", "--out", "{o}", "--norm-first", "maybe"], "expected true or false"),
    (["train", "--out", "{o}", "--config", "{d}/bad.json"], "cannot read JSON"),
    (["train", "--out", "{o}", "--config", "{d}/unknown.json"], "unknown key(s) learning_rate"),
    (["train", "--out", "{o}", "--resume"], "nothing to resume"),
    (["train", "--out", "{o}", "--src-lang", "xx"], "no language 'xx'"),
    (["translate", "--model", "{d}/nothing"], "not a qkv model directory"),
    (["translate", "--model", "{m}", "--beam", "0"], "--beam"),
    (["translate", "--model", "{m}", "--nbest", "9"], "--nbest"),
    (["translate", "--model", "{m}", "--input", "{d}/bad.de"], "invalid UTF-8"),
    (["evaluate", "--hyp", "{d}/hyp"], "both --hyp and --ref"),
    (["evaluate", "--hyp", "{d}/hyp", "--ref", "{d}/ref"], "has 1 lines but"),
    (["evaluate", "--model", "{m}", "--split", "dev"], "no split 'dev'"),
    (["evaluate"], "give --model"),
    (["probe", "--model", "{d}/nothing", "--out", "{o}"], "not a qkv model directory"),
    (["probe", "--model", "{m}", "--sentences", "0", "--out", "{o}"], "--sentences"),
    (
        ["probe", "--model", "{m}", "--src", "{d}/a.de", "--tgt", "{d}/b.en", "--out", "{o}"],
        "has 2 lines but",
    ),
    (["explain", "--model", "{m}", " ", "--out", "{o}"], "the sentence is empty"),
    (["explain", "--model", "{d}/nothing", "Hallo", "--out", "{o}"], "not a qkv model"),
    (["import-marian", "{d}/nothing", "--out", "{o}"], "no config.json"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:2]) + "|" + m for a, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(capsys, bad_files, trained, argv, message):
    out_dir = bad_files / "out"
    argv = [a.format(d=bad_files, o=out_dir, m=trained[0]) for a in argv]
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


def test_gz_input_for_training_files(tmp_path, corpus):
    from qkv.data import read_parallel

    root, src, tgt = corpus
    (tmp_path / "s.gz").write_bytes(gzip.compress((root / "train.de").read_bytes()))
    assert read_parallel(tmp_path / "s.gz", root / "train.en")[0] == (src[0], tgt[0])
