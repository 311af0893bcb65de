"""The proxy under a flood: many times the requests it can finish, from many connections.

The upstream takes `REQUEST_S` per request and the proxy handles `MAX_CONCURRENT` at once,
so `MAX_CONCURRENT / REQUEST_S` requests per second is the sustainable rate. `CLIENTS`
connections send requests back to back, each at once after its answer, until the upstream
has finished `TARGET_OK` of them: far more than ten times the sustainable rate (the test
checks the ratio, in counts over the same period). The engine holds at most `CAP` pending
requests and is not drained during the flood. What must hold: the excess answered 503 with
Retry-After at once, never queued (the upstream never sees more than `MAX_CONCURRENT`);
every other request answered 200, the engine's refusals included; the engine within its
cap; process memory flat; every accepted request final afterwards; and full service again
once the flood stops.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest
from aiohttp import ClientSession, TCPConnector
from scripted import Servers, wait_until

from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.intake.proxy import PROXY_STATS, RUNNER_OPTIONS, ProxyStats, proxy_app
from agent.sim.upstream import fake_upstream_app
from agent.timeline import EnergyPoint, Timeline

MAX_CONCURRENT = 4
TOKENS_PER_S = 16.0
MAX_TOKENS = 8
REQUEST_S = (MAX_TOKENS - 1) / TOKENS_PER_S
"""How long the upstream takes for one request: 0.44 s (its prefill is negligible)."""
CLIENTS = 10 * MAX_CONCURRENT
TARGET_OK = 4 * MAX_CONCURRENT
MAX_SENT = 50_000
"""A bound on the flood, should the proxy never answer 200 again."""
WARM_UP = 2 * MAX_CONCURRENT
CAP = WARM_UP + 2 * MAX_CONCURRENT
"""The engine's max_pending: the flood fills it, and the rest is refused (still proxied)."""
RSS_GROWTH_BOUND = 32 * 2**20
"""Generous: the flood sends thousands of requests; a leak of 10 kB each would pass it."""
SPAN_S = 600


@dataclass
class Flood:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: set[str | None] = field(default_factory=set)
    errors: set[str] = field(default_factory=set)
    """JSON `error.type` of the 503 answers."""


@dataclass
class Upstream:
    running: int = 0
    most: int = 0
    done: int = 0

    def start(self, _key: int, _model: str) -> None:
        self.running += 1
        self.most = max(self.most, self.running)

    def end(self, _key: int) -> None:
        self.running -= 1
        self.done += 1


def body(i: int) -> bytes:
    return json.dumps({"model": "slow", "prompt": f"flood {i} " + "joule " * 200,
                       "max_tokens": MAX_TOKENS, "stream": i % 2 == 0}).encode()


async def send(session: ClientSession, url: str, i: int, flood: Flood) -> None:
    async with session.post(url, data=body(i),
                            headers={"Content-Type": "application/json"}) as answer:
        payload = await answer.read()
        flood.statuses[answer.status] += 1
        if answer.status == 503:
            flood.retry_after.add(answer.headers.get("Retry-After"))
            flood.errors.add(json.loads(payload)["error"]["type"])


async def flood_until(url: str, upstream: Upstream, flood: Flood) -> None:
    """CLIENTS connections, each sending as soon as it has its answer, until the upstream
    has finished TARGET_OK requests (or MAX_SENT have been sent)."""
    goal = upstream.done + TARGET_OK

    async def client(session: ClientSession) -> None:
        while upstream.done < goal and flood.sent < MAX_SENT:
            flood.sent += 1
            await send(session, url, flood.sent, flood)

    async with ClientSession(connector=TCPConnector(limit=CLIENTS)) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))


async def together(url: str, count: int) -> Flood:
    """`count` requests at once."""
    flood = Flood()
    async with ClientSession(connector=TCPConnector(limit=count)) as session:
        await asyncio.gather(*(send(session, url, i, flood) for i in range(count)))
    return flood


