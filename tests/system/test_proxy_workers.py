"""`jouleprobe run` serving a `[[proxy]]` in worker processes of its own: a worker killed
is started again and the proxy keeps serving; on SIGTERM a stream in flight runs to its
end and is recorded."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from scripted import free_port, http_get, serve_app, start_agent, stop_process, wait_for

from agent.sim.upstream import fake_upstream_app
from agent.store import RecordReader

WORKERS = 2
TOKENS_PER_S = 20.0
STREAM_TOKENS = 40
"""At most 2 s of stream: long enough to be in flight when the agent is told to stop."""


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    with serve_app(fake_upstream_app(models={"tiny": TOKENS_PER_S})) as url:
        yield url


def workers_of(agent: psutil.Process) -> list[psutil.Process]:
    return [child for child in agent.children()
            if "agent.intake.proxy.worker" in " ".join(child.cmdline())]


def chat(proxy: str, *, stream: bool, max_tokens: int) -> urllib.request.Request:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream}
    return urllib.request.Request(f"http://{proxy}/v1/chat/completions",
                                  json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})


def content_chunks(lines: list[bytes]) -> int:
    """The chunks of an OpenAI stream that carry content: one token each, from the fake."""
    chunks = [json.loads(line[len(b"data: "):]) for line in lines
              if line.startswith(b"data: {")]
    return sum(1 for chunk in chunks
               if any(choice["delta"].get("content") for choice in chunk["choices"]))


def metric(address: str, line_start: str) -> float | None:
    for line in http_get(f"http://{address}/metrics")[1].decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_killed_worker_is_restarted_and_sigterm_lets_a_stream_finish(
        tmp_path: Path, slow_upstream: str) -> None:
    proxy = f"127.0.0.1:{free_port()}"
    address = f"127.0.0.1:{free_port()}"
    records = tmp_path / "records.db"
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{records}"\n[ingest]\nlisten = "127.0.0.1:0"\n'
        "[attribution]\nsettle = 0.2\n"
        f'[[proxy]]\nname = "fake"\nlisten = "{proxy}"\nupstream = "{slow_upstream}"\n'
        f"gpus = [0]\nworkers = {WORKERS}\n"
    )
    log = tmp_path / "agent.log"
    proc = start_agent(["--config", str(config), "--simulate", "1xH100", "--listen", address],
                       log)
    agent = psutil.Process(proc.pid)
    try:
        wait_for("the proxy", lambda: http_get(f"http://{proxy}/v1/models")[0] == 200, proc,
                 log, timeout_s=30)
        wait_for("its workers", lambda: len(workers_of(agent)) == WORKERS, proc, log, 30)
        victim = workers_of(agent)[0]
        victim.kill()
        restarts = 'jouleprobe_proxy_worker_restarts_total{proxy="fake"}'
        wait_for("the restart", lambda: metric(address, restarts) == 1.0, proc, log, 30)
        wait_for("a new worker", lambda: len(workers_of(agent)) == WORKERS
                 and victim.pid not in {w.pid for w in workers_of(agent)}, proc, log, 30)
        for _ in range(6):  # served by both workers, whichever accepts
            with urllib.request.urlopen(chat(proxy, stream=False, max_tokens=2),
                                        timeout=10) as response:
                assert response.status == 200

        received: list[bytes] = []
        first_chunk = threading.Event()

        def stream() -> None:
            with urllib.request.urlopen(chat(proxy, stream=True, max_tokens=STREAM_TOKENS),
                                        timeout=30) as response:
                received.append(response.headers["X-Jouleprobe-Request-Id"].encode())
                for line in response:
                    first_chunk.set()
                    received.append(line)

        client = threading.Thread(target=stream)
        client.start()
        assert first_chunk.wait(10)
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        proc.wait(60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
    request_id = received[0].decode()
    assert any(line.strip() == b"data: [DONE]" for line in received), "the stream was cut"
    record = RecordReader(records).get(request_id)
    assert record is not None, log.read_text()[-4000:]
    assert (record["source"], record["status"], record["completion_tokens"]) == (
        "proxy:fake", "ok", content_chunks(received[1:]))
