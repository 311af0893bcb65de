"""The node's Prometheus metrics, rendered from one `NodeSnapshot` per scrape.

`NodeCollector` is a custom collector rather than a set of live `Gauge`/`Counter` objects
because the sampler already keeps every figure: copying them into client metrics on each
read would be a second source of truth, and the families of one scrape could then come
from different instants. Here each scrape takes one snapshot and renders every family
from it.

The families are produced by a list of small functions (`FamilyProducer`), so that other
parts of the agent (request attribution, ...) can add theirs with `NodeCollector.add`.
A gauge whose latest value is unknown is left out for that GPU rather than shown as 0:
an absent series is something Prometheus and its operators know how to read, an invented
zero is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from agent.devices.base import GpuReading
from agent.sampler import SAMPLE_DURATION_BUCKETS, GpuSnapshot, NodeSnapshot
from agent.units import flag_text

FamilyProducer = Callable[[NodeSnapshot], Iterable[Metric]]
"""Renders some metric families from one snapshot."""

GPU_LABELS = ("gpu", "uuid")

_READING_GAUGES: tuple[tuple[str, str, str, str], ...] = (
    # (GpuReading attribute, metric name, unit, help)
    ("power_w", "jouleprobe_gpu_power_watts", "watts",
     "Board power at the latest read (which NVML reading: jouleprobe_gpu_info power_field)."),
    ("power_limit_w", "jouleprobe_gpu_power_limit_watts", "watts",
     "Enforced board power limit at the latest read."),
    ("utilization", "jouleprobe_gpu_utilization_ratio", "ratio",
     "GPU utilisation at the latest read, 0 to 1."),
    ("memory_used_bytes", "jouleprobe_gpu_memory_used_bytes", "bytes",
     "GPU memory in use at the latest read."),
    ("memory_total_bytes", "jouleprobe_gpu_memory_total_bytes", "bytes",
     "GPU memory in total."),
    ("temperature_c", "jouleprobe_gpu_temperature_celsius", "celsius",
     "GPU die temperature at the latest read."),
    ("sm_clock_hz", "jouleprobe_gpu_sm_clock_hertz", "hertz",
     "SM clock at the latest read."),
)


class NodeCollector:
    """Renders the node's GPU, host and agent metrics; one `snapshot()` call per scrape."""

    def __init__(
        self, snapshot: Callable[[], NodeSnapshot], *, pue: float, version: str
    ) -> None:
        self._snapshot = snapshot
        self._pue = pue
        self._version = version
        self._producers: list[FamilyProducer] = [
            gpu_families,
            gpu_health_families,
            host_families,
            self._agent_families,
        ]

    def add(self, producer: FamilyProducer) -> None:
        """Render `producer`'s families too, from the same snapshot as the rest."""
        self._producers.append(producer)

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        for producer in self._producers:
            yield from producer(snapshot)

    def _agent_families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "jouleprobe_build_info", "jouleprobe version, always 1.", labels=["version"]
        )
        build.add_metric([self._version], 1)
        yield build
        yield GaugeMetricFamily(
            "jouleprobe_site_pue_ratio",
            "Configured power usage effectiveness of the site (facility / IT energy).",
            value=self._pue, unit="ratio",
        )


def build_registry(collector: NodeCollector) -> CollectorRegistry:
    """A fresh registry with `collector` and the agent's own process metrics.

    Not the global default registry: nothing imported by the agent can then leak
    metrics into its exposition, and tests can build as many as they like.
    """
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(namespace="jouleprobe", registry=registry)
    return registry


def bucket_bounds(bounds: Sequence[float]) -> list[str]:
    """A histogram's `le` label values: its upper bounds as Prometheus writes them, then +Inf."""
    return [*map(floatToGoString, bounds), "+Inf"]


def _gpu_labels(gpu: GpuSnapshot) -> list[str]:
    return [str(gpu.info.index), gpu.info.uuid]


def _lost(reading: GpuReading | None) -> bool:
    """Whether the latest read found the GPU gone (off the bus, or otherwise inaccessible):
    its telemetry from an earlier read is then no longer current."""
    return reading is not None and any(kind == "GpuIsLost" for _, kind in reading.errors)


