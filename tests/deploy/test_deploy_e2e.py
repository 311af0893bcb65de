"""End to end: an agent on simulated GPUs under a request load, a real Prometheus with the
rules of deploy/prometheus/ loaded, and the dashboards of deploy/grafana/: every panel's
query returns data, and the recording rules give the figures of the agent's own records.

Needs the `prometheus` binary; without it the test is skipped, except under CI (CI=true),
where that is a failure. Every wait is bounded and both processes are always stopped.

Why a warm-up: a model's counters appear in /metrics only once its first request is final,
so Prometheus never sees them at 0, and rate() cannot count what happened before a series'
first scrape. The warm-up creates every series; the rules' 5 m rates then cover exactly
the measured load, which is compared with the records of the load's requests alone.

Why a long warm-up (half the load): rate() extrapolates each series towards the window's
start by half a scrape interval, or less where that would take a counter below zero
(its first value over its rate). A series whose first value is small against its increase
is extrapolated less than the others, which skews a ratio of two rates by up to half a
scrape interval over the whole run (several %). With a warm-up worth half the load, every
series' zero lies seconds back, and all are extrapolated alike: the ratios are exact. For
the same reason the GPU idle baseline is configured rather than learned: while it is being
learned, gpu_static stays 0, and its series would start at 0.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scripted import (
    free_port,
    http_get,
    prometheus_server,
    start_agent,
    stop_process,
    wait_for,
    wait_until,
)
from test_deploy_queries import RULE_FILES, dashboard_targets, substitute

from agent.intake.client import Tracker

INTERVAL = "500ms"
"""Scrape and rule evaluation interval."""
MODELS = ("llama-8b", "mistral-7b")
PUE = 1.3
WARMUP_S = 2.0
LOAD_S = 4.0
TOLERANCE = 1e-6
"""Relative: the rules' ratios and the records are the same sums (see the module's doc)."""
COMPONENTS = ("gpu_dynamic", "gpu_static", "host", "facility")


@dataclass(frozen=True)
class Agent:
    metrics: str
    ingest: str


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent on two simulated H100s that settles requests quickly."""
    agent = Agent(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    env = {"JOULEPROBE_RECORDS_PATH": str(tmp_path / "records.db"),
           "JOULEPROBE_INGEST_LISTEN": agent.ingest, "JOULEPROBE_SITE_PUE": str(PUE),
           "JOULEPROBE_ATTRIBUTION_SETTLE": "0.5", "JOULEPROBE_RECORDS_FLUSH_INTERVAL": "0.2",
           "JOULEPROBE_ATTRIBUTION_IDLE_WATTS": "60"}
    log = tmp_path / "agent.log"
    proc = start_agent(["--simulate", "2xH100", "--listen", agent.metrics,
                        "--sample-interval", "0.1"], log, env)
    try:
        healthy = f"http://{agent.metrics}/healthz"
        wait_for("the agent", lambda: http_get(healthy)[0] == 200, proc, log, timeout_s=30)
        yield agent
    finally:
        stop_process(proc)


@pytest.fixture
def prometheus(agent: Agent, tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping the agent as job "jouleprobe", with the rules loaded."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {INTERVAL}\n"
        f"  scrape_timeout: {INTERVAL}\n"
        f"  evaluation_interval: {INTERVAL}\n"
        f"rule_files: {json.dumps([str(path) for path in RULE_FILES])}\n"
        "scrape_configs:\n"
        "  - job_name: jouleprobe\n"
        f"    static_configs: [{{targets: ['{agent.metrics}']}}]\n"
    )
    with prometheus_server(config, tmp_path) as url:
        yield url


def _query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": promql})
    status, body = http_get(f"{prometheus}/api/v1/query?{params}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (promql, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"][label] for label in labels): float(r["value"][1]) for r in result}


