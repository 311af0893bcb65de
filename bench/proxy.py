"""What the OpenAI-compatible proxy adds, alone and inside a running agent, beside nginx:
CPU per request, latency added per request, and lost throughput.

Run: python bench/proxy.py [--rounds 8] [--per-client 8] [--clients 64]
                           [--tokens-per-s 100] [--max-tokens 16]

One fake upstream (`agent.sim.upstream`), and the same load sent in one run to four
targets in front of it, or reached directly:

- `direct`: the upstream itself, the reference;
- `proxy`: the proxy app alone in a process of its own (a real AttributionEngine, its
  timeline filled at 10 Hz and `advance` called every 0.5 s from threads, as the daemon
  does);
- `agent`: `jouleprobe run --simulate 1xH100` with one `[[proxy]]` table in front of the
  upstream (its listeners on free ports, its records in a temporary directory), so with
  the sampler, the attribution, the record writer and the exporter running, and the proxy
  wherever the agent serves it (in its own process or in worker processes of its own);
- `nginx`, where nginx is on PATH: a plain reverse proxy (one master, one worker,
  `proxy_http_version 1.1`, `proxy_buffering off`, `keepalive 64` to the upstream), the
  yardstick. Where it is not, the bench says so and leaves it out.

Rounds rotate among the targets (direct, proxy, agent, nginx, then proxy, agent, nginx,
direct, ...) so that drift in the machine's state falls on all alike: 64 concurrent
clients, each on its own keep-alive connection, each sending `--per-client` chat
completions per round, streaming or not (the two loads are measured apart). Latency is
from the request's first byte sent to the answer's last byte received. "Added" latency is
a target's percentile minus the direct one (requests cannot be paired); throughput is
requests per second of wall time over all rounds, as a ratio over direct's. CPU per
request is that of the target's own processes, read before and after each of its rounds:
the upstream's for direct, the proxy's process, the agent's whole process tree (the process
and all its descendants, summed), nginx's master and worker.

Then, per load, the agent against nginx and the targets of issue 18: CPU per request
≤ 2.5 × nginx's; added p50 ≤ 0.3 ms and added p99 ≤ 3 ms over nginx's own added latency;
throughput ≥ 0.98 of direct; each marked met or not met.

The load generator is this process: a minimal HTTP/1.1 client on asyncio streams, so that
the client's own cost stays small. Traffic goes only to 127.0.0.1. Every process the bench
starts is stopped at its end, also on error (the agent and nginx by SIGTERM, then SIGKILL).

The upstream answers at `--tokens-per-s` per stream (`inf`: no delay at all). At a
GPU-like speed the upstream is the bottleneck, as in production, and the figures say what
each proxy adds to a real service. With no delay everything is CPU-bound, and on a machine
with fewer cores than processes each target's figures include the CPU it takes away from
the upstream and the client on the same cores: a stress figure, not a latency one.

Last line: one JSON object: the settings, then per load ("stream", "plain") each target's
figures (cpu_ms_per_request, p50_ms, p99_ms, mean_ms, throughput_rps, and for all but
direct added_p50_ms, added_p99_ms, throughput_ratio) and "agent_vs_nginx" (cpu_ratio,
added_p50_over_nginx_ms, added_p99_over_nginx_ms, throughput_ratio, and `met` per target;
without nginx, only throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy_targets import Spawned, agent_proxy_counts, nginx_binary, start_agent, start_nginx

from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.intake.proxy import PROXY_STATS, RUNNER_OPTIONS, proxy_app
from agent.sim.upstream import fake_upstream_app
from agent.timeline import EnergyPoint, Timeline

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b-instruct"
PROMPT = ("Estimate the energy of one chat request on an H100 serving an eight billion "
          "parameter model, and explain the method in two sentences.")
SAMPLE_HZ = 10
ADVANCE_S = 0.5
IO_TIMEOUT_S = 30.0
"""Bound on any one read of the load generator: a stuck server fails the bench."""
MAX_HEADERS = 100
CPU_RATIO_TARGET = 2.5
"""Issue 18: the agent's CPU per request at most this many times nginx's."""
ADDED_P50_TARGET_MS = 0.3
ADDED_P99_TARGET_MS = 3.0
"""Issue 18: the agent's added latency at most this much over nginx's own added latency."""
THROUGHPUT_TARGET = 0.98
"""Issue 18: the agent's throughput at least this share of direct's."""


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
        stats = None
        try:
            self._conn.send("stop")
            stats = self._conn.recv() if self._conn.poll(10) else None
        except (OSError, EOFError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
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
    cpu_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s


@dataclass(frozen=True)
class _Target:
    port: int
    cpu_s: Callable[[], float]
    """CPU seconds so far of the target's own processes."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _measure(args: argparse.Namespace, targets: dict[str, _Target]
                   ) -> dict[str, dict[str, _Series]]:
    names = list(targets)
    results: dict[str, dict[str, _Series]] = {}
    for mode in ("stream", "plain"):
        request = _request_bytes(mode == "stream", args.max_tokens)
        series = {name: _Series() for name in names}
        # Warm-up (connections, caches, code paths), which also tells how long one request
        # takes (direct): the spread of the clients' starts.
        spread_s = 0.0
        for name in names:
            latencies, _ = await _round(targets[name].port, request, args.clients, 2)
            if name == "direct":
                spread_s = statistics.median(latencies)
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                target = targets[name]
                cpu = target.cpu_s()
                latencies, wall = await _round(target.port, request, args.clients,
                                               args.per_client, spread_s)
                series[name].cpu_s += target.cpu_s() - cpu
                series[name].latencies += latencies
                series[name].wall_s += wall
        results[mode] = series
    return results


