"""Request metrics and the records API, on a tiny scripted node with a real attribution engine.

The node: two GPUs read through a real `Sampler` every 0.5 s for 10 s (GPU 0 at a constant
100 W with a configured 50 W idle baseline, GPU 1 at 200 W with none yet), host at 50 W,
and three requests under the `equal` policy:

    r1 llama   GPU 0     [1, 4)   prompt 100, completion 50
    r2 llama   GPU 0, 1  [2, 6)   prompt 10,  completion 200
    r3 mistral GPU 1     [0, 9.5) tokens unknown

so every figure below can be worked out by hand. Time is scripted: nothing depends on
the wall clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from scripted import (
    ScriptedGpuSource,
    ScriptedHostSource,
    exposed_samples,
    require_binary,
    series,
)

from agent.attribution import (
    AttributionEngine,
    AttributionTotals,
    CapacityExceeded,
    GpuTotals,
    HostTotals,
)
from agent.devices.base import GpuInfo, GpuReading, HostReading
from agent.health import assess
from agent.report import RecordsApi
from agent.requests import Request, RequestEnergy
from agent.sampler import Sampler
from agent.store import RecordStore, RecordStoreError
from exporters.http import metrics_app, parse_window
from exporters.prometheus import NodeCollector, build_registry
from exporters.request_metrics import ENERGY_BUCKETS_J, OTHER_MODEL, RequestMetrics

T0 = 1000.0
"""Scripted monotonic time of the first read."""
WALL = 1_750_000_000.0
"""What the scripted wall clock says, for exemplar timestamps."""

GPUS = [
    GpuInfo(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", "counter", "instant"),
    GpuInfo(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", "counter", "instant"),
]
POWER_W = {0: 100.0, 1: 200.0}
HOST_W = 50.0


def _sampled_node() -> Sampler:
    """21 reads of each GPU and the host, 0.5 s apart: 10 s of constant power."""
    gpu_source, host_source = ScriptedGpuSource(GPUS), ScriptedHostSource()
    for step in range(21):
        elapsed = step / 2
        t = T0 + elapsed
        for gpu, watts in POWER_W.items():
            gpu_source.queued[gpu].append(GpuReading(
                time=t, energy_j=5000.0 + watts * elapsed, power_w=watts, power_limit_w=700.0,
            ))
        host_source.queued.append(HostReading(t, 9000.0 + HOST_W * elapsed, HOST_W, "rapl"))
    sampler = Sampler(gpu_source, host_source, interval_s=0.5, clock=lambda: 0.0)
    for _ in range(21):
        sampler.sample_all()
    return sampler


REQUESTS = [
    Request("r1", "llama", "ingest", (0,), T0 + 1, T0 + 4, T0 + 1.5, 100, 50),
    Request("r2", "llama", "ingest", (0, 1), T0 + 2, T0 + 6, T0 + 3, 10, 200),
    Request("r3", "mistral", "ingest", (1,), T0, T0 + 9.5),
]

# Hand-worked figures (J). GPU 0: [1,2) r1 alone, 100 J = 50 static + 50 dynamic; [2,4)
# shared, 200 J = 100 + 100; [4,6) r2 alone, 200 J = 100 + 100. GPU 1 (idle unknown: all
# dynamic): [0,2) r3 400 J; [2,6) shared 800 J; [6,9.5) r3 700 J. Host: [0,1) r3 50 J;
# [1,2) r1 r3 50 J; [2,4) r1 r2 r3 100 J; [4,6) r2 r3 100 J; [6,9.5) r3 175 J; [9.5,10) 25 J
# unattributed.
R1 = {"gpu_dynamic": 100.0, "gpu_static": 100.0, "host": 25 + 100 / 3}
R2 = {"gpu_dynamic": 150.0 + 400.0, "gpu_static": 150.0, "host": 100 / 3 + 50}
R3 = {"gpu_dynamic": 400.0 + 400.0 + 700.0, "gpu_static": 0.0, "host": 50 + 25 + 100 / 3 + 50 + 175}
BY_MODEL = {
    "llama": {component: R1[component] + R2[component] for component in R1},
    "mistral": R3,
}


@dataclasses.dataclass
class Run:
    sampler: Sampler
    engine: AttributionEngine
    metrics: RequestMetrics
    collector: NodeCollector
    pending_before: str
    """The text exposition while the three requests were still pending."""
    energies: list[RequestEnergy]

    def text(self) -> str:
        return generate_latest(build_registry(self.collector)).decode()

    def openmetrics(self) -> str:
        return generate_openmetrics(build_registry(self.collector)).decode()


@pytest.fixture
def run() -> Run:
    sampler = _sampled_node()
    engine = AttributionEngine(
        sampler.timelines, sampler.host_timeline, idle_power_w={0: 50.0}, settle_s=0.0,
        max_pending=3,
    )
    metrics = RequestMetrics(engine.totals, clock=lambda: WALL)
    collector = NodeCollector(sampler.snapshot, pue=1.2, version="0")
    collector.add(metrics.families)
    for request in REQUESTS:
        engine.add(request)
    with pytest.raises(ValueError, match="not measured on this node"):
        engine.add(Request("bad-gpu", "llama", "ingest", (7,), T0, T0 + 1))
    with pytest.raises(CapacityExceeded):
        engine.add(Request("one-too-many", "llama", "ingest", (0,), T0, T0 + 1))
    pending_before = generate_latest(build_registry(collector)).decode()
    energies = engine.advance(T0 + 10.5)
    assert sorted(energy.request.id for energy in energies) == ["r1", "r2", "r3"]
    metrics.observe(energies)
    return Run(sampler, engine, metrics, collector, pending_before, energies)


def _approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def test_per_model_requests_energy_tokens_and_histogram(run: Run) -> None:
    samples = exposed_samples(run.text())
    assert samples[series("jouleprobe_requests_total", model="llama")] == 2
    assert samples[series("jouleprobe_requests_total", model="mistral")] == 1
    for model, components in BY_MODEL.items():
        for component, joules in components.items():
            key = series("jouleprobe_request_energy_joules_total", model=model, component=component)
            assert samples[key] == _approx(joules), (model, component)
    assert not any(labels and dict(labels).get("component") == "facility"
                   for _, labels in samples)
    assert samples[series("jouleprobe_request_tokens_total", model="llama", kind="prompt")] == 110
    assert samples[series("jouleprobe_request_tokens_total", model="llama", kind="completion")] \
        == 250
    assert samples[series("jouleprobe_request_tokens_total", model="mistral", kind="prompt")] == 0

    it = {model: sum(components.values()) for model, components in BY_MODEL.items()}
    assert samples[series("jouleprobe_request_it_energy_joules_sum", model="llama")] == _approx(
        it["llama"])
    assert samples[series("jouleprobe_request_it_energy_joules_count", model="mistral")] == 1
    r1_it, r2_it = sum(R1.values()), sum(R2.values())  # 258.3 J and 783.3 J
    for bound in ENERGY_BUCKETS_J:
        expected = (r1_it <= bound) + (r2_it <= bound)
        le = repr(bound)
        assert samples[series("jouleprobe_request_it_energy_joules_bucket", model="llama", le=le)] \
            == expected, bound
    assert samples[
        series("jouleprobe_request_it_energy_joules_bucket", model="llama", le="+Inf")] == 2


def test_per_gpu_attributed_plus_unattributed_is_the_measured_energy(run: Run) -> None:
    samples = exposed_samples(run.text())
    totals = run.engine.totals()
    for info in GPUS:
        labels = {"gpu": str(info.index), "uuid": info.uuid}
        attributed = sum(
            samples[series("jouleprobe_gpu_attributed_energy_joules_total", **labels,
                         component=component)]
            for component in ("gpu_dynamic", "gpu_static")
        )
        unattributed = samples[series("jouleprobe_gpu_unattributed_energy_joules_total", **labels)]
        measured = samples[series("jouleprobe_gpu_energy_joules_total", **labels)]
        assert measured == POWER_W[info.index] * 10  # 10 s of constant power
        assert attributed + unattributed == _approx(measured)
        assert attributed + unattributed == _approx(totals.gpus[info.index].measured_j)
    # what GPUs credited equals what the requests received, summed over models
    for component in ("gpu_dynamic", "gpu_static"):
        by_gpu = sum(samples[series("jouleprobe_gpu_attributed_energy_joules_total",
                                  gpu=str(i.index), uuid=i.uuid, component=component)]
                     for i in GPUS)
        by_model = sum(samples[series("jouleprobe_request_energy_joules_total", model=model,
                                    component=component)] for model in BY_MODEL)
        assert by_gpu == _approx(by_model)
    assert samples[series("jouleprobe_gpu_unattributed_energy_joules_total", gpu="0",
                        uuid="GPU-aaaa")] == _approx(500.0)  # [0,1) and [6,10) at 100 W
    host_attributed = samples[series("jouleprobe_host_attributed_energy_joules_total")]
    host_unattributed = samples[series("jouleprobe_host_unattributed_energy_joules_total")]
    assert host_unattributed == _approx(25.0)
    assert host_attributed + host_unattributed == _approx(HOST_W * 10)
    # GPU 0's idle baseline is configured; GPU 1 has none yet, so no series rather than 0
    assert samples[series("jouleprobe_gpu_idle_power_watts", gpu="0", uuid="GPU-aaaa")] == 50.0
    assert series("jouleprobe_gpu_idle_power_watts", gpu="1", uuid="GPU-bbbb") not in samples


def test_engine_counters(run: Run) -> None:
    before, after = exposed_samples(run.pending_before), exposed_samples(run.text())
    assert before[series("jouleprobe_requests_pending")] == 3
    assert not any(name == "jouleprobe_requests_total" for name, _ in before)
    assert after[series("jouleprobe_requests_pending")] == 0
    assert after[series("jouleprobe_requests_rejected_total", reason="unknown_gpu")] == 1
    assert after[series("jouleprobe_requests_rejected_total", reason="over_capacity")] == 1
    assert after[series("jouleprobe_requests_late_total")] == 0
    assert after[series("jouleprobe_requests_expired_total")] == 0
    assert after[series("jouleprobe_request_ends_unmatched_total")] == 0


_EXEMPLAR = re.compile(
    r'^jouleprobe_request_it_energy_joules_bucket\{le="([^"]+)",model="([^"]+)"\} \S+'
    r' # \{request_id="([^"]+)"\} (\S+) (\S+)$'
)


def test_exemplars_only_in_openmetrics(run: Run) -> None:
    exemplars = {
        (match[2], match[1]): (match[3], float(match[4]), float(match[5]))
        for line in run.openmetrics().splitlines()
        if (match := _EXEMPLAR.match(line))
    }
    assert exemplars == {
        ("llama", "500.0"): ("r1", _approx(sum(R1.values())), WALL),
        ("llama", "1000.0"): ("r2", _approx(sum(R2.values())), WALL),
        ("mistral", "2500.0"): ("r3", _approx(sum(R3.values())), WALL),
    }
    text = run.text()
    assert "request_id" not in text  # neither an exemplar nor, ever, a label
    assert " # {" not in text


def _totals(**changes: Any) -> AttributionTotals:
    base = AttributionTotals(
        gpus={0: GpuTotals(1.0, 2.0, 3.0, 6.0, None), 1: GpuTotals(4.0, 0.0, 0.0, 4.0, 80.0)},
        host=None, pending_requests=4, late_requests=2, expired_requests=1,
        unknown_gpu_requests=3, over_capacity_requests=5, unmatched_ends=6,
    )
    return dataclasses.replace(base, **changes)


def _render(metrics: RequestMetrics, fmt: Callable[..., bytes] = generate_latest) -> str:
    sampler = Sampler(ScriptedGpuSource(GPUS), interval_s=0.1)  # GPU identities only
    collector = NodeCollector(sampler.snapshot, pue=1.1, version="0")
    collector.add(metrics.families)
    return fmt(build_registry(collector)).decode()


def _energy(request_id: str, model: str, it_j: float) -> RequestEnergy:
    request = Request(request_id, model, "ingest", (0,), T0, T0 + 1, None, 3, 4)
    return RequestEnergy(request, it_j / 2, it_j / 4, it_j / 4, it_j * 0.2)


def test_counters_come_from_the_engine_totals_as_they_are() -> None:
    samples = exposed_samples(_render(RequestMetrics(_totals)))
    assert samples[series("jouleprobe_requests_pending")] == 4
    assert samples[series("jouleprobe_requests_late_total")] == 2
    assert samples[series("jouleprobe_requests_expired_total")] == 1
    assert samples[series("jouleprobe_requests_rejected_total", reason="unknown_gpu")] == 3
    assert samples[series("jouleprobe_requests_rejected_total", reason="over_capacity")] == 5
    assert samples[series("jouleprobe_request_ends_unmatched_total")] == 6
    assert samples[series("jouleprobe_gpu_idle_power_watts", gpu="1", uuid="GPU-bbbb")] == 80.0
    assert series("jouleprobe_gpu_idle_power_watts", gpu="0", uuid="GPU-aaaa") not in samples
    assert samples[series("jouleprobe_gpu_attributed_energy_joules_total", gpu="0",
                        uuid="GPU-aaaa", component="gpu_static")] == 2.0
    # no host timeline: no host series, not zeros
    assert not any(name.startswith("jouleprobe_host_") for name, _ in samples)

    with_host = exposed_samples(_render(RequestMetrics(
        lambda: _totals(host=HostTotals(attributed_j=7.0, unattributed_j=8.0, measured_j=15.0))
    )))
    assert with_host[series("jouleprobe_host_attributed_energy_joules_total")] == 7.0
    assert with_host[series("jouleprobe_host_unattributed_energy_joules_total")] == 8.0


def test_each_bucket_keeps_the_exemplar_of_its_latest_request() -> None:
    metrics = RequestMetrics(_totals, clock=lambda: WALL)
    long_id = "x" * 119  # with "request_id", over OpenMetrics' 128 characters
    metrics.observe([_energy("first", "m", 300.0), _energy("other-bucket", "m", 3.0)])
    metrics.observe([_energy("second", "m", 400.0), _energy(long_id, "m", 0.05)])
    lines = _render(metrics, generate_openmetrics).splitlines()
    exemplars = {match[1]: match[3] for line in lines if (match := _EXEMPLAR.match(line))}
    assert exemplars == {"500.0": "second", "5.0": "other-bucket"}
    samples = exposed_samples(_render(metrics))
    assert samples[series("jouleprobe_request_it_energy_joules_bucket", model="m", le="0.1")] == 1
    assert samples[series("jouleprobe_requests_total", model="m")] == 4  # the long id counts


def test_models_past_the_cap_are_folded_into_other(caplog: pytest.LogCaptureFixture) -> None:
    metrics = RequestMetrics(_totals, max_models=2)
    with caplog.at_level(logging.WARNING, logger="exporters.request_metrics"):
        metrics.observe([_energy("1", "a", 1.0), _energy("2", "b", 1.0)])
        metrics.observe([_energy("3", "c", 1.0), _energy("4", "d", 2.0), _energy("5", "a", 1.0)])
        metrics.observe([_energy("6", "e", 1.0)])
    samples = exposed_samples(_render(metrics))
    requests = {dict(labels)["model"]: value for (name, labels), value in samples.items()
                if name == "jouleprobe_requests_total"}
    assert requests == {"a": 2, "b": 1, OTHER_MODEL: 3}
    assert samples[series("jouleprobe_request_it_energy_joules_sum", model=OTHER_MODEL)] == 4.0
    assert samples[series("jouleprobe_request_tokens_total", model=OTHER_MODEL, kind="prompt")] == 9
    assert len([r for r in caplog.records if "models" in r.getMessage()]) == 1  # warned once
    with pytest.raises(ValueError, match="max_models"):
        RequestMetrics(_totals, max_models=0)


def test_promtool_finds_nothing_to_lint(run: Run) -> None:
    promtool = require_binary("promtool")
    run.metrics.observe([_energy('quote"and\\newline\n', 'model "with" quotes', 1.0)])
    result = subprocess.run(
        [promtool, "check", "metrics"], input=run.text(), capture_output=True, text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- the records API on the metrics listener -------------------------------------------

OFFSET = 1_750_000_000.0
"""Records' wall-clock offset: monotonic t is UTC epoch OFFSET + t."""
NOW = OFFSET + 20_000.0
"""The record store's wall clock."""


