"""`qkv serve`: every model behind HTTP (FastAPI + uvicorn), with dynamic batching, limits that
refuse instead of falling over, Prometheus metrics, and a web page that shows the attention.

The app is thin: each endpoint checks its request, hands the inputs to its model's `Batcher`
(qkv/batching.py), which gathers concurrent requests with the same settings into one batched
call to the library (Translator, Generator, SentenceEncoder, recommend, explain) on a worker
thread, and awaits the answer. A model is loaded and packed once at start-up and only its own
worker thread touches it; every decode makes its own KV cache.

Errors are JSON, `{"error": {"field": ..., "message": ...}}`, and always 4xx or 503: 400 for a
body that is not JSON (or not UTF-8), 413 for a body, a list or a text over its limit, 422 for a
value the model cannot take, 404 for a task no model here serves, 408 when a request waits past
its timeout, 503 (with Retry-After) when the queue is full. No field names a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import threading
import time
import typing
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import Batcher, QueueFull
from .config import ConfigError, DecodeConfig
from .sentences import labelled

TASK_ENDPOINT = {
    "translation": "translate",
    "lm": "generate",
    "classify": "classify",
    "similarity": "embed",
    "items": "recommend",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask, and how the server batches and queues."""

    max_body_bytes: int = 1 << 20
    max_texts: int = 64  # texts (or histories) per request
    max_chars: int = 2000  # characters per text
    max_beam: int = 16
    max_new_tokens: int = 1024
    max_k: int = 1000  # recommendations per history
    timeout_s: float = 30.0  # per request, waiting included: 408 past it
    max_queue: int = 256  # requests waiting per model: 503 past it
    max_batch: int = 64  # inputs per batched call
    max_wait_ms: float = 5.0  # how long the oldest request waits for company
    batching: bool = True  # off: every request its own call (the benchmark's baseline)