class RssWatch:
    """The process's resident memory, sampled every 10 ms from a thread while it runs."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)


class PendingWatch:
    """The engine's pending requests, sampled on the proxy's own event loop."""

    def __init__(self, engine: AttributionEngine) -> None:
        self.engine = engine
        self.most = 0

    async def run(self) -> None:
        while True:
            self.most = max(self.most, self.engine.totals().pending_requests)
            await asyncio.sleep(0.005)


@pytest.fixture
def servers() -> Iterator[Servers]:
    serving = Servers()
    yield serving
    serving.close()


def test_a_flood_gets_503_with_retry_after_and_the_proxy_recovers(
        servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    now = time.monotonic()
    line = Timeline(max_points=SPAN_S + 20)
    for i in range(SPAN_S + 11):
        line.append(EnergyPoint(now - 10 + i, 100.0 * i))
    engine = AttributionEngine({0: line}, policy="tokens", settle_s=0.0, max_age_s=1e6,
                               max_pending=CAP)
    upstream = Upstream()
    fake = servers.serve(fake_upstream_app(models={"slow": TOKENS_PER_S},
                                           on_start=upstream.start, on_end=upstream.end),
                         handler_cancellation=True)
    table = ProxyTable(name="flood", listen="127.0.0.1:0", upstream=fake, gpus=(0,))
    app = proxy_app(table, engine, lambda: (0,), max_concurrent=MAX_CONCURRENT)
    stats: ProxyStats = app[PROXY_STATS]
    servers.proxies.append(stats)
    url = servers.serve(app, **RUNNER_OPTIONS) + "/v1/completions"

    warm = asyncio.run(together(url, MAX_CONCURRENT))
    warm.statuses.update(asyncio.run(together(url, MAX_CONCURRENT)).statuses)
    assert warm.statuses == {200: WARM_UP}
    gc.collect()
    before = psutil.Process().memory_info().rss

    pending = PendingWatch(engine)
    watching = asyncio.run_coroutine_threadsafe(pending.run(), servers.loop)
    flood = Flood()
    started = time.monotonic()
    with RssWatch() as rss:
        asyncio.run(flood_until(url, upstream, flood))
    seconds = time.monotonic() - started
    wait_until(lambda: stats.running == 0, "the proxy to end every request")
    watching.cancel()
    gc.collect()
    after = psutil.Process().memory_info().rss

    ok, busy = flood.statuses[200], flood.statuses[503]
    print(f"\nflood: {flood.sent} requests in {seconds:.1f} s ({flood.sent / seconds:.0f}/s), "
          f"{ok} answered 200, {busy} answered 503, {stats.refused} refused by the engine; "
          f"sustainable {MAX_CONCURRENT / REQUEST_S:.0f}/s; RSS before {before / 2**20:.1f} "
          f"MiB, peak {rss.peak / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB")
    assert set(flood.statuses) == {200, 503} and ok + busy == flood.sent
    assert flood.sent >= 10 * ok  # ten times what it can finish, over the same period
    assert flood.retry_after == {"1"} and flood.errors == {"proxy_busy"}
    assert stats.busy == busy and stats.measured == WARM_UP + ok
    assert upstream.most == MAX_CONCURRENT  # reached, never passed: nothing queued
    assert pending.most <= CAP
    assert stats.refused == WARM_UP + ok - CAP > 0  # proxied all the same (200)
    assert rss.peak - before < RSS_GROWTH_BOUND
    busy_warnings = [r for r in caplog.records if "max_concurrent" in r.getMessage()]
    assert len(busy_warnings) == 1  # one a minute at most

    # Nothing that the engine accepted is lost; then full service again.
    finals = engine.advance(time.monotonic() + 2)
    assert len(finals) == CAP and {r.request.status for r in finals} == {"ok"}
    assert engine.totals().pending_requests == 0
    again = asyncio.run(together(url, MAX_CONCURRENT))
    assert again.statuses == {200: MAX_CONCURRENT}
    assert stats.refused == WARM_UP + ok - CAP  # accepted again: the engine has room


def test_max_concurrent_must_be_positive() -> None:
    table = ProxyTable(name="x", listen="127.0.0.1:0", upstream="http://127.0.0.1:1", gpus=(0,))
    engine = AttributionEngine({0: Timeline(max_points=10)})
    with pytest.raises(ValueError, match="max_concurrent"):
        proxy_app(table, engine, lambda: (0,), max_concurrent=0)

