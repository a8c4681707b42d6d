"""Load on `qkv serve`: single-sentence translation requests from concurrent clients, dynamic
batching on vs off, beside the batch path's ceiling (`Translator` on the same sentences as one
file, what `qkv translate` runs) and a single `Translator` call.

The server runs in its own process (`qkv serve`, on 127.0.0.1 only); this process is the
clients (asyncio, one keep-alive connection each, a lean HTTP/1.1 client, as they share the
server's cores). At each concurrency level every client sends requests back to back until
`--requests` have been sent (or `--seconds` pass), `--repeats` times (the best run counts, on
both servers; the library is measured before and after the servers, its best counts); requests/s,
sentences/s, p50/p99 latency, errors (any status but 200 and 503) and 503s (refused above the
queue bound) are counted, and the server's peak RSS read from /proc. Same sentences (Multi30k
test 2016, German, in order, cycled), same decoding (beam 5, the API's default) everywhere.

Targets (issue 14): at 64 clients, sentences/s >= 3x the batching-off server and >= 0.8x the
batch path; p99 latency at 1 client within 1.5x a single Translator call (p99 of single calls
on the sentences the one client sends).

    .venv/bin/python bench/serve_load.py --model bench/runs/multi30k-de-en
    .venv/bin/python bench/serve_load.py --levels 1 64 --requests 256 --no-off   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def sentences(data_dir: Path, n: int) -> list[str]:
    with gzip.open(data_dir / "multi30k" / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def library_baseline(
    model: str, texts: list[str], singles: int, chunk: int = 32
) -> dict[str, float]:
    """In a child process (nothing else running): the batch path's sentences/s over all texts
    (sorted by length over the whole file, then batched), the same over the texts in their
    order `chunk` at a time (what a server gets at 64 clients: two alternating batches of 32),
    and the latency of single-sentence Translator calls on the first `singles` (the sentences
    the one-client level sends)."""
    code = f"""
import json, sys, time
from qkv.checkpoint import load
from qkv.config import DecodeConfig
from qkv.packed import pack
from qkv.translate import Translator
texts = json.load(sys.stdin)
model, tok, _ = load({model!r})
t = Translator(pack(model), tok, batch_size=64)
cfg = DecodeConfig()
t.translate(texts[:64], cfg)  # warm-up
start = time.perf_counter(); t.translate(texts, cfg); batch = time.perf_counter() - start
# what a server sees: sentences in arrival order, {chunk} at a time (not sorted over the file)
start = time.perf_counter()
for i in range(0, len(texts), {chunk}):
    t.translate(texts[i : i + {chunk}], cfg)
chunks = time.perf_counter() - start
lat = []
for s in texts[:{singles}]:
    start = time.perf_counter(); t.translate([s], cfg); lat.append(time.perf_counter() - start)