def _record(request_id: str, model: str, end: float) -> RequestEnergy:
    """A request that ended at monotonic `end` (UTC epoch OFFSET + end): 360 J IT energy."""
    request = Request(request_id, model, "proxy:vllm", (0,), end - 10, end, end - 9, 100, 50)
    return RequestEnergy(request, 200.0, 100.0, 60.0, 72.0)


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    """A store holding a llama request that ended 10 min ago and a mistral one 2 h ago."""
    store = RecordStore(tmp_path / "records.db", pue=1.2, simulated=False, wall_offset=OFFSET,
                        flush_interval_s=3600.0, retention_days=None, clock=lambda: NOW)
    store.submit([_record("recent", "llama", 20_000.0 - 600), _record("old", "mistral", 12_800.0)])
    store.close()  # commits; reads keep working
    return store


def _get(path: str, records: Any) -> tuple[int, Any]:
    """One GET through the agent's aiohttp app, on a real loopback socket."""
    sampler = Sampler(ScriptedGpuSource(GPUS), interval_s=0.1)
    registry = build_registry(NodeCollector(sampler.snapshot, pue=1.2, version="0"))
    app: web.Application = metrics_app(
        registry, lambda: assess(sampler.snapshot(), stale_after_s=1.0), records=records
    )

    async def go() -> tuple[int, Any]:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get(path)
            assert response.content_type == "application/json"
            return response.status, json.loads(await response.read())

    return asyncio.run(go())


