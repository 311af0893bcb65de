"""`jouleprobe run` with request sources from its config file, as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from otel_spans import vllm_span
from scripted import (
    FIXTURES,
    ROOT,
    agent_env,
    exposed_samples,
    free_port,
    http_get,
    serve_app,
    serve_http,
    start_agent,
    stop_process,
    wait_for,
)

from agent.cli import main
from agent.report import SIMULATED_LINE
from agent.sim.upstream import fake_upstream_app
from agent.store import RecordReader

MODEL = "tiny"
"""The model of the llama.cpp captures; the scrape URL's `?model=` names it (router mode)."""

LLAMA_PAGES = [FIXTURES / "metrics" / f"llamacpp_b11434_{when}.txt" for when in ("idle", "busy")]
"""Two scrapes of one real llama-server (each file says how it was captured): idle, then after
three chat completions. No vLLM /metrics pair of one server was found to capture from."""


@pytest.fixture
def llama_metrics() -> Iterator[str]:
    """A stand-in llama-server /metrics: the first scrape sees the idle capture, every later
    one the busy capture, byte for byte."""
    pages = [path.read_bytes() for path in LLAMA_PAGES]
    served = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[min(len(served), 1)]
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Handler) as url:
        yield f"{url}/metrics?model={MODEL}"


def counter_increase(name: str) -> float:
    """How much counter `name` rose from the idle capture to the busy one."""
    idle, busy = (exposed_samples(path.read_text()) for path in LLAMA_PAGES)
    return busy[(name, frozenset())] - idle[(name, frozenset())]


def test_a_configured_scraper_exports_and_records_window_figures(
    tmp_path: Path, llama_metrics: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = counter_increase("llamacpp:prompt_tokens_total")
    completion = counter_increase("llamacpp:tokens_predicted_total")
    assert (prompt, completion) == (171, 28)  # read in the captures: 0 idle, 171 and 28 busy
    store = tmp_path / "records.db"
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{store}"\n'
        '[ingest]\nlisten = "127.0.0.1:0"\n'
        f'[[scrape]]\nkind = "llamacpp"\nurl = "{llama_metrics}"\ngpus = [0]\ninterval = 0.5\n'
    )
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    proc = start_agent(["--config", str(config), "--simulate", "1xH100", "--listen", address],
                       log)
    try:
        def exported(name: str, label: str = "component") -> dict[str, float]:
            """The model's samples of `name`, by `label` (or "" without one)."""
            text = http_get(f"http://{address}/metrics")[1].decode()
            return {
                dict(labels).get(label, ""): value
                for (sample, labels), value in exposed_samples(text).items()
                if sample == name and ("model", MODEL) in labels
            }

        def window_tokens() -> dict[str, float]:
            return exported("jouleprobe_window_tokens_total", "kind")

        wait_for("window figures", lambda: window_tokens().get("completion", 0) > 0, proc, log,
                 timeout_s=30)
        assert window_tokens() == {"prompt": prompt, "completion": completion}
        # llama.cpp counts no requests: no series for them, rather than a zero.
        assert exported("jouleprobe_window_requests_total") == {}
        # Only the first window saw tokens: every later one gives the model 0 J, so
        # these totals are final although the agent goes on scraping until it stops.
        energy = exported("jouleprobe_window_energy_joules_total")
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]

    (stored,) = RecordReader(store).window_totals(model=MODEL).models
    assert stored.requests is None and stored.gpu_j > 0
    assert (stored.prompt_tokens, stored.completion_tokens) == (prompt, completion)
    assert stored.gpu_dynamic_j == pytest.approx(energy["gpu_dynamic"], rel=1e-9)
    assert stored.gpu_static_j == pytest.approx(energy["gpu_static"], rel=1e-9)
    assert main(["report", "--store", str(store)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == SIMULATED_LINE
    row = next(line.split() for line in table if line.startswith("scrape:llamacpp"))
    assert row[:6] == ["scrape:llamacpp", MODEL, str(stored.windows), "-", "171", "28"]


@pytest.mark.parametrize(("table", "reason"), [
    ('[[scrape]]\nkind = "vllm"\nurl = "http://127.0.0.1:9/metrics"\ngpus = "auto"\n',
     "explicit list"),  # auto cannot be resolved on simulated GPUs
    ('[[trace]]\nservice = "vllm-a"\ngpus = "auto"\n', "explicit list"),
    ('[[scrape]]\nkind = "vllm"\nurl = "http://127.0.0.1:9/metrics"\ngpus = [0]\n'
     'trace = "vllm-b"\n', "trace = 'vllm-b' names no [[trace]] table"),
])
def test_a_source_that_can_never_work_stops_the_agent_with_a_reason(
        tmp_path: Path, table: str, reason: str) -> None:
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{tmp_path / "records.db"}"\n[ingest]\nlisten = "127.0.0.1:0"\n'
        + table
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config), "--simulate", "1xH100",
         "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert reason in result.stderr, result.stderr


@pytest.fixture
def fake_upstream() -> Iterator[str]:
    """The package's fake OpenAI-compatible server, on its own event loop in a thread."""
    with serve_app(fake_upstream_app(models={"tiny": 1000.0})) as url:
        yield url


def test_a_configured_proxy_measures_requests(tmp_path: Path, fake_upstream: str) -> None:
    import json
    import urllib.request

    proxy = f"127.0.0.1:{free_port()}"
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{tmp_path / "records.db"}"\n[ingest]\nlisten = "127.0.0.1:0"\n'
        "[attribution]\nsettle = 0.2\n"
        f'[[proxy]]\nname = "fake"\nlisten = "{proxy}"\nupstream = "{fake_upstream}"\n'
        "gpus = [0]\n"
    )
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    proc = start_agent(["--config", str(config), "--simulate", "1xH100", "--listen", address],
                       log)
    try:
        wait_for("the proxy", lambda: http_get(f"http://{proxy}/v1/models")[0] == 200, proc,
                 log, timeout_s=30)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(f"http://{proxy}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            request_id = response.headers["X-Jouleprobe-Request-Id"]
            usage = json.load(response)["usage"]
        record_url = f"http://{address}/api/v1/requests/{request_id}"
        wait_for("the record", lambda: http_get(record_url)[0] == 200, proc, log, timeout_s=30)
        record = json.loads(http_get(record_url)[1])
        assert record["source"] == "proxy:fake" and record["model"] == "tiny"
        assert record["prompt_tokens"] == usage["prompt_tokens"]
        assert record["completion_tokens"] == usage["completion_tokens"]
        assert record["energy_j"]["gpu"] > 0 and record["simulated"] is True
        metrics = http_get(f"http://{address}/metrics")[1].decode()
        assert 'jouleprobe_proxy_requests_total{proxy="fake",status="ok"} 1.0' in metrics
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]


