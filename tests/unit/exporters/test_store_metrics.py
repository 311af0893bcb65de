"""The record store's own health, as the node exports it: its writer's counters on /metrics,
and /healthz degraded while its writes fail."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scripted import http_get, serve_app, wait_until

from agent.app.daemon import build_apps
from agent.app.node import Node
from agent.config import load
from agent.requests import Request, RequestEnergy
from agent.sampler import NodeSnapshot
from agent.sim.gpus import SimulatedGpuSource
from agent.store import StoreStats, schema
from exporters.store_metrics import StoreMetrics


def _node(path: Path, flush_interval_s: float) -> Node:
    config = load(environ={}, overrides={"records.path": str(path),
                                         "records.flush_interval": str(flush_interval_s)})
    return Node(config, SimulatedGpuSource("1xH100"), None)


def _energy(request_id: str) -> RequestEnergy:
    return RequestEnergy(Request(request_id, "llama", "ingest", (0,), 1.0, 2.0), 3.0, 2.0, 0.0,
                         1.0)


def test_a_loaded_store_shows_its_counters_on_metrics(tmp_path: Path) -> None:
    node = _node(tmp_path / "records.db", flush_interval_s=3600.0)
    node.store.submit([_energy(f"r{i}") for i in range(3)])
    sample = node.registry.get_sample_value
    try:
        assert sample("jouleprobe_store_records_pending") == 3  # the flush is an hour away
        assert sample("jouleprobe_store_records_written_total") == 0
    finally:
        node.drain()  # commits
    assert sample("jouleprobe_store_records_pending") == 0
    assert sample("jouleprobe_store_records_written_total") == 3
    assert sample("jouleprobe_store_records_dropped_total") == 0
    assert sample("jouleprobe_store_records_pruned_total") == 0
    assert sample("jouleprobe_store_write_errors_total") == 0
    assert sample("jouleprobe_store_write_errors_since_commit") == 0


def test_each_series_shows_its_own_counter() -> None:
    stats = StoreStats(pending=1, written_total=2, dropped_total=3, write_errors_total=4,
                       pruned_total=5, write_errors_since_commit=6, last_write_error="locked")
    families = StoreMetrics(lambda: stats).families(NodeSnapshot(0.0, (), None))
    samples = {sample.name: sample.value for family in families for sample in family.samples}
    assert samples == {
        "jouleprobe_store_records_pending": 1,
        "jouleprobe_store_records_written_total": 2,
        "jouleprobe_store_records_dropped_total": 3,
        "jouleprobe_store_write_errors_total": 4,
        "jouleprobe_store_records_pruned_total": 5,
        "jouleprobe_store_write_errors_since_commit": 6,
    }


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Node, str]]:
    """A node that flushes every 10 ms and gives up on a locked file after 10 ms, served
    as the daemon serves it; yields it and its metrics URL."""
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_S", 0.01)
    node = _node(tmp_path / "records.db", flush_interval_s=0.01)
    metrics, _ = build_apps(node, token=None)
    try:
        with serve_app(metrics) as url:
            yield node, url
    finally:
        node.drain()


def _health(node: Node, url: str) -> tuple[int, dict[str, Any]]:
    for _ in range(3):  # fresh energy readings: the GPU is healthy
        node.sampler.sample_all()
    status, body = http_get(f"{url}/healthz")
    return status, json.loads(body)


def test_healthz_is_degraded_while_writes_fail_and_ok_after_a_commit(
    served: tuple[Node, str], tmp_path: Path
) -> None:
    node, url = served
    status, body = _health(node, url)
    assert (status, body["status"], body["store"]) == (200, "ok", {"ok": True, "reason": None})
    blocker = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer's commits fail
    try:
        node.store.submit([_energy("a")])
        wait_until(lambda: node.store.stats().write_errors_since_commit >= 1)
        status, body = _health(node, url)
        assert (status, body["status"], body["store"]["ok"]) == (503, "degraded", False)
        assert "database is locked" in body["store"]["reason"]
        assert all(gpu["ok"] for gpu in body["gpus"].values()), "the GPUs are still measured"
        assert node.registry.get_sample_value("jouleprobe_store_write_errors_since_commit") >= 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: node.store.stats().write_errors_since_commit == 0)
    assert node.store.get("a") is not None, "the retry committed the record"
    status, body = _health(node, url)
    assert (status, body["status"], body["store"]) == (200, "ok", {"ok": True, "reason": None})
    assert node.registry.get_sample_value("jouleprobe_store_write_errors_since_commit") == 0
    assert node.registry.get_sample_value("jouleprobe_store_write_errors_total") >= 1