class Refused(Exception):
    """A request the server will not run: an HTTP status, the field at fault, why."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- requests ----------------------------------------------------------------------------------

_HINTS = typing.get_type_hints(DecodeConfig)
_TRANSLATION_ONLY = ("max_len_a", "max_len_b", "at_max", "nbest")


def _decode_fields(skip: Sequence[str] = ()) -> dict[str, Any]:
    """Every DecodeConfig field as an optional request field (absent: the server's default)."""
    return {
        f.name: (_HINTS[f.name] | None, Field(None, description=f.metadata.get("help", "")))
        for f in dataclasses.fields(DecodeConfig)
        if f.name not in skip
    }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_MODEL = (str | None, Field(None, description="which model (default: the one for this task)"))
TranslateRequest = create_model(
    "TranslateRequest",
    __base__=_Strict,
    texts=(list[str], Field(description="sentences to translate")),
    model=_MODEL,
    **_decode_fields(),
)
GenerateRequest = create_model(
    "GenerateRequest",
    __base__=_Strict,
    prompt=(str, Field(description="the text to continue")),
    max_new_tokens=(int, 100),
    stream=(bool, Field(False, description="server-sent events as the text grows")),
    model=_MODEL,
    **_decode_fields(_TRANSLATION_ONLY),
)


class TextsRequest(_Strict):
    texts: list[str]
    model: str | None = None


class EmbedRequest(TextsRequest):
    normalize: bool = True


class RecommendRequest(_Strict):
    histories: list[list[int]] = Field(description="item ids, oldest first, one list per user")
    k: int = 10
    exclude_seen: bool = True
    model: str | None = None


ExplainRequest = create_model(
    "ExplainRequest",
    __base__=_Strict,
    text=(str | None, Field(None, description="the sentence, or a language model's prompt")),
    pair=(str | None, Field(None, description="a bi-encoder's second sentence")),
    history=(list[int] | None, Field(None, description="a next-item model's history")),
    max_new_tokens=(int, 50),
    model=_MODEL,
    **_decode_fields(),
)


# --- models ------------------------------------------------------------------------------------


@dataclass
class Served:
    """One model directory, loaded and packed, with its tokenizer."""

    name: str
    task: str
    model: Any
    tokenizer: Any
    meta: dict
    path: str
    helper: Any = None  # Translator, Generator or SentenceEncoder
    decoding: dict = field(default_factory=dict)  # its decoding.json (qkv.tuning)

    def decode_default(self, strategy: str) -> DecodeConfig:
        """The decoding a request gets for the fields it leaves out."""
        return DecodeConfig(strategy=strategy, **self.decoding)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        langs = {k: self.meta[k] for k in ("src_lang", "tgt_lang") if k in self.meta}
        out = {
            "name": self.name,
            "task": self.task,
            "endpoint": f"/v1/{TASK_ENDPOINT.get(self.task, 'explain')}",
            "languages": langs,
            "vocab_size": cfg.vocab_size,
            "config": dataclasses.asdict(cfg),
        }
        if "labels" in self.meta:
            out["labels"] = self.meta["labels"]
        if self.decoding:
            out["decoding"] = self.decoding
        return out


def load_served(
    paths: Sequence[str], device: str = "auto", precision: str = "fp32"
) -> list[Served]:
    """Each model directory, loaded on `device` and packed for inference (bf16 weights where
    `precision` says so: qkv.precision), named by its directory (made unique with a suffix)."""
    from . import tuning
    from .checkpoint import load
    from .models import pick_device
    from .packed import pack
    from .precision import for_decoding

    served, names = [], set()
    for path in paths:
        on = pick_device(device)
        model, tok, meta = load(path, on)
        if tok is None:
            raise ValueError(f"{path}: the model directory has no tokenizer")
        name = Path(path).resolve().name
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        task = meta.get("task", "translation")
        bf16 = task != "items" and for_decoding(model, precision, on) == "bf16"
        decoding = tuning.read(path)
        served.append(
            Served(name, task, pack(model, bf16=bf16), tok, meta, str(path), decoding=decoding)
        )
    return served


# --- metrics -----------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (so apps do not collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "qkv_requests", "requests answered", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "qkv_errors", "requests answered with an error", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "qkv_request_seconds",
            "time from request to response",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue = Gauge("qkv_queue_length", "requests waiting", registry=r)
        counts = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.batch_inputs = Histogram(
            "qkv_batch_inputs",
            "inputs (sentences, prompts, histories) per batched call",
            ["model"],
            buckets=counts,
            registry=r,
        )
        self.batch_requests = Histogram(
            "qkv_batch_requests",
            "requests served by one batched call",
            ["model"],
            buckets=counts,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "qkv_batch_seconds", "time of one batched call", ["model"], registry=r
        )
        self.tokens = Counter("qkv_tokens_generated", "output tokens", ["model"], registry=r)
        self.abandoned = Counter(
            "qkv_streams_abandoned", "streamed generations stopped: the client left", registry=r
        )


# --- what each task runs on a batch ------------------------------------------------------------


def _runner(s: Served, limits: Limits, metrics: Metrics) -> Callable[[Hashable, list], list]:
    """What the batcher calls for model s: (key, inputs) -> one output per input. The key's
    first element says what to do; the rest is what every request in the batch shares. Outputs
    are plain Python: the event loop never touches a tensor."""

    from . import explain as ex
    from .generate import Generator
    from .recommend import block_size, recommend
    from .sentences import SentenceEncoder
    from .translate import Translator

    if s.task == "translation":
        s.helper = Translator(s.model, s.tokenizer, batch_size=limits.max_batch)
    elif s.task == "lm":
        s.helper = Generator(s.model, s.tokenizer, batch_size=limits.max_batch)
    elif s.task in ("classify", "similarity"):
        s.helper = SentenceEncoder(s.model, s.tokenizer, batch_size=limits.max_batch)
    count = metrics.tokens.labels(s.name).inc

    def run(key: Hashable, inputs: list) -> list:
        what, *rest = key  # type: ignore[misc]
        if what == "translate":
            cfg = rest[0]
            t = s.helper
            hyps = t.translate_ids(t.encode_sources(inputs), cfg)
            count(sum(len(nbest[0].tokens) for nbest in hyps))
            return [t.texts(nbest) for nbest in hyps]
        if what in ("generate", "stream"):
            cfg, max_new, on_text = rest[0], rest[1], rest[2] if what == "stream" else None
            out = s.helper.generate(inputs, cfg, max_new, on_text)
            count(sum(len(g.tokens) for g in out))
            return out
        if what == "classify":
            return s.helper.probabilities(inputs).tolist()
        if what == "embed":
            return s.helper.encode(inputs, normalize=rest[0]).tolist()
        if what == "recommend":
            k, exclude = rest
            return recommend(s.model, s.tokenizer, inputs, block_size(s.model, s.meta), k, exclude)
        if what == "explain":  # one request: (ExplainRequest fields, cfg) -> json-able dict
            return [_explain(s, *inputs[0], ex)]
        if what == "beam":  # one request: (ExplainRequest fields, cfg) -> the tree's data
            req, cfg = inputs[0]
            return [s.helper.traced([req["text"]], cfg)[1]]
        raise AssertionError(what)

    return run


def _explain(s: Served, req: dict, cfg: DecodeConfig, ex) -> dict[str, Any]:
    """The attention (and for beam search, the search tree) of one input."""
    from .recommend import block_size

    out: dict[str, Any] = {"model": s.name, "task": s.task}
    if s.task == "translation":
        output = None
        if cfg.strategy == "beam":  # one search: its tree, and its best output explained
            _, out["beam"] = s.helper.traced([req["text"]], cfg)
            output = out["beam"]["sentences"][0]["nbest"][0]["tokens"]
        e = ex.explain(s.helper, req["text"], cfg, output)
    elif s.task == "lm":
        e = ex.explain_generation(s.helper, req["text"], cfg, req["max_new_tokens"])
    elif s.task == "classify":
        e = ex.explain_classification(s.model, s.tokenizer, req["text"], s.meta["labels"])
    elif s.task == "similarity":
        if req.get("pair") is None:
            raise Refused(422, "pair", "a bi-encoder compares two sentences: give pair")
        e, other, cos = ex.explain_similarity(s.model, s.tokenizer, req["text"], req["pair"])
        out["pair"], out["cosine"] = other.to_json(), cos
    else:
        block = block_size(s.model, s.meta)
        e = ex.explain_recommendation(s.model, s.tokenizer, req["history"], block)
    out["explanation"] = e.to_json()
    return out


# --- the app -----------------------------------------------------------------------------------


class _Guard:
    """Plain ASGI middleware around the app: refuses bodies over the limit (413) before FastAPI
    reads them, and records every response in the metrics (endpoint, status, latency)."""

    def __init__(self, app, limit: int, metrics: Metrics, paths: set[str]):
        self.app, self.limit, self.metrics, self.paths = app, limit, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, endpoint = time.perf_counter(), scope["path"]
        endpoint = endpoint if endpoint in self.paths else "other"
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read(scope, receive)
            if body is None:
                too_big = _error(413, "body", f"the body is over {self.limit} bytes")
                return await too_big(scope, receive, send_counted)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # what comes after the body: the disconnect

            await self.app(scope, replay, send_counted)
        finally:
            m, code = self.metrics, str(status[0])
            m.requests.labels(endpoint, code).inc()
            if status[0] >= 400:
                m.errors.labels(endpoint, code).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _read(self, scope, receive) -> bytes | None:
        """The whole body, or None when it passes the limit (said or seen)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def create_app(
    paths: Sequence[str], device: str = "auto", limits: Limits = Limits(), precision: str = "fp32"
) -> FastAPI:
    """The FastAPI app over the models of `paths`, loaded (and every batch run) on the one
    thread of its batcher; `precision` as `qkv serve --precision` (qkv.precision)."""
    from .web import PAGE

    metrics = Metrics()
    runners: dict[str, Callable[[Hashable, list], list]] = {}
    batcher = Batcher(
        lambda key, inputs: runners[key[0]](key[1:], inputs),  # key: (model name, what, ...)
        max_items=limits.max_batch,
        max_wait_s=limits.max_wait_ms / 1000 if limits.batching else 0.0,
        max_queue=limits.max_queue,
        max_requests=None if limits.batching else 1,
        on_batch=_batch_recorder(metrics),
        name="qkv-models",
    )

    def start() -> list[Served]:
        import torch

        torch.set_grad_enabled(False)  # for this thread, the only one that runs the models
        loaded = load_served(paths, device, precision)
        for s in loaded:
            runners[s.name] = _runner(s, limits, metrics)
        return loaded

    try:
        served = batcher.call(start).result()
    except BaseException:
        batcher.close()
        raise
    metrics.queue.set_function(batcher.__len__)
    state = {"ready": True}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        close()  # after uvicorn has drained the in-flight requests

    app = FastAPI(
        lifespan=lifespan,
        title="qkv",
        version="0.1.0",
        description="Attention and the Transformer: translation, generation, classification, "
        "embeddings, next-item recommendation, and the attention behind each answer.",
    )
    app.state.served, app.state.limits, app.state.metrics = served, limits, metrics
    app.state.batcher = batcher

    @app.exception_handler(Refused)
    async def refused(_: Request, e: Refused) -> JSONResponse:
        return _error(e.status, e.field, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own: a body it could not read (not UTF-8), an unknown path or method
        field = "body" if e.status_code == 400 else "path"
        return _error(e.status_code, field, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid"}
        if first.get("type") == "json_invalid" or "error parsing the body" in str(first):
            return _error(400, "body", "the body is not valid JSON (or not UTF-8)")
        where = [str(x) for x in first.get("loc", ()) if x != "body"] or ["body"]
        return _error(422, ".".join(where), first.get("msg", "invalid"))

    def pick(task_names: Sequence[str], name: str | None) -> Served:
        if name is not None:
            for s in served:
                if s.name == name:
                    if s.task not in task_names:
                        raise Refused(422, "model", f"{name} is a {s.task} model")
                    return s
            raise Refused(404, "model", f"no model named {name!r} (GET /v1/models lists them)")
        fits = [s for s in served if s.task in task_names]
        if not fits:
            raise Refused(404, "model", f"no {' or '.join(task_names)} model is served here")
        if len(fits) > 1:
            raise Refused(422, "model", f"several models fit: {', '.join(s.name for s in fits)}")
        return fits[0]

    def check_texts(texts: list[str], field: str = "texts") -> None:
        if not texts:
            raise Refused(422, field, "give at least one")
        if len(texts) > limits.max_texts:
            raise Refused(413, field, f"{len(texts)} given; at most {limits.max_texts}")
        for i, t in enumerate(texts):
            if len(t) > limits.max_chars:
                raise Refused(413, f"{field}.{i}", f"over {limits.max_chars} characters")

    def check_prompt(s: Served, prompt: str, field: str) -> None:
        """A language model's prompt it can read (not empty, characters it knows)."""
        try:
            s.helper.encode(prompt)
        except ValueError as e:
            raise Refused(422, field, str(e)) from None

    def check_text(text: str, field: str) -> None:
        if len(text) > limits.max_chars:
            raise Refused(413, field, f"over {limits.max_chars} characters")

    def decode_config(req: BaseModel, default: DecodeConfig) -> DecodeConfig:
        given = {
            k: v
            for k, v in req.model_dump(exclude_unset=True).items()
            if k in _HINTS and v is not None
        }
        if "beam" in given and given["beam"] > limits.max_beam:
            raise Refused(422, "beam", f"at most {limits.max_beam}")
        if ("beam" in given or "nbest" in given) and "strategy" not in given:
            given["strategy"] = "beam"
        try:
            cfg = default.replace(**given)
        except ConfigError as e:
            named = [k for k in given if k in str(e)] or ["strategy"]
            raise Refused(422, named[0], str(e)) from None
        return cfg

    async def run(s: Served, key: tuple, inputs: list) -> list:
        try:
            future = batcher.submit((s.name, *key), inputs)
        except QueueFull:
            raise Refused(
                503, "queue", "the server is busy: try again", {"Retry-After": "1"}
            ) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # dropped unrun if it is still waiting
            raise Refused(408, "timeout", f"not answered within {limits.timeout_s:g} s") from None
        except Refused:
            raise
        except Exception as e:  # the library refused the input (unknown item, prompt...)
            refused = _library_error(e)
            if refused is None:
                raise
            raise refused from None

    def unshared(cfg: DecodeConfig) -> tuple:
        """Sampling draws from one random stream per call: a sampled request runs alone, so
        its seed gives the same output whoever else is asking."""
        return (uuid.uuid4().hex,) if cfg.strategy == "sample" else ()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = state["ready"]
        body = {"ready": ok, "models": [s.name for s in served]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": [s.describe() for s in served]}

    @app.post("/v1/translate")
    async def translate(req: TranslateRequest) -> dict:  # type: ignore[valid-type]
        s = pick(["translation"], req.model)
        check_texts(req.texts)
        cfg = decode_config(req, s.decode_default("beam"))
        out = await run(s, ("translate", cfg, *unshared(cfg)), req.texts)
        return {
            "model": s.name,
            "translations": [
                {
                    "text": nbest[0].text,
                    "score": _num(nbest[0].score),
                    "nbest": [{"text": t.text, "score": _num(t.score)} for t in nbest],
                }
                for nbest in out
            ],
        }

    @app.post("/v1/generate", response_model=None)
    async def generate(req: GenerateRequest) -> dict | StreamingResponse:  # type: ignore[valid-type]
        s = pick(["lm"], req.model)
        check_text(req.prompt, "prompt")
        if not 1 <= req.max_new_tokens <= limits.max_new_tokens:
            raise Refused(422, "max_new_tokens", f"between 1 and {limits.max_new_tokens}")
        cfg = decode_config(req, s.decode_default("sample"))
        check_prompt(s, req.prompt, "prompt")
        if not req.stream:
            key = ("generate", cfg, req.max_new_tokens, *unshared(cfg))
            (g,) = await run(s, key, [req.prompt])
            return _generation(s, g)
        if cfg.strategy == "beam":
            raise Refused(422, "stream", "beam search has no output until it ends")
        return await _stream(s, cfg, req.prompt, req.max_new_tokens, run, metrics)

    @app.post("/v1/classify")
    async def classify(req: TextsRequest) -> dict:
        s = pick(["classify"], req.model)
        check_texts(req.texts)
        out = await run(s, ("classify",), req.texts)
        return {"model": s.name, "results": [labelled(s.meta["labels"], p) for p in out]}

    @app.post("/v1/embed")
    async def embed(req: EmbedRequest) -> dict:
        # every encoder embeds: bi-encoders, classifiers, and translation models' encoders
        s = pick(["similarity", "classify", "translation"], req.model)
        check_texts(req.texts)
        out = await run(s, ("embed", req.normalize), req.texts)
        return {
            "model": s.name,
            "dim": len(out[0]),
            "embeddings": [[round(x, 6) for x in v] for v in out],
        }

    @app.post("/v1/recommend")
    async def recommend(req: RecommendRequest) -> dict:
        s = pick(["items"], req.model)
        if not req.histories:
            raise Refused(422, "histories", "give at least one")
        if len(req.histories) > limits.max_texts:
            raise Refused(413, "histories", f"at most {limits.max_texts}")
        for i, h in enumerate(req.histories):
            if not h:
                raise Refused(422, f"histories.{i}", "an empty history")
            if len(h) > limits.max_chars:
                raise Refused(413, f"histories.{i}", f"over {limits.max_chars} items")
        if not 1 <= req.k <= limits.max_k:
            raise Refused(422, "k", f"between 1 and {limits.max_k}")
        out = await run(s, ("recommend", req.k, req.exclude_seen), req.histories)
        return {
            "model": s.name,
            "results": [
                {"items": [r.item for r in recs], "scores": [_num(r.score) for r in recs]}
                for recs in out
            ],
        }

    async def explained(req: BaseModel, what: str = "explain") -> dict:
        """One input's attention (what="explain"), or its beam-search tree ("beam")."""
        r = req.model_dump()
        s = pick(list(TASK_ENDPOINT), r["model"])
        if what == "beam" and s.task != "translation":
            raise Refused(422, "model", "only a translation model draws a beam-search tree")
        if s.task == "items":
            if not r["history"]:
                raise Refused(422, "history", "a next-item model explains a history of items")
            if len(r["history"]) > limits.max_chars:
                raise Refused(413, "history", f"over {limits.max_chars} items")
        else:
            if not r["text"] or not r["text"].strip():
                raise Refused(422, "text", "give the sentence (or prompt) to explain")
            check_text(r["text"], "text")
            if r["pair"] is not None:
                check_text(r["pair"], "pair")
        if not 1 <= r["max_new_tokens"] <= limits.max_new_tokens:
            raise Refused(422, "max_new_tokens", f"between 1 and {limits.max_new_tokens}")
        cfg = decode_config(req, s.decode_default("sample" if s.task == "lm" else "beam"))
        if s.task == "lm":
            check_prompt(s, r["text"], "text")
        (out,) = await run(s, (what, uuid.uuid4().hex), [(r, cfg)])
        return out

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest) -> dict:  # type: ignore[valid-type]
        return await explained(req)

    @app.get("/pages/attention", response_class=HTMLResponse)
    async def attention_page(
        text: str = "",
        model: str | None = None,
        beam: int | None = None,
        strategy: str | None = None,
        pair: str | None = None,
        history: str = "",
        max_new_tokens: int = 50,
    ) -> HTMLResponse:
        """The attention explorer of one input (what `qkv explain` writes), for the web page."""
        from .html import attention_page

        out = await explained(
            _explain_query(text, model, beam, strategy, pair, history, max_new_tokens)
        )
        return HTMLResponse(attention_page(out["explanation"]))

    @app.get("/pages/beam", response_class=HTMLResponse)
    async def beam_page(text: str = "", model: str | None = None, beam: int = 5) -> HTMLResponse:
        """The beam-search tree of one translation, for the web page."""
        from .html import beam_page

        tree = await explained(_explain_query(text, model, beam, "beam", None, "", 50), "beam")
        return HTMLResponse(beam_page(tree))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    paths = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(_Guard, limit=limits.max_body_bytes, metrics=metrics, paths=paths)

    def close() -> None:
        state["ready"] = False
        batcher.close(timeout=limits.timeout_s)

    app.state.close = close
    return app


def _explain_query(text, model, beam, strategy, pair, history, max_new_tokens) -> BaseModel:
    """An ExplainRequest from a page's query string; a malformed history is a 422."""
    from .tokenizer import ItemError, parse_history

    try:
        items = parse_history(history) if history else None
    except ItemError as e:
        raise Refused(422, "history", str(e)) from None
    fields: dict[str, Any] = dict(text=text, model=model, pair=pair, history=items)
    fields["max_new_tokens"] = max_new_tokens
    if beam is not None:
        fields["beam"] = beam
    if strategy is not None:
        fields["strategy"] = strategy
    try:
        return ExplainRequest(**fields)
    except Exception as e:  # pydantic's ValidationError: a bad strategy name
        raise Refused(422, "strategy", _first_line(str(e))) from None


def _library_error(e: Exception) -> Refused | None:
    """What the library raised about an input, as a 422 naming the input (None: not that)."""
    from .generate import PromptError
    from .tokenizer import ItemError

    if isinstance(e, ItemError):
        return Refused(422, "histories", str(e))
    if isinstance(e, PromptError):
        return Refused(422, "prompt", str(e))
    if isinstance(e, (ValueError, ConfigError)):
        return Refused(422, "body", _first_line(str(e)))
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid"


def _num(x: float) -> float | None:
    """A float JSON can carry (-inf, for an empty hypothesis, is null)."""
    return round(float(x), 5) if math.isfinite(x) else None


def _generation(s: Served, g) -> dict[str, Any]:
    return {
        "model": s.name,
        "text": g.text,
        "tokens": len(g.tokens),
        "ended": g.ended,
        "log_prob": _num(g.log_prob),
    }


def _batch_recorder(metrics: Metrics):
    def on_batch(key, requests: int, inputs: int, seconds: float) -> None:
        name = key[0]
        metrics.batch_requests.labels(name).observe(requests)
        metrics.batch_inputs.labels(name).observe(inputs)
        metrics.batch_seconds.labels(name).observe(seconds)

    return on_batch


class _ClientGone(Exception):
    """Raised inside a streamed generation whose client has gone: it stops there."""


async def _stream(s: Served, cfg: DecodeConfig, prompt: str, max_new: int, run, metrics: Metrics):
    """Server-sent events: `{"text": ...}` with the continuation so far as it grows, then the
    whole result with `"done": true`. The generation runs on the model thread; its callback
    hands each update to the event loop, and stops the generation once the client has gone."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def on_text(_: int, text: str) -> None:
        if gone.is_set():
            metrics.abandoned.inc()
            raise _ClientGone()
        loop.call_soon_threadsafe(updates.put_nowait, text.rstrip("\ufffd"))

    task = asyncio.ensure_future(run(s, ("stream", cfg, max_new, on_text), [prompt]))

    async def events():
        try:
            async for event in _events(s, updates, task):
                yield event
        finally:  # the stream ended, or the client left mid-way: free the model thread
            gone.set()
            task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


async def _events(s: Served, updates: asyncio.Queue, task: asyncio.Future):
    """The stream's events: each new text, then the result (or the error)."""
    sent = ""
    while True:
        getter = asyncio.ensure_future(updates.get())
        try:
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # a client that leaves cancels the wait: the getter must not outlive it
            if not getter.done():
                getter.cancel()
        if getter in done:
            text = getter.result()
            if text != sent:
                sent = text
                yield f"data: {json.dumps({'text': text}, ensure_ascii=False)}\n\n"
            continue
        try:
            (g,) = task.result()
            final = {**_generation(s, g), "done": True}
        except Refused as e:
            final = {"error": {"field": e.field, "message": e.message}, "done": True}
        yield f"data: {json.dumps(final, ensure_ascii=False)}\n\n"
        return


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    drain_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    limits: Limits = field(default_factory=Limits)
    precision: str = "auto"  # the large linear layers' number format (qkv.precision)


def serve(
    paths: Sequence[str], device: str, options: ServeOptions, announce: Callable[[str], None]
) -> None:
    """Run the app until SIGINT or SIGTERM; both drain in-flight requests (bounded by drain_s)
    and return normally, so the command exits 0."""
    import signal

    import uvicorn

    app = create_app(paths, device, options.limits, options.precision)
    served = app.state.served
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        timeout_graceful_shutdown=int(math.ceil(options.drain_s)),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has drained; these handlers make that a
    # no-op, so a SIGTERM ends with exit status 0 instead of being killed by it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    names = ", ".join(f"{s.name} ({s.task})" for s in served)
    announce(f"serving {names} on http://{options.host}:{options.port}/ (Ctrl-C to stop)")
    server.run()
