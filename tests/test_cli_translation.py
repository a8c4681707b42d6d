import gzip
import io
import sys

import pytest
import torch

from qkv import checkpoint
from qkv.cli import main
from qkv.config import DecodeConfig
from qkv.translate import Translator


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
    sample = ["translate", "--model", str(out_dir), "--sample", "--temperature", "3"]
    text = "\n".join(src[:6]) + "\n"
    outs = [run(capsys, *sample, "--seed", seed, stdin=text) for seed in ("1", "1", "2")]
    assert all(rc == 0 for rc, _, _ in outs)
    assert outs[0][1] == outs[1][1] != outs[2][1]  # reproducible per seed, varies across seeds
    model, tok, _ = checkpoint.load(out_dir)
    want = Translator(model, tok).translate_best(
        src[:6], DecodeConfig(strategy="sample", temperature=3.0, seed=1)
    )
    assert outs[0][1].splitlines() == want  # the library's sampler, not a CLI copy


def test_translate_int8(capsys, trained, corpus, monkeypatch):
    out_dir, _, _ = trained
    _, src, _ = corpus
    monkeypatch.setenv("QKV_PACK_MIN_WEIGHTS", "0")  # the toy model's layers are all small
    text = "\n".join(src[:5]) + "\n"
    argv = ["translate", "--model", str(out_dir), "--beam", "3", "--nbest", "2"]
    rc, fp32, _ = run(capsys, *argv, stdin=text)
    rc8, int8, err = run(capsys, *argv, "--int8", stdin=text)
    assert rc == rc8 == 0 and err == ""
    assert len(int8.splitlines()) == len(fp32.splitlines()) == 10
    assert int8 != fp32  # 8-bit weights move the scores


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
    assert "step 10 | epoch 1" in err and "tok/s" in err and "ETA" in err
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
    (["train", "--out", "{o}", "--config", "{d}/bad.json"], "not valid JSON"),
    (["train", "--out", "{o}", "--config", "{d}/unknown.json"], "unknown key(s) learning_rate"),
    (["train", "--out", "{o}", "--resume"], "nothing to resume"),
    (["train", "--out", "{o}", "--src-lang", "xx"], "no language 'xx'"),
    (["translate", "--model", "{d}/nothing"], "not a qkv model directory"),
    (["translate", "--model", "{m}", "--beam", "0"], "beam must be >= 1"),
    (["translate", "--model", "{m}", "--nbest", "9"], "nbest must be between 1 and the beam size"),
    (["translate", "--model", "{m}", "--input", "{d}/bad.de"], "invalid UTF-8"),
    (["translate", "--model", "{m}", "--greedy", "--sample"], "choose one decoding strategy"),
    (["translate", "--model", "{m}", "--sample", "--beam", "3"], "--beam applies to beam"),
    (["translate", "--model", "{m}", "--top-p", "0.5"], "--top-p applies to sampling"),
    (["translate", "--model", "{m}", "--sample", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["translate", "--model", "{m}", "--penalty", "nope"], "invalid choice"),
    (["translate", "--model", "{m}", "--greedy", "--trace", "{o}.html"], "records beam search"),
    (["translate", "--model", "{m}", "--device", "tpu"], "--device"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, trained):
    rc, _, err = run(capsys, "translate", "--model", str(trained[0]), "--device", "cuda", stdin="")
    assert rc == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
