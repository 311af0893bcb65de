"""The agent's whole pipeline on one node, in the order data flows through it:

sources → sampler (timelines) → attribution engine → record store + request metrics → exporters,

with the workload view (`agent.app.workloads`) beside the engine: who is on each GPU, which
the engine's lanes split each interval by.

`jouleprobe run` and `jouleprobe demo` both build a `Node`; only where the GPU source and
the requests come from differs.
"""

from __future__ import annotations

import math
import threading
import time

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.app.workloads import WorkloadView, open_view
from agent.attribution import AttributionEngine
from agent.config import Config
from agent.devices.base import GpuInfo, GpuSource, HostSource
from agent.intake.discovery import GpuResolver
from agent.requests import RequestEnergy
from agent.sampler import Sampler
from agent.store import RecordStore
from agent.workloads.naming import PodNames
from exporters.prometheus import NodeCollector, build_registry
from exporters.request_metrics import RequestMetrics
from exporters.store_metrics import StoreMetrics
from exporters.window_metrics import WindowMetrics
from exporters.workload_metrics import WorkloadMetrics


def trace_settle(config: Config, gpus: list[GpuInfo]) -> dict[int, float]:
    """How long each GPU fed by a trace source waits for its spans, which arrive only after
    their request ended and an exporter's batch delay (a request longer than that is
    attributed late: what was not yet shared). Which GPUs a `gpus = "auto"` source feeds is
    known only from its spans, so then every GPU waits."""
    settle: dict[int, float] = {}
    for table in config.trace:
        fed = ([gpu.index for gpu in gpus] if table.gpus == "auto"
               else GpuResolver(table.gpus, gpus, None).current())
        for index in fed:
            settle[index] = max(settle.get(index, 0.0), table.settle)
    return settle


class Node:
    """One node's sampler, attribution engine, record store and metrics, wired together."""

    def __init__(self, config: Config, gpu_source: GpuSource, host_source: HostSource | None,
                 *, pod_names: PodNames | None = None):
        """`pod_names`: names of pods where they come from elsewhere than the API server
        (the demo's simulated pods)."""
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
        gpu_settle = trace_settle(config, self.sampler.gpus())
        view = open_view(config.workloads, gpu_source, self.sampler.gpus(),
                         settle_s=max([attribution.settle, *gpu_settle.values()]),
                         pod_names=pod_names)
        self.workloads: WorkloadView | None = view if isinstance(view, WorkloadView) else None
        self.workloads_off: str | None = view if isinstance(view, str) else None
        """Why there is no workload view, where there is none."""
        self.engine = AttributionEngine(
            self.sampler.timelines,
            self.sampler.host_timeline,
            policy=attribution.policy,
            prefill_weight=attribution.prefill_weight,
            pue=config.site.pue,
            idle_power_w={gpu.index: idle for gpu in self.sampler.gpus()} if idle else None,
            settle_s=attribution.settle,
            gpu_settle_s=gpu_settle,
            max_age_s=attribution.max_age,
            max_pending=attribution.max_pending,
            power_limit_w=self.sampler.power_limit_w,
            workloads=self.workloads.accounts if self.workloads else None,
        )
        self.store = RecordStore(
            config.records.path,
            gpu_models={gpu.index: gpu.name for gpu in self.sampler.gpus()},
            pue=config.site.pue,
            simulated=any(gpu.simulated for gpu in self.sampler.gpus()),
            flush_interval_s=config.records.flush_interval,
            retention_days=config.records.retention_days,
        )
        self.request_metrics = RequestMetrics(self.engine.totals)
        self.collector = NodeCollector(
            self.sampler.snapshot, pue=config.site.pue, version=__version__
        )
        self.collector.add(self.request_metrics.families)
        self.collector.add(StoreMetrics(self.store.stats).families)
        self.window_metrics = WindowMetrics()
        self.collector.add(self.window_metrics.families)
        if self.workloads is not None:
            self.collector.add(WorkloadMetrics(self.workloads.accounts.totals,
                                               self.sampler.gpus(),
                                               self.workloads.observer.status).families)
        self.registry: CollectorRegistry = build_registry(self.collector)
        self._attributing = threading.Lock()
        """One attribution round at a time: a round still running on its worker thread when
        the daemon stops must hand its records to the store before `drain` closes it."""
        self._drained = False

    def start(self) -> None:
        self.sampler.start()
        if self.workloads is not None:
            self.workloads.start()

    def attribute(self, now: float | None = None) -> list[RequestEnergy]:
        """Share the settled intervals among requests; record and count the final ones.

        Does nothing once drained (a round may start on its thread after the stop)."""
        with self._attributing:
            if self._drained:
                return []
            return self._attribute(time.monotonic() if now is None else now)

    def _attribute(self, now: float) -> list[RequestEnergy]:
        energies = self.engine.advance(now)
        if energies:
            self.store.submit(energies)
            self.request_metrics.observe(energies)
        if self.workloads is not None:
            finished = self.workloads.accounts.take_records(now, final=math.isinf(now))
            if finished:
                self.store.submit_workloads(finished)
        return energies

    def drain(self) -> None:
        """Stop sampling, attribute everything measured, and flush the records to disk.

        Once the sampler has stopped no point will ever come, so attribution runs as at the
        end of time: a request still open is closed at its maximum age and marked expired
        (no end; its figures cover what was measured of it, and the report leaves it out of
        Wh per query), every interval is processed, and every request waiting for a later
        point is finalised with what was measured. Without it, each request that ended
        after the start of one still open would wait for that one and never be recorded.

        After this, per GPU, attributed + unattributed energy equals the energy measured:
        nothing is left waiting to settle."""
        self.sampler.stop()
        if self.workloads is not None:
            self.workloads.stop()
        with self._attributing:
            self._drained = True
            self._attribute(math.inf)
        self.store.close()
        self.gpu_source.close()
