"""The Prometheus exporter, /metrics content negotiation and /healthz, over a scripted source.

Time is scripted: every reading carries the time the test gives it, and the snapshot's
`time` is replaced by the test's "now", so nothing here depends on the wall clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from scripted import (
    ScriptedGpuSource,
    ScriptedHostSource,
    exposed_samples,
    require_binary,
    series,
)

from agent.devices.base import GpuInfo, GpuReading, HostReading
from agent.health import assess
from agent.sampler import SAMPLE_DURATION_BUCKETS, NodeSnapshot, Sampler
from agent.store import StoreStats
from exporters.http import metrics_app
from exporters.prometheus import NodeCollector, build_registry

T0 = 1000.0
"""Scripted monotonic time of the first read."""

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""The Accept header that Prometheus 2.x sends with each scrape."""

GPUS = [
    GpuInfo(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", "counter", "instant"),
    GpuInfo(1, "GPU-bbbb", "Tesla T4", "power_integration", "power_usage", simulated=True),
]


def _h100(t: float, energy_j: float) -> GpuReading:
    return GpuReading(
        time=t, energy_j=energy_j, power_w=300.0, power_limit_w=700.0, utilization=0.5,
        memory_used_bytes=1 << 30, memory_total_bytes=80 << 30, temperature_c=55.0,
        sm_clock_hz=1.98e9,
    )


def _t4(t: float, power_w: float) -> GpuReading:
    """A board without temperature or clock readings: those gauges must be left out."""
    return GpuReading(
        time=t, power_w=power_w, power_limit_w=70.0, utilization=0.25,
        memory_used_bytes=2 << 30, memory_total_bytes=16 << 30,
        errors=(("temperature", "NotSupported"),),
    )


def _lost(t: float) -> GpuReading:
    return GpuReading(time=t, errors=(("energy", "GpuIsLost"), ("power", "GpuIsLost")))


@dataclasses.dataclass
class Node:
    gpu_source: ScriptedGpuSource
    host_source: ScriptedHostSource
    sampler: Sampler
    now: float = T0

    def snapshot(self) -> NodeSnapshot:
        """The sampler's snapshot, taken at the test's scripted time."""
        return dataclasses.replace(self.sampler.snapshot(), time=self.now)


@pytest.fixture
def node() -> Node:
    """Three reads of each GPU and the host, 0.1 s apart; "now" is 0.5 s after the last."""
    gpu_source, host_source = ScriptedGpuSource(GPUS), ScriptedHostSource()
    for step, (energy, power) in enumerate([(1000.0, 100.0), (1030.0, 100.0), (1060.0, 200.0)]):
        t = T0 + step / 10
        gpu_source.queued[0].append(_h100(t, energy))
        gpu_source.queued[1].append(_t4(t, power))
        host_source.queued.append(HostReading(t, 5000.0 + 10 * step, 100.0, "rapl"))
    ticks = itertools.cycle([0.0, 0.002])  # each read takes 2 ms by the sampler's clock
    sampler = Sampler(gpu_source, host_source, interval_s=0.1, clock=lambda: next(ticks))
    for _ in range(3):
        sampler.sample_all()
    return Node(gpu_source, host_source, sampler, now=T0 + 0.7)


def _exposition(node: Node, pue: float = 1.2) -> str:
    collector = NodeCollector(node.snapshot, pue=pue, version="9.8.7")
    return generate_latest(build_registry(collector)).decode()


def test_every_metric_with_its_labels_and_value(node: Node) -> None:
    samples = exposed_samples(_exposition(node))
    g0 = {"gpu": "0", "uuid": "GPU-aaaa"}
    g1 = {"gpu": "1", "uuid": "GPU-bbbb"}
    expected = {
        series("jouleprobe_gpu_info", **g0, name="NVIDIA H100 80GB HBM3", energy_source="counter",
             power_field="instant", simulated="false", module_power="false", mig="false"): 1,
        series("jouleprobe_gpu_info", **g1, name="Tesla T4", energy_source="power_integration",
             power_field="power_usage", simulated="true", module_power="false", mig="false"): 1,
        series("jouleprobe_gpu_energy_joules_total", **g0): 60.0,  # counter 1000 → 1060 J
        # trapezoids: (100 + 100) / 2 · 0.1 + (100 + 200) / 2 · 0.1
        series("jouleprobe_gpu_energy_joules_total", **g1): pytest.approx(25.0),
        series("jouleprobe_gpu_power_watts", **g0): 300.0,
        series("jouleprobe_gpu_power_watts", **g1): 200.0,
        series("jouleprobe_gpu_power_limit_watts", **g0): 700.0,
        series("jouleprobe_gpu_power_limit_watts", **g1): 70.0,
        series("jouleprobe_gpu_utilization_ratio", **g0): 0.5,
        series("jouleprobe_gpu_utilization_ratio", **g1): 0.25,
        series("jouleprobe_gpu_memory_used_bytes", **g0): float(1 << 30),
        series("jouleprobe_gpu_memory_used_bytes", **g1): float(2 << 30),
        series("jouleprobe_gpu_memory_total_bytes", **g0): float(80 << 30),
        series("jouleprobe_gpu_memory_total_bytes", **g1): float(16 << 30),
        series("jouleprobe_gpu_temperature_celsius", **g0): 55.0,
        series("jouleprobe_gpu_sm_clock_hertz", **g0): 1.98e9,
        series("jouleprobe_gpu_samples_total", **g0): 3,
        series("jouleprobe_gpu_samples_total", **g1): 3,
        series("jouleprobe_gpu_energy_gaps_total", **g0): 0,
        series("jouleprobe_gpu_energy_gaps_total", **g1): 0,
        series("jouleprobe_gpu_sample_skipped_total", **g0): 0,
        series("jouleprobe_gpu_sample_skipped_total", **g1): 0,
        series("jouleprobe_nvml_errors_total", **g1, call="temperature", kind="NotSupported"): 3,
        series("jouleprobe_gpu_sample_age_seconds", **g0): pytest.approx(0.5),
        series("jouleprobe_gpu_sample_age_seconds", **g1): pytest.approx(0.5),
        series("jouleprobe_host_energy_joules_total", source="rapl"): 5020.0,
        series("jouleprobe_host_power_watts", source="rapl"): 100.0,
        series("jouleprobe_host_read_errors_total"): 0,
        series("jouleprobe_build_info", version="9.8.7"): 1,
        series("jouleprobe_site_pue_ratio"): 1.2,
    }
    for gpu in ("0", "1"):  # every read took 2 ms: all three in the le=0.0025 bucket and above
        for bound in SAMPLE_DURATION_BUCKETS:
            le = f"{bound}" if bound < 1 else "1.0"
            count = 3 if bound >= 0.0025 else 0
            expected[series("jouleprobe_sample_duration_seconds_bucket", gpu=gpu, le=le)] = count
        expected[series("jouleprobe_sample_duration_seconds_bucket", gpu=gpu, le="+Inf")] = 3
        expected[series("jouleprobe_sample_duration_seconds_count", gpu=gpu)] = 3
        expected[series("jouleprobe_sample_duration_seconds_sum", gpu=gpu)] = pytest.approx(0.006)
    ours = {key: value for key, value in samples.items() if not key[0].startswith(
        "jouleprobe_process_")}
    assert ours == expected  # nothing missing, and no unknown gauge rendered as 0
    if sys.platform == "linux":  # the agent's own process metrics, where /proc exists
        assert series("jouleprobe_process_resident_memory_bytes") in samples


def test_failed_reads_keep_counters_and_drop_unknown_gauges(node: Node) -> None:
    node.gpu_source.queued[0].append(_lost(T0 + 0.3))
    node.sampler.sample_gpu(0)
    samples = exposed_samples(_exposition(node))
    g0 = {"gpu": "0", "uuid": "GPU-aaaa"}
    assert samples[series("jouleprobe_gpu_energy_joules_total", **g0)] == 60.0
    lost = series("jouleprobe_nvml_errors_total", **g0, call="energy", kind="GpuIsLost")
    assert samples[lost] == 1
    assert samples[series("jouleprobe_gpu_samples_total", **g0)] == 4
    assert samples[series("jouleprobe_gpu_sample_age_seconds", **g0)] == pytest.approx(0.5)
    assert series("jouleprobe_gpu_power_watts", **g0) not in samples
    assert series("jouleprobe_gpu_temperature_celsius", **g0) not in samples


def test_a_counter_reset_is_a_gap_not_negative_energy(node: Node) -> None:
    node.gpu_source.queued[0].append(_h100(T0 + 0.3, 5.0))  # the driver reloaded
    node.sampler.sample_gpu(0)
    samples = exposed_samples(_exposition(node))
    g0 = {"gpu": "0", "uuid": "GPU-aaaa"}
    assert samples[series("jouleprobe_gpu_energy_joules_total", **g0)] == 60.0
    assert samples[series("jouleprobe_gpu_energy_gaps_total", **g0)] == 1


def test_one_snapshot_per_scrape(node: Node) -> None:
    calls = 0

    def counted() -> NodeSnapshot:
        nonlocal calls
        calls += 1
        return node.snapshot()

    registry = build_registry(NodeCollector(counted, pue=1.1, version="0"))
    generate_latest(registry)
    assert calls == 1
    generate_latest(registry)
    assert calls == 2


def test_added_producers_render_from_the_same_snapshot(node: Node) -> None:
    seen: list[NodeSnapshot] = []

    def extra(snapshot: NodeSnapshot) -> list[GaugeMetricFamily]:
        seen.append(snapshot)
        return [GaugeMetricFamily("jouleprobe_test_gpus", "GPUs seen.", value=len(snapshot.gpus))]

    collector = NodeCollector(node.snapshot, pue=1.1, version="0")
    collector.add(extra)
    samples = exposed_samples(generate_latest(build_registry(collector)).decode())
    assert samples[series("jouleprobe_test_gpus")] == 2
    assert len(seen) == 1 and seen[0].time == node.now


def test_promtool_finds_nothing_to_lint(node: Node) -> None:
    promtool = require_binary("promtool")
    node.gpu_source.queued[0].append(_lost(T0 + 0.3))  # an error series too
    node.sampler.sample_gpu(0)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=_exposition(node), capture_output=True,
        text=True, timeout=30,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def _get(
    node: Node, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET through the aiohttp app, on a real loopback socket."""
    registry = build_registry(NodeCollector(node.snapshot, pue=1.2, version="9.8.7"))
    app = metrics_app(registry, lambda: assess(node.snapshot(), stale_after_s=1.0))

    async def go() -> tuple[int, dict[str, str], bytes]:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get(path, headers=headers or {})
            return response.status, dict(response.headers), await response.read()

    return asyncio.run(go())


def test_openmetrics_when_the_scraper_asks_for_it(node: Node) -> None:
    status, headers, body = _get(node, "/metrics", {"Accept": PROMETHEUS_ACCEPT})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    energy = families["jouleprobe_gpu_energy_joules"]
    assert (energy.type, energy.unit) == ("counter", "joules")
    assert {s.labels["gpu"]: s.value for s in energy.samples if s.name.endswith("_total")} == {
        "0": 60.0, "1": pytest.approx(25.0),
    }


def test_text_format_without_accept_header(node: Node) -> None:
    status, headers, body = _get(node, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# EOF" not in body.decode()
    assert exposed_samples(body.decode())[series("jouleprobe_site_pue_ratio")] == 1.2


def test_healthz_turns_503_with_a_reason_when_reads_fail(node: Node) -> None:
    status, _, body = _get(node, "/healthz")
    report = json.loads(body)
    assert (status, report["status"]) == (200, "ok")
    assert set(report["gpus"]) == {"0", "1"}
    assert report["gpus"]["0"] == {
        "ok": True, "uuid": "GPU-aaaa", "age_s": pytest.approx(0.5), "reason": None,
    }

    for step in range(3, 30):  # GPU 0 is lost; GPU 1 keeps reading
        t = T0 + step / 10
        node.gpu_source.queued[0].append(_lost(t))
        node.gpu_source.queued[1].append(_t4(t, 150.0))
        node.sampler.sample_gpu(0)
        node.sampler.sample_gpu(1)
    node.now = T0 + 3.0

    status, _, body = _get(node, "/healthz")
    report = json.loads(body)
    assert (status, report["status"]) == (503, "unhealthy")
    assert report["gpus"]["1"]["ok"] is True
    lost = report["gpus"]["0"]
    assert lost["ok"] is False
    assert lost["reason"] == "no energy reading for 2.8 s; last read failed: energy GpuIsLost, " \
        "power GpuIsLost"


def test_assess_says_when_a_gpu_was_never_read_or_its_read_hangs(node: Node) -> None:
    fresh = Sampler(ScriptedGpuSource(GPUS), interval_s=0.1)
    never = assess(fresh.snapshot(), stale_after_s=1.0)
    assert not never.ok
    assert never.gpus["0"].reason == "no energy reading yet; no read has completed"
    assert never.gpus["0"].age_s is None

    node.now = T0 + 5.2  # no read since T0 + 0.2: the next one has not returned
    hung = assess(node.snapshot(), stale_after_s=1.0)
    assert hung.gpus["0"].reason == "no energy reading for 5.0 s; no read has completed since"
    assert not hung.ok


def test_a_failing_store_degrades_health_and_a_lost_gpu_outranks_it(node: Node) -> None:
    failing = StoreStats(pending=2, written_total=0, dropped_total=0, write_errors_total=3,
                         pruned_total=0, write_errors_since_commit=3,
                         last_write_error="writing to /data/records.db failed: disk I/O error")
    degraded = assess(node.snapshot(), stale_after_s=1.0, store=failing)
    assert (degraded.ok, degraded.status) == (True, "degraded"), "the GPUs are still measured"
    assert degraded.store is not None and degraded.store.reason == (
        "3 write(s) in a row failed, the latest: writing to /data/records.db failed: "
        "disk I/O error")
    writing = dataclasses.replace(failing, write_errors_since_commit=0, last_write_error=None)
    assert assess(node.snapshot(), stale_after_s=1.0, store=writing).status == "ok"
    assert assess(node.snapshot(), stale_after_s=1.0).store is None

    never_read = Sampler(ScriptedGpuSource(GPUS), interval_s=0.1)
    assert assess(never_read.snapshot(), stale_after_s=1.0, store=failing).status == "unhealthy"
