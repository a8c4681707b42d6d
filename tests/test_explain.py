import json

import matplotlib.image
import numpy as np
import pytest
import torch

from qkv import checkpoint, plot
from qkv.config import DecodeConfig
from qkv.explain import explain
from qkv.inspect import AttentionKind, ablate, attention_modules, mask_heads, record_attention
from qkv.translate import Translator


@pytest.fixture(scope="module")
def translator(trained):
    model, tok, _ = checkpoint.load(trained[0])
    return Translator(model, tok)


def test_greedy_recording_during_generation_equals_teacher_forced(translator, corpus):
    _, src, _ = corpus
    e = explain(translator, src[0], DecodeConfig(strategy="greedy"))
    ids = translator.tokenizer.encode(e.translation)
    model = translator.model
    s = torch.tensor([translator.encode_sources([src[0]])[0]])
    with torch.no_grad(), record_attention(model) as rec:
        model(s, torch.tensor([[1] + ids]))
    kinds = {
        AttentionKind.ENCODER_SELF: "encoder.layers.{}.self_attn",
        AttentionKind.DECODER_SELF: "decoder.layers.{}.self_attn",
        AttentionKind.CROSS: "decoder.layers.{}.cross_attn",
    }
    for kind, pattern in kinds.items():
        for layer, w in enumerate(e.attention[kind]):
            torch.testing.assert_close(w, rec.last(pattern.format(layer))[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5, rtol=1e-5)
    assert e.attention[AttentionKind.CROSS][0].shape[1:] == (len(e.tgt_in), len(e.src_tokens))
    assert len(e.tgt_in) == len(e.tgt_out) and e.tgt_out[-1] == "</s>"


def test_beam_explanation_follows_the_chosen_hypothesis(translator, corpus):
    _, src, _ = corpus
    opts = DecodeConfig(beam=3)
    e = explain(translator, src[1], opts)
    assert e.translation == translator.translate_best([src[1]], opts)[0]
    assert e.mode == "beam 3 (alpha 0.6)"
    assert e.attention[AttentionKind.DECODER_SELF][0].shape[-1] == len(e.tgt_in)


def test_sampled_explanation_samples(translator, corpus):
    """explain with sampling explains the sampled output (it once silently decoded greedily)."""
    _, src, _ = corpus
    outputs = set()
    for seed in range(6):
        cfg = DecodeConfig(strategy="sample", seed=seed, temperature=3.0)
        e = explain(translator, src[2], cfg)
        assert e.mode == f"sample (seed {seed})"
        assert e.translation == translator.translate_best([src[2]], cfg)[0]
        outputs.add(e.translation)
    assert len(outputs) > 1  # hot sampling varies with the seed; greedy would not


def test_masking_no_head_is_exact_and_one_head_is_local(tiny):
    model = tiny()
    src, tgt = torch.randint(3, 23, (2, 8)), torch.randint(3, 23, (2, 5))
    plain = model(src, tgt)
    with mask_heads(model, {}):
        assert torch.equal(model(src, tgt), plain)
    # masking head 1 of the last decoder cross-attention changes that module's output by exactly
    # that head's share of out_proj, and nothing upstream
    path = "decoder.layers.1.cross_attn"
    mha = attention_modules(model)[path]
    seen = {}
    mha.out_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0].clone()))
    model(src, tgt)
    full_in = seen["in"]
    with mask_heads(model, {path: [1]}):
        model(src, tgt)
    masked_in = seen["in"]
    dh = mha.d_head
    assert torch.equal(masked_in[..., dh : 2 * dh], torch.zeros_like(masked_in[..., dh : 2 * dh]))
    keep = [i for i in range(4 * dh) if not dh <= i < 2 * dh]
    torch.testing.assert_close(masked_in[..., keep], full_in[..., keep])
    assert mha.head_mask is None  # removed after the block
    with pytest.raises(KeyError), mask_heads(model, {"nope": [0]}):
        pass


