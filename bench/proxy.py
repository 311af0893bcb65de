"""What the OpenAI-compatible proxy adds: latency per request and lost throughput.

Run: python bench/proxy.py [--rounds 8] [--per-client 8] [--clients 64]
                           [--tokens-per-s 100] [--max-tokens 16]

The same load goes to the fake upstream directly and through the proxy, in one run,
alternating (direct, proxy, then proxy, direct, ...) so that drift in the machine's state
falls on both alike: 64 concurrent clients, each on its own keep-alive connection, each
sending `--per-client` chat completions per round, streaming or not (the two loads are
measured apart). Latency is from the request's first byte sent to the answer's last byte
received. "Added" latency is the proxied percentile minus the direct one (requests cannot
be paired); throughput is requests per second of wall time over all rounds.

Three processes: the fake upstream, the proxy (with a real AttributionEngine, its
timeline filled at 10 Hz and `advance` called every 0.5 s from threads, as the daemon
does), and this one, the load generator: a minimal HTTP/1.1 client on asyncio streams,
so that the client's own cost stays small. Traffic goes only to 127.0.0.1.

The upstream answers at `--tokens-per-s` per stream (`inf`: no delay at all). At a
GPU-like speed the upstream is the bottleneck, as in production, and the figures say what
the proxy adds to a real service. With no delay everything is CPU-bound, and on a machine
with fewer cores than processes the proxy's figures include the CPU it takes away from the
upstream and the client on the same cores: a stress figure, not a latency one.

Last line: one JSON object, {"stream": {...}, "plain": {...}}, each with added_p50_ms,
added_p99_ms and throughput_ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.intake.proxy import PROXY_STATS, RUNNER_OPTIONS, proxy_app
from agent.sim.upstream import fake_upstream_app
from agent.timeline import EnergyPoint, Timeline

MODEL = "llama-3.1-8b-instruct"
PROMPT = ("Estimate the energy of one chat request on an H100 serving an eight billion "
          "parameter model, and explain the method in two sentences.")
SAMPLE_HZ = 10
ADVANCE_S = 0.5
IO_TIMEOUT_S = 30.0
"""Bound on any one read of the load generator: a stuck server fails the bench."""
MAX_HEADERS = 100


# --- the servers (their own processes) ---------------------------------------------------


def _serve(app_factory: Any, options: dict[str, Any], conn: Connection) -> None:
    """Serves the app made by `app_factory()` on 127.0.0.1, sends the port, and runs until
    `conn` says stop; then sends back `stats()` if the factory gave one."""
    async def main() -> None:
        app, stats = app_factory()
        runner = web.AppRunner(app, access_log=None, **options)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        conn.send(sock.getsockname()[1])
        await asyncio.to_thread(conn.recv)
        conn.send(stats() if stats else None)
        await runner.cleanup()
    asyncio.run(main())


def _upstream_app(tokens_per_s: float) -> tuple[web.Application, None]:
    return fake_upstream_app(models={MODEL: tokens_per_s}), None


def _proxy_app(upstream_port: int) -> tuple[web.Application, Any]:
    """The proxy, with an engine that works as in the daemon while the load runs."""
    line = Timeline(max_points=SAMPLE_HZ * 600)
    engine = AttributionEngine({0: line}, policy="tokens", settle_s=2.0,
                               max_pending=1_000_000)
    stopped = threading.Event()

    def sample() -> None:  # 300 W at 10 Hz
        start = time.monotonic()
        while not stopped.wait(1 / SAMPLE_HZ):
            now = time.monotonic()
            line.append(EnergyPoint(now, 300.0 * (now - start)))

    def attribute() -> None:
        while not stopped.wait(ADVANCE_S):
            engine.advance(time.monotonic())

    for target in (sample, attribute):
        threading.Thread(target=target, daemon=True).start()
    table = ProxyTable(name="bench", listen="127.0.0.1:0",
                       upstream=f"http://127.0.0.1:{upstream_port}", gpus=(0,))
    app = proxy_app(table, engine, lambda: (0,))
    stats = app[PROXY_STATS]

    def report() -> dict[str, Any]:
        stopped.set()
        totals = engine.totals()
        return {"measured": stats.measured, "refused": stats.refused, "ok": stats.ok,
                "failed": stats.failed, "pending": totals.pending_requests}
    return app, report


class _Server:
    def __init__(self, factory: Any, args: tuple[Any, ...], options: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(_Factory(factory, args), options,
                                                            child), daemon=True)
        self.process.start()
        if not self._conn.poll(60):
            raise RuntimeError("a server process did not start")
        self.port: int = self._conn.recv()
        self.cpu = psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        times = self.cpu.cpu_times()
        return times.user + times.system

    def stop(self) -> Any:
        self._conn.send("stop")
        stats = self._conn.recv() if self._conn.poll(10) else None
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
        return stats


@dataclass(frozen=True)
class _Factory:
    """A picklable `app_factory` for a spawned process."""

    function: Any
    args: tuple[Any, ...]

    def __call__(self) -> tuple[web.Application, Any]:
        return self.function(*self.args)


# --- the load generator --------------------------------------------------------------------


def _request_bytes(stream: bool, max_tokens: int) -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> None:
    """One request on a keep-alive connection, its whole answer read (chunked or not)."""
    writer.write(request)
    status = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answer {status!r}")
    length = None
    chunked = False
    for _ in range(MAX_HEADERS):
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    else:
        raise RuntimeError("an answer with too many headers")
    if not chunked:
        await asyncio.wait_for(reader.readexactly(length or 0), IO_TIMEOUT_S)
        return
    for _ in range(1_000_000):  # bounded: a stream has far fewer chunks
        size = int((await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)).split(b";")[0],
                   16)
        if size == 0:
            await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)  # the blank line
            return
        await asyncio.wait_for(reader.readexactly(size + 2), IO_TIMEOUT_S)
    raise RuntimeError("an answer with too many chunks")


async def _round(port: int, request: bytes, clients: int, per_client: int,
                 spread_s: float = 0.0) -> tuple[list[float], float]:
    """Latencies (s) of `clients × per_client` requests, and the round's wall time.

    Client i starts `i / clients × spread_s` after the first: independent users do not
    arrive in step, whereas clients of an upstream whose answers all take the same time
    would stay in step forever, and the figures would measure one burst of 64 requests.
    """
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    latencies: list[float] = []

    async def client(i: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(i / clients * spread_s)
        for _ in range(per_client):
            sent = time.perf_counter()
            await _exchange(reader, writer, request)
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(i, r, w) for i, (r, w) in enumerate(connections)))
        wall = time.perf_counter() - started
    finally:
        for _, writer in connections:
            writer.close()
    return latencies, wall


@dataclass
class _Series:
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    proxy_cpu_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _measure(args: argparse.Namespace, upstream: _Server, proxy: _Server
                   ) -> dict[str, dict[str, _Series]]:
    results: dict[str, dict[str, _Series]] = {}
    for mode in ("stream", "plain"):
        request = _request_bytes(mode == "stream", args.max_tokens)
        series = {"direct": _Series(), "proxy": _Series()}
        targets = {"direct": upstream.port, "proxy": proxy.port}
        # Warm-up (connections, caches, code paths), which also tells how long one request
        # takes: the spread of the clients' starts.
        for port in targets.values():
            latencies, _ = await _round(port, request, args.clients, 2)
        spread_s = statistics.median(latencies)
        for r in range(args.rounds):
            order = ["direct", "proxy"] if r % 2 == 0 else ["proxy", "direct"]
            for name in order:
                cpu = proxy.cpu_s()
                latencies, wall = await _round(targets[name], request, args.clients,
                                               args.per_client, spread_s)
                series[name].latencies += latencies
                series[name].wall_s += wall
                series[name].proxy_cpu_s += proxy.cpu_s() - cpu
        results[mode] = series
    return results


def _summary(series: dict[str, _Series]) -> dict[str, float]:
    direct, proxied = series["direct"], series["proxy"]
    return {
        "added_p50_ms": round(1e3 * (_percentile(proxied.latencies, 50)
                                     - _percentile(direct.latencies, 50)), 3),
        "added_p99_ms": round(1e3 * (_percentile(proxied.latencies, 99)
                                     - _percentile(direct.latencies, 99)), 3),
        "throughput_ratio": round(proxied.throughput / direct.throughput, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens-per-s", type=float, default=100.0,
                        help="decode speed of the fake upstream per stream; inf: no delay")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    upstream = _Server(_upstream_app, (args.tokens_per_s,), {})
    proxy = _Server(_proxy_app, (upstream.port,), RUNNER_OPTIONS)
    started = time.perf_counter()
    try:
        results = asyncio.run(_measure(args, upstream, proxy))
    finally:
        proxy_stats = proxy.stop()
        upstream.stop()
    print(f"{os.cpu_count()} CPU(s); {args.clients} clients × {args.per_client} requests × "
          f"{args.rounds} rounds per target and load; upstream at {args.tokens_per_s:g} "
          f"tokens/s per stream, {args.max_tokens} tokens per answer; "
          f"{time.perf_counter() - started:.1f} s")
    summary = {}
    for mode, series in results.items():
        summary[mode] = _summary(series)
        for name, s in series.items():
            print(f"  {mode:6} {name:6}: p50 {1e3 * _percentile(s.latencies, 50):8.2f} ms  "
                  f"p99 {1e3 * _percentile(s.latencies, 99):8.2f} ms  "
                  f"mean {1e3 * statistics.fmean(s.latencies):8.2f} ms  "
                  f"{s.throughput:8.1f} req/s  proxy CPU "
                  f"{1e3 * s.proxy_cpu_s / len(s.latencies):.3f} ms/req")
    print(f"  proxy: {proxy_stats}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
