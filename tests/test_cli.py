import subprocess
import sys

import pytest

from qkv.cli import main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "qkv.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_demo_prints_size_and_weights(capsys):
    assert main(["demo", "a b c", "--d-model", "32", "--heads", "4", "--show-heads", "1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "head 0" in out and "encoder.layers.0.self_attn" in out


COMMANDS = [
    "demo",
    "train",
    "translate",
    "evaluate",
    "explain",
    "probe",
    "generate",
    "import-marian",
    "import-nanogpt",
]


def test_top_level_help_has_an_example():
    r = run("--help")
    assert r.returncode == 0 and "example:" in r.stdout
    assert all(c in r.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"qkv {command} " in out.split("examples:")[1]


def test_config_flags_show_meaning_and_default(capsys):
    import dataclasses

    from qkv.config import DecodeConfig, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert "--lr X peak learning rate, reached after warmup" in train_help
    assert "(default 0.001)" in train_help and "(default 0.9,0.98)" in train_help
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    explain_help = " ".join(capsys.readouterr().out.split())
    assert "greedy, sample, or beam search (default greedy)" in explain_help
    for cls in (TrainConfig, DecodeConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--heads", "7"], "divisible"),
        (["demo", "   "], "empty"),
        (["demo", "--d-model", "x"], "invalid int"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(argv, message):
    r = run(*argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
