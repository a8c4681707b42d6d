"""fp32 or bf16 (qkv.precision): "auto" asks the hardware, then a measurement; bf16 inference
runs the large linear layers on bf16 weights and stays close to fp32; training's auto follows
the same rule. The machine this runs on may or may not have bf16 units: the decisions are
tested with both answers, the arithmetic with whichever bf16 path this CPU has."""

import pytest
import torch

from qkv import checkpoint, precision
from qkv.cli import main
from qkv.config import DecodeConfig, ModelConfig, TrainConfig
from qkv.models import EncoderDecoder
from qkv.packed import PackedAttention, PackedLinear, pack
from qkv.train import train
from qkv.translate import Translator

CPU = torch.device("cpu")


def units(monkeypatch, has: bool, speedup: float | None = None):
    """Pretend the CPU has (or lacks) bf16 units, and that bf16 measures `speedup` times faster
    (None: measuring fails the test: it must not be asked)."""

    def measured(*args, **kw):
        assert speedup is not None, "measured although the answer was already known"
        return speedup

    monkeypatch.setattr(precision, "bf16_units", lambda device: has)
    monkeypatch.setattr(precision, "bf16_speedup", measured)


@pytest.mark.parametrize(
    ("has", "speedup", "chosen"),
    [(False, None, "fp32"), (True, 2.5, "bf16"), (True, 1.1, "fp32"), (True, 0.3, "fp32")],
)
def test_auto_is_bf16_only_with_units_and_a_measured_gain(monkeypatch, has, speedup, chosen):
    units(monkeypatch, has, speedup)
    assert precision.resolve("auto", CPU, 32, 256, 8000) == chosen
    assert precision.why("auto", chosen, CPU).startswith(chosen)


def test_an_explicit_choice_is_kept_without_measuring(monkeypatch):
    units(monkeypatch, False)
    assert precision.resolve("bf16", CPU, 32, 256, 8000) == "bf16"
    assert precision.resolve("fp32", CPU, 32, 256, 8000) == "fp32"


def test_the_measurement_runs_here_and_is_a_ratio():
    for training in (False, True):
        speedup = precision.bf16_speedup(16, 64, 512, "cpu", training, reps=2)
        assert speedup >= 0.0 and speedup != float("inf")
    if not precision.bf16_units(CPU):  # no packed bf16 kernel: reported as no gain
        assert precision.bf16_speedup(16, 64, 512, "cpu", False, reps=2) < precision.MIN_SPEEDUP


def test_inference_measures_fp32_on_the_kernel_it_would_run(gemm_route, monkeypatch):
    """bf16 is weighed against the fp32 product qkv.packed would use: MKL's packed one where in
    use (qkv/native.py), oneDNN's elsewhere."""
    if not precision.bf16_units(CPU):
        pytest.skip("no packed bf16 kernel on this CPU: nothing is measured")
    from qkv import native

    calls = []
    real = native.packed_linear
    monkeypatch.setattr(native, "packed_linear", lambda *a: calls.append(1) or real(*a))
    precision.bf16_speedup.cache_clear()
    try:
        precision.bf16_speedup(16, 64, 512 + len(gemm_route), "cpu", False, reps=2)
    finally:
        precision.bf16_speedup.cache_clear()
    assert bool(calls) == (gemm_route == "mkl")


@pytest.mark.parametrize(
    ("timings", "want", "calls"),
    [
        ([1.0, 0.2], 5.0, 2),  # a clear gain: measured once
        ([1.0, 2.0, 1.0, 0.2], 5.0, 4),  # one disturbed measurement, then the gain
        ([1.0, 1.0] * 3, 1.0, 6),  # no gain: three measurements, then no
    ],
)
def test_a_measurement_without_gain_is_repeated_before_saying_no(monkeypatch, timings, want, calls):
    """bf16_speedup's guard against a busy machine: below MIN_SPEEDUP it measures again (three
    times at most) and keeps the largest ratio; a clear gain costs one measurement."""
    seen = iter(timings)
    monkeypatch.setattr(precision, "best_of", lambda fn, reps: next(seen))
    precision.bf16_speedup.cache_clear()
    try:
        assert precision.bf16_speedup(8, 16, 16, "cpu", True) == want
        assert len(timings) - len(list(seen)) == calls
    finally:
        precision.bf16_speedup.cache_clear()