def gpu_families(snapshot: NodeSnapshot) -> Iterator[Metric]:
    """What each GPU is, its measured energy, and the gauges of its latest read."""
    info = GaugeMetricFamily(
        "jouleprobe_gpu_info",
        "GPU identity and how its energy is measured, always 1. simulated=\"true\" GPUs "
        "are not measurements; module_power=\"true\" boards report CPU+GPU module power.",
        labels=[*GPU_LABELS, "name", "energy_source", "power_field", "simulated",
                "module_power", "mig"],
    )
    energy = CounterMetricFamily(
        "jouleprobe_gpu_energy_joules",
        "GPU energy measured since the agent started; intervals of unknown energy "
        "(jouleprobe_gpu_energy_gaps_total) are not in it.",
        labels=GPU_LABELS, unit="joules",
    )
    gauges = [
        (attribute, GaugeMetricFamily(name, doc, labels=GPU_LABELS, unit=unit))
        for attribute, name, unit, doc in _READING_GAUGES
    ]
    for gpu in snapshot.gpus:
        labels = _gpu_labels(gpu)
        gi = gpu.info
        info.add_metric(
            [*labels, gi.name, gi.energy_source, gi.power_field, flag_text(gi.simulated),
             flag_text(gi.module_power), flag_text(gi.mig_enabled)],
            1,
        )
        energy.add_metric(labels, gpu.energy_j)
        lost = _lost(gpu.reading)
        for attribute, family in gauges:
            # Power comes with every read, the other fields with the latest telemetry read
            # (about once a second), each unknown where its own call failed. A failure of
            # another call says nothing about them; a GPU that reports itself lost does.
            slow = gpu.telemetry if not lost else None
            reading = gpu.reading if attribute == "power_w" else slow
            value = getattr(reading, attribute) if reading is not None else None
            if value is not None:
                family.add_metric(labels, value)
    yield info
    yield energy
    for _, family in gauges:
        yield family


def gpu_health_families(snapshot: NodeSnapshot) -> Iterator[Metric]:
    """The sampler's own health, per GPU: reads, gaps, skips, errors, staleness, latency."""
    samples = CounterMetricFamily(
        "jouleprobe_gpu_samples", "Reads of the GPU, successful or not.", labels=GPU_LABELS
    )
    gaps = CounterMetricFamily(
        "jouleprobe_gpu_energy_gaps",
        "Sampling intervals whose energy is unknown (counter reset, implausible jump, "
        "power integration gap); their energy is in no other metric.",
        labels=GPU_LABELS,
    )
    skipped = CounterMetricFamily(
        "jouleprobe_gpu_sample_skipped",
        "Scheduled reads skipped because the previous read of the GPU had not returned.",
        labels=GPU_LABELS,
    )
    errors = CounterMetricFamily(
        "jouleprobe_nvml_errors",
        "Failed GPU calls, by call and error kind.",
        labels=[*GPU_LABELS, "call", "kind"],
    )
    age = GaugeMetricFamily(
        "jouleprobe_gpu_sample_age_seconds",
        "Seconds since the GPU's latest reading that measured energy.",
        labels=GPU_LABELS, unit="seconds",
    )
    durations = HistogramMetricFamily(
        "jouleprobe_sample_duration_seconds",
        "Time taken by one read of one GPU.",
        labels=["gpu"], unit="seconds",
    )
    bounds = bucket_bounds(SAMPLE_DURATION_BUCKETS)
    for gpu in snapshot.gpus:
        labels = _gpu_labels(gpu)
        samples.add_metric(labels, gpu.samples_total)
        gaps.add_metric(labels, gpu.gaps_total)
        skipped.add_metric(labels, gpu.skipped_total)
        for (call, kind), count in sorted(gpu.errors.items()):
            errors.add_metric([*labels, call, kind], count)
        if gpu.last_energy_time is not None:
            age.add_metric(labels, snapshot.time - gpu.last_energy_time)
        durations.add_metric(
            [labels[0]],
            list(zip(bounds, gpu.durations.bucket_counts, strict=True)),
            gpu.durations.sum,
        )
    yield from (samples, gaps, skipped, errors, age, durations)


def host_families(snapshot: NodeSnapshot) -> Iterator[Metric]:
    """Host CPU + DRAM energy, labelled with whether it is measured (RAPL) or estimated."""
    host = snapshot.host
    if host is None:
        return
    energy = CounterMetricFamily(
        "jouleprobe_host_energy_joules",
        "Host CPU + DRAM energy: source=\"rapl\" is measured, source=\"estimated\" is the "
        "configured idle + utilisation model.",
        labels=["source"], unit="joules",
    )
    power = GaugeMetricFamily(
        "jouleprobe_host_power_watts", "Host CPU + DRAM power at the latest read.",
        labels=["source"], unit="watts",
    )
    reading = host.reading
    if reading is not None:
        energy.add_metric([reading.source], reading.energy_j)
        if reading.power_w is not None:
            power.add_metric([reading.source], reading.power_w)
    yield energy
    yield power
    yield CounterMetricFamily(
        "jouleprobe_host_read_errors", "Failed reads of host energy.", value=host.errors_total
    )
