"""The ingest API under hostile load: floods at many times the rate the node can finish,
and access from off loopback.

Flood: the engine holds at most CAP pending requests and each round drains it once (an
attribution pass over one more simulated second), so CAP requests per round is the
sustainable rate; every round offers ten times that, from many concurrent POSTs. What
must hold: backpressure (429 or 503, each with Retry-After) instead of growing queues, the
engine and the record store within their bounds, process memory flat, every accepted event
final and recorded, and full service again once the flood stops.

Access: a real agent (`python -m agent run`, simulated GPUs) with its ingest API on
0.0.0.0. Traffic only ever goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import ClientSession, TCPConnector
from aiohttp.test_utils import TestServer
from ingest_node import GPUS, POWER_W
from scripted import ROOT, agent_env, free_port, http_get, start_agent, stop_process, wait_for

from agent.attribution import AttributionEngine
from agent.intake.client import EVENTS_PATH
from agent.intake.ingest import ingest_app
from agent.requests import RequestEnergy
from agent.store import RecordStore
from agent.timeline import EnergyPoint, Timeline
from exporters.request_metrics import RequestMetrics

CAP = 200
"""The engine's max_pending: what one round can finish."""
ROUNDS = 30
POSTS_PER_ROUND = 40
EVENTS_PER_POST = 50
OFFERED = POSTS_PER_ROUND * EVENTS_PER_POST
assert OFFERED == 10 * CAP
HZ = 10
RSS_GROWTH_BOUND = 24 * 2**20
"""Generous, yet below what a leak of 400 bytes per offered request would add up to
(ROUNDS × OFFERED = 60,000 requests)."""


