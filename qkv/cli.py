"""The `qkv` command line. Each command is a parser (`add_*`) beside a function (`run_*`) that
parses, makes one library call and prints; bad input ends in one line on stderr and exit code 2,
never a traceback. Config flags (model, training, decoding) come from qkv/flags.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .allocator import keep_freed_memory
from .checkpoint import CheckpointError, write_text_atomic
from .cli_items import add_recommend
from .cli_sentences import add_classify, add_embed, add_search
from .cli_serve import add_serve
from .config import ConfigError, ModelConfig, TrainConfig
from .data import PARALLEL_SPLITS, DataError, parallel, read_lines, read_parallel
from .distributed import DistributedError, exit_if_joined
from .flags import (
    Parser,
    UsageError,
    add_batch_size_flag,
    add_compile_flag,
    add_decode_flags,
    add_device_flag,
    command,
    config_flags,
    decode_config,
    device_of_flag,
    given,
    load_model_dir,
    load_translator,
    model_flags,
    note_cut,
    parse_floats,
    read_input,
    task_of,
)
from .marian import MarianImportError
from .nanogpt import NanoGPTImportError
from .tokenizer import ItemError
from .train import Diverged, Stopped


def _languages(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[str, str]:
    src, tgt = args.src_lang or meta.get("src_lang"), args.tgt_lang or meta.get("tgt_lang")
    if not (src and tgt):
        raise UsageError("the model does not name its languages; give --src-lang and --tgt-lang")
    return src, tgt


# --- the commands -----------------------------------------------------------------------------

SHADES = " .:-=+*#%@"


def add_demo(sub) -> None:
    p = command(
        sub,
        "demo",
        "build a small model and show attention weights of a toy sentence",
        "Build a small encoder-decoder, print its size and the attention weights that each "
        "head of encoder layer 0 gives a toy sentence.",
        ["qkv demo 'the cat sat on the mat' --show-heads 2"],
    )
    p.add_argument("sentence", nargs="?", default="the cat sat on the mat")
    p.add_argument("--d-model", type=int, default=256, help="default 256")
    p.add_argument("--heads", type=int, default=8, help="default 8")
    p.add_argument("--show-heads", type=int, default=2, help="default 2")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .inspect import record_attention
    from .models import count_parameters, from_config

    words = args.sentence.split()
    if not words:
        raise UsageError("demo: the sentence is empty")
    vocab = ["<pad>", "<s>", "</s>"] + sorted(set(words))
    ids = torch.tensor([[vocab.index(w) for w in words]])
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=args.d_model, n_heads=args.heads, dropout=0.0)
    model = from_config(cfg).eval()
    print(
        f"model: {cfg.arch}, d_model={cfg.d_model}, heads={cfg.n_heads}, "
        f"layers={cfg.n_encoder_layers}+{cfg.n_decoder_layers}, "
        f"{count_parameters(model):,} parameters"
    )
    with torch.no_grad(), record_attention(model) as rec:
        model(ids, torch.tensor([[cfg.bos_id] + ids[0, :-1].tolist()]))
    w = rec.last("encoder.layers.0.self_attn")[0]  # (H, S, S)
    print(
        f"\nencoder layer 0 self-attention of {args.sentence!r} (untrained weights; "
        f"darker = more weight, shades {SHADES!r}); each row sums to 1:"
    )
    width = max(map(len, words))
    for h in range(min(args.show_heads, cfg.n_heads)):
        print(f"\nhead {h}")
        print(" " * (width + 1) + " ".join(word[:3].ljust(3) for word in words))
        for i, word in enumerate(words):
            cells = " ".join(
                SHADES[min(int(x * len(SHADES)), len(SHADES) - 1)] * 3 for x in w[h, i]
            )
            print(f"{word.rjust(width)} {cells}   max {float(w[h, i].max()):.2f}")
    print(f"\nrecorded {len(rec)} attention modules:", ", ".join(sorted(rec)))
    return 0


# Model fields that training derives from the data (the tokenizer decides them), so no flag.
DERIVED = {"arch", "vocab_size", "tgt_vocab_size", "share_embeddings", "pad_id", "bos_id", "eos_id"}
DATA_FLAGS = {
    "src": "src_file",
    "tgt": "tgt_file",
    "tsv": "tsv_file",
    "valid_src": "valid_src_file",
    "valid_tgt": "valid_tgt_file",
    "text": "text_file",
    "valid_text": "valid_text_file",
    "valid_tsv": "valid_tsv_file",
    "interactions": "interactions_file",
}
RESUMABLE = {"max_minutes", "max_steps", "max_epochs", "threads"}  # a resumed run's new budget


def add_train(sub) -> None:
    from .presets import PRESETS

    p = command(
        sub,
        "train",
        "train a model (translation, language model, classifier, bi-encoder, next item)",
        "Train a model for a task on a named data set (Multi30k, Tiny Shakespeare, SST-2, STS-B, "
        "MovieLens-1M) or your own "
        "files. Shows loss, lr, tokens/s and ETA; keeps the best checkpoint in OUT/best and a "
        "resumable one in OUT/last; SIGTERM or Ctrl-C saves OUT/last after the step in progress "
        "and stops (exit 143 or 130). Values: the preset, then --config, then flags.",
        [
            "qkv train --preset multi30k-de-en --out runs/de-en --max-minutes 60",
            "qkv train --preset multi30k-de-en --src my.de --tgt my.en --out runs/mine",
            "qkv train --preset multi30k-de-en --arch gru-attention --out runs/de-en-gru",
            "qkv train --preset tatoeba-en-zh --out runs/en-zh",
            "qkv train --preset shakespeare-char --out runs/shakespeare",
            "qkv train --task lm --text my.txt --tokenizer bpe --vocab-size 4000 --out runs/lm",
            "qkv train --preset ml-1m --out runs/ml-1m",
            "qkv train --task items --interactions events.csv --block-size 50 --out runs/shop",
            "qkv train --out runs/de-en --resume",
        ],
    )
    p.add_argument(
        "--preset",
        help=f"one of: {', '.join(PRESETS)} (default: multi30k-de-en; shakespeare-char's "
        "shape for --task lm)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--arch",
        choices=["transformer", "gru", "gru-attention"],
        help="translation: the Transformer (default), or a recurrent baseline: a GRU "
        "encoder-decoder through one fixed vector (gru) or with additive attention",
    )
    p.add_argument("--config", help='JSON file {"model": {...}, "train": {...}} over the preset')
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out has a run")
    add_device_flag(p)
    p.add_argument("--src", help="your source file, one sentence per line (plain or .gz)")
    p.add_argument("--tgt", help="your target file, line-aligned with --src")
    p.add_argument(
        "--tsv",
        help="source<TAB>target lines; classify: text<TAB>label; similarity: a<TAB>b<TAB>score",
    )
    p.add_argument("--valid-src", help="validation source file (default: held out from --src)")
    p.add_argument("--valid-tgt", help="validation target file")
    p.add_argument("--text", help="lm: your training text (plain or .gz)")
    p.add_argument("--valid-text", help="lm: validation text (default: the last 10%%)")
    p.add_argument("--valid-tsv", help="classify/similarity: validation TSV (default: held out)")
    p.add_argument(
        "--interactions",
        help="items: `user item` lines in time order, or a CSV with user, item, timestamp",
    )
    config_flags(p, TrainConfig, "t_", "training (overrides the preset)", set(DATA_FLAGS.values()))
    config_flags(p, ModelConfig, "m_", "model shape (overrides the preset)", DERIVED)
    p.set_defaults(func=run_train)


def _train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    from .config import apply_file, read_run_config
    from .presets import PRESETS

    out = Path(args.out)
    if args.resume:
        if not (out / "train_config.json").is_file():
            raise UsageError(f"{out}: nothing to resume (no train_config.json)")
        model_cfg, train_cfg = read_run_config(out / "train_config.json")
        budget = {k: v for k, v in given(args, "t_").items() if k in RESUMABLE}
        return model_cfg, train_cfg.replace(**budget)
    # a data flag that only one task reads names that task
    task = args.t_task
    if args.text is not None:
        task = task or "lm"
    if args.interactions is not None:
        task = task or "items"
    by_task = {
        "lm": "shakespeare-char",
        "classify": "sst2",
        "similarity": "stsb",
        "items": "ml-1m",
    }
    preset = args.preset or by_task.get(task, "multi30k-de-en")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    model_cfg, train_cfg = PRESETS[preset]
    if args.config:
        model_cfg, train_cfg = apply_file(model_cfg, train_cfg, args.config)
    files = {DATA_FLAGS[k]: getattr(args, k) for k in DATA_FLAGS if getattr(args, k)}
    if any(files.get(k) for k in ("src_file", "tsv_file", "text_file", "interactions_file")):
        files["dataset"] = None
    needs = {"lm": ("text_file", "--text"), "items": ("interactions_file", "--interactions")}
    if task in needs and train_cfg.task != task:
        field, flag = needs[task]
        if not files.get(field):
            raise UsageError(f"--task {task} with preset {preset} needs {flag} FILE")
        files["task"] = task
    if (out / "last").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a training run; use --resume or --overwrite")
    train_cfg = train_cfg.replace(**{**given(args, "t_"), **files})
    model_cfg = model_cfg.replace(**given(args, "m_"))
    if args.arch in ("gru", "gru-attention"):
        if train_cfg.task != "translation":
            raise UsageError(f"--arch {args.arch} is a translation model, not for {train_cfg.task}")
        model_cfg = model_cfg.replace(arch=args.arch)
    return model_cfg, train_cfg


def run_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .tasks import task_for
    from .train import train

    model_cfg, train_cfg = _train_configs(args)
    world = distributed.from_env()  # torchrun's processes, or this one alone
    device = distributed.init(world, device_of_flag(args.device))
    finished = False
    try:
        train(
            task_for(train_cfg),
            model_cfg,
            train_cfg,
            args.out,
            resume=args.resume,
            device=device,
            world=world,
        )
        finished = True
    except Stopped:
        finished = True  # every process stopped at the same step: they can meet to leave
        raise
    finally:
        distributed.close(world, finished)
    return 0


def add_translate(sub) -> None:
    p = command(
        sub,
        "translate",
        "translate text with a trained model",
        "Translate lines from stdin (or --input) to stdout (or --output).",
        [
            "echo 'Ein Mann fährt Fahrrad.' | qkv translate --model runs/de-en",
            "qkv translate --model runs/de-en --input in.de --output out.en --beam 5 --nbest 3",
            "qkv translate --model runs/de-en --int8 < in.de    # 8-bit weights: faster on CPU",
            "qkv translate --model runs/de-en --compile < in.de  # compiled fixed-shape steps",
            "qkv translate --model opus-de-en --penalty power --alpha 1 --at-max stop  # as HF",
        ],
    )
    model_flags(p)
    p.add_argument("--input", help="file to translate (default: stdin)")
    p.add_argument("--output", help="file to write (default: stdout)")
    p.add_argument("--trace", help="also write the beam-search tree to this .html or .json file")
    add_decode_flags(p)
    add_compile_flag(p)
    p.set_defaults(func=run_translate)


def run_translate(args: argparse.Namespace) -> int:
    from .html import beam_page

    cfg = decode_config(args)
    if args.trace and not args.trace.endswith((".html", ".json")):
        raise UsageError("--trace must name a .html or .json file")
    if args.trace and cfg.strategy != "beam":
        raise UsageError(f"--trace records beam search, not {cfg.strategy}")
    translator, _ = load_translator(args, args.int8)
    lines = read_input(args.input)
    note_cut(translator.tokenizer, lines, translator.config.max_len - 1, args.input)
    if args.trace:
        results, trace = translator.traced(lines, cfg)
        write_text_atomic(
            args.trace, beam_page(trace) if args.trace.endswith(".html") else json.dumps(trace)
        )
    else:
        results = translator.translate(lines, cfg)
    if cfg.nbest > 1:
        out = "".join(
            f"{i} ||| {t.text} ||| {t.score:.4f}\n"
            for i, nbest in enumerate(results)
            for t in nbest
        )
    else:
        out = "".join(nbest[0].text + "\n" for nbest in results)
    if args.output:
        write_text_atomic(args.output, out)
    else:
        sys.stdout.write(out)
    return 0


def add_evaluate(sub) -> None:
    p = command(
        sub,
        "evaluate",
        "score a model on a data set split, or hypothesis/reference files",
        "Cased, detokenized sacreBLEU and chrF (with signatures), plus lowercased 13a-tokenized "
        "BLEU as older papers report it.",
        [
            "qkv evaluate --model runs/de-en --split test_2016_flickr",
            "qkv evaluate --hyp out.en --ref ref.en",
            "qkv evaluate --model runs/sst2 --plot confusion.png",
            "qkv evaluate --model runs/stsb --split test",
            "qkv evaluate --model runs/mine --tsv test.tsv",
            "qkv evaluate --model runs/ml-1m --split test",
        ],
    )
    p.add_argument("--model", help="model directory (or a training --out)")
    p.add_argument(
        "--split",
        help="translation: train, val or test_2016_flickr (default) of Multi30k, train, valid or "
        "test (default) of Tatoeba; sst2: glue/dev, "
        "sentence/test (default both); stsb: dev, test (default both); next items: valid, "
        "test (default)",
    )
    p.add_argument("--tsv", help="classifier: text<TAB>label; bi-encoder: a<TAB>b<TAB>score")
    p.add_argument("--plot", help="classifier: write the confusion matrix as this PNG")
    p.add_argument("--interactions", help="next items: the interactions (default: the model's)")
    p.add_argument("--src-lang", help="default: the model's")
    p.add_argument("--tgt-lang", help="default: the model's")
    p.add_argument("--data-dir", help="where to look for data sets first")
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences")
    p.add_argument("--show", type=int, default=3, help="print N example translations")
    p.add_argument("--output", help="also write the translations here")
    p.add_argument("--hyp", help="hypothesis file (instead of --model)")
    p.add_argument("--ref", help="reference file")
    add_decode_flags(p)
    add_compile_flag(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_translations, score

    if args.hyp or args.ref:
        if not (args.hyp and args.ref):
            raise UsageError("give both --hyp and --ref")
        hyps, refs = read_lines(args.hyp), read_lines(args.ref)
        if len(hyps) != len(refs):
            raise UsageError(f"{args.hyp} has {len(hyps)} lines but {args.ref} has {len(refs)}")
        print(score(hyps, refs, args.tgt_lang).summary())
        return 0
    if not args.model:
        raise UsageError("give --model DIR (with --split) or --hyp FILE --ref FILE")
    task = task_of(args.model)
    if task in ("classify", "similarity"):
        from .cli_sentences import evaluate_sentences

        return evaluate_sentences(args, task)
    if task == "items":
        from .cli_items import evaluate_items

        return evaluate_items(args)
    if args.tsv or args.plot:
        raise UsageError("--tsv and --plot are for classifiers and bi-encoders")
    if args.interactions:
        raise UsageError("--interactions is for next-item models")
    cfg = decode_config(args)
    translator, meta = load_translator(args, args.int8)
    src_lang, tgt_lang = _languages(args, meta)
    dataset = meta.get("dataset") or "multi30k"  # the data set it was trained on
    args.split = args.split or PARALLEL_SPLITS[dataset][1]
    pairs = parallel(dataset, args.split, src_lang, tgt_lang, args.data_dir)[: args.limit or None]
    result = evaluate_translations(
        lambda s: translator.translate_best(s, cfg), pairs, target_lang=tgt_lang
    )
    print(
        f"{dataset} {args.split} {src_lang}->{tgt_lang}, {len(pairs)} sentences, "
        f"{cfg.describe()}, {result.sentences_per_second():.1f} sentences/s"
    )
    print(result.scores.summary())
    for (src, ref), hyp in list(zip(pairs, result.hypotheses, strict=True))[: args.show]:
        print(f"\n  src: {src}\n  ref: {ref}\n  hyp: {hyp}")
    if args.output:
        write_text_atomic(args.output, "".join(h + "\n" for h in result.hypotheses))
    return 0


def add_tune(sub) -> None:
    p = command(
        sub,
        "tune",
        "choose a translation model's length penalty on held-out data (decoding.json)",
        "Beam-search the validation sentences once per length-penalty alpha and keep the best "
        "in the model directory's decoding.json, which translate, evaluate, explain and serve "
        "then use unless --alpha says otherwise. Training a translation preset does this itself.",
        [
            "qkv tune --model runs/de-en              # best/, on Multi30k's val split",
            "qkv tune --model runs/de-en/averaged --alphas 0.6,1,1.5 --limit 500",
            "qkv tune --model runs/mine --src dev.de --ref dev.en --dry-run",
        ],
    )
    model_flags(p, data=True)
    p.add_argument("--split", help="default: the data set's validation split (Multi30k: val)")
    p.add_argument("--src", help="source sentences, one per line (with --ref; instead of --split)")
    p.add_argument("--ref", help="their reference translations")
    p.add_argument(
        "--alphas",
        type=parse_floats,
        default=(0.6, 1.0, 1.3, 1.6, 2.0),
        metavar="A,B,...",
        help="the alphas to try (default 0.6,1.0,1.3,1.6,2.0)",
    )
    p.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    p.add_argument("--limit", type=int, help="the first N sentences (default 1000)")
    p.add_argument("--dry-run", action="store_true", help="print the scores, write nothing")
    add_batch_size_flag(p)
    add_device_flag(p)
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from . import tuning

    if not args.alphas or not all(0 <= a <= 10 for a in args.alphas):
        raise UsageError("--alphas: numbers between 0 and 10, like 0.6,1,1.5")
    args.limit = tuning.SENTENCES if args.limit is None else args.limit
    if args.beam < 1 or args.limit < 1 or args.batch_size < 1:
        raise UsageError("--beam, --limit and --batch-size must be >= 1")
    if bool(args.src) != bool(args.ref):
        raise UsageError("give both --src and --ref, or neither")
    if args.src and args.split:
        raise UsageError("--split or --src/--ref, not both")
    translator, meta = load_translator(args)
    if args.src:
        srcs, refs = read_lines(args.src), read_lines(args.ref)
        if len(srcs) != len(refs):
            raise UsageError(f"{args.src} has {len(srcs)} lines but {args.ref} has {len(refs)}")
        pairs, split = list(zip(srcs, refs, strict=True)), args.src
        tgt_lang = args.tgt_lang or meta.get("tgt_lang")
    else:
        src_lang, tgt_lang = _languages(args, meta)
        dataset = meta.get("dataset") or "multi30k"
        split = args.split or PARALLEL_SPLITS[dataset][0]
        pairs = parallel(dataset, split, src_lang, tgt_lang, args.data_dir)
        split = f"{dataset} {split}"
    pairs = pairs[: args.limit]
    if not pairs:
        raise UsageError("no sentences to tune on")
    print(f"{args.model}: length penalty on {len(pairs):,} sentences of {split}, beam {args.beam}")
    base = tuning.base_config(args.model, args.beam)
    tuned = tuning.tune_alpha(translator.translate_best, pairs, tgt_lang, args.alphas, base, print)
    best = f"alpha {tuned.alpha:g}: BLEU {tuned.bleu[tuned.alpha]:.2f}"
    if args.dry_run:
        print(f"best: {best} (--dry-run: nothing written)")
        return 0
    print(f"best: {best}; written to {tuning.save(args.model, tuned, split)}")
    return 0


def add_explain(sub) -> None:
    p = command(
        sub,
        "explain",
        "translate a sentence (or continue a prompt) and show every head's attention",
        "Translate one sentence and capture all attention (encoder self, decoder self, cross) "
        "for every layer and head along the output: PNG grids, a cross-attention alignment, "
        "and one self-contained HTML page (works offline, opened from disk). With a language "
        "model: continue the prompt and show the causal self-attention over prompt and output.",
        [
            "qkv explain --model runs/de-en 'Ein Mann fährt Fahrrad.' --out ex/",
            "qkv explain --model runs/de-en 'Ein Mann fährt Fahrrad.' --beam 5 --json",
            "qkv explain --model runs/en-zh 'The chicken crossed the road carelessly.' "
            "--query crossed",
            "qkv explain --model runs/shakespeare 'ROMEO:' --max-new-tokens 30 --out ex-lm/",
            "qkv explain --model runs/sst2 'a gorgeous , witty , seductive movie .' --out ex/",
            "qkv explain --model runs/stsb 'A man plays a guitar.' --pair 'A man plays music.'",
        ],
    )
    p.add_argument("sentence", help="the sentence to translate, or the prompt to continue")
    p.add_argument("--pair", help="bi-encoders: the second sentence of the pair")
    model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=40, help="language models: default 40")
    p.add_argument("--out", default="explain", help="directory for the pictures and the page")
    p.add_argument("--json", action="store_true", help="also write the raw weights as JSON")
    p.add_argument(
        "--query",
        help="a word of the input: also draw what it attends to in every layer and head "
        "(query-WORD.png)",
    )
    add_decode_flags(p, strategy="greedy")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from .explain import QueryError, explain, write_artifacts

    if not args.sentence.strip():
        raise UsageError("explain: the sentence is empty")
    cfg = decode_config(args)
    task = task_of(args.model)
    if task in ("classify", "similarity"):
        return _explain_encoder(args, task)
    if task == "items":
        raise UsageError(
            f"{args.model} is a next-item model: explain with qkv recommend --model "
            f"{args.model} ITEM ITEM ... --explain DIR"
        )
    if args.pair:
        raise UsageError("--pair is for bi-encoders (models trained for similarity)")
    if task == "lm":
        from .explain import explain_generation
        from .generate import Generator, PromptError

        model, tok, _ = load_model_dir(args, "lm", args.int8)
        if args.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be >= 1")
        try:
            e = explain_generation(Generator(model, tok), args.sentence, cfg, args.max_new_tokens)
        except PromptError as err:
            raise UsageError(f"prompt: {err}") from None
    else:
        translator, _ = load_translator(args, args.int8)
        e = explain(translator, args.sentence, cfg)
        if not e.attention:  # the fixed-vector GRU: nothing to draw, and that is the point
            print(e.translation)
            print(
                "this model has no attention: its decoder saw the source only through the "
                "encoder's final state, one fixed vector (--arch gru-attention has an alignment)",
                file=sys.stderr,
            )
            return 0
    try:
        written = write_artifacts(e, Path(args.out), args.json, args.query)
    except QueryError as err:
        raise UsageError(f"--query: {err}") from None
    print(e.translation)
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return 0


def _explain_encoder(args: argparse.Namespace, task: str) -> int:
    from .explain import QueryError, explain_classification, explain_similarity, write_artifacts

    model, tok, meta = load_model_dir(args, task)
    out = Path(args.out)
    if task == "classify":
        if args.pair:
            raise UsageError("--pair is for bi-encoders; a classifier reads one sentence")
        e = explain_classification(model, tok, args.sentence, meta["labels"])
        try:
            written = write_artifacts(e, out, args.json, args.query)
        except QueryError as err:
            raise UsageError(f"--query: {err}") from None
        print(e.translation)
    else:
        if not (args.pair and args.pair.strip()):
            raise UsageError("a bi-encoder compares two sentences: give the second with --pair")
        if args.query:
            raise UsageError("--query is for one sentence: translation, classifier, or lm")
        a, b, cos = explain_similarity(model, tok, args.sentence, args.pair)
        written = write_artifacts(a, out / "a", args.json) + write_artifacts(
            b, out / "b", args.json
        )
        print(f"cosine {cos:.4f}")
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return 0


def add_probe(sub) -> None:
    p = command(
        sub,
        "probe",
        "measure focus, redundancy, mitigation, receptive field on validation data",
        "One report (markdown + PNG + JSON) answering the explainers' claims with numbers: "
        "head focus, head redundancy and pruning, what skip connections and other layers "
        "absorb, receptive field by depth, beam vs greedy.",
        [
            "qkv probe --model runs/de-en --out probe/ --sentences 200",
            "qkv probe --model runs/shakespeare --out probe-lm/ --windows 32",
        ],
    )
    model_flags(p, data=True)
    p.add_argument("--out", default="probe", help="directory for report.md, report.json, PNGs")
    p.add_argument("--sentences", type=int, default=200, help="validation subsample size")
    p.add_argument("--split", help="split of the model's data set (default: its validation one)")
    p.add_argument("--src", help="or your own source file")
    p.add_argument("--tgt", help="and its reference file")
    p.add_argument("--beam", type=int, default=5, help="beam size for the beam-vs-greedy line")
    p.add_argument("--seed", type=int, default=0, help="for the subsample")
    add_device_flag(p)
    g = p.add_argument_group("language models")
    g.add_argument("--windows", type=int, default=64, help="validation windows (default 64)")
    g.add_argument("--text", help="validation text (default: the model's own validation split)")
    p.set_defaults(func=run_probe)


def _run_probe_lm(args: argparse.Namespace) -> int:
    from .config import TrainConfig, from_dict
    from .data import read_text
    from .probe_lm import probe_lm, write_lm_report
    from .tasks.lm import load_texts

    if args.windows < 1:
        raise UsageError("--windows must be >= 1")
    model, tok, meta = load_model_dir(args, "lm")
    if args.text:
        text = read_text(args.text)
    else:
        text = load_texts(from_dict(TrainConfig, meta["train"], source=args.model)).valid
    ids = torch.tensor(tok.encode_batch([text])[0])
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        report = probe_lm(model, ids, windows=args.windows, log=log)
    except ValueError as e:
        raise UsageError(str(e)) from None
    log(f"wrote {write_lm_report(report, args.out)} ({report.minutes:.1f} minutes)")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from .probe import probe
    from .probe_report import write_report

    if task_of(args.model) == "lm":
        return _run_probe_lm(args)
    if args.sentences < 1 or args.beam < 1:
        raise UsageError("--sentences and --beam must be >= 1")
    translator, meta = load_translator(args)
    if translator.config.arch in ("gru", "gru-attention"):
        raise UsageError(
            f"probe measures a Transformer's heads and layers; a {translator.config.arch} model "
            "has none (bench/big_deal.py compares it with a Transformer)"
        )
    if args.src and args.tgt:
        pairs = read_parallel(args.src, args.tgt)
    else:
        dataset = meta.get("dataset") or "multi30k"
        split = args.split or PARALLEL_SPLITS[dataset][0]
        pairs = parallel(dataset, split, *_languages(args, meta), args.data_dir)
    pairs = random.Random(args.seed).sample(pairs, min(args.sentences, len(pairs)))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    target_lang = args.tgt_lang or meta.get("tgt_lang")
    report = probe(translator, pairs, beam=args.beam, log=log, target_lang=target_lang)
    log(f"wrote {write_report(report, args.out)} ({report.minutes:.1f} minutes)")
    return 0


def add_generate(sub) -> None:
    p = command(
        sub,
        "generate",
        "continue text with a language model (sampling, greedy, beam), streaming",
        "Continue a prompt, printing tokens as they come. Several prompts (one per line, from "
        "stdin or --input; any lengths) are generated as one batch (--batch-size). Past the "
        "model's context, greedy and sampling slide (the last half of the context is read "
        "again); beam search stops.",
        [
            "qkv generate --model runs/shakespeare 'ROMEO:' --max-new-tokens 300",
            "qkv generate --model runs/shakespeare 'ROMEO:' --temperature 0.8 --top-k 40 --seed 1",
            "qkv generate --model runs/shakespeare 'JULIET:' --greedy",
            "qkv generate --model runs/shakespeare --input prompts.txt --jsonl > out.jsonl",
        ],
    )
    p.add_argument("prompt", nargs="?", help="the text to continue (default: lines of stdin)")
    model_flags(p)
    p.add_argument("--input", help="prompts, one per line (instead of the argument or stdin)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="default 200")
    p.add_argument("--samples", type=int, default=1, help="outputs per prompt (default 1)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per output")
    add_decode_flags(p, strategy="sample")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import Generator, PromptError

    cfg = decode_config(args)
    for name in ("max_len_a", "max_len_b", "at_max"):
        if getattr(args, "d_" + name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} is for translation; use --max-new-tokens")
    if args.max_new_tokens < 1 or args.samples < 1:
        raise UsageError("--max-new-tokens and --samples must be >= 1")
    if cfg.nbest != 1:
        raise UsageError("generate prints one output per prompt; --nbest is for translate")
    if args.prompt is not None and args.input:
        raise UsageError("give the prompt as an argument or --input, not both")
    model, tok, _ = load_model_dir(args, "lm", args.int8)
    gen = Generator(model, tok, args.batch_size)
    prompts = [args.prompt] if args.prompt is not None else read_input(args.input)
    prompts = [p for p in prompts for _ in range(args.samples)]
    if not prompts:
        raise UsageError("no prompts (stdin was empty)")
    lengths = set()
    for i, p in enumerate(prompts):
        try:
            lengths.add(len(gen.encode(p)))
        except PromptError as e:
            where = "prompt" if args.prompt is not None else f"prompt {i // args.samples + 1}"
            raise UsageError(f"{where}: {e}") from None
    if any(gen.would_slide(n, args.max_new_tokens) for n in lengths):
        how = "stops there" if cfg.strategy == "beam" else "slides (re-reads the last half)"
        print(
            f"qkv: note: prompt + {args.max_new_tokens} new tokens pass the model's context of "
            f"{gen.context} tokens; {cfg.strategy} {how}",
            file=sys.stderr,
        )
    stream = len(prompts) == 1 and not args.jsonl and cfg.strategy != "beam"
    shown = [0]

    def on_text(_: int, text: str) -> None:  # print what is new, not a partial character
        text = text.rstrip("\ufffd")
        sys.stdout.write(text[shown[0] :])
        sys.stdout.flush()
        shown[0] = max(shown[0], len(text))

    if stream:
        sys.stdout.write(prompts[0])
    results = gen.generate(prompts, cfg, args.max_new_tokens, on_text if stream else None)
    for i, g in enumerate(results):
        if args.jsonl:
            row = dict(prompt=g.prompt, text=g.text, tokens=len(g.tokens), ended=g.ended)
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif stream:
            sys.stdout.write(g.text[shown[0] :] + "\n")
        else:
            sys.stdout.write(("---\n" if i else "") + g.prompt + g.text + "\n")
    return 0


def add_import_marian(sub) -> None:
    p = command(
        sub,
        "import-marian",
        "convert a Hugging Face MarianMTModel (OPUS-MT) directory into a qkv model",
        "Convert config.json + model.safetensors (or pytorch_model.bin, read with weights_only) "
        "+ the sentencepiece vocabulary into a qkv model directory, usable by translate, "
        "evaluate, explain and probe. To reproduce HF generate: --penalty power --alpha 1 "
        "--at-max stop.",
        ["qkv import-marian opus-mt-de-en/ --out models/opus-de-en"],
    )
    p.add_argument("src", help="the Hugging Face model directory")
    p.add_argument("--out", required=True, help="the qkv model directory to write")
    p.set_defaults(func=run_import_marian)


def run_import_marian(args: argparse.Namespace) -> int:
    from .marian import convert

    print(f"wrote {convert(args.src, args.out)}", file=sys.stderr)
    return 0


def add_import_nanogpt(sub) -> None:
    p = command(
        sub,
        "import-nanogpt",
        "convert a nanoGPT character-level checkpoint (ckpt.pt) into a qkv language model",
        "Read nanoGPT's ckpt.pt with torch.load(weights_only=True) (no code from the file "
        "runs) and rebuild its character vocabulary from the training text (nanoGPT's meta.pkl "
        "is a pickle, not opened). The result works with generate and explain.",
        [
            "qkv import-nanogpt out-shakespeare-char/ckpt.pt "
            "--text data/shakespeare_char/input.txt --out models/nanogpt"
        ],
    )
    p.add_argument("ckpt", help="nanoGPT's ckpt.pt")
    p.add_argument("--text", required=True, help="the text it was trained on (its input.txt)")
    p.add_argument("--out", required=True, help="the qkv model directory to write")
    p.set_defaults(func=run_import_nanogpt)


def run_import_nanogpt(args: argparse.Namespace) -> int:
    from .nanogpt import convert

    print(f"wrote {convert(args.ckpt, args.text, args.out)}", file=sys.stderr)
    return 0


COMMANDS = [
    add_demo,
    add_train,
    add_translate,
    add_evaluate,
    add_tune,
    add_explain,
    add_probe,
    add_generate,
    add_classify,
    add_embed,
    add_search,
    add_recommend,
    add_serve,
    add_import_marian,
    add_import_nanogpt,
]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qkv",
        description="Attention and the Transformer, with the inner workings visible.",
        epilog="example: qkv demo 'the cat sat on the mat'",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    exit_if_joined(code)  # under torchrun: leave without PyTorch's exit teardown
    return code


def _main(argv: Sequence[str] | None) -> int:
    keep_freed_memory()  # large temporaries reused, not re-faulted each step (qkv/allocator.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (
        UsageError,
        ConfigError,
        DataError,
        CheckpointError,
        MarianImportError,
        NanoGPTImportError,
        ItemError,
        Diverged,
    ) as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"qkv: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