def test_get_one_request_record(store: RecordStore) -> None:
    status, record = _get("/api/v1/requests/recent", RecordsApi(store))
    assert status == 200
    assert (record["id"], record["model"], record["gpus"]) == ("recent", "llama", [0])
    assert record["end"] == OFFSET + 19_400.0
    assert record["energy_j"]["it"] == pytest.approx(360.0)
    assert record["energy_wh"]["it"] == pytest.approx(0.1)


def test_unknown_request_is_a_json_404_that_says_when_records_appear(store: RecordStore) -> None:
    status, body = _get("/api/v1/requests/nope", RecordsApi(store))
    assert status == 404
    assert "'nope'" in body["error"] and "once a request is final" in body["error"]


def test_summary_per_model_over_the_window(store: RecordStore) -> None:
    status, body = _get("/api/v1/summary?window=1h", RecordsApi(store))
    assert status == 200
    assert body["window_s"] == 3600 and body["simulated"] is False
    assert set(body["models"]) == {"llama"}
    llama = body["models"]["llama"]
    assert llama["requests"] == 1
    assert llama["wh_per_query_mean"]["it"] == pytest.approx(0.1)
    assert llama["it_j_per_completion_token"] == pytest.approx(360.0 / 50)

    status, body = _get("/api/v1/summary?window=10800", RecordsApi(store))  # 3 h, in seconds
    assert (status, set(body["models"])) == (200, {"llama", "mistral"})
    status, body = _get("/api/v1/summary", RecordsApi(store))  # default: the last hour
    assert (status, body["window_s"]) == (200, 3600)


