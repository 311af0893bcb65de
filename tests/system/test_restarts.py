"""Stops and restarts under load (issue 8, item 3): real `jouleprobe run` processes on
simulated GPUs, fed requests through the ingest API by a thread while they are stopped.

- SIGTERM loses no finished request (an end event the API answered 200 to), keeps the
  energy measured for requests still open at the stop, and leaves a SQLite file closed
  cleanly (WAL checkpointed and removed, integrity check ok).
- SIGKILL loses at most the records that became final in the last moments before the kill
  (attribution's settle time, one attribution round, one flush interval), and leaves a file
  that passes the integrity check and that a new agent appends to.
- A new agent on the same file serves the old records, and its counters start from zero
  again, which a real Prometheus scraping across the restart handles as one counter reset.

Every wait is bounded and every process is always stopped.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from scripted import (
    ROOT,
    agent_env,
    exposed_samples,
    free_port,
    http_get,
    require_binary,
    start_agent,
    stop_process,
    wait_for,
)

from agent.app.daemon import ATTRIBUTION_PERIOD_S
from agent.app.node import Node
from agent.config import load
from agent.intake.client import Tracker
from agent.requests import Request, RequestEnergy
from agent.sim.gpus import SimulatedGpuSource
from agent.store import RecordReader
from agent.timeline import EnergyPoint

MODEL = "restart-test-model"
SAMPLE_INTERVAL_S = 0.1
SETTLE_S = 0.5
FLUSH_INTERVAL_S = 0.5
EXIT_TIMEOUT_S = 30.0
SCHEDULING_SLACK_S = 0.5
"""Allowed on top of the agent's own periods for threads that a loaded 2-core machine
runs late."""

ENERGY = "jouleprobe_gpu_energy_joules_total"
MAX_GPU_POWER_W = 2000.0
"""Far above any H100's 700 W limit: a rate above it is an artefact (a counter that went
down without starting again from zero reads to Prometheus as a reset plus a huge jump)."""


class Agent:
    """One `jouleprobe run` process on two simulated H100s, on fixed loopback ports."""

    def __init__(self, records: Path, log: Path, *, listen: str, ingest: str) -> None:
        self.listen = listen
        self.ingest_url = f"http://{ingest}"
        self.log = log
        self.proc = start_agent(
            ["--simulate", "2xH100", "--listen", listen,
             "--sample-interval", str(SAMPLE_INTERVAL_S)], log,
            {"JOULEPROBE_RECORDS_PATH": str(records),
             "JOULEPROBE_RECORDS_FLUSH_INTERVAL": str(FLUSH_INTERVAL_S),
             "JOULEPROBE_INGEST_LISTEN": ingest,
             "JOULEPROBE_ATTRIBUTION_SETTLE": str(SETTLE_S)},
        )
        try:
            wait_for("the agent", lambda: http_get(f"http://{listen}/healthz")[0] == 200,
                     self.proc, log, timeout_s=30)
        except BaseException:
            stop_process(self.proc)
            raise

    def metric(self, name: str) -> dict[str, float]:
        """The samples of one metric on /metrics, by their `gpu` (or `model`) label."""
        text = http_get(f"http://{self.listen}/metrics")[1].decode()
        found = {}
        for (sample, labelset), value in exposed_samples(text).items():
            if sample == name:
                labels = dict(labelset)
                found[labels.get("gpu", labels.get("model", ""))] = value
        return found

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            pytest.fail(f"the agent did not exit within {EXIT_TIMEOUT_S} s of signal {signum}:\n"
                        f"{self.log.read_text()[-4000:]}")


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents a test starts go here, so that every one is stopped whatever happens."""
    started: list[Agent] = []
    yield started
    for agent in started:
        stop_process(agent.proc)


