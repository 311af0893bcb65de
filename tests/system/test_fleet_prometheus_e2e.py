"""End to end: three agents on simulated GPUs, a real Prometheus with the recording rules of
deploy/prometheus/recording.yml, and `jouleprobe fleet --from-prometheus`, which must report
the fleet Wh/query that the three agents' own records give.

Needs the `prometheus` binary; without it the test is skipped, except under CI (CI=true),
where that is a failure. Every wait is bounded and every process is always stopped.

Why the records of a warm-up are left out of the comparison: a model's counters appear in
/metrics only once its first request is final, so Prometheus never sees them at 0, and
rate() cannot count what happened before a series' first scrape. The warm-up creates every
series; the measured load then runs entirely inside the rules' 5 m window, which is what
the rules' rates cover. What remains is rate()'s extrapolation at the start of a series, a
fraction of one scrape interval against the whole load, and the same for the energy and
the request counters but for their first values: far below the tolerance.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from scripted import (
    ROOT,
    free_port,
    http_get,
    prometheus_server,
    start_agent,
    stop_process,
    wait_for,
    wait_until,
)

from agent.cli import main
from agent.intake.client import Tracker

INTERVAL = "500ms"
"""Scrape and rule evaluation interval."""
PUES = (1.1, 1.2, 1.4)
"""A different site PUE per agent: the facility rule must apply each node's own."""
LOAD_S = 4.0
TOLERANCE = 0.03


def _scraped_requests(prometheus: str) -> float:
    params = urllib.parse.urlencode({"query": "sum(jouleprobe_requests_total)"})
    status, body = http_get(f"{prometheus}/api/v1/query?{params}", timeout=5)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", answer
    return sum(float(r["value"][1]) for r in answer["data"]["result"])


@dataclass(frozen=True)
class Agent:
    metrics: str
    ingest: str
    records: Path
    models: tuple[str, str]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Agent]]:
    with ExitStack() as stack:
        started = []
        for index, pue in enumerate(PUES):
            metrics, ingest = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            records = tmp_path / f"records-{index}.db"
            log = tmp_path / f"agent-{index}.log"
            proc = start_agent(
                ["--simulate", "2xH100", "--listen", metrics, "--sample-interval", "0.1"], log,
                {"JOULEPROBE_RECORDS_PATH": str(records), "JOULEPROBE_INGEST_LISTEN": ingest,
                 "JOULEPROBE_SITE_PUE": str(pue), "JOULEPROBE_ATTRIBUTION_SETTLE": "0.5",
                 "JOULEPROBE_RECORDS_FLUSH_INTERVAL": "0.2"},
            )
            stack.callback(stop_process, proc)
            started.append((proc, log, Agent(metrics, ingest, records,
                                             (f"model-{index}", "shared"))))
        for proc, log, agent in started:
            wait_for("an agent", lambda a=agent: http_get(f"http://{a.metrics}/healthz")[0] == 200,
                      proc, log, timeout_s=30)
        yield [agent for _, _, agent in started]


@pytest.fixture
def prometheus(agents: list[Agent], tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "prometheus.yml"
    targets = ", ".join(f"'{agent.metrics}'" for agent in agents)
    config.write_text(
        "global:\n"
        f"  scrape_interval: {INTERVAL}\n"
        f"  scrape_timeout: {INTERVAL}\n"
        f"  evaluation_interval: {INTERVAL}\n"
        f"rule_files: ['{ROOT / 'deploy' / 'prometheus' / 'recording.yml'}']\n"
        "scrape_configs:\n"
        "  - job_name: jouleprobe\n"
        f"    static_configs: [{{targets: [{targets}]}}]\n"
    )
    with prometheus_server(config, tmp_path) as url:
        yield url


def _load(agent: Agent, prefix: str, seconds: float, seed: int) -> int:
    """Requests on both GPUs and both models of `agent` for `seconds`; returns their count."""
    rng = random.Random(seed)
    count = 0
    lock = threading.Lock()
    tracker = Tracker(f"http://{agent.ingest}", flush_interval=0.05)

    def client(worker: int) -> None:
        nonlocal count
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            model = agent.models[n % 2]
            with tracker.request(model=model, gpus=[worker % 2],
                                 request_id=f"{prefix}-{worker}-{n}") as tracked:
                time.sleep(rng.uniform(0.1, 0.4))
                tracked.tokens(prompt=rng.randint(10, 200), completion=rng.randint(20, 300))
            n += 1
        with lock:
            count += n

    workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    tracker.close()
    assert tracker.stats().rejected == tracker.stats().dropped == 0, tracker.stats()
    return count


def _records(path: Path) -> list[tuple[str, float]]:
    """(id, facility Wh) of every finished record."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT id, (gpu_dynamic_j + gpu_static_j + host_j + facility_j) "
                          "/ 3600.0 FROM requests WHERE end_time IS NOT NULL").fetchall()
    return [(row[0], row[1]) for row in rows]


def _run_load(agents: list[Agent], prefix: str, seconds: float) -> int:
    counts = [0] * len(agents)

    def run(index: int) -> None:
        counts[index] = _load(agents[index], prefix, seconds, seed=index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(agents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def test_fleet_from_prometheus_matches_the_agents_records(
    agents: list[Agent], prometheus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    warmup = _run_load(agents, "warmup", 0.5)
    wait_until(lambda: _scraped_requests(prometheus) >= warmup,
               "Prometheus to scrape the warm-up", 20.0)
    total = warmup + _run_load(agents, "load", LOAD_S)
    wait_until(lambda: sum(len(_records(a.records)) for a in agents) >= total,
               "every record to be written", 20.0)
    wait_until(lambda: _scraped_requests(prometheus) >= total,
               "Prometheus to scrape every request", 20.0)
    time.sleep(1.5)  # a few more scrapes and rule evaluations after the last request

    measured = [wh for agent in agents for rid, wh in _records(agent.records)
                if rid.startswith("load-")]
    expected = sum(measured) / len(measured)
    assert main(["fleet", "--from-prometheus", prometheus, "--window", "5m",
                 "--queries-per-day", "1B", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["simulated"] is True
    assert result["inputs"]["wh_per_query"]["origin"].startswith(
        f"measured on SIMULATED GPUs: prometheus {prometheus}")
    assert result["wh_per_query"] == pytest.approx(expected, rel=TOLERANCE)
    assert result["annual_energy_wh"] == pytest.approx(expected * 1e9 * 365, rel=TOLERANCE)

    # Without a volume, the fleet's own measured query rate is the volume.
    assert main(["fleet", "--from-prometheus", prometheus, "--window", "5m",
                 "--format", "json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["inputs"]["queries_per_day"]["kind"] == "measured"
    assert own["inputs"]["queries_per_day"]["value"] > 0
