import pytest
import torch
from safetensors.torch import load_file

from qkv import checkpoint
from qkv.presets import PRESETS
from qkv.train import train
from qkv.translate import DecodeOptions, Translator


def test_training_lowers_loss_and_learns(trained, corpus):
    out, trainer, logs = trained
    _, src, tgt = corpus
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("step")]
    assert losses[-1] < losses[0] / 3, losses
    assert any("tgt tok/s" in line and "ETA" in line for line in logs)
    model, tok, meta = checkpoint.load(out)
    translator = Translator(model, tok)
    hyps = translator.translate_best(src[:20], DecodeOptions(beam=3))
    assert sum(h == t for h, t in zip(hyps, tgt[:20], strict=True)) >= 15, hyps
    assert (out / "metrics.jsonl").read_text().count("valid_bleu") == 2


def test_checkpoint_round_trip_gives_identical_translations(trained, corpus, tmp_path):
    out, trainer, _ = trained
    _, src, _ = corpus
    model, tok, _ = checkpoint.load(out / "best")
    checkpoint.save(tmp_path / "copy", model, tok, {"note": "copy"})
    again, tok2, meta = checkpoint.load(tmp_path / "copy")
    assert meta == {"note": "copy"}
    opts = DecodeOptions(beam=4, nbest=2)
    a = Translator(model, tok).translate(src[:10], opts)
    b = Translator(again, tok2).translate(src[:10], opts)
    assert [[(t.text, t.score) for t in n] for n in a] == [
        [(t.text, t.score) for t in n] for n in b
    ]


def test_resume_after_a_kill_matches_an_uninterrupted_run(corpus, tmp_path):
    root, _, _ = corpus
    model_cfg, cfg = PRESETS["tiny"]
    model_cfg = model_cfg.replace(dropout=0.1)  # so the random state must be restored too
    cfg = cfg.replace(
        src_file=str(root / "train.de"),
        tgt_file=str(root / "train.en"),
        threads=1,
        max_steps=24,
        save_every=8,
        eval_every=12,
        eval_sentences=5,
    )

    def run(out, **extra):
        return train(model_cfg, cfg, out, log=lambda s: None, **extra)

    class Killed(Exception):
        pass

    def kill_at_19(step):
        if step == 19:
            raise Killed

    run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "killed", on_step=kill_at_19)
    assert checkpoint.load_trainer_state(tmp_path / "killed" / "last")["json"]["step"] == 16
    run(tmp_path / "killed", resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_atomic_dir_keeps_the_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with checkpoint.atomic_dir(target) as d:
        (d / "x").write_text("old")
    with pytest.raises(RuntimeError), checkpoint.atomic_dir(target) as d:
        (d / "x").write_text("half-written")
        raise RuntimeError("killed")
    assert (target / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_torch(eps):
    from qkv.train import smoothed_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).requires_grad_()
    target = torch.randint(0, 50, (37,))
    target[:5] = 7  # repeated targets
    want = torch.nn.functional.cross_entropy(logits, target, reduction="sum", label_smoothing=eps)
    (want_grad,) = torch.autograd.grad(want * 2.5, logits)
    got = smoothed_cross_entropy(logits, target, eps)
    (got_grad,) = torch.autograd.grad(got * 2.5, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    small = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: smoothed_cross_entropy(x, torch.tensor([0, 5, 5, 2]), eps), (small,)
    )