class Load:
    """A busy inference server reporting to the ingest API from a thread: every few ms one
    batch starts requests, to keep `concurrency` open, and ends those that have run for
    `duration_s`; the first `held` requests are long generations that never end. It keeps
    going until the agent stops answering, and knows exactly which events the agent
    acknowledged (answered 200 with every event accepted)."""

    def __init__(self, ingest_url: str, prefix: str, *, concurrency: int = 8,
                 duration_s: float = 0.15, held: int = 0) -> None:
        self.url = ingest_url + "/api/v1/events"
        self.prefix = prefix
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.held = {f"{prefix}-{i}" for i in range(held)}
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        """Ids whose start was sent, answered or not."""
        self.ends_sent: set[str] = set()
        self.started: dict[str, float] = {}
        """Acknowledged starts: id → start time (monotonic, shared with the agent)."""
        self.ended: dict[str, float] = {}
        """Acknowledged ends: id → end time."""
        self.failures: list[str] = []
        """Answers other than a full acceptance (a refused event is a test failure)."""
        self._open: dict[str, float] = {}
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait_ended(self, count: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ended) < count:
            assert not self.failures, self.failures[:3]
            assert self._thread.is_alive(), f"the load stopped early: {self.failures[:3]}"
            assert time.monotonic() < deadline, f"only {len(self.ended)} ends acknowledged"
            time.sleep(0.05)

    def wait_done(self, timeout_s: float = 20) -> None:
        """Until the agent stopped answering (the thread ends on a refused connection)."""
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), "the agent still answers after it exited"

    def _run(self) -> None:
        while self._round(finishing=self._stop.is_set()):
            time.sleep(0.01)

    def _round(self, *, finishing: bool) -> bool:
        """One batch; when `finishing`, it only ends the open requests. False: stop."""
        now = time.monotonic()
        events: list[dict[str, Any]] = []
        for request_id, start in list(self._open.items()):
            if (finishing or now - start >= self.duration_s) and request_id not in self.held:
                del self._open[request_id]
                events.append({
                    "type": "end", "id": request_id, "time": now, "prompt_tokens": 20,
                    "completion_tokens": 60, "first_token_time": start + 0.02,
                })
        starts = []
        while not finishing and len(self._open) + len(starts) < self.concurrency + len(self.held):
            request_id = f"{self.prefix}-{self._count}"
            self._count += 1
            starts.append(request_id)
            events.append({"type": "start", "id": request_id, "model": MODEL,
                           "gpus": [self._count % 2], "time": now})
        with self.lock:
            self.sent.update(starts)
            self.ends_sent.update(e["id"] for e in events if e["type"] == "end")
        try:
            status, answer = self._post(events)
        except OSError:  # refused or reset: the agent has stopped listening
            return False
        if status != 200 or answer.get("accepted") != len(events):
            self.failures.append(f"{status}: {answer}")
            return False
        with self.lock:
            for event in events:
                if event["type"] == "start":
                    self.started[event["id"]] = now
                    self._open[event["id"]] = now
                else:
                    self.ended[event["id"]] = now
        return not finishing

    def _post(self, events: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"events": events}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read() or b"{}")


def open_db(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10)
    assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return connection


