"""The node's whole /metrics exposition, in OpenMetrics as Prometheus asks for it, read by
prometheus_client's strict OpenMetrics parser once requests have been attributed.

A strict parser rejects an exposition in which two families share a name (as the counter
`jouleprobe_request_energy_joules_total` and the per-request histogram once did), so the
whole exposition is parsed, not just the families a test looks at.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from fake_pynvml import ManualClock
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from scripted import serve_app

from agent.app.node import Node
from agent.config import load
from agent.devices.host import EstimatedHostSource
from agent.health import assess
from agent.requests import Request
from agent.sim.gpus import SimulatedGpuSource
from exporters.http import metrics_app

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
HISTOGRAM = "jouleprobe_request_it_energy_joules"
"""IT energy per request."""
COUNTER = "jouleprobe_request_energy_joules"
"""Request energy by component (samples `_total`): a counter family, and only that."""
SAMPLES = 60
"""Reads of every source, 0.1 s apart."""


def _loaded_node(records: Path, clock: ManualClock) -> tuple[Node, int]:
    """A node of two simulated H100s and an estimated host, 6 s sampled, with its requests
    attributed; and how many requests became final."""
    config = load(environ={}, overrides={"records.path": str(records)})
    node = Node(config, SimulatedGpuSource("2xH100", clock=clock),
                EstimatedHostSource(100.0, 400.0, utilization=lambda: 0.5, clock=clock))
    start = clock()
    for _ in range(SAMPLES):
        node.sampler.sample_all()
        clock.advance(0.1)
    for i, gpus in enumerate([(0,), (1,), (0, 1)]):
        node.engine.add(Request(f"request-{i}", "llama", "ingest", gpus, start + i,
                                start + i + 2, start + i + 0.5, 100, 50))
    return node, len(node.attribute(clock()))


def _scrape(node: Node) -> tuple[str, str]:
    """(Content-Type, body) of GET /metrics with Prometheus' preferred Accept header."""
    app = metrics_app(node.registry, lambda: assess(node.sampler.snapshot(), 5.0))
    with serve_app(app) as url:
        request = urllib.request.Request(f"{url}/metrics", headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()


def test_the_whole_exposition_parses_and_has_the_per_request_histogram(tmp_path: Path) -> None:
    node, final = _loaded_node(tmp_path / "records.db", ManualClock())
    try:
        content_type, text = _scrape(node)
    finally:
        node.drain()
    assert final == 3
    assert content_type.startswith(OPENMETRICS)
    families = {family.name: family for family in text_string_to_metric_families(text)}

    histogram = families[HISTOGRAM]
    assert (histogram.type, histogram.unit) == ("histogram", "joules")
    counts = [s.value for s in histogram.samples if s.name == f"{HISTOGRAM}_count"]
    assert counts == [final]
    assert any(s.exemplar is not None and s.exemplar.labels["request_id"].startswith("request-")
               for s in histogram.samples if s.name == f"{HISTOGRAM}_bucket")

    assert families[COUNTER].type == "counter"
    old_histogram = {COUNTER + suffix for suffix in ("_bucket", "_count", "_sum")}
    assert not [s.name for family in families.values() for s in family.samples
                if s.name in old_histogram]