def _figures(series: dict[str, _Series]) -> dict[str, dict[str, float]]:
    direct = series["direct"]
    direct_p50 = _percentile(direct.latencies, 50)
    direct_p99 = _percentile(direct.latencies, 99)
    figures = {}
    for name, s in series.items():
        p50, p99 = _percentile(s.latencies, 50), _percentile(s.latencies, 99)
        one = {
            "requests": len(s.latencies),
            "cpu_ms_per_request": round(1e3 * s.cpu_s / len(s.latencies), 4),
            "p50_ms": round(1e3 * p50, 3),
            "p99_ms": round(1e3 * p99, 3),
            "mean_ms": round(1e3 * statistics.fmean(s.latencies), 3),
            "throughput_rps": round(s.throughput, 2),
        }
        if name != "direct":
            one["added_p50_ms"] = round(1e3 * (p50 - direct_p50), 3)
            one["added_p99_ms"] = round(1e3 * (p99 - direct_p99), 3)
            one["throughput_ratio"] = round(s.throughput / direct.throughput, 4)
        figures[name] = one
    return figures


def _agent_vs_nginx(figures: dict[str, dict[str, float]]) -> dict[str, Any]:
    agent = figures["agent"]
    versus: dict[str, Any] = {"throughput_ratio": agent["throughput_ratio"]}
    met = {"throughput": agent["throughput_ratio"] >= THROUGHPUT_TARGET}
    nginx = figures.get("nginx")
    if nginx is not None:
        nginx_cpu = nginx["cpu_ms_per_request"]
        versus["cpu_ratio"] = (round(agent["cpu_ms_per_request"] / nginx_cpu, 3)
                               if nginx_cpu > 0 else math.inf)
        versus["added_p50_over_nginx_ms"] = round(agent["added_p50_ms"]
                                                  - nginx["added_p50_ms"], 3)
        versus["added_p99_over_nginx_ms"] = round(agent["added_p99_ms"]
                                                  - nginx["added_p99_ms"], 3)
        met["cpu"] = versus["cpu_ratio"] <= CPU_RATIO_TARGET
        met["added_p50"] = versus["added_p50_over_nginx_ms"] <= ADDED_P50_TARGET_MS
        met["added_p99"] = versus["added_p99_over_nginx_ms"] <= ADDED_P99_TARGET_MS
    versus["met"] = met
    return versus


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _print_load(mode: str, figures: dict[str, dict[str, float]],
                versus: dict[str, Any]) -> None:
    for name, f in figures.items():
        line = (f"  {mode:6} {name:6}: p50 {f['p50_ms']:8.2f} ms  p99 {f['p99_ms']:8.2f} ms  "
                f"mean {f['mean_ms']:8.2f} ms  {f['throughput_rps']:7.1f} req/s  "
                f"CPU {f['cpu_ms_per_request']:6.3f} ms/req")
        if name != "direct":
            line += (f"  added p50 {f['added_p50_ms']:+7.2f} ms  p99 {f['added_p99_ms']:+7.2f}"
                     f" ms  throughput ×{f['throughput_ratio']:.4f}")
        print(line)
    met = versus["met"]
    parts = []
    if "cpu_ratio" in versus:
        parts += [
            f"CPU {versus['cpu_ratio']:.2f} × nginx's (≤ {CPU_RATIO_TARGET:g}: "
            f"{_met(met['cpu'])})",
            f"added p50 {versus['added_p50_over_nginx_ms']:+.2f} ms over nginx's "
            f"(≤ {ADDED_P50_TARGET_MS:g}: {_met(met['added_p50'])})",
            f"added p99 {versus['added_p99_over_nginx_ms']:+.2f} ms over nginx's "
            f"(≤ {ADDED_P99_TARGET_MS:g}: {_met(met['added_p99'])})",
        ]
    else:
        parts.append("no nginx to compare CPU and latency with")
    parts.append(f"throughput {versus['throughput_ratio']:.4f} of direct "
                 f"(≥ {THROUGHPUT_TARGET:g}: {_met(met['throughput'])})")
    print(f"  {mode:6} agent vs nginx: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens-per-s", type=float, default=100.0,
                        help="decode speed of the fake upstream per stream; inf: no delay")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    # SIGTERM too unwinds through the `finally` below, which stops every process started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    nginx_found = nginx_binary()
    if nginx_found is None:
        print("nginx: not on PATH, the nginx target is skipped")
    upstream: _Server | None = None
    proxy: _Server | None = None
    spawned: list[Spawned] = []
    proxy_stats = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jouleprobe-bench-proxy-") as tmp:
        directory = Path(tmp)
        try:
            upstream = _Server(_upstream_app, (args.tokens_per_s,), {})
            proxy = _Server(_proxy_app, (upstream.port,), RUNNER_OPTIONS)
            targets = {"direct": _Target(upstream.port, upstream.cpu_s),
                       "proxy": _Target(proxy.port, proxy.cpu_s)}
            agent = start_agent(upstream.port, directory / "agent", REPO)
            spawned.append(agent)
            targets["agent"] = _Target(agent.port, agent.cpu_s)
            if nginx_found is not None:
                nginx = start_nginx(nginx_found[0], upstream.port, directory / "nginx")
                spawned.append(nginx)
                targets["nginx"] = _Target(nginx.port, nginx.cpu_s)
            trees = ", ".join(f"{s.what}: {s.processes()} processes" for s in spawned)
            results = asyncio.run(_measure(args, targets))
            trees_after = ", ".join(f"{s.processes()}" for s in spawned)
            agent_counts = agent_proxy_counts(directory / "agent")
        finally:
            for s in reversed(spawned):
                code = s.stop()
                if code not in (0, None):
                    print(f"  {s.what} exited with {code}:\n{s.log_tail()}")
            if proxy is not None:
                proxy_stats = proxy.stop()
            if upstream is not None:
                upstream.stop()
    print(f"{os.cpu_count()} CPU(s); {args.clients} clients × {args.per_client} requests × "
          f"{args.rounds} rounds per target and load; upstream at {args.tokens_per_s:g} "
          f"tokens/s per stream, {args.max_tokens} tokens per answer; nginx "
          f"{nginx_found[1] if nginx_found else 'absent'}; "
          f"{time.perf_counter() - started:.1f} s")
    print(f"  {trees} at the start ({trees_after} at the end)")
    summary: dict[str, Any] = {
        "cpus": os.cpu_count(), "clients": args.clients, "per_client": args.per_client,
        "rounds": args.rounds, "tokens_per_s": args.tokens_per_s,
        "max_tokens": args.max_tokens, "nginx": nginx_found[1] if nginx_found else None,
    }
    for mode, series in results.items():
        figures = _figures(series)
        versus = _agent_vs_nginx(figures)
        _print_load(mode, figures, versus)
        summary[mode] = {**figures, "agent_vs_nginx": versus}
    print(f"  proxy alone: {proxy_stats}")
    print(f"  agent's proxy: {agent_counts}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
