"""The local channel between a proxy's worker processes and the agent (docs/design.md §6).

A proxy runs in worker processes of its own (`worker`), so that nothing the agent's main
process does (sampling, attribution, records, exports) can stall a client. A worker's
engine calls become events of the ingest protocol (`agent.intake.ingest`), which
`ChannelSink` sends in batches, over HTTP on a unix socket in a directory only the agent's
user can enter, to the agent's `ProxyChannel`, which applies them to the engine as
requests of `proxy:<name>`. Each batch also carries the worker's `ProxyStats`; the answer
carries the proxy's GPU set as the agent resolves it (a worker never calls NVML).

Times stay `time.monotonic()` seconds: CLOCK_MONOTONIC is one clock for every process of
a host. A request's start reaches the engine up to one flush period (`FLUSH_S`) after it
began, far within the engine's settle, so no interval is attributed without it.

Bounds: at most `MAX_QUEUED_STARTS` starts wait in a worker while the agent cannot be
reached (a further request is proxied unmeasured, counted refused); ends are never
dropped, so that no request the engine took stays open until its maximum age.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.devices.base import GpuInfo
from agent.intake.ingest import EventIntake
from agent.intake.proxy.app import ProxyStats
from agent.requests import SAMPLING_FIELDS, Request, RequestStatus

log = logging.getLogger(__name__)

BATCH_PATH = "/batch"
FLUSH_S = 0.02
"""Seconds between two batches of a worker (and the longest a start waits for the agent)."""
HEARTBEAT_S = 1.0
"""A worker sends its counters at least this often, even with no request."""
MAX_BATCH = 2_000
MAX_QUEUED_STARTS = 100_000
RETRY_S = 0.5
REMEMBERED_REFUSALS = 100_000
"""Refused starts remembered, so that their ends are not counted as unexpected."""
_WORKER_FIELDS = ("measured", "refused", "ok", "failed", "cancelled", "busy",
                  "upstream_unreachable", "upstream_timeouts")
"""The counters of `ProxyStats` that a worker keeps (the agent keeps the others)."""


class ChannelSink:
    """A worker's `RequestSink`: each call queues one event; `run` sends them."""

    def __init__(self, socket_path: str, proxy: str, worker: str) -> None:
        self.socket_path = socket_path
        self.url = f"http://agent{BATCH_PATH}/{proxy}"
        self.worker = worker
        self.stats = ProxyStats()
        """The worker's proxy's counters (set to its app's `PROXY_STATS`), sent along."""
        self._events: list[dict[str, Any]] = []
        self._starts = 0
        self._gpus: tuple[int, ...] | None = None
        self._wake = asyncio.Event()
        self._answered = asyncio.Event()
        self._closing = False

    async def answered(self) -> None:
        """Returns once the agent has answered a batch (and so said the proxy's GPUs)."""
        await self._answered.wait()

    def gpus(self) -> tuple[int, ...]:
        """The proxy's GPUs as the agent last said; raises until it has."""
        if self._gpus is None:
            raise ValueError("the agent has not yet said which GPUs serve this proxy")
        return self._gpus

    def add(self, request: Request) -> None:
        if self._starts >= MAX_QUEUED_STARTS:
            raise CapacityExceeded(f"{self._starts} request starts are waiting for the agent")
        event: dict[str, Any] = {"type": "start", "id": request.id, "model": request.model,
                                 "gpus": list(request.gpus), "time": request.start}
        if request.sampling is not None:
            for name in SAMPLING_FIELDS:
                if (value := getattr(request.sampling, name)) is not None:
                    event[name] = value
        self._events.append(event)
        self._starts += 1
        if len(self._events) >= MAX_BATCH:
            self._wake.set()

    def end(self, request_id: str, end: float, *, first_token: float | None = None,
            prompt_tokens: int | None = None, completion_tokens: int | None = None,
            status: RequestStatus = "ok", scheduled: float | None = None,
            tokens_estimated: bool = False) -> bool:
        event = {"type": "end", "id": request_id, "time": end, "status": status,
                 "first_token_time": first_token, "scheduled_time": scheduled,
                 "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "tokens_estimated": tokens_estimated}
        self._events.append({k: v for k, v in event.items() if v is not None})
        return True  # whether the engine expected it is counted by the agent

    async def run(self) -> None:
        """Sends the queued events every `FLUSH_S` (and the counters every `HEARTBEAT_S`)
        until `close`; while the agent cannot be reached, keeps them and tries again."""
        connector = aiohttp.UnixConnector(path=self.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            idle_s = HEARTBEAT_S
            while True:
                if self._events or idle_s >= HEARTBEAT_S or self._closing:
                    batch, self._events, starts = self._events, [], self._starts
                    self._starts = 0
                    if await self._send(session, batch):
                        idle_s = 0.0
                    else:
                        self._events[:0] = batch  # in order, before what came since
                        self._starts += starts
                        if self._closing:
                            return
                        await asyncio.sleep(RETRY_S)
                        continue
                if self._closing and not self._events:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), FLUSH_S)
                idle_s += FLUSH_S

    def close(self) -> None:
        """Makes `run` send what is queued once more and return."""
        self._closing = True
        self._wake.set()

    async def _send(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> bool:
        stats = {name: getattr(self.stats, name) for name in _WORKER_FIELDS}
        stats["counts_unasked"] = self.stats.counts_unasked
        body = json.dumps({"worker": self.worker, "stats": stats, "events": batch})
        try:
            async with session.post(self.url, data=body,
                                    headers={"Content-Type": "application/json"}) as answer:
                if answer.status != 200:
                    log.warning("proxy channel: the agent answered %d: %s", answer.status,
                                (await answer.text())[:200])
                    return False
                gpus = (await answer.json())["gpus"]
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            log.warning("proxy channel: the agent cannot be reached (%s); %d event(s) kept",
                        exc, len(batch))
            return False
        self._gpus = None if gpus is None else tuple(gpus)
        self._answered.set()
        return True


class ProxyChannel:
    """The agent's end of one proxy's channel: applies its workers' events to the engine
    and keeps the proxy's counters (`stats`, the same object while the agent runs: the
    metrics read it) as the sum of its workers' and its own."""

    def __init__(self, name: str, engine: AttributionEngine, gpus: list[GpuInfo],
                 resolve: Callable[[], tuple[int, ...]]) -> None:
        self.name = name
        self.stats = ProxyStats()
        self._intake = EventIntake(engine, gpus, source=f"proxy:{name}")
        self._resolve = resolve
        self._workers: dict[str, dict[str, Any]] = {}
        self._retired = dict.fromkeys(_WORKER_FIELDS, 0)
        """Counters of the workers that have died: a restarted one counts from 0 again."""
        self._refused = 0
        self._unmatched = 0
        self._refused_ids: OrderedDict[str, None] = OrderedDict()
        self._engine = engine
        self._running: dict[str, set[str]] = {}
        """Per worker, the requests it started that the engine took and it has not ended."""

    def retire(self, worker: str) -> None:
        """Worker `worker` has exited: its counters stay in the sums, and the requests it
        left running (it was killed) end now as failed: their clients lost the answer."""
        stats = self._workers.pop(worker, None)
        if stats is not None:
            for name in _WORKER_FIELDS:
                value = stats.get(name, 0)
                self._retired[name] += value if type(value) is int else 0
        running = self._running.pop(worker, set())
        now = time.monotonic()
        for request_id in running:
            self._engine.end(request_id, now, status="failed")
        if running:
            self._retired["failed"] += len(running)
            log.warning("proxy %s: %d request(s) of a worker that died recorded failed",
                        self.name, len(running))
            self._sum()

    def take(self, document: Any) -> dict[str, Any]:
        """Applies one batch; raises ValueError for one of another shape."""
        if (type(document) is not dict or type(document.get("worker")) is not str
                or type(document.get("stats")) is not dict
                or type(document.get("events")) is not list):
            raise ValueError('expected {"worker": str, "stats": {...}, "events": [...]}')
        events = document["events"]
        refused = self._intake.apply_each(events)
        for event, why in refused:
            self._count_refusal(event, why)
        self._track(document["worker"], events, {id(event) for event, _ in refused})
        self._workers[document["worker"]] = document["stats"]
        self._sum()
        try:
            gpus: list[int] | None = list(self._resolve())
        except Exception as exc:  # "auto" discovery may fail in many ways; the worker waits
            log.debug("proxy %s: GPUs not known yet: %r", self.name, exc)
            gpus = None
        return {"gpus": gpus}

    def _track(self, worker: str, events: list[Any], refused: set[int]) -> None:
        running = self._running.setdefault(worker, set())
        for event in events:
            if id(event) in refused:
                continue
            if event["type"] == "start":
                running.add(event["id"])
            elif event["type"] == "end":
                running.discard(event["id"])

    def _count_refusal(self, event: Any, why: str) -> None:
        request_id = event.get("id") if type(event) is dict else None
        if type(event) is dict and event.get("type") == "start":
            self._refused += 1
            self._refused_ids[str(request_id)] = None
            if len(self._refused_ids) > REMEMBERED_REFUSALS:
                self._refused_ids.popitem(last=False)
            log.debug("proxy %s: start refused: %s", self.name, why)
        elif str(request_id) in self._refused_ids:
            del self._refused_ids[str(request_id)]  # its start was refused: nothing to end
        else:
            self._unmatched += 1
            log.debug("proxy %s: end refused: %s", self.name, why)

    def _sum(self) -> None:
        totals = dict(self._retired)
        unasked: dict[str, bool] = {}
        for stats in self._workers.values():
            for name in _WORKER_FIELDS:
                value = stats.get(name, 0)
                totals[name] += value if type(value) is int else 0
            if type(learnt := stats.get("counts_unasked")) is dict:
                unasked.update({k: v for k, v in learnt.items() if type(v) is bool})
        totals["refused"] += self._refused
        for name, value in totals.items():
            setattr(self.stats, name, value)
        self.stats.unmatched_ends = self._unmatched
        self.stats.counts_unasked = unasked


def channel_app(channels: dict[str, ProxyChannel]) -> web.Application:
    """The agent's channel listener: `POST /batch/<proxy name>` from that proxy's workers."""

    async def batch(request: web.Request) -> web.Response:
        channel = channels.get(request.match_info["name"])
        if channel is None:
            return web.json_response({"error": "no such proxy"}, status=404)
        try:
            answer = channel.take(json.loads(await request.read()))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(answer)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post(BATCH_PATH + "/{name}", batch)
    return app


def private_socket_path(directory: str) -> str:
    """The channel's socket in `directory`, which only this user may enter."""
    os.chmod(directory, 0o700)
    return os.path.join(directory, "proxies.sock")

