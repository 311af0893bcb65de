"""The agent's HTTP listener: `/metrics` for Prometheus and `/healthz` for probes.

Other parts of the agent add their routes (`/api/v1/...`) to the Application that
`metrics_app` returns, so that the node has one port to open and to scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent.health import Health


def metrics_app(
    registry: CollectorRegistry, health: Callable[[], Health]
) -> web.Application:
    """GET /metrics renders `registry`; GET /healthz answers 200 or 503 from `health()`."""

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
        return web.json_response(
            {
                "status": "ok" if report.ok else "unhealthy",
                "gpus": {gpu: dataclasses.asdict(state) for gpu, state in report.gpus.items()},
            },
            status=200 if report.ok else 503,
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port; `runner.addresses` holds the bound addresses
    (the real port where `port` was 0). Stop with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
