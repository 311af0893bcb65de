"""End to end: the agent on simulated GPUs, scraped by a real Prometheus server.

Needs the `prometheus` binary (Debian/Ubuntu: apt-get install prometheus). Without it the
test is skipped, except under CI (CI=true), where that is a failure. Every wait is bounded
and both processes are always stopped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scripted import (
    ROOT,
    agent_env,
    free_port,
    http_get,
    prometheus_server,
    require_binary,
    start_agent,
    stop_process,
    wait_for,
)

SCRAPE_INTERVAL_S = 0.3
"""Why not 1 s: the power gauge is an instantaneous sensor sample, and the simulated load
has 2 s bursts and a 7 Hz ripple. Prometheus scrapes at an exact period, so with 1 s the
samples stay phase-locked to the load and their mean is biased, not merely noisy: over
10 s windows we measured offline (the simulated source, a 0.1 s sampler and Prometheus'
rate() arithmetic, 300 random phases) a median gap of 4 % and a worst of 28 % between
rate(energy) and avg_over_time(power), with the agent computing both correctly. At 0.3 s
(incommensurate with the 0.1 s sensor grid, the ripple and the bursts) 99 % of windows
agree within 3.5 % and the worst of 600 was 6.3 %."""

WINDOW = "10s"
TOLERANCE = 0.08
"""Relative; above the worst sampling error measured (6.3 %), far below any real fault
(power in mW or mJ, energy counted twice, a stuck counter)."""


@pytest.fixture
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[str]:
    """A running agent on two simulated H100s; yields its host:port once /healthz is 200."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    proc = start_agent(["--simulate", "2xH100", "--listen", address, "--sample-interval", "0.1"],
                       log, {"JOULEPROBE_RECORDS_PATH": str(tmp_path / "records.db"),
                             "JOULEPROBE_INGEST_LISTEN": "127.0.0.1:0"})
    try:
        wait_for("the agent", lambda: http_get(f"http://{address}/healthz")[0] == 200,
                  proc, log, timeout_s=30)
        yield address
    finally:
        stop_process(proc)


@pytest.fixture
def prometheus(prometheus_binary: str, agent: str, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server scraping the agent; yields its base URL once it is ready.
    (`prometheus_binary` comes first so that a missing server skips before the agent starts.)"""
    config = tmp_path / "prometheus.yml"
    interval = f"{round(SCRAPE_INTERVAL_S * 1000)}ms"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  scrape_timeout: {interval}\n"
        "scrape_configs:\n"
        "  - job_name: jouleprobe\n"
        f"    static_configs: [{{targets: ['{agent}']}}]\n"
    )
    with prometheus_server(config, tmp_path) as url:
        yield url


def _query(base: str, promql: str, at: float) -> dict[str, float]:
    """An instant query; the result's values by their `gpu` label."""
    params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    status, body = http_get(f"{base}/api/v1/query?{params}", timeout=5)
    answer: dict[str, Any] = json.loads(body)
    assert status == 200 and answer["status"] == "success", answer
    return {r["metric"].get("gpu", ""): float(r["value"][1]) for r in answer["data"]["result"]}


def test_prometheus_sees_energy_that_agrees_with_power(prometheus: str) -> None:
    energy = "jouleprobe_gpu_energy_joules_total"
    deadline = time.time() + 30
    while not _query(prometheus, energy, time.time()):  # until the first scrape is stored
        assert time.time() < deadline, "Prometheus stored no jouleprobe sample in 30 s"
        time.sleep(0.2)
    first = time.time()
    # One window and a bit of data, then evaluate a little in the past so that the latest
    # scrape is certainly stored; both queries at the same instant see the same samples.
    time.sleep(10 + 1.5)
    at = time.time() - 0.5
    assert at - first > 10

    now, before = _query(prometheus, energy, at), _query(prometheus, energy, at - 8)
    assert set(now) == set(before) == {"0", "1"}
    for gpu in now:
        assert now[gpu] > before[gpu] > 0, f"GPU {gpu}: energy did not grow"

    rate = _query(prometheus, f"rate({energy}[{WINDOW}])", at)
    power = _query(prometheus, f"avg_over_time(jouleprobe_gpu_power_watts[{WINDOW}])", at)
    assert set(rate) == set(power) == {"0", "1"}
    for gpu in rate:
        assert rate[gpu] > 50, f"GPU {gpu}: {rate[gpu]} W is below any H100's idle power"
        assert power[gpu] == pytest.approx(rate[gpu], rel=TOLERANCE), f"GPU {gpu}"


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: all mean "not here"
        return False
    pynvml.nvmlShutdown()
    return True


def test_run_without_gpu_or_simulate_fails_and_says_why() -> None:
    if _nvml_works():
        pytest.skip("NVML works on this machine: the agent would start on its GPUs")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert re.search(r"NVML|driver", result.stderr, re.IGNORECASE), result.stderr
    assert "--simulate" in result.stderr, result.stderr
