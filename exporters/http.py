"""The agent's HTTP listener: `/metrics` for Prometheus, `/healthz` for probes, and the
record store (`/api/v1/requests/{id}`; `/api/v1/summary`, per-request and window figures).

Other parts of the agent add their routes (`/api/v1/...`) to the Application that
`metrics_app` returns, so that the node has one port to open and to scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent.health import Health
from agent.store import RecordStoreError
from agent.units import duration_seconds

DEFAULT_SUMMARY_WINDOW = "1h"


class Records(Protocol):
    """What the API reads from the record store (`agent.report.RecordsApi` offers it over a
    `agent.store.RecordReader`). Both may raise `RecordStoreError`."""

    def get(self, request_id: str) -> dict[str, Any] | None: ...

    def summary(self, window_s: float) -> dict[str, Any]: ...


def parse_window(text: str) -> float:
    """A summary window in seconds: "30s", "15m", "1h", "2d", "1w" or plain seconds ("90").
    Raises ValueError, naming the parameter, for anything else or a window of 0."""
    seconds = duration_seconds(text, plain_seconds=True)
    if seconds is None or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"window: expected a duration longer than 0 such as 30s, 15m, 1h, 2d, or a "
            f"number of seconds; got {text!r}"
        )
    return seconds


def metrics_app(
    registry: CollectorRegistry,
    health: Callable[[], Health],
    records: Records | None = None,
) -> web.Application:
    """GET /metrics renders `registry`; GET /healthz answers 200 when `health()` is ok, 503
    with its status, `unhealthy` (a GPU is not measured) or `degraded` (the record store
    cannot write), and the reason of each GPU and of the store;
    GET /api/v1/requests/{id} and GET /api/v1/summary?window=1h read `records` (JSON 404
    on both when the agent keeps no records)."""

    async def metrics(request: web.Request) -> web.Response:
        # OpenMetrics when the scraper asks for it (Prometheus does), else text 0.0.4.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Rendering reads /proc and takes the sampler's lock: off the event loop, so that
        # a slow scrape never delays the other routes.
        body = await asyncio.to_thread(encoder, registry)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()  # only where the client accepts it
        return response

    async def healthz(request: web.Request) -> web.Response:
        report = health()
        body: dict[str, Any] = {
            "status": report.status,
            "gpus": {gpu: dataclasses.asdict(state) for gpu, state in report.gpus.items()},
        }
        if report.store is not None:
            body["store"] = dataclasses.asdict(report.store)
        return web.json_response(body, status=200 if report.status == "ok" else 503)

    async def request_record(request: web.Request) -> web.Response:
        if records is None:
            return _no_records()
        request_id = request.match_info["id"]
        try:
            # SQLite reads block: off the event loop, like the scrape.
            record = await asyncio.to_thread(records.get, request_id)
        except RecordStoreError as exc:
            return _error(503, str(exc))
        if record is None:
            return _error(
                404,
                f"no record of request {request_id!r}: records appear once a request is "
                f"final (it has ended and its energy has been attributed, a few seconds "
                f"later) and are kept until retention deletes them",
            )
        return web.json_response(record)

    async def summary(request: web.Request) -> web.Response:
        if records is None:
            return _no_records()
        try:
            window_s = parse_window(request.query.get("window", DEFAULT_SUMMARY_WINDOW))
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            return web.json_response(await asyncio.to_thread(records.summary, window_s))
        except RecordStoreError as exc:
            return _error(503, str(exc))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/requests/{id}", request_record)
    app.router.add_get("/api/v1/summary", summary)
    return app


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _no_records() -> web.Response:
    return _error(404, "this agent keeps no per-request records (no record store configured)")
