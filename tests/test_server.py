"""`qkv serve`: every endpoint against the library called directly (the oracle), dynamic batching
(concurrent requests share one decode, each gets what it would get alone), the queue bound and
the timeout, every bad input (a JSON error naming the field, never a 500), schemathesis over the
OpenAPI schema, and SIGTERM draining a request in flight."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from qkv import checkpoint
from qkv.config import DecodeConfig
from qkv.generate import Generator
from qkv.models import DecoderOnly, EncoderOnly
from qkv.presets import PRESETS
from qkv.recommend import recommend
from qkv.sentences import SentenceEncoder
from qkv.server import Limits, create_app
from qkv.tokenizer import Characters, Items, Subwords
from qkv.translate import Translator

from .conftest import free_port, tiny_config

LM_TEXT = "ROMEO: what light through yonder window breaks\nJULIET: ay me\n"
WORDS = "a red dog runs the cat sleeps blue green now good bad film"


def lm_dir(root: Path) -> Path:
    tok = Characters.of(LM_TEXT)
    shape, _ = PRESETS["shakespeare-char"]
    cfg = shape.replace(
        d_model=32, n_heads=4, d_ff=64, n_decoder_layers=2, max_len=48, output_bias=True
    ).replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    m = DecoderOnly(cfg).eval()
    with torch.no_grad():  # untrained: keep it from ending (eos) or saying <unk> at once
        m.lm_head.bias[:4] = -1e4
    return checkpoint.save(root / "lm", m, tok, {"task": "lm"})


def encoder_dir(root: Path, task: str) -> Path:
    tok = Subwords.train([WORDS] * 3, vocab_size=300, min_frequency=1)
    base = dict(arch="encoder-only", n_decoder_layers=0, vocab_size=tok.vocab_size, max_len=40)
    if task == "classify":
        base["n_classes"] = 2
    torch.manual_seed(1)
    m = EncoderOnly(tiny_config(**base)).eval()
    meta = {"task": task, "labels": ["negative", "positive"]} if task == "classify" else {}
    return checkpoint.save(root / task, m, tok, {"task": task, **meta})


def items_dir(root: Path) -> Path:
    items = Items(list(range(100, 140)))
    cfg = tiny_config(
        arch="decoder-only",
        n_encoder_layers=0,
        vocab_size=items.vocab_size,
        positions="learned",
        max_len=16,
    )
    torch.manual_seed(2)
    m = DecoderOnly(cfg).eval()
    return checkpoint.save(root / "items", m, items, {"task": "items", "block_size": 16})


@pytest.fixture(scope="module")
def dirs(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    out, _, _ = trained
    return {
        "translation": checkpoint.resolve(out),
        "lm": lm_dir(root),
        "classify": encoder_dir(root, "classify"),
        "similarity": encoder_dir(root, "similarity"),
        "items": items_dir(root),
    }


def make_app(dirs, tasks=("translation", "lm", "classify", "similarity", "items"), **limits):
    return create_app([str(dirs[t]) for t in tasks], "cpu", Limits(**limits))


@pytest.fixture(scope="module")
def app(dirs):
    app = make_app(dirs)
    yield app
    app.state.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def served(app, task):
    return next(s for s in app.state.served if s.task == task)


def metric(client, name: str, **labels) -> float:
    """One sample of the Prometheus text at /metrics (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not want and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sources(corpus, n=5):
    _, src, _ = corpus
    return src[:n]


# --- endpoints against the library ---------------------------------------------------------------


def test_models_health_ready_and_openapi(client, app):
    models = client.get("/v1/models").json()["models"]
    assert [m["task"] for m in models] == ["translation", "lm", "classify", "similarity", "items"]
    mt = models[0]
    assert mt["endpoint"] == "/v1/translate" and mt["config"]["arch"] == "encoder-decoder"
    assert mt["vocab_size"] == served(app, "translation").model.config.vocab_size
    assert models[2]["labels"] == ["negative", "positive"]
    assert client.get("/health").json() == {"status": "alive"}
    assert client.get("/ready").status_code == 200
    schema = client.get("/openapi.json").json()
    for p in ("/v1/translate", "/v1/generate", "/v1/classify", "/v1/embed", "/v1/recommend"):
        assert "post" in schema["paths"][p]
    fields = schema["components"]["schemas"]["TranslateRequest"]["properties"]
    assert {"texts", "strategy", "beam", "nbest", "alpha", "max_len_a", "top_p"} <= set(fields)
    assert client.get("/docs").status_code == 200


def test_translate_gives_the_translators_nbest(client, app, corpus):
    s = served(app, "translation")
    texts = sources(corpus, 3)
    cfg = DecodeConfig(beam=4, nbest=3)
    want = Translator(s.model, s.tokenizer).translate(texts, cfg)
    r = client.post("/v1/translate", json={"texts": texts, "beam": 4, "nbest": 3})
    assert r.status_code == 200, r.text
    got = r.json()["translations"]
    for g, w in zip(got, want, strict=True):
        assert g["text"] == w[0].text and [h["text"] for h in g["nbest"]] == [x.text for x in w]
        assert [h["score"] for h in g["nbest"]] == pytest.approx([x.score for x in w], abs=1e-4)
    greedy = client.post("/v1/translate", json={"texts": texts, "strategy": "greedy"}).json()
    assert [t["text"] for t in greedy["translations"]] == Translator(
        s.model, s.tokenizer
    ).translate_best(texts, DecodeConfig(strategy="greedy"))


def test_generate_classify_embed_recommend_match_the_library(client, app):
    lm = served(app, "lm")
    r = client.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_tokens": 12, "seed": 3})
    (want,) = Generator(lm.model, lm.tokenizer).generate(
        ["ROMEO:"], DecodeConfig(strategy="sample", seed=3), 12
    )
    assert r.json()["text"] == want.text and r.json()["tokens"] == 12

    cl = served(app, "classify")
    texts = ["a red dog runs", "the cat sleeps now", "good film"]
    probs = SentenceEncoder(cl.model, cl.tokenizer).probabilities(texts)
    res = client.post("/v1/classify", json={"texts": texts}).json()["results"]
    for row, p in zip(res, probs, strict=True):
        assert row["label"] == ["negative", "positive"][int(p.argmax())]
        assert row["probabilities"]["positive"] == pytest.approx(float(p[1]), abs=1e-5)

    sim = served(app, "similarity")
    vecs = SentenceEncoder(sim.model, sim.tokenizer).encode(texts, normalize=True)
    got = client.post("/v1/embed", json={"texts": texts, "model": sim.name}).json()
    assert got["dim"] == vecs.shape[1]
    torch.testing.assert_close(torch.tensor(got["embeddings"]), vecs, atol=1e-5, rtol=0)

    it = served(app, "items")
    histories = [[100, 101, 102], [139, 120]]
    want_items = recommend(it.model, it.tokenizer, histories, 16, 5)
    got = client.post("/v1/recommend", json={"histories": histories, "k": 5}).json()["results"]
    for g, w in zip(got, want_items, strict=True):
        assert g["items"] == [r.item for r in w]
        assert not set(g["items"]) & set(histories[got.index(g)])  # seen items excluded


def test_explain_gives_attention_rows_that_sum_to_one_and_the_beam_tree(client, app, corpus):
    text = sources(corpus, 1)[0]
    name = served(app, "translation").name
    d = client.post("/v1/explain", json={"text": text, "model": name, "beam": 3}).json()
    e = d["explanation"]
    cross = torch.tensor(e["attention"]["cross"])  # (layers, heads, T, S)
    assert cross.shape[-1] == len(e["src_tokens"]) and cross.shape[-2] == len(e["tgt_in"])
    torch.testing.assert_close(cross.sum(-1), torch.ones(cross.shape[:-1]), atol=1e-3, rtol=0)
    tree = d["beam"]["sentences"][0]
    assert tree["nbest"][0]["text"] == e["translation"] and d["beam"]["beam"] == 3
    page = client.get("/pages/beam", params={"text": text, "model": d["model"], "beam": 3})
    assert page.status_code == 200 and "Beam search, beam 3" in page.text
    refused = client.get("/pages/beam", params={"text": "ROMEO:", "model": "lm"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "model"
    for task_params in (
        {"text": "ROMEO:", "model": "lm", "strategy": "greedy", "max_new_tokens": 5},
        {"text": "a red dog", "model": "classify"},
        {"text": "a red dog", "model": "similarity", "pair": "the cat"},
        {"history": "100 101 102", "model": "items"},
    ):
        page = client.get("/pages/attention", params=task_params)
        assert page.status_code == 200, (task_params, page.text)
        assert '<script id="data" type="application/json">' in page.text


def test_the_page_and_its_assets_come_from_the_server_alone(client):
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert not re.search(r"""(src|href)=["']?https?:""", page.text)  # no CDN
    assert "fetch('/v1/models')" in page.text


def test_streaming_sends_the_text_as_it_grows_then_the_result(client):
    events = []
    body = {"prompt": "JULIET:", "max_new_tokens": 15, "stream": True, "strategy": "greedy"}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    texts = [e["text"] for e in events[:-1]]
    assert len(texts) == 15 and all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    final = events[-1]
    assert final["done"] and final["text"] == texts[-1] and final["tokens"] == 15
    alone = client.post("/v1/generate", json={**body, "stream": False}).json()
    assert alone["text"] == final["text"]


# --- dynamic batching ----------------------------------------------------------------------------


async def _concurrently(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://qkv") as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))


def test_concurrent_requests_share_one_decode_and_get_what_they_would_alone(dirs, corpus):
    app = make_app(dirs, ("translation", "lm"), max_wait_ms=500)
    try:
        texts = sources(corpus, 4)
        reqs = [("/v1/translate", {"texts": [t], "beam": 3}) for t in texts]
        prompts = ["ROMEO:", "JULIET: ay", "a"]  # different lengths: left-padded together
        reqs += [
            ("/v1/generate", {"prompt": p, "max_new_tokens": 8, "strategy": "greedy"})
            for p in prompts
        ]
        together = asyncio.run(_concurrently(app, reqs))
        with TestClient(app) as c:
            for (path, body), r in zip(reqs, together, strict=True):
                alone = c.post(path, json=body).json()
                got = r.json()
                if path == "/v1/translate":
                    assert got["translations"][0]["text"] == alone["translations"][0]["text"]
                    assert got["translations"][0]["score"] == pytest.approx(
                        alone["translations"][0]["score"], abs=1e-4
                    )
                else:
                    assert got["text"] == alone["text"]
            mt, lm = (s.name for s in app.state.served)
            # the 4 translations in one decode, the 3 generations in another; then 7 alone
            assert metric(c, "qkv_batch_requests_count", model=mt) == 1 + 4
            assert metric(c, "qkv_batch_requests_sum", model=mt) == 4 + 4
            assert metric(c, "qkv_batch_requests_count", model=lm) == 1 + 3
            assert metric(c, "qkv_batch_inputs_sum", model=lm) == 3 + 3
    finally:
        app.state.close()


def test_without_batching_each_request_is_its_own_decode(dirs, corpus):
    app = make_app(dirs, ("translation",), batching=False, max_wait_ms=500)
    try:
        reqs = [("/v1/translate", {"texts": [t], "beam": 2}) for t in sources(corpus, 3)]
        assert all(r.status_code == 200 for r in asyncio.run(_concurrently(app, reqs)))
        with TestClient(app) as c:
            (mt,) = (s.name for s in app.state.served)
            assert metric(c, "qkv_batch_requests_count", model=mt) == 3
            assert metric(c, "qkv_batch_requests_sum", model=mt) == 3
    finally:
        app.state.close()


def test_sampled_requests_are_not_batched_so_a_seed_means_the_same_output(dirs):
    app = make_app(dirs, ("lm",), max_wait_ms=300)
    try:
        body = {"prompt": "ROMEO:", "max_new_tokens": 10, "seed": 7}
        a, b = asyncio.run(_concurrently(app, [("/v1/generate", body)] * 2))
        assert a.json()["text"] == b.json()["text"]
        with TestClient(app) as c:
            assert metric(c, "qkv_batch_requests_sum", model="lm") == 2
            assert metric(c, "qkv_batch_requests_count", model="lm") == 2
    finally:
        app.state.close()


class _Blocked:
    """Holds a model's worker inside its call until released, counting the calls."""

    def __init__(self, app):
        self.batcher = app.state.batcher
        self.run, self.gate, self.calls = self.batcher.run, threading.Event(), 0
        self.started = threading.Event()
        self.batcher.run = self

    def __call__(self, key, inputs):
        self.calls += 1
        self.started.set()
        self.gate.wait(10)
        return self.run(key, inputs)


def test_a_full_queue_answers_503_with_retry_after_at_once(dirs, corpus):
    app = make_app(dirs, ("translation",), max_queue=1, max_wait_ms=0)
    block = _Blocked(app)
    text = sources(corpus, 1)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://qkv") as c:
            first = asyncio.ensure_future(c.post("/v1/translate", json={"texts": text}))
            while not block.started.is_set():
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(c.post("/v1/translate", json={"texts": text}))
            while len(app.state.batcher) < 1:
                await asyncio.sleep(0.01)
            t = time.perf_counter()
            third = await c.post("/v1/translate", json={"texts": text})
            waited = time.perf_counter() - t
            block.gate.set()
            return await first, await second, third, waited

    try:
        first, second, third, waited = asyncio.run(scenario())
        assert first.status_code == second.status_code == 200
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["field"] == "queue" and waited < 1.0
    finally:
        block.gate.set()
        app.state.close()


def test_a_request_past_its_timeout_is_408_and_never_runs(dirs, corpus):
    app = make_app(dirs, ("translation",), timeout_s=0.3, max_wait_ms=0)
    block = _Blocked(app)
    text = sources(corpus, 1)
    try:
        with TestClient(app) as c:
            threading.Thread(
                target=lambda: c.post("/v1/translate", json={"texts": text}), daemon=True
            ).start()
            assert block.started.wait(5)
            r = c.post("/v1/translate", json={"texts": text})  # waits behind the blocked one
            assert r.status_code == 408 and r.json()["error"]["field"] == "timeout"
            block.gate.set()
            time.sleep(0.3)
            assert block.calls == 1  # the timed-out request was dropped, not decoded
            assert c.post("/v1/translate", json={"texts": text}).status_code == 200
    finally:
        block.gate.set()
        app.state.close()


# --- bad input -----------------------------------------------------------------------------------

LONG = "x" * 2001
BAD = [
    # (path, body or raw bytes, status, field)
    ("/v1/translate", b'{"texts": ["x"', 400, "body"),
    ("/v1/translate", b'{"texts": ["\xff"]}', 400, "body"),
    ("/v1/translate", {"texts": ["a"] * 65}, 413, "texts"),
    ("/v1/translate", {"texts": [LONG]}, 413, "texts.0"),
    ("/v1/translate", {"texts": []}, 422, "texts"),
    ("/v1/translate", {"texts": "a dog"}, 422, "texts"),
    ("/v1/translate", {"texts": ["a"], "beam": 17}, 422, "beam"),
    ("/v1/translate", {"texts": ["a"], "beam": 0}, 422, "beam"),
    ("/v1/translate", {"texts": ["a"], "strategy": "sample", "nbest": 2}, 422, "nbest"),
    ("/v1/translate", {"texts": ["a"], "strategy": "best"}, 422, "strategy"),
    ("/v1/translate", {"texts": ["a"], "temperature": -1}, 422, "temperature"),
    ("/v1/translate", {"texts": [""], "min_len": 2**64}, 422, "min_len"),  # was a 500
    ("/v1/translate", {"texts": [""], "max_len_b": 2**63}, 422, "max_len_b"),
    ("/v1/translate", {"texts": ["a"], "file": "/etc/passwd"}, 422, "file"),
    ("/v1/translate", {"texts": ["a"], "model": "nope"}, 404, "model"),
    ("/v1/translate", {"texts": ["a"], "model": "lm"}, 422, "model"),
    ("/v1/generate", {"prompt": "ROMEO:", "max_new_tokens": 1025}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "ROMEO:", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "ROMEO: ☃"}, 422, "prompt"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt"),
    ("/v1/generate", {"prompt": LONG}, 413, "prompt"),
    ("/v1/generate", {"prompt": "a", "stream": True, "strategy": "beam"}, 422, "stream"),
    ("/v1/generate", {"prompt": "a", "max_len_a": 2}, 422, "max_len_a"),
    ("/v1/classify", {"texts": [LONG]}, 413, "texts.0"),
    ("/v1/embed", {"texts": ["a"]}, 422, "model"),  # three encoders: which?
    ("/v1/recommend", {"histories": [[999]]}, 422, "histories"),
    ("/v1/recommend", {"histories": [[]]}, 422, "histories.0"),
    ("/v1/recommend", {"histories": [["x"]]}, 422, "histories.0.0"),
    ("/v1/recommend", {"histories": [[100]], "k": 0}, 422, "k"),
    ("/v1/explain", {"model": "classify"}, 422, "text"),
    ("/v1/explain", {"model": "items"}, 422, "history"),
    ("/v1/explain", {"model": "similarity", "text": "a dog"}, 422, "pair"),
    ("/v1/explain", {"text": "a dog"}, 422, "model"),  # five models: which?
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD)
def test_bad_input_is_a_json_error_naming_the_field(client, path, body, status, field):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert (r.status_code, r.json()["error"]["field"]) == (status, field), r.text
    assert r.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_before_it_is_read(dirs):
    app = make_app(dirs, ("translation",), max_body_bytes=1000)
    try:
        with TestClient(app) as c:
            big = json.dumps({"texts": ["a" * 2000]})
            r = c.post("/v1/translate", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["field"] == "body"

            def chunks():  # no Content-Length: counted as it arrives
                for _ in range(20):
                    yield b"a" * 100

            r = c.post("/v1/translate", content=chunks())
            assert r.status_code == 413
            assert c.post("/v1/recommend", json={"histories": [[1]]}).status_code == 404
            assert c.get("/nowhere").json()["error"]["field"] == "path"
            assert metric(c, "qkv_errors_total", endpoint="/v1/translate", status="413") == 2
    finally:
        app.state.close()


def test_no_request_the_schema_allows_is_a_server_error(app):
    """schemathesis generates requests from the OpenAPI schema, each operation in turn."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    def answered() -> float:
        return sum(
            x.value
            for m in app.state.metrics.requests.collect()
            for x in m.samples
            if x.name.endswith("_total")
        )

    before = answered()
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=int(os.environ.get("QKV_FUZZ_EXAMPLES", "25")),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate(checks=[not_a_server_error])

        check()
    assert answered() - before >= 10 * len(operations)  # it did send requests


# --- SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(dirs):
    port = free_port()
    cmd = [sys.executable, "-m", "qkv.cli", "serve", "--model", str(dirs["lm"])]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--device", "cpu"],
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        # a long greedy generation (it slides past the 48-token context), streamed
        body = {"prompt": "ROMEO:", "max_new_tokens": 1024, "stream": True, "strategy": "greedy"}
        after, final = 0, None
        with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break  # the first token is out: the request is in flight
            proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line.startswith("data: "):
                    after += 1
                    final = json.loads(line[6:])
        assert final is not None and final["done"] and final["tokens"] == 1024
        assert after > 10  # tokens kept coming after SIGTERM
        assert proc.wait(30) == 0
        with pytest.raises(httpx.HTTPError):  # and it is gone
            httpx.get(f"{base}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "/nonexistent"], "not a qkv model directory"),
        (["--model", "MODEL", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["--model", "MODEL", "--max-body", "0"], "--max-body must be >= 1"),
        (["--model", "MODEL", "--timeout", "0"], "--timeout must be > 0"),
        (["--model", "MODEL", "--port", "70000"], "--port must be between"),
        (["--model", "MODEL", "--port", "TAKEN"], "cannot serve on 127.0.0.1"),
        (["--model", "MODEL", "--device", "tpu"], "--device"),
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(dirs, capsys, flags, message):
    from qkv.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        flags = [{"MODEL": str(dirs["lm"]), "TAKEN": port}.get(f, f) for f in flags]  # placeholders
        assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_stream_left_mid_way_leaves_no_task_behind():
    # a client that disconnects cancels the stream while it waits for the next text: the
    # queue's getter must be cancelled with it (else asyncio reports a pending task destroyed)
    from qkv.server import _events

    async def run() -> set:
        updates: asyncio.Queue = asyncio.Queue()
        generation = asyncio.get_running_loop().create_future()  # never finishes
        stream = _events(None, updates, generation)  # type: ignore[arg-type]
        await updates.put("Ein")
        reader = asyncio.ensure_future(stream.__anext__())
        assert json.loads((await reader)[6:])["text"] == "Ein"
        reader = asyncio.ensure_future(stream.__anext__())  # now waits on the empty queue
        await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await asyncio.sleep(0)  # let cancellations run
        generation.cancel()
        await stream.aclose()
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()
