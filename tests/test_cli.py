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


@pytest.mark.parametrize("argv", [[], ["demo"]])
def test_help_has_example(argv):
    r = run(*argv, "--help")
    assert r.returncode == 0 and "example:" in r.stdout


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