@pytest.mark.parametrize("window", ["", "0", "0s", "-1h", "1y", "h", "1e400", "nan", "1 hour"])
def test_a_bad_window_is_a_400_naming_the_parameter(store: RecordStore, window: str) -> None:
    status, body = _get(f"/api/v1/summary?window={window}", RecordsApi(store))
    assert status == 400
    assert body["error"].startswith("window:")


def test_window_forms() -> None:
    assert [parse_window(text) for text in ("30s", "15m", "1h", "2d", "1w", "90", "1.5h", " 2 m")
            ] == [30, 900, 3600, 172_800, 604_800, 90, 5400, 120]


class _BrokenRecords:
    def get(self, request_id: str) -> dict[str, Any] | None:
        raise RecordStoreError("cannot read /var/lib/jouleprobe/records.db: disk I/O error")

    def summary(self, window_s: float) -> dict[str, Any]:
        return self.get("")  # type: ignore[return-value]


def test_store_errors_and_no_store_are_json_answers() -> None:
    for path in ("/api/v1/requests/x", "/api/v1/summary?window=1h"):
        status, body = _get(path, _BrokenRecords())
        assert (status, body["error"]) == (
            503, "cannot read /var/lib/jouleprobe/records.db: disk I/O error")
        status, body = _get(path, None)
        assert status == 404
        assert "keeps no per-request records" in body["error"]