lat.sort()
print(json.dumps(dict(batch_sps=len(texts) / batch, chunk_sps=len(texts) / chunks,
                      single_p50=lat[len(lat) // 2],
                      single_p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))])))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Connection:
    """A lean HTTP/1.1 keep-alive client (asyncio streams): the clients share the server's
    cores, and httpx spends ~8 ms of CPU per request, a sixth of this machine at 64 clients."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.io = host, port, None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.io is None:
            self.io = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.io
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
        writer.write(f"{head}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await reader.readexactly(length)

    def close(self) -> None:
        if self.io is not None:
            self.io[1].close()


async def load(base: str, texts: list[str], clients: int, requests: int, seconds: float):
    """`clients` clients, one connection each, sending requests back to back until `requests`
    are sent (or `seconds` pass)."""
    host, port = base.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal sent
        c = Connection(host, int(port))
        while sent < requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            start = time.perf_counter()
            try:
                status, _ = await c.post("/v1/translate", {"texts": [text]})
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                status, c = -1, Connection(host, int(port))
            if status == 200:
                latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
        c.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    ok = len(latencies)
    return dict(
        clients=clients,
        requests=sum(statuses.values()),
        ok=ok,
        rps=ok / wall,
        sps=ok / wall,  # one sentence per request
        p50=latencies[ok // 2] if ok else float("nan"),
        p99=latencies[min(ok - 1, int(ok * 0.99))] if ok else float("nan"),
        errors=sum(n for s, n in statuses.items() if s not in (200, 503)),
        refused=statuses.get(503, 0),
        wall=wall,
    )


def run_server(model: str, batching: bool, texts, levels, args) -> list[dict]:
    port = free_port()
    cmd = [sys.executable, "-m", "qkv.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--device", "cpu"] + ([] if batching else ["--no-batching"])
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(load(base, texts, 4, 16, 30))  # warm-up
        rows = []
        for clients in levels:
            n = max(args.requests, 2 * clients) if clients > 1 else args.requests_at_1
            runs = []
            for _ in range(args.repeats):  # the best run counts: this machine is noisy
                runs.append(asyncio.run(load(base, texts, clients, n, args.seconds)))
                time.sleep(1)
            row = max(runs, key=lambda r: r["sps"])
            row.update(batching=batching, rss_mib=peak_rss_mib(proc.pid))
            row["all_sps"] = [round(r["sps"], 1) for r in runs]
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=str(ROOT / "bench/runs/multi30k-de-en"))
    p.add_argument(
        "--data-dir", default=os.environ.get("QKV_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--requests", type=int, default=512, help="requests per level (>1 client)")
    p.add_argument("--requests-at-1", type=int, default=60, help="requests with one client")
    p.add_argument("--seconds", type=float, default=120, help="time bound per level")
    p.add_argument("--sentences", type=int, default=1000, help="distinct sentences, cycled")
    p.add_argument("--repeats", type=int, default=2, help="runs per level; the best counts")
    p.add_argument("--threads", type=int, help="the server's PyTorch threads (default: all)")
    p.add_argument(
        "--off",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the batching-off server (default yes)",
    )
    p.add_argument("--out", default=str(ROOT / "bench/runs/serve_load.json"))
    args = p.parse_args()
    texts = sentences(Path(args.data_dir), args.sentences)
    first = library_baseline(args.model, texts, args.requests_at_1)
    print(json.dumps(first), flush=True)
    rows = run_server(args.model, True, texts, args.levels, args)
    if args.off:
        rows += run_server(args.model, False, texts, args.levels, args)
    last = library_baseline(args.model, texts, args.requests_at_1)
    print(json.dumps(last), flush=True)
    # the library's best measurements (before and after the servers): the ceiling
    lib = dict(
        batch_sps=max(first["batch_sps"], last["batch_sps"]),
        chunk_sps=max(first["chunk_sps"], last["chunk_sps"]),
        single_p50=min(first["single_p50"], last["single_p50"]),
        single_p99=min(first["single_p99"], last["single_p99"]),
        all_batch_sps=[round(first["batch_sps"], 1), round(last["batch_sps"], 1)],
    )
    Path(args.out).write_text(json.dumps(dict(library=lib, rows=rows), indent=1))
    print(
        f"\nbatch path (Translator, one file of {len(texts)}): {lib['batch_sps']:.1f} sentences/s;"
        f" single calls p50 {lib['single_p50'] * 1000:.0f} ms,"
        f" p99 {lib['single_p99'] * 1000:.0f} ms"
    )
    print(
        "| clients | batching | requests | req/s | sentences/s | p50 ms | p99 ms | errors | 503 "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {'on' if r['batching'] else 'off'} | {r['ok']} | {r['rps']:.1f} | "
            f"{r['sps']:.1f} | {r['p50'] * 1000:.0f} | {r['p99'] * 1000:.0f} | {r['errors']} | "
            f"{r['refused']} | {r['rss_mib']:.0f} |"
        )
    on = {r["clients"]: r for r in rows if r["batching"]}
    off = {r["clients"]: r for r in rows if not r["batching"]}
    print(f"in arrival order, 32 at a time: {lib['chunk_sps']:.1f} sentences/s")
    if 64 in on and 64 in off:
        print(
            f"\n64 clients: batching on / off = {on[64]['sps'] / off[64]['sps']:.2f}x "
            "(target >= 3);"
            f" on / batch path = {on[64]['sps'] / lib['batch_sps']:.2f}x (target >= 0.8);"
            f" on / 32 at a time = {on[64]['sps'] / lib['chunk_sps']:.2f}x"
        )
    if 1 in on:
        print(
            f"1 client: p99 / single Translator call p99 = {on[1]['p99'] / lib['single_p99']:.2f}x"
            f" (target <= 1.5); p50 / p50 = {on[1]['p50'] / lib['single_p50']:.2f}x"
        )


if __name__ == "__main__":
    main()
