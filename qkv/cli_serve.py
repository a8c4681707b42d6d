"""`qkv serve`: the models of one or more model directories behind HTTP (qkv/server.py). Same
shape as qkv/cli.py: a parser beside a function; bad input is one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from .flags import (
    UsageError,
    add_device_flag,
    add_precision_flag,
    check_precision,
    command,
    device_of_flag,
)


def add_serve(sub) -> None:
    p = command(
        sub,
        "serve",
        "serve models over HTTP, with dynamic batching and a web page of the attention",
        "Serve each --model directory (any task) on FastAPI + uvicorn: POST /v1/translate, "
        "/v1/generate (stream: true for server-sent events), /v1/classify, /v1/embed, "
        "/v1/recommend, /v1/explain; GET /v1/models, /health, /ready, /metrics (Prometheus), "
        "/docs (OpenAPI), and a page at / to try a model and see its attention and beam "
        "search. Concurrent requests with the same settings share one batched decode; past "
        "--max-queue waiting requests the answer is 503 with Retry-After. SIGTERM or Ctrl-C "
        "lets in-flight requests finish (at most --drain seconds) and exits 0.",
        [
            "qkv serve --model runs/de-en",
            "qkv serve --model runs/de-en --model runs/shakespeare --port 8080",
            "curl -s localhost:8000/v1/translate -H 'Content-Type: application/json' "
            '-d \'{"texts": ["Ein Hund läuft."], "beam": 5}\'',
        ],
    )
    p.add_argument(
        "--model", action="append", required=True, help="a model directory (repeat for more)"
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    add_device_flag(p)
    add_precision_flag(p)
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=64, help="inputs per batched call (64)")
    g.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for company (5)"
    )
    g.add_argument("--no-batching", action="store_true", help="every request its own call")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests per model (256)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30): 408")
    g.add_argument("--max-texts", type=int, default=64, help="texts per request (64)")
    g.add_argument("--max-chars", type=int, default=2000, help="characters per text (2000)")
    g.add_argument("--max-body", type=int, default=1 << 20, help="bytes per body (1 MiB)")
    g.add_argument("--max-beam", type=int, default=16, help="largest beam (16)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="most new tokens (1024)")
    g.add_argument("--drain", type=float, default=30.0, help="SIGTERM: seconds to finish (30)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .server import Limits, ServeOptions, serve

    sizes = dict(  # Limits fields that count something: each at least 1
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body,
        max_beam=args.max_beam,
        max_new_tokens=args.max_new_tokens,
    )
    for name, value in sizes.items():
        if value < 1:
            flag = "max-body" if name == "max_body_bytes" else name.replace("_", "-")
            raise UsageError(f"--{flag} must be >= 1")
    if args.timeout <= 0 or args.max_wait_ms < 0 or args.drain < 0:
        raise UsageError("--timeout must be > 0; --max-wait-ms and --drain >= 0")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    check_precision(args.precision, device_of_flag(args.device))
    _check_port(args.host, args.port)
    limits = Limits(
        **sizes,
        timeout_s=args.timeout,
        max_wait_ms=args.max_wait_ms,
        batching=not args.no_batching,
    )
    options = ServeOptions(args.host, args.port, args.drain, limits, args.precision)

    def announce(line: str) -> None:
        print(f"qkv: {line}", file=sys.stderr, flush=True)

    try:
        serve(args.model, args.device, options, announce)
    except ValueError as e:  # a model directory without a tokenizer
        raise UsageError(str(e)) from None
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before loading any model, when the address cannot be served on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:  # the port is taken, the host is not this machine's
        raise UsageError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