def _load(agent: Agent, prefix: str, seconds: float) -> list[str]:
    """Requests of every model on both GPUs from 4 clients for `seconds`; returns their ids."""
    tracker = Tracker(f"http://{agent.ingest}", flush_interval=0.05)
    ids: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        rng = random.Random(worker)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            request_id = f"{prefix}-{worker}-{n}"
            with tracker.request(model=MODELS[(worker + n) % len(MODELS)], gpus=[worker % 2],
                                 request_id=request_id) as tracked:
                time.sleep(rng.uniform(0.05, 0.15))
                tracked.first_token()
                time.sleep(rng.uniform(0.1, 0.3))
                tracked.tokens(prompt=rng.randint(10, 500), completion=rng.randint(20, 300))
            with lock:
                ids.append(request_id)
            n += 1

    workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    tracker.close()
    stats = tracker.stats()
    assert stats.rejected == stats.dropped == 0, stats
    return ids


def _requests_scraped(prometheus: str) -> dict[tuple[str, ...], float]:
    return _by(_query(prometheus, "sum by (model) (jouleprobe_requests_total)"), "model")


def _record(agent: Agent, request_id: str) -> dict[str, Any]:
    status, body = http_get(f"http://{agent.metrics}/api/v1/requests/{request_id}")
    assert status == 200, (request_id, body)
    record: dict[str, Any] = json.loads(body)
    return record


def test_dashboards_and_rules_on_a_live_agent(agent: Agent, prometheus: str) -> None:
    warmup = _load(agent, "warmup", WARMUP_S)

    def warm() -> bool:
        scraped = _requests_scraped(prometheus)
        return sum(scraped.values()) >= len(warmup) and len(scraped) == len(MODELS)
    wait_until(warm, "Prometheus to scrape the warm-up", 20.0)
    load = _load(agent, "load", LOAD_S)
    total = len(warmup) + len(load)
    wait_until(lambda: sum(_requests_scraped(prometheus).values()) >= total,
               "Prometheus to scrape every request", 20.0)
    time.sleep(1.5)  # a few more scrapes and rule evaluations after the last request

    # Every query of every panel returns data, with at least one number in it.
    for name, title, expr in dashboard_targets():
        result = _query(prometheus, substitute(expr))
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"{name} {title!r}: no data for {expr}"

    # The rules give what the agent's own records say of the load's requests.
    energy: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    count: dict[str, int] = defaultdict(int)
    for request_id in load:
        record = _record(agent, request_id)
        model = record["model"]
        count[model] += 1
        for component in (*COMPONENTS, "it"):
            energy[model][component] += record["energy_j"][component]
        tokens[model]["prompt"] += record["prompt_tokens"]
        tokens[model]["completion"] += record["completion_tokens"]
    assert set(count) == set(MODELS)

    per_request = _by(_query(
        prometheus, "job_model_component:jouleprobe_request_energy_joules_per_request"
                    ":ratio_rate5m"), "model", "component")
    assert set(per_request) == {(m, c) for m in MODELS for c in COMPONENTS}
    for (model, component), joules in sorted(per_request.items()):
        expected = energy[model][component] / count[model]
        assert joules == pytest.approx(expected, rel=TOLERANCE), (model, component)

    per_token = _by(_query(
        prometheus, "job_model_kind:jouleprobe_request_energy_joules_per_token:ratio_rate5m"),
        "model", "kind")
    assert set(per_token) == {(m, k) for m in MODELS for k in ("prompt", "completion")}
    for (model, kind), joules in per_token.items():
        expected = energy[model]["it"] / tokens[model][kind]
        assert joules == pytest.approx(expected, rel=TOLERANCE), (model, kind)

    # Power: the facility boundary is IT power times the PUE the agent reports. (Absolute
    # rates are not compared: a 5 m rate() divides by 5 m, and these series are seconds old.)
    power = _by(_query(prometheus, "job_boundary:jouleprobe_energy_joules:rate5m"), "boundary")
    assert power[("it",)] > 0
    assert power[("facility",)] == pytest.approx(power[("it",)] * PUE, rel=1e-9)