def records(path: Path) -> dict[str, tuple[str, float | None, float]]:
    """id → (status, end time, IT energy in J) of every record in the file."""
    with closing(open_db(path)) as connection:
        rows = connection.execute(
            "SELECT id, status, end_time, gpu_dynamic_j + gpu_static_j + host_j FROM requests"
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def addresses() -> tuple[str, str]:
    return f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"


def test_sigterm_under_load_loses_no_finished_request(tmp_path: Path,
                                                      agents: list[Agent]) -> None:
    db = tmp_path / "records.db"
    listen, ingest = addresses()
    agent = Agent(db, tmp_path / "agent.log", listen=listen, ingest=ingest)
    agents.append(agent)
    with Load(agent.ingest_url, "term", held=2) as load:
        load.wait_ended(200)
        with load.lock:
            ended_before = dict(load.ended)
        returncode = agent.stop(signal.SIGTERM)
        load.wait_done()
    assert returncode == 0, agent.log.read_text()[-4000:]
    assert not load.failures, load.failures[:3]

    # Closed cleanly: the last connection checkpointed the WAL into the file and removed it.
    assert not Path(f"{db}-wal").exists()
    stored = records(db)
    lost = sorted(set(load.ended) - set(stored))
    print(f"\nSIGTERM: {len(ended_before)} requests ended before the signal, "
          f"{len(load.ended)} in all; {len(lost)} of them lost")
    assert not lost, f"{len(lost)} finished requests lost, e.g. {lost[:5]}"
    for request_id in load.ended:
        status, end, it_j = stored[request_id]
        assert status == "ok" and end is not None and it_j > 0, (request_id, stored[request_id])
    # A POST answered after the agent took it but lost on the way may add records; nothing
    # that was never sent may appear.
    assert set(stored) <= load.sent

    # Open at the stop: kept with the energy measured so far (none for a request that began
    # after the last sample), as expired: no end, so the report leaves their partial figures
    # out of Wh per query. Every request that ended above was open alongside a held one.
    still_open = set(load.started) - load.ends_sent
    assert load.held < still_open <= set(stored)
    assert all(stored[r][1] is None and stored[r][2] >= 0 for r in still_open)
    assert all(stored[r][2] > 0 for r in load.held), [stored[r] for r in load.held]


def test_sigkill_under_load_loses_at_most_the_last_flush(tmp_path: Path,
                                                         agents: list[Agent]) -> None:
    db = tmp_path / "records.db"
    listen, ingest = addresses()
    agent = Agent(db, tmp_path / "agent.log", listen=listen, ingest=ingest)
    agents.append(agent)
    with Load(agent.ingest_url, "kill") as load:
        load.wait_ended(300)
        final = sum(agent.metric("jouleprobe_requests_total").values())
        killed_at = time.monotonic()
        returncode = agent.stop(signal.SIGKILL)
        load.wait_done()
    assert returncode == -signal.SIGKILL
    assert not load.failures, load.failures[:3]

    stored = records(db)  # opens the file as it was left, integrity check included
    assert set(stored) <= load.sent
    # The longest a request can stay unrecorded once it has ended: the interval holding its
    # end must settle and be sampled, one attribution round must pass, then one flush.
    window_s = SETTLE_S + SAMPLE_INTERVAL_S + ATTRIBUTION_PERIOD_S + FLUSH_INTERVAL_S
    cutoff = killed_at - window_s - SCHEDULING_SLACK_S
    old_enough = {r for r, end in load.ended.items() if end < cutoff}
    missing = sorted(old_enough - set(stored))
    lost = set(load.ended) - set(stored)
    print(f"\nSIGKILL: {len(load.ended)} requests ended, {len(stored)} records on disk; "
          f"{final:.0f} final at the last scrape before the kill, so at least "
          f"{max(0, final - len(stored)):.0f} final records were lost unflushed; "
          f"{len(lost)} ended requests have no record, all ended in the last "
          f"{killed_at - min((load.ended[r] for r in lost), default=killed_at):.2f} s")
    assert len(old_enough) > 100
    assert not missing, f"{len(missing)} requests ended > {window_s} s before the kill are lost"

    # A new agent on the same file starts, keeps the old records and appends new ones.
    listen, ingest = addresses()
    again = Agent(db, tmp_path / "agent2.log", listen=listen, ingest=ingest)
    agents.append(again)
    with Load(again.ingest_url, "after") as load:
        load.wait_ended(20)
    deadline = time.monotonic() + 20
    while not set(load.ended) <= set(after := records(db)):
        assert time.monotonic() < deadline, "the new agent recorded nothing"
        time.sleep(0.2)
    assert set(stored) <= set(after)
    assert again.stop(signal.SIGTERM) == 0, again.log.read_text()[-4000:]
    assert not Path(f"{db}-wal").exists()
    assert set(after) <= set(records(db))


def _prometheus_config(path: Path, target: str) -> None:
    path.write_text(
        "global:\n"
        "  scrape_interval: 300ms\n"
        "  scrape_timeout: 300ms\n"
        "scrape_configs:\n"
        "  - job_name: jouleprobe\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )


def _query(base: str, promql: str, at: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    status, body = http_get(f"{base}/api/v1/query?{params}", timeout=5)
    answer: dict[str, Any] = json.loads(body)
    assert status == 200 and answer["status"] == "success", answer
    return answer["data"]["result"]


def _by_gpu(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["gpu"]: float(r["value"][1]) for r in result}


def _track(agent: Agent, prefix: str, count: int) -> list[str]:
    """`count` requests of 50 ms reported with the client helper; their ids once all final."""
    before = agent.metric("jouleprobe_requests_total").get(MODEL, 0.0)
    tracker = Tracker(agent.ingest_url, flush_interval=0.1)
    ids = []
    for i in range(count):
        with tracker.request(model=MODEL, gpus=[i % 2], request_id=f"{prefix}-{i}") as request:
            time.sleep(0.05)
            request.tokens(prompt=10, completion=30)
        ids.append(request.id)
    tracker.close()
    stats = tracker.stats()
    assert stats.rejected == stats.dropped == stats.queued == 0, stats
    wait_for("final requests",
             lambda: agent.metric("jouleprobe_requests_total").get(MODEL, 0.0) == before + count,
             agent.proc, agent.log, timeout_s=20)
    return ids


def _report_requests(db: Path) -> int:
    """Requests of MODEL in `jouleprobe report --format json` of the store."""
    report = subprocess.run(
        [sys.executable, "-m", "agent", "report", "--store", str(db), "--format", "json"],
        cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60,
    )
    assert report.returncode == 0, report.stderr
    return {m["model"]: m["requests"] for m in json.loads(report.stdout)["models"]}[MODEL]


def test_restart_resumes_and_prometheus_handles_the_counter_reset(
    tmp_path: Path, agents: list[Agent]
) -> None:
    prometheus_binary = require_binary("prometheus")
    db = tmp_path / "records.db"
    listen, ingest = addresses()  # the restarted agent takes the same ports, as under systemd
    config = tmp_path / "prometheus.yml"
    _prometheus_config(config, listen)
    address = f"127.0.0.1:{free_port()}"
    prometheus_log = tmp_path / "prometheus.log"
    with prometheus_log.open("wb") as out:
        prometheus = subprocess.Popen(
            [prometheus_binary, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={address}",
             "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://{address}"
    try:
        wait_for("prometheus", lambda: http_get(f"{base}/-/ready")[0] == 200,
                 prometheus, prometheus_log, timeout_s=30)
        first = Agent(db, tmp_path / "agent1.log", listen=listen, ingest=ingest)
        agents.append(first)
        old_ids = _track(first, "first", 20)
        # Prometheus applies its targets some seconds after it starts: wait until it has a
        # few scrapes, the latest with every request counted.
        wait_for("scrapes of the first agent", lambda: _by_gpu(_query(
            base, f"count_over_time({ENERGY}[1m]) >= 5", time.time())).keys() == {"0", "1"}
            and _query(base, f'jouleprobe_requests_total{{model="{MODEL}"}} == 20', time.time()),
            prometheus, prometheus_log, timeout_s=30)
        energy_before_stop = first.metric(ENERGY)
        assert first.stop(signal.SIGTERM) == 0, first.log.read_text()[-4000:]

        second = Agent(db, tmp_path / "agent2.log", listen=listen, ingest=ingest)
        agents.append(second)
        # Its counters start again from zero; the old records are served as they were.
        assert second.metric("jouleprobe_requests_total").get(MODEL, 0.0) == 0.0
        started = second.metric(ENERGY)
        assert all(started[gpu] < energy_before_stop[gpu] for gpu in ("0", "1")), started
        status, body = http_get(f"http://{listen}/api/v1/requests/{old_ids[0]}")
        assert status == 200, body
        assert json.loads(body)["id"] == old_ids[0]
        assert _report_requests(db) == 20
        _track(second, "second", 10)
        assert second.metric("jouleprobe_requests_total")[MODEL] == 10.0
        time.sleep(1.5)  # a few scrapes of the second agent after its last request
        at = time.time() - 0.5  # the latest scrapes are certainly stored

        window = "60s"  # reaches back past the first agent's first scrape
        resets = _by_gpu(_query(base, f"resets({ENERGY}[{window}])", at))
        assert resets == {"0": 1.0, "1": 1.0}
        requests_resets = _query(base, f"resets(jouleprobe_requests_total[{window}])", at)
        assert [float(r["value"][1]) for r in requests_resets] == [1.0]
        # What both agents measured while scraped: the first from its first scrape to its
        # last, the second from its start (its counter starts at zero) to its last scrape.
        raw = _query(base, f"{ENERGY}[{window}]", at)
        measured, extrapolation = {}, {}
        for series in raw:
            values = [float(v) for _, v in series["values"]]
            drop = next(i for i in range(1, len(values)) if values[i] < values[i - 1])
            gpu = series["metric"]["gpu"]
            measured[gpu] = values[drop - 1] - values[0] + values[-1]
            # Prometheus extrapolates the increase between the first and last samples towards
            # each edge of the window by at most 1.1 average intervals between samples.
            extrapolation[gpu] = 1 + 2 * 1.1 / (len(values) - 1)
        increase = _by_gpu(_query(base, f"increase({ENERGY}[{window}])", at))
        assert set(increase) == set(measured) == {"0", "1"}
        print(f"\nrestart: increase over {window} by GPU {increase}, energy measured by both "
              f"agents while scraped {measured}, extrapolation at most {extrapolation}")
        for gpu, joules in measured.items():
            assert joules <= increase[gpu] <= joules * extrapolation[gpu], (
                gpu, increase[gpu], joules)

        params = urllib.parse.urlencode({  # rate over windows that span the restart's gap
            "query": f"rate({ENERGY}[10s])", "start": f"{at - 50:.3f}", "end": f"{at:.3f}",
            "step": "0.3",
        })
        status, body = http_get(f"{base}/api/v1/query_range?{params}", timeout=5)
        assert status == 200, body
        rates = [float(v) for series in json.loads(body)["data"]["result"]
                 for _, v in series["values"]]
        assert rates and all(0 <= watts <= MAX_GPU_POWER_W for watts in rates), (
            min(rates), max(rates))
        assert second.stop(signal.SIGTERM) == 0, second.log.read_text()[-4000:]
    finally:
        stop_process(prometheus)
    assert _report_requests(db) == 30
    assert len(records(db)) == 30  # the file passes the integrity check


def test_a_round_still_running_at_the_stop_hands_its_records_to_the_store(
    tmp_path: Path,
) -> None:
    """The daemon cancels its attribution task on SIGTERM, but a round already running in
    its worker thread goes on: `drain` must wait for it, not close the store under it."""
    db = tmp_path / "records.db"
    config = load(environ={}, overrides={"records.path": str(db), "attribution.settle": "0"})
    node = Node(config, SimulatedGpuSource("1xH100"), None)
    for i in range(11):  # one second at 100 W, no sampler needed
        node.sampler.timelines[0].append(EnergyPoint(1000 + i / 10, 10.0 * i, 100.0))
    node.engine.add(Request("r", MODEL, "test", (0,), 1000.2, 1000.6))

    advance = node.engine.advance
    in_round, release = threading.Event(), threading.Event()

    def slow_first_round(now: float) -> list[RequestEnergy]:
        energies = advance(now)
        if not in_round.is_set():
            in_round.set()
            release.wait(10)
        return energies

    node.engine.advance = slow_first_round  # type: ignore[method-assign]
    attribution = threading.Thread(target=node.attribute)
    attribution.start()
    assert in_round.wait(10)
    drain = threading.Thread(target=node.drain)
    drain.start()
    drain.join(0.3)  # time enough to close the store, if drain did not wait for the round
    release.set()
    attribution.join(10)
    drain.join(10)
    assert not drain.is_alive()
    record = RecordReader(db).get("r")
    assert record is not None and record["energy_j"]["gpu"] == pytest.approx(40.0)
    assert node.attribute() == []  # a round that starts after the stop does nothing