def model() -> EncoderDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, d_ff=256, vocab_size=500, max_len=32, dropout=0.0)
    return EncoderDecoder(cfg).eval()


def test_bf16_inference_stays_close_to_fp32_and_really_is_bf16():
    ref = model()
    src = torch.randint(4, 500, (3, 9))
    tgt = torch.randint(4, 500, (3, 7))
    with torch.no_grad():
        want = ref(src, tgt)
        half = pack(model(), min_weights=0, bf16=True)
        got = half(src, tgt)
    layers = [m for m in half.modules() if isinstance(m, PackedLinear | PackedAttention)]
    assert layers and all("bf16" in repr(m) for m in half.modules() if type(m) is PackedLinear)
    assert got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    # bf16 keeps 8 bits of mantissa: close to fp32, and not fp32 itself
    assert 0 < diff < 0.03 * want.abs().max().item(), diff
    assert half.state_dict().keys() == ref.state_dict().keys()
    with pytest.raises(ValueError, match="int8 or bf16"):
        pack(model(), int8=True, bf16=True)


def test_bf16_beam_search_mostly_agrees_with_fp32(trained, corpus):
    out, _, _ = trained
    _, src, _ = corpus
    fp32, tok, _ = checkpoint.load(out / "last")
    bf16, _, _ = checkpoint.load(out / "last")
    cfg = DecodeConfig(beam=4)
    a = Translator(pack(fp32, min_weights=0), tok).translate(src[:40], cfg)
    b = Translator(pack(bf16, min_weights=0, bf16=True), tok).translate(src[:40], cfg)
    same = sum(x[0].text == y[0].text for x, y in zip(a, b, strict=True))
    assert same >= 36, same
    assert max(abs(x[0].score - y[0].score) for x, y in zip(a, b, strict=True)) > 0  # bf16 did run


def test_translate_precision_flags(trained, corpus, tmp_path, capsys, monkeypatch):
    out, _, _ = trained
    _, src, _ = corpus
    (tmp_path / "in.de").write_text("\n".join(src[:20]) + "\n")
    monkeypatch.setenv("QKV_PACK_MIN_WEIGHTS", "0")  # the tiny model's layers packed too

    def translate(*flags):
        argv = ["translate", "--model", str(out / "last"), "--input", str(tmp_path / "in.de")]
        code = main([*argv, "--greedy", *flags])
        return code, *capsys.readouterr()

    code, fp32, _ = translate("--precision", "fp32")
    assert code == 0 and len(fp32.splitlines()) == 20
    code, bf16, _ = translate("--precision", "bf16")
    assert code == 0 and len(bf16.splitlines()) == 20
    units(monkeypatch, False)
    assert translate() == (0, fp32, "")  # auto without bf16 units: fp32, silently
    units(monkeypatch, True, 3.0)
    code, auto, err = translate()
    assert (code, auto) == (0, bf16) and "bf16 weights (auto: faster here)" in err
    for other in (["--int8"], ["--compile"]):
        code, _, err = translate("--precision", "bf16", *other)
        assert code == 2 and len(err.splitlines()) == 1
        assert f"--precision bf16 and {other[0]} do not go together" in err


@pytest.mark.parametrize(("has", "chosen"), [(False, "fp32"), (True, "bf16")])
def test_training_auto_follows_the_same_rule_and_says_so(monkeypatch, tmp_path, has, chosen):
    units(monkeypatch, has, 2.0 if has else None)
    seen = []
    monkeypatch.setattr(torch, "autocast", _recording(torch.autocast, seen))
    from .test_train import Counting  # a stub task

    logs: list[str] = []
    cfg = TrainConfig(threads=1, max_steps=3, eval_every=100, save_every=100, precision="auto")
    shape = ModelConfig(d_model=32, n_heads=4, d_ff=64, max_len=16)
    trainer = train(Counting(seed=1), shape, cfg, tmp_path, log=logs.append)
    assert trainer.precision == chosen
    assert any(line.startswith(f"precision: {chosen} (auto: ") for line in logs), logs
    assert seen and all(on == (chosen == "bf16") for on in seen)


def _recording(autocast, seen):
    def recorded(device_type, dtype=None, enabled=True, **kw):
        seen.append(enabled)
        return autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    return recorded