def test_ablations(tiny):
    model = tiny()
    src, tgt = torch.randint(3, 23, (2, 8)), torch.randint(3, 23, (2, 5))
    plain = model(src, tgt)
    # removing encoder layer 1 equals an encoder with only layer 0
    with ablate(model, bypass=["encoder.layers.1"]):
        removed = model(src, tgt)
    layer1 = model.encoder.layers[1]
    model.encoder.layers = torch.nn.ModuleList([model.encoder.layers[0]])
    torch.testing.assert_close(removed, model(src, tgt))
    model.encoder.layers.append(layer1)
    torch.testing.assert_close(model(src, tgt), plain)  # everything restored
    with ablate(model, no_skip=["decoder.layers.0.ff_residual"]):
        assert not torch.allclose(model(src, tgt), plain)
    torch.testing.assert_close(model(src, tgt), plain)


def _panel_runs(mask: np.ndarray, axis: int, min_len: int = 40) -> int:
    """Runs of rows/columns that are mostly colourful (heatmap panels), longer than min_len."""
    line = mask.sum(axis=axis) > 0.3 * mask.shape[axis]
    runs, length = 0, 0
    for v in list(line) + [False]:
        if v:
            length += 1
        else:
            runs += length >= min_len
            length = 0
    return runs


def test_png_grid_has_layers_by_heads_panels(tmp_path):
    layers = [torch.rand(3, 6, 6).softmax(-1) for _ in range(2)]  # 2 layers x 3 heads
    path = plot.attention_grid(layers, list("abcdef"), list("abcdef"), "t", tmp_path / "g.png")
    img = matplotlib.image.imread(path)[..., :3]
    colourful = (img.max(-1) - img.min(-1)) > 0.15  # viridis cells; text and frames are grey
    assert _panel_runs(colourful, axis=0) == 3  # columns of panels: heads
    assert _panel_runs(colourful, axis=1) == 2  # rows of panels: layers


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    import os

    if not os.access("/usr/bin/chromium", os.X_OK):
        pytest.fail("Debian's chromium is not installed: run ./setup.sh test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route(
        "**/*", lambda r: r.abort() if not r.request.url.startswith("file:") else r.continue_()
    )  # prove it needs no network
    page.goto(path.as_uri())
    page.wait_for_function("window.qkvReady === true", timeout=10000)
    return page, errors


