"""The agent's whole pipeline on one node, in the order data flows through it:

sources → sampler (timelines) → attribution engine → record store + request metrics → exporters.

`jouleprobe run` and `jouleprobe demo` both build a `Node`; only where the GPU source and
the requests come from differs.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.attribution import AttributionEngine
from agent.config import Config
from agent.records import RecordStore
from agent.requests import RequestEnergy
from agent.sampler import Sampler
from agent.sources.base import GpuSource, HostSource
from exporters.prometheus import NodeCollector, build_registry
from exporters.request_metrics import RequestMetrics
from exporters.window_metrics import WindowMetrics

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config, gpu_source: GpuSource, host_source: HostSource | None):
        self.config = config
        self.gpu_source = gpu_source
        self.sampler = Sampler(
            gpu_source,
            host_source,
            interval_s=config.agent.sample_interval,
            timeline_seconds=config.agent.timeline_seconds,
        )
        attribution = config.attribution
        idle = attribution.idle_watts
        self.engine = AttributionEngine(
            self.sampler.timelines,
            self.sampler.host_timeline,
            policy=attribution.policy,  # type: ignore[arg-type]  # checked by the config
            prefill_weight=attribution.prefill_weight,  # type: ignore[arg-type]
            pue=config.site.pue,
            idle_power_w={gpu.index: idle for gpu in self.sampler.gpus()} if idle else None,
            settle_s=attribution.settle,
            max_age_s=attribution.max_age,
            max_pending=attribution.max_pending,
        )
        self.store = RecordStore(
            config.records.path,
            pue=config.site.pue,
            simulated=any(gpu.simulated for gpu in self.sampler.gpus()),
            flush_interval_s=config.records.flush_interval,
            retention_days=config.records.retention_days,
        )
        self.request_metrics = RequestMetrics(self.engine.totals)
        collector = NodeCollector(self.sampler.snapshot, pue=config.site.pue, version=__version__)
        collector.add(self.request_metrics.families)
        self.window_metrics = WindowMetrics()
        collector.add(self.window_metrics.families)
        self.registry: CollectorRegistry = build_registry(collector)

    def start(self) -> None:
        self.sampler.start()

    def attribute(self, now: float | None = None) -> list[RequestEnergy]:
        """Share the settled intervals among requests; record and count the final ones."""
        energies = self.engine.advance(time.monotonic() if now is None else now)
        if energies:
            self.store.submit(energies)
            self.request_metrics.observe(energies)
        return energies

    def drain(self) -> None:
        """Stop sampling, attribute everything measured, and flush the records to disk.

        After this, per GPU, attributed + unattributed energy equals the energy measured:
        nothing is left waiting to settle."""
        self.sampler.stop()
        self.attribute(time.monotonic() + self.engine.settle_s)
        self.store.close()
        self.gpu_source.close()