def test_a_configured_trace_source_records_the_spans_of_the_real_exporter(
        tmp_path: Path) -> None:
    """vLLM-shaped spans (tests/unit/intake/test_otlp.py) through the OpenTelemetry SDK's
    batching processor and OTLP/HTTP exporter, as vLLM exports them, into `jouleprobe run`:
    per-request records with no proxy in the path, queue time excluded."""
    otlp, otlp_grpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{tmp_path / "records.db"}"\n[ingest]\nlisten = "127.0.0.1:0"\n'
        f'[attribution]\nsettle = 0.2\n[otlp]\nlisten = "{otlp}"\n'
        f'grpc_listen = "{otlp_grpc}"\n'
        '[[trace]]\nservice = "vllm-llama"\ngpus = [0]\nmodel = "llama-8b"\nsettle = 1.0\n'
    )
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    proc = start_agent(["--config", str(config), "--simulate", "1xH100", "--listen", address],
                       log)
    try:
        wait_for("the OTLP receiver", lambda: http_get(f"http://{otlp}/v1/traces")[0] == 405,
                 proc, log, timeout_s=30)
        # One span over OTLP/HTTP, one over gRPC (vLLM's default protocol).
        providers = []
        for exporter in (OTLPSpanExporter(endpoint=f"http://{otlp}/v1/traces"),
                         GrpcExporter(endpoint=otlp_grpc, insecure=True)):
            provider = TracerProvider(resource=Resource.create({"service.name": "vllm-llama"}))
            provider.add_span_processor(BatchSpanProcessor(exporter))
            providers.append(provider)
        arrival = time.time()
        time.sleep(1.5)  # the requests ran while the agent measured
        vllm_span(providers[0], "chatcmpl-a", arrival, queue=0.3, ttft=0.5, e2e=1.2,
                  prompt=20, completion=30)
        vllm_span(providers[1], "chatcmpl-b", arrival + 0.2, queue=0.0, ttft=0.1, e2e=1.0,
                  prompt=5, completion=50)
        for provider in providers:
            provider.shutdown()  # flushes the batch

        def record(request_id: str) -> dict[str, Any]:
            url = f"http://{address}/api/v1/requests/{request_id}"
            wait_for("the record", lambda: http_get(url)[0] == 200, proc, log, timeout_s=30)
            return dict(json.loads(http_get(url)[1]))

        records = {request_id: record(request_id) for request_id in ("chatcmpl-a", "chatcmpl-b")}
        a = records["chatcmpl-a"]
        assert (a["source"], a["model"], a["status"]) == ("trace:vllm-llama", "llama-8b", "ok")
        assert (a["prompt_tokens"], a["completion_tokens"], a["tokens_estimated"]) == (
            20, 30, False)
        assert a["scheduled"] - a["start"] == pytest.approx(0.3, abs=1e-3)
        assert a["end"] - a["start"] == pytest.approx(1.2, abs=1e-3)
        assert a["energy_j"]["gpu"] > 0 and records["chatcmpl-b"]["energy_j"]["gpu"] > 0
        metrics = http_get(f"http://{address}/metrics")[1].decode()
        assert ('jouleprobe_otlp_spans_total{outcome="accepted",reason="trace:vllm-llama"} 2.0'
                in metrics)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
