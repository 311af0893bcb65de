"""`jouleprobe run`: wires sources → sampler → exporters and serves until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web

from agent import __version__
from agent.config import Config, parse_listen
from agent.health import assess
from agent.sampler import Sampler
from agent.sources.base import GpuSource
from agent.sources.host import open_host_source
from agent.sources.nvml import NvmlGpuSource
from agent.sources.simulated import SimulatedGpuSource
from exporters.http import metrics_app
from exporters.prometheus import NodeCollector, build_registry

log = logging.getLogger(__name__)


def open_gpu_source(config: Config) -> GpuSource:
    """Simulated GPUs only when asked for; otherwise NVML or a `SourceUnavailable` error."""
    if config.agent.simulate:
        source = SimulatedGpuSource(config.agent.simulate)
        log.warning("SIMULATED GPUs (%s): figures are not measurements", config.agent.simulate)
        return source
    return NvmlGpuSource.open()


def bind(listen: str) -> socket.socket:
    """A listening socket for HOST:PORT; binding it ourselves tells us the port when it was 0."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def serve(config: Config, gpu_source: GpuSource) -> None:
    host_source = open_host_source(
        config.host.rapl_path, config.host.idle_watts, config.host.max_watts
    )
    sampler = Sampler(
        gpu_source,
        host_source,
        interval_s=config.agent.sample_interval,
        timeline_seconds=config.agent.timeline_seconds,
    )
    collector = NodeCollector(sampler.snapshot, pue=config.site.pue, version=__version__)
    app = metrics_app(
        build_registry(collector), lambda: assess(sampler.snapshot(), config.agent.stale_after)
    )
    runner = web.AppRunner(app, access_log=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sampler.start()
    try:
        await runner.setup()
        sock = bind(config.agent.listen)
        await web.SockSite(runner, sock).start()
        log.info("serving /metrics and /healthz on http://%s:%d", *sock.getsockname()[:2])
        log.info("sampling %d GPU(s) every %.3g s", len(sampler.gpus()), sampler.interval_s)
        await stop.wait()
        log.info("stopping")
    finally:
        sampler.stop()
        await runner.cleanup()
        gpu_source.close()
