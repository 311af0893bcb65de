"""`jouleprobe run`: builds the node's pipeline, serves its listeners until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from aiohttp import web

from agent.app.annotated import AnnotatedScrapers
from agent.app.node import Node
from agent.app.proxies import Proxies
from agent.app.sites import bind, start_site
from agent.config import Config, GpuSpec
from agent.devices.base import GpuSource
from agent.devices.host import open_host_source
from agent.devices.nvml import NvmlGpuSource
from agent.health import assess
from agent.intake.access import check_listen_access, load_token
from agent.intake.discovery import GpuResolver, local_port
from agent.intake.ingest import ingest_app
from agent.intake.otlp import RUNNER_OPTIONS as OTLP_RUNNER_OPTIONS
from agent.intake.otlp import PodGpus, ProcessGpus, TraceReceiver, TraceSource, fixed, otlp_app
from agent.intake.otlp.coverage import Coverage
from agent.intake.otlp.grpc_service import start_grpc
from agent.intake.scrapers import WindowScraper
from agent.intake.scrapers.scraper import ErrorKind, ScrapeObserver
from agent.intake.scrapers.window import WindowFigures
from agent.report import RecordsApi
from agent.sim.gpus import SimulatedGpuSource
from exporters.http import metrics_app
from exporters.otlp_metrics import OtlpMetrics
from exporters.proxy_metrics import ProxyMetrics

log = logging.getLogger(__name__)

ATTRIBUTION_PERIOD_S = 0.5


def open_gpu_source(config: Config) -> GpuSource:
    """Simulated GPUs only when asked for; otherwise NVML or a `SourceUnavailable` error."""
    if config.agent.simulate:
        source = SimulatedGpuSource(config.agent.simulate)
        log.warning("SIMULATED GPUs (%s): figures are not measurements", config.agent.simulate)
        return source
    return NvmlGpuSource.open()


async def attribute_periodically(node: Node) -> None:
    """Runs the attribution off the event loop, so the listeners stay responsive."""
    while True:
        await asyncio.sleep(ATTRIBUTION_PERIOD_S)
        try:
            await asyncio.to_thread(node.attribute)
        except Exception:  # one bad round must not end attribution for good
            log.exception("attribution round failed")


def resolver(node: Node, spec: GpuSpec, url: str) -> GpuResolver:
    """The GPUs serving the server at `url`: as configured, or discovered for "auto" in the
    background. Its `current()` is called on the event loop, so it never waits for discovery:
    until the first discovery succeeds it raises, and that request or window is counted as
    refused rather than guessed."""
    port = local_port(url) if spec == "auto" else None
    return GpuResolver(spec, node.sampler.gpus(), port, wait_s=0.0)


class CoverageObserver:
    """The window metrics of a scraped server that is also a trace source, which also hands
    its settled windows to the trace coverage (`agent.intake.otlp.coverage`)."""

    def __init__(self, metrics: ScrapeObserver, coverage: Coverage, trace_source: str) -> None:
        self._metrics = metrics
        self._coverage = coverage
        self._trace_source = trace_source

    def scraped(self, source: str) -> None:
        self._metrics.scraped(source)
        self._coverage.settle(time.monotonic())

    def scrape_failed(self, source: str, kind: ErrorKind) -> None:
        self._metrics.scrape_failed(source, kind)

    def observe(self, source: str, figures: WindowFigures) -> None:
        self._metrics.observe(source, figures)
        self._coverage.window(self._trace_source, figures)


def pod_gpus(node: Node) -> PodGpus | None:
    """The GPUs the kubelet allocated to each pod of the node, where the workload view reads
    the node's pod list (`workloads.kubernetes`); None where it does not."""
    view = node.workloads
    if view is None or view.readers.pods is None:
        return None
    return PodGpus(node.sampler.gpus(), view.readers.pods, view.readers.allocations)


def annotated_scrapers(node: Node, coverage: Coverage | None) -> AnnotatedScrapers | None:
    """The scrapers of the pods annotated `jouleprobe.io/scrape` (`agent.app.annotated`),
    where the workload view reads the node's pod list; None where it does not."""
    view = node.workloads
    if view is None or view.readers.pods is None:
        return None
    return AnnotatedScrapers(
        view.readers.pods, view.readers.allocations, node.sampler.gpus(),
        timelines=node.sampler.timelines, idle_power_w=node.engine.idle_power_w,
        metrics=node.window_metrics, store=node.store,
        traces={table.service for table in node.config.trace},
        coverage=coverage, covering=CoverageObserver, retire=node.window_metrics.retire,
    )


def start_scrapers(node: Node, coverage: Coverage | None) -> list[asyncio.Task[None]]:
    """One task per `[[scrape]]` table: window-level figures from the server's own metrics,
    exported as metrics and kept in the record store for the report; for a server that is
    also a trace source (`trace`), compared with its spans too. On Kubernetes, one more task
    keeps a scraper for each annotated pod of the node, as a table's, in step with the pod
    list (`annotated_scrapers`)."""
    tasks = []
    annotated = annotated_scrapers(node, coverage)
    if annotated is not None:
        tasks.append(asyncio.create_task(annotated.run(), name="annotated pods"))
    for table in node.config.scrape:
        gpus = resolver(node, table.gpus, table.url).current
        metrics: ScrapeObserver = node.window_metrics
        trace_source = f"trace:{table.trace}" if table.trace else None
        if trace_source and coverage is not None:  # trace_receiver checked the name
            metrics = CoverageObserver(metrics, coverage, trace_source)
        scraper = WindowScraper(
            table.kind, table.url, gpus=gpus, timelines=node.sampler.timelines,
            idle_power_w=node.engine.idle_power_w, metrics=metrics, store=node.store,
            trace_source=trace_source,
        )
        tasks.append(asyncio.create_task(scraper.run(table.interval)))
    return tasks


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def start_proxies(node: Node, proxies: Proxies) -> None:
    """Every `[[proxy]]` table served (`agent.app.proxies`), its counters in the metrics."""
    try:
        await proxies.start(node, bind)
    finally:  # the metrics of those that started, whatever happened to the next
        node.collector.add(ProxyMetrics(proxies.stats).families)


