"""The channel between proxy workers and the agent: a worker's engine calls arrive as the
agent's requests over a real unix socket; nothing is lost while the agent is away; the
proxy's counters add up across workers and restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.devices.base import GpuInfo
from agent.intake.proxy import channel as channel_module
from agent.intake.proxy.channel import ChannelSink, ProxyChannel, channel_app
from agent.requests import Request, Sampling
from agent.timeline import EnergyPoint, Timeline

GPUS = [GpuInfo(i, f"GPU-{i:08d}-0000-4000-8000-000000000000", "H100", "counter",
                "instant") for i in (0, 1)]


def engine_now(max_pending: int = 1000) -> AttributionEngine:
    """Two GPUs at 100 W from 100 s ago on: requests of now are inside the timelines."""
    now = time.monotonic()
    timelines = {}
    for info in GPUS:
        timelines[info.index] = line = Timeline(max_points=300)
        for i in range(201):
            line.append(EnergyPoint(now - 100 + i, 100.0 * i))
    return AttributionEngine(timelines, settle_s=0.0, max_age_s=10_000.0,
                             max_pending=max_pending)


async def with_channel(tmp_path: Path, channel: ProxyChannel,
                       body: Callable[[str], Awaitable[None]]) -> None:
    """Serves `channel` on a unix socket in `tmp_path` while `body(socket_path)` runs."""
    path = str(tmp_path / "proxies.sock")
    runner = web.AppRunner(channel_app({channel.name: channel}))
    await runner.setup()
    await web.UnixSite(runner, path).start()
    try:
        await body(path)
    finally:
        await runner.cleanup()


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_workers_requests_reach_the_engine_as_the_proxys(tmp_path: Path) -> None:
    engine = engine_now()
    channel = ProxyChannel("vllm", engine, GPUS, lambda: (1,))

    async def body(path: str) -> None:
        sink = ChannelSink(path, "vllm", "4242")
        sender = asyncio.create_task(sink.run())
        await asyncio.wait_for(sink.answered(), 5)
        assert sink.gpus() == (1,)
        start = time.monotonic() - 2.0
        sink.add(Request("r1", "llama", "proxy:vllm", sink.gpus(), start,
                         sampling=Sampling(max_tokens=64, temperature=0.5)))
        sink.stats.measured, sink.stats.ok = 1, 1
        assert sink.end("r1", start + 1.5, first_token=start + 0.5, prompt_tokens=12,
                        completion_tokens=30, scheduled=start + 0.1, tokens_estimated=True)
        await until(lambda: channel.stats.ok == 1)
        sink.close()
        await asyncio.wait_for(sender, 5)

    asyncio.run(with_channel(tmp_path, channel, body))
    (final,) = engine.advance(time.monotonic() + 200)
    request = final.request
    assert (request.id, request.model, request.source, request.gpus) == (
        "r1", "llama", "proxy:vllm", (1,))
    assert (request.prompt_tokens, request.completion_tokens, request.tokens_estimated) == (
        12, 30, True)
    assert request.sampling == Sampling(max_tokens=64, temperature=0.5)
    assert request.end is not None and request.first_token is not None
    assert request.end - request.start == pytest.approx(1.5)
    assert request.scheduled == pytest.approx(request.start + 0.1)
    assert final.gpu_j > 0
    assert (channel.stats.measured, channel.stats.refused, channel.stats.unmatched_ends) == (
        1, 0, 0)


def test_events_wait_while_the_agent_is_away_and_starts_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_module, "MAX_QUEUED_STARTS", 3)
    monkeypatch.setattr(channel_module, "RETRY_S", 0.05)
    engine = engine_now()
    channel = ProxyChannel("p", engine, GPUS, lambda: (0,))
    path = str(tmp_path / "proxies.sock")

    async def scenario() -> None:
        sink = ChannelSink(path, "p", "1")
        sender = asyncio.create_task(sink.run())  # nobody listens yet
        start = time.monotonic() - 1.0
        for i in range(3):
            sink.add(Request(f"r{i}", "m", "proxy:p", (0,), start))
        with pytest.raises(CapacityExceeded):
            sink.add(Request("r3", "m", "proxy:p", (0,), start))
        for i in range(3):  # ends are taken whatever waits
            sink.end(f"r{i}", start + 0.5, prompt_tokens=1, completion_tokens=2)
        await asyncio.sleep(0.3)
        assert engine.totals().pending_requests == 0
        runner = web.AppRunner(channel_app({"p": channel}))
        await runner.setup()
        await web.UnixSite(runner, path).start()
        try:
            finals = []

            def all_final() -> bool:
                finals.extend(engine.advance(time.monotonic()))
                return len(finals) == 3

            await until(all_final)
            assert sorted(f.request.completion_tokens or 0 for f in finals) == [2, 2, 2]
            sink.close()
            await asyncio.wait_for(sender, 5)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert engine.totals().pending_requests == 0
    assert channel.stats.unmatched_ends == 0


def test_a_refused_start_is_counted_once_and_its_end_is_not_unexpected(
        tmp_path: Path) -> None:
    engine = engine_now(max_pending=1)
    channel = ProxyChannel("p", engine, GPUS, lambda: (0,))
    now = time.monotonic()
    batch = {"worker": "7", "stats": {"measured": 3, "ok": 3}, "events": [
        {"type": "start", "id": "a", "model": "m", "gpus": [0], "time": now - 5},
        {"type": "start", "id": "b", "model": "m", "gpus": [0], "time": now - 5},  # full
        {"type": "end", "id": "b", "time": now - 4},
        {"type": "end", "id": "never-started", "time": now - 4},
        {"type": "end", "id": "a", "time": now - 4},
    ]}
    assert channel.take(batch) == {"gpus": [0]}
    assert (channel.stats.measured, channel.stats.ok) == (3, 3)
    assert (channel.stats.refused, channel.stats.unmatched_ends) == (1, 1)
    assert len(engine.advance(now + 200)) == 1


def test_counters_add_up_across_workers_and_restarts() -> None:
    channel = ProxyChannel("p", engine_now(), GPUS, lambda: (0,))
    channel.take({"worker": "1", "stats": {"ok": 5, "busy": 1,
                                           "counts_unasked": {"/chat/completions": False}},
                  "events": []})
    channel.take({"worker": "2", "stats": {"ok": 7}, "events": []})
    channel.take({"worker": "1", "stats": {"ok": 6, "busy": 1}, "events": []})  # later figures
    assert (channel.stats.ok, channel.stats.busy) == (13, 1)
    channel.retire("1")
    channel.take({"worker": "3", "stats": {"ok": 1}, "events": []})  # 1's successor, from 0
    assert channel.stats.ok == 6 + 7 + 1  # never backwards: a counter
    assert channel.stats.counts_unasked == {}  # learnt again by the new worker


def test_gpus_not_yet_known_are_said_as_null_and_bad_batches_get_400(tmp_path: Path) -> None:
    def unknown() -> tuple[int, ...]:
        raise ValueError("still discovering")

    channel = ProxyChannel("p", engine_now(), GPUS, unknown)
    assert channel.take({"worker": "1", "stats": {}, "events": []}) == {"gpus": None}

    async def body(path: str) -> None:
        import aiohttp
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s:
            for url, data, status in (
                    ("http://agent/batch/p", b"[]", 400),
                    ("http://agent/batch/p", b"{", 400),
                    ("http://agent/batch/other", json.dumps(
                        {"worker": "1", "stats": {}, "events": []}).encode(), 404)):
                async with s.post(url, data=data) as answer:
                    assert answer.status == status, url
                    assert "error" in await answer.json()

    asyncio.run(with_channel(tmp_path, channel, body))


def test_the_requests_a_dead_worker_left_running_end_failed() -> None:
    engine = engine_now()
    channel = ProxyChannel("p", engine, GPUS, lambda: (0,))
    now = time.monotonic()
    channel.take({"worker": "1", "stats": {"measured": 2, "ok": 1}, "events": [
        {"type": "start", "id": "done", "model": "m", "gpus": [0], "time": now - 5},
        {"type": "start", "id": "cut", "model": "m", "gpus": [0], "time": now - 5},
        {"type": "end", "id": "done", "time": now - 4},
    ]})
    assert engine.totals().pending_requests == 2
    channel.retire("1")
    assert (channel.stats.measured, channel.stats.ok, channel.stats.failed) == (2, 1, 1)
    assert channel.stats.running == 0
    finals = {f.request.id: f.request for f in engine.advance(time.monotonic() + 200)}
    assert finals["done"].status == "ok" and finals["cut"].status == "failed"
    assert finals["cut"].end is not None and finals["cut"].end >= now