def test_prefill_weight_gauge_shows_the_weight_in_use() -> None:
    sampler = _sampled_node()
    fixed = AttributionEngine(sampler.timelines, policy="tokens", prefill_weight=0.5)
    by_time = AttributionEngine(sampler.timelines, policy="equal")
    for engine, expected in ((fixed, 0.5), (by_time, None)):
        collector = NodeCollector(sampler.snapshot, pue=1.2, version="0")
        collector.add(RequestMetrics(engine.totals).families)
        samples = exposed_samples(generate_latest(build_registry(collector)).decode())
        key = series("jouleprobe_gpu_prefill_weight_ratio", gpu="0", uuid="GPU-aaaa")
        assert samples.get(key) == expected


def test_the_costs_of_a_token_alone_are_exported_once_measured() -> None:
    sampler = _sampled_node()
    engine = AttributionEngine(sampler.timelines, policy="tokens")
    collector = NodeCollector(sampler.snapshot, pue=1.2, version="0")
    collector.add(RequestMetrics(engine.totals).families)
    name = "jouleprobe_gpu_token_cost_alone_joules"
    prompt = series(name, gpu="0", uuid="GPU-aaaa", token="prompt")
    samples = exposed_samples(generate_latest(build_registry(collector)).decode())
    assert prompt not in samples, "absent until measured"
    learner = engine._gpus[0].weight_learner
    assert learner is not None
    learner.alone_costs_j = (0.02, 1.5)
    samples = exposed_samples(generate_latest(build_registry(collector)).decode())
    assert samples[prompt] == 0.02
    assert samples[series(name, gpu="0", uuid="GPU-aaaa", token="completion")] == 1.5