class SimulatedNode:
    """Timelines that advance one simulated second per round, and the engine behind them."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.timelines = {gpu: Timeline(max_points=HZ * 600) for gpu in POWER_W}
        for line in self.timelines.values():
            line.append(EnergyPoint(start, 0.0))
        self.engine = AttributionEngine(self.timelines, settle_s=0.0, max_age_s=300.0,
                                        max_pending=CAP)

    def tick(self) -> None:
        """One more simulated second of steady power on every GPU."""
        for step in range(1, HZ + 1):
            at = self.now + step / HZ
            for gpu, line in self.timelines.items():
                latest = line.latest()
                assert latest is not None
                line.append(EnergyPoint(at, latest.energy_j + POWER_W[gpu] / HZ))
        self.now += 1.0

    def drain(self) -> list[RequestEnergy]:
        return self.engine.advance(self.now)


def round_bodies(node: SimulatedNode, round_no: int) -> list[bytes]:
    """OFFERED complete requests that ran during the last simulated second."""
    bodies = []
    for post in range(POSTS_PER_ROUND):
        events = [
            {"type": "request", "id": f"r{round_no}-{post}-{i}", "model": "llama-8b",
             "gpus": [i % 2], "start": node.now - 1.0 + i / 100, "end": node.now - 0.2,
             "prompt_tokens": 100, "completion_tokens": 20}
            for i in range(EVENTS_PER_POST)
        ]
        bodies.append(json.dumps({"events": events}).encode())
    return bodies


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_a_flood_at_ten_times_the_sustainable_rate_gets_backpressure_then_recovers(
    tmp_path: Path,
) -> None:
    node = SimulatedNode(start=10_000.0)
    store = RecordStore(tmp_path / "records.db", pue=1.2, simulated=True,
                        flush_interval_s=0.05, max_pending=2 * CAP)
    metrics = RequestMetrics(node.engine.totals)
    app = ingest_app(node.engine, GPUS, token=None, max_body_bytes=1 << 20, max_concurrent=8,
                     clock=lambda: node.now, wall_clock=lambda: node.now + 1.7e9)
    statuses: dict[int, int] = {}
    accepted = finals = 0
    rss_by_round: list[int] = []

    def finish(energies: list[RequestEnergy]) -> int:
        store.submit(energies)
        metrics.observe(energies)
        assert store.stats().pending <= store.max_pending
        return len(energies)

    async def flood() -> None:
        nonlocal accepted, finals
        async with TestServer(app, host="127.0.0.1") as server, ClientSession(
            connector=TCPConnector(limit=0)
        ) as session:
            url = str(server.make_url(EVENTS_PATH))

            async def post(body: bytes) -> None:
                nonlocal accepted
                async with session.post(url, data=body) as response:
                    answer = await response.json()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                assert response.status in (200, 429, 503), answer
                if response.status != 200:
                    assert int(response.headers["Retry-After"]) >= 1
                    assert answer["errors"] and answer["errors"][-1]["error"]
                accepted += answer["accepted"]

            for round_no in range(ROUNDS):
                node.tick()
                await asyncio.gather(*(post(body) for body in round_bodies(node, round_no)))
                assert node.engine.totals().pending_requests <= CAP
                finals += finish(node.drain())
                rss_by_round.append(rss())

            # The flood has stopped: one drain later, a full batch is taken whole.
            node.tick()
            finals += finish(node.drain())
            assert node.engine.totals().pending_requests == 0
            events = [{"type": "request", "id": f"after-{i}", "model": "llama-8b", "gpus": [0],
                       "start": node.now - 0.5, "end": node.now - 0.1} for i in range(CAP)]
            async with session.post(url, json={"events": events}) as response:
                assert (response.status, await response.json()) == (
                    200, {"accepted": CAP, "errors": []})
            accepted += CAP
            node.tick()
            finals += finish(node.drain())

    asyncio.run(flood())
    store.close()
    stats = store.stats()
    print(f"statuses {statuses}; accepted {accepted} of {ROUNDS * OFFERED + CAP}; RSS MiB by "
          f"round {[round(r / 2**20) for r in rss_by_round]}; store {stats}")
    assert statuses.get(429, 0) >= ROUNDS * POSTS_PER_ROUND // 2  # most of the flood refused
    assert accepted <= (ROUNDS + 1) * CAP
    assert accepted == finals  # nothing taken was lost
    assert stats.written_total + stats.dropped_total == finals and stats.pending == 0
    assert max(rss_by_round) - rss_by_round[2] < RSS_GROWTH_BOUND  # from round 3, flat


def test_posts_beyond_max_concurrent_get_503_with_retry_after_until_a_slot_frees() -> None:
    engine = AttributionEngine({0: Timeline(max_points=2), 1: Timeline(max_points=2)})
    app = ingest_app(engine, GPUS, token=None, max_body_bytes=1 << 20, max_concurrent=2,
                     clock=lambda: 100.0)
    body = json.dumps({"events": [{"type": "start", "id": "slow-{}", "model": "m",
                                   "gpus": [0], "time": 99.0}]})

    async def scenario() -> None:
        async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
            url = str(server.make_url(EVENTS_PATH))
            held = []
            for n in range(2):  # two POSTs whose bodies arrive only in part
                data = body.replace("{}", str(n)).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"POST " + EVENTS_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n"
                             + data[:10])
                await writer.drain()
                held.append((reader, writer, data[10:]))
            for _ in range(500):  # until both handlers wait for their bodies
                async with session.post(url, json={"events": []}) as response:
                    status, headers = response.status, response.headers
                    answer = await response.json()
                if status == 503:
                    break
                await asyncio.sleep(0.01)
            assert status == 503
            assert headers["Retry-After"] == "1"
            assert "2 POSTs are being handled" in answer["errors"][0]["error"]
            for reader, writer, rest in held:
                writer.write(rest)
                await writer.drain()
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                writer.close()
            async with session.post(url, json={"events": []}) as response:
                assert response.status == 200
            assert engine.totals().pending_requests == 2

    asyncio.run(scenario())


def test_a_compressed_body_that_inflates_past_the_limit_gets_413_in_bounded_memory() -> None:
    """aiohttp inflates a gzip body as it reads it, and counts what it inflated against
    max_body_bytes: 64 KB on the wire that would inflate to 64 MiB stop at 1 MiB."""
    engine = AttributionEngine({0: Timeline(max_points=2), 1: Timeline(max_points=2)})
    app = ingest_app(engine, GPUS, token=None, max_body_bytes=1 << 20)
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: the gzip container
    bomb = packer.compress(b'{"events": [' + b" " * (64 * 2**20)) + packer.flush()

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
            response = await session.post(server.make_url(EVENTS_PATH), data=bomb,
                                          headers={"Content-Encoding": "gzip"})
            async with response:
                return response.status, await response.json()

    before = rss()
    status, answer = asyncio.run(scenario())
    assert status == 413 and answer["errors"][0]["field"] == "body"
    assert rss() - before < 32 * 2**20


def test_max_concurrent_must_be_positive() -> None:
    engine = AttributionEngine({0: Timeline(max_points=2), 1: Timeline(max_points=2)})
    with pytest.raises(ValueError, match="max_concurrent"):
        ingest_app(engine, GPUS, token=None, max_body_bytes=1000, max_concurrent=0)


# --- access off loopback, on a real agent ---------------------------------------------------


def agent_config(tmp_path: Path, ingest_port: int, token_file: Path | None) -> Path:
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{tmp_path / "records.db"}"\n'
        "[attribution]\nsettle = 0.2\n"
        f'[ingest]\nlisten = "0.0.0.0:{ingest_port}"\n'
        + (f'token_file = "{token_file}"\n' if token_file else "")
    )
    return config


def agent_args(config: Path, listen: str) -> list[str]:
    return ["--config", str(config), "--simulate", "1xH100", "--listen", listen]


def test_off_loopback_without_a_token_the_agent_refuses_to_start(tmp_path: Path) -> None:
    config = agent_config(tmp_path, free_port(), token_file=None)
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", *agent_args(config, f"127.0.0.1:{free_port()}")],
        cwd=ROOT, env=agent_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "listens off loopback without a token_file" in result.stderr
    assert "ingest.token_file" in result.stderr


def post(port: int, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", EVENTS_PATH, json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_off_loopback_only_the_token_gets_in_and_metrics_carry_no_request_content(
    tmp_path: Path,
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    ingest_port = free_port()
    metrics_address = f"127.0.0.1:{free_port()}"
    config = agent_config(tmp_path, ingest_port, token_file)
    log = tmp_path / "agent.log"
    ids = [f"secret-request-{uuid.uuid4().hex}" for _ in range(5)]
    model = "llama-probe"
    proc = start_agent(agent_args(config, metrics_address), log)
    try:
        wait_for("the ingest API", lambda: post(ingest_port, {"events": []}, None)[0] == 401,
                 proc, log, timeout_s=30)
        assert any(  # off loopback indeed
            c.status == psutil.CONN_LISTEN and tuple(c.laddr) == ("0.0.0.0", ingest_port)
            for c in psutil.Process(proc.pid).net_connections("tcp")
        )
        now = time.monotonic()
        events = [{"type": "request", "id": rid, "model": model, "gpus": [0],
                   "start": now - 0.3, "end": now - 0.1, "prompt_tokens": 10,
                   "completion_tokens": 5} for rid in ids]
        for wrong in (None, "wrong", token + "x", token[:-1], f"Bearer {token}"):
            status, answer = post(ingest_port, {"events": events}, wrong)
            assert status == 401, answer
            assert answer["errors"][0]["field"] == "Authorization"
        assert post(ingest_port, {"events": events}, token) == (
            200, {"accepted": len(ids), "errors": []})

        def finished() -> bool:
            text = http_get(f"http://{metrics_address}/metrics")[1].decode()
            return f'jouleprobe_requests_total{{model="{model}"}} {float(len(ids))}' in text

        wait_for("the requests to be final", finished, proc, log, timeout_s=30)
        text = http_get(f"http://{metrics_address}/metrics")[1].decode()
        for secret in (*ids, token):
            assert secret not in text
        openmetrics = http_get_with(f"http://{metrics_address}/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
        # OpenMetrics carries exemplars (docs/design.md §8: ids as exemplars, never as labels):
        # an id may appear only there, after the sample's " # ".
        exemplars = 0
        for line in openmetrics.splitlines():
            sample, _, exemplar = line.partition(" # ")
            assert not any(secret in sample for secret in (*ids, token)), line
            assert token not in exemplar
            if any(rid in exemplar for rid in ids):
                assert exemplar.startswith('{request_id="secret-request-'), line
                exemplars += 1
        assert exemplars > 0  # the check above did look at them
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]


def http_get_with(url: str, headers: dict[str, str]) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return r.read().decode()