def build_apps(node: Node, token: str | None) -> tuple[web.Application, web.Application]:
    config = node.config
    metrics = metrics_app(
        node.registry,
        lambda: assess(node.sampler.snapshot(), config.agent.stale_after, node.store.stats()),
        records=RecordsApi(node.store),
    )
    ingest = ingest_app(
        node.engine, node.sampler.gpus(), token=token,
        max_body_bytes=config.ingest.max_body_bytes, max_concurrent=config.ingest.max_concurrent,
    )
    return metrics, ingest


def trace_receiver(node: Node) -> TraceReceiver | None:
    """The OTLP receiver for the `[[trace]]` tables, if there are any."""
    config = node.config
    traced = {table.service for table in config.trace}
    for scrape in config.scrape:
        if scrape.trace and scrape.trace not in traced:
            raise ValueError(f"[[scrape]] {scrape.url}: trace = {scrape.trace!r} names no "
                             "[[trace]] table")
    if not config.trace:
        return None
    pods = pod_gpus(node)  # the pod of a span's resource first, for gpus = "auto"
    sources = []
    for table in config.trace:
        if table.gpus == "auto":
            if any(gpu.simulated for gpu in node.sampler.gpus()):
                raise ValueError(f'[[trace]] {table.service!r}: gpus = "auto" cannot be '
                                 "resolved on simulated GPUs: give an explicit list")
            gpus: Callable[[Mapping[str, Any]], tuple[int, ...]] = ProcessGpus(
                node.sampler.gpus(), pods=pods)
        else:
            gpus = fixed(GpuResolver(table.gpus, node.sampler.gpus(), None).current())
        sources.append(TraceSource(table.service, gpus, table.model))
    # Scraped servers that name a trace source: [[scrape]] tables, or annotated pods.
    compared = pods is not None or any(scrape.trace for scrape in config.scrape)
    coverage = (Coverage({f"trace:{table.service}": table.settle for table in config.trace})
                if compared else None)
    receiver = TraceReceiver(node.engine, sources, coverage=coverage)
    node.collector.add(OtlpMetrics(receiver.stats, coverage).families)
    return receiver


async def start_trace_receiver(receiver: TraceReceiver, config: Config, token: str | None
                               ) -> tuple[web.AppRunner, grpc.aio.Server | None]:
    """OTLP over HTTP and, unless `otlp.grpc_listen` is empty, over gRPC."""
    otlp = config.otlp
    http = await start_site(
        otlp_app(receiver, token=token, max_body_bytes=otlp.max_body_bytes,
                 max_concurrent=otlp.max_concurrent),
        otlp.listen, "the OTLP/HTTP trace receiver", **OTLP_RUNNER_OPTIONS)
    if not otlp.grpc_listen:
        return http, None
    server = await start_grpc(receiver, otlp.grpc_listen, token=token,
                              max_body_bytes=otlp.max_body_bytes,
                              max_concurrent=otlp.max_concurrent)
    log.info("serving the OTLP/gRPC trace receiver on %s", otlp.grpc_listen)
    return http, server


async def serve(config: Config, gpu_source: GpuSource) -> None:
    token = load_token(config.ingest.token_file, "ingest.token_file")
    check_listen_access(config.ingest.listen, token, "the ingest API", "ingest.token_file")
    otlp_token = load_token(config.otlp.token_file, "otlp.token_file")
    if config.trace:
        for listen in filter(None, (config.otlp.listen, config.otlp.grpc_listen)):
            check_listen_access(listen, otlp_token, "the OTLP receiver", "otlp.token_file")
    host_source = open_host_source(
        config.host.rapl_path, config.host.idle_watts, config.host.max_watts
    )
    node = Node(config, gpu_source, host_source)
    try:
        metrics, ingest = build_apps(node, token)
        receiver = trace_receiver(node)
    except ValueError:  # a source's GPUs: nothing was measured yet, nothing is lost
        node.drain()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    proxies = Proxies()
    grpc_server: grpc.aio.Server | None = None
    node.start()
    tasks = [asyncio.create_task(attribute_periodically(node)),
             *start_scrapers(node, None if receiver is None else receiver.coverage)]
    try:
        runners.append(await start_site(metrics, config.agent.listen, "/metrics and /api/v1"))
        runners.append(await start_site(ingest, config.ingest.listen, "the ingest API"))
        if receiver is not None:
            http, grpc_server = await start_trace_receiver(receiver, config, otlp_token)
            runners.append(http)
        await start_proxies(node, proxies)
        log.info("sampling %d GPU(s) every %.3g s; records in %s",
                 len(node.sampler.gpus()), config.agent.sample_interval, config.records.path)
        await stop.wait()
        log.info("stopping: attributing what was measured and flushing records")
    finally:
        await cancel(tasks)
        await proxies.stop()
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        for runner in reversed(runners):
            await runner.cleanup()
        await asyncio.to_thread(node.drain)