def test_attention_page_draws_the_chosen_head(browser, translator, corpus, tmp_path, capsys):
    from qkv.cli import main

    _, src, _ = corpus
    assert (
        main(["explain", "--model", str(tmp_path.parent), src[2], "--out", str(tmp_path), "--json"])
        == 2
    )  # not a model dir: one clear error
    capsys.readouterr()
    model_dir = checkpoint.resolve(translator_dir(translator, tmp_path))
    assert (
        main(
            ["explain", "--model", str(model_dir), src[2], "--out", str(tmp_path / "ex"), "--json"]
        )
        == 0
    )
    out = tmp_path / "ex"
    for name in ("encoder_self", "decoder_self", "cross", "alignment"):
        assert matplotlib.image.imread(out / f"{name}.png").ndim == 3
    data = json.loads((out / "attention.json").read_text())
    page, errors = open_page(browser, out / "attention.html")
    page.select_option("#kind", "cross")
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    png = page.locator("#heatmap").screenshot(path=str(tmp_path / "shot.png"))
    assert png
    img = (matplotlib.image.imread(tmp_path / "shot.png")[..., :3] * 255).round()
    weights = np.array(data["attention"]["cross"][1][2])  # (T, S)
    cell, pad = 22, 110
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            red = img[pad + i * cell + cell // 2, pad + j * cell + cell // 2, 0]
            assert abs(red - 255 * (1 - weights[i, j])) <= 3, (i, j, red, weights[i, j])
    page.hover("#queries .tok >> nth=1")
    shaded = page.eval_on_selector_all("#keys .tok", "els => els.map(e => e.style.background)")
    assert all(shaded)
    assert errors == []


def translator_dir(translator, tmp_path):
    path = tmp_path / "model"
    checkpoint.save(path, translator.model, translator.tokenizer, {})
    return path


def test_beam_trace_matches_the_search_and_renders(browser, translator, corpus, tmp_path, capsys):
    from qkv.cli import main

    _, src, _ = corpus
    model_dir = translator_dir(translator, tmp_path)
    (tmp_path / "in.txt").write_text("\n".join(src[:3]) + "\n")
    base = [
        "translate",
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in.txt"),
        "--beam",
        "4",
        "--nbest",
        "2",
    ]
    import qkv.translate

    searches = []

    def counting(*args, **kwargs):
        searches.append(kwargs.get("trace"))
        return decode(*args, **kwargs)

    decode = qkv.translate.decode
    qkv.translate.decode = counting
    try:
        assert main([*base, "--trace", str(tmp_path / "t.json")]) == 0
    finally:
        qkv.translate.decode = decode
    assert len(searches) == 1 and searches[0] is not None  # one search, traced, printed
    printed = capsys.readouterr().out.splitlines()
    trace = json.loads((tmp_path / "t.json").read_text())
    got = [
        f"{i} ||| {h['text']} ||| {h['score']:.4f}"
        for i, s in enumerate(trace["sentences"])
        for h in s["nbest"]
    ]
    assert got == printed  # the trace's final hypotheses are beam search's own output
    for s in trace["sentences"]:
        for h in s["nbest"]:
            node, path = h["node"], []
            while s["nodes"][node]["parent"] is not None:
                path.append(s["nodes"][node]["token"])
                node = s["nodes"][node]["parent"]
            assert path[::-1] == h["tokens"] + [2]
    assert main([*base, "--trace", str(tmp_path / "t.html")]) == 0
    page, errors = open_page(browser, tmp_path / "t.html")
    assert page.locator("#tree circle").count() == len(trace["sentences"][0]["nodes"])
    assert page.locator("#nbest li").count() == 2
    assert errors == []
    assert main([*base[:-4], "--greedy", "--trace", str(tmp_path / "x.html")]) == 2
    assert main([*base, "--trace", str(tmp_path / "x.txt")]) == 2


def test_probe_report(translator, corpus, tmp_path):
    from qkv.probe import probe
    from qkv.probe_report import write_report

    _, src, tgt = corpus
    pairs = list(zip(src[:12], tgt[:12], strict=True))
    report = probe(translator, pairs, beam=2, receptive_sentences=4, log=lambda m: None)
    n_heads = len(attention_modules(translator.model)) * 4
    assert len(report.single_head) == n_heads
    assert report.pruning[0].bleu == pytest.approx(report.greedy_bleu)
    assert report.pruning[0].heads_removed == 0
    rf = report.receptive_field[0.01]
    assert rf[0] == 1.0  # embeddings: only the position itself
    longest = max(len(ids) for ids in translator.encode_sources(src[:4]))
    assert all(1.0 <= c <= longest for c in rf), rf
    for ent in report.focus[AttentionKind.CROSS]["entropy"]:
        assert all(e >= 0 for e in ent)
    write_report(report, tmp_path)
    for name in (
        "report.md",
        "report.json",
        "focus_entropy.png",
        "head_masking.png",
        "pruning.png",
        "ablations.png",
        "receptive_field.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert "## Redundancy" in (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["receptive_field"]["0.01"] == rf and "cross" in data["focus"]


def test_attention_page_of_a_language_model(browser, tmp_path):
    """A language model's page: one kind (causal self-attention), drawn as its weights say."""
    from qkv.cli import main
    from qkv.models import DecoderOnly
    from qkv.presets import PRESETS
    from qkv.tokenizer import Characters

    tok = Characters.of("abcdefgh ")
    shape, _ = PRESETS["shakespeare-char"]
    cfg = shape.replace(
        vocab_size=tok.vocab_size, d_model=32, d_ff=64, n_decoder_layers=2, output_bias=True
    )
    torch.manual_seed(0)
    model = DecoderOnly(cfg).eval()
    with torch.no_grad():  # untrained: never end (eos) early, whatever the seed draws
        model.lm_head.bias[:4] = -1e4
    checkpoint.save(tmp_path / "lm", model, tok, {"task": "lm"})
    argv = ["explain", "--model", str(tmp_path / "lm"), "abc d", "--out", str(tmp_path / "ex")]
    assert main([*argv, "--json", "--max-new-tokens", "4", "--sample", "--seed", "1"]) == 0
    data = json.loads((tmp_path / "ex" / "attention.json").read_text())
    assert list(data["attention"]) == ["decoder self"] and len(data["tgt_in"]) == 9
    page, errors = open_page(browser, tmp_path / "ex" / "attention.html")
    assert page.eval_on_selector_all("#kind option", "os => os.map(o => o.value)") == [
        "decoder self"
    ]
    page.select_option("#layer", "1")
    page.select_option("#head", "3")
    page.locator("#heatmap").screenshot(path=str(tmp_path / "shot.png"))
    img = (matplotlib.image.imread(tmp_path / "shot.png")[..., :3] * 255).round()
    weights = np.array(data["attention"]["decoder self"][1][3])  # (T, T), causal
    assert np.triu(weights, 1).max() == 0
    cell, pad = 22, 110
    for i in range(9):
        for j in range(9):
            red = img[pad + i * cell + cell // 2, pad + j * cell + cell // 2, 0]
            assert abs(red - 255 * (1 - weights[i, j])) <= 3, (i, j, red, weights[i, j])
    assert errors == []


def test_head_diversity_counts_what_the_heads_pick(translator, corpus):
    """distinct_top per layer, against a loop over queries and heads on the recorded weights;
    a one-head model picks exactly one key per layer."""
    from qkv.probe import STRONG, Prober

    _, src, tgt = corpus
    pairs = list(zip(src[:10], tgt[:10], strict=True))
    prober = Prober(translator, pairs, log=lambda m: None)
    div = prober.diversity()
    enc = div[AttentionKind.ENCODER_SELF]
    picks, strong, union, n = [0.0, 0.0], [0.0, 0.0], 0.0, 0
    for batch in prober.batches:
        with torch.no_grad(), record_attention(translator.model) as rec:
            translator.model(batch.src, batch.tgt_in)
        for b in range(batch.src.shape[0]):
            for i in range(batch.src.shape[1]):
                if batch.src[b, i] == translator.config.pad_id:
                    continue
                n += 1
                seen = set()
                for layer in range(2):
                    w = rec[f"encoder.layers.{layer}.self_attn"][0][b, :, i]  # (H, S)
                    tops = {int(w[h].argmax()) for h in range(w.shape[0])}
                    picks[layer] += len(tops)
                    strong[layer] += int((w.max(0).values >= STRONG).sum())
                    seen |= tops
                union += len(seen)
    assert enc["distinct_top"] == pytest.approx([p / n for p in picks])
    assert enc["strong"] == pytest.approx([s / n for s in strong])
    assert enc["distinct_top_all"] == pytest.approx(union / n)
    assert all(1.0 <= x <= 4.0 for x in enc["distinct_top"])  # 4 heads
    from qkv.models import from_config

    one_head = from_config(translator.config.replace(n_heads=1)).eval()
    one_head = Translator(one_head, translator.tokenizer)
    single = Prober(one_head, pairs, log=lambda m: None).diversity()
    assert single[AttentionKind.ENCODER_SELF]["distinct_top"] == [1.0, 1.0]


def test_explain_query_draws_one_words_heads(trained, tmp_path, capsys):
    from qkv.cli import main

    out_dir, _, _ = trained
    argv = ["explain", "--model", str(out_dir), "zwei Katze schläft", "--out", str(tmp_path)]
    assert main([*argv, "--query", "Katze"]) == 0
    assert (tmp_path / "query-Katze.png").stat().st_size > 0
    rc = main([*argv[:-1], str(tmp_path / "none"), "--query", "Hund"])
    assert rc == 2 and not (tmp_path / "none").exists()  # nothing written
    err = capsys.readouterr().err
    assert "no token 'Hund'" in err and "Traceback" not in err
