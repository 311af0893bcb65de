"""The OTLP trace receiver: spans shaped as vLLM shapes them (tests/otel_spans.py), sent
by the real OpenTelemetry SDK and its OTLP/HTTP exporter, into a real AttributionEngine;
and bodies it must refuse."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from otel_spans import NS, sglang_request, triton_request, vllm_span
from scripted import Servers, free_port, wait_until

from agent.attribution import AttributionEngine
from agent.intake.otlp import (
    RUNNER_OPTIONS,
    TraceReceiver,
    TraceSource,
    TraceStats,
    fixed,
    otlp_app,
)
from agent.intake.otlp.grpc_service import start_grpc
from agent.requests import RequestEnergy, Sampling
from agent.timeline import EnergyPoint, Timeline


def provider_for(url: str, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                        "vllm.process_id": "4242"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider


@pytest.fixture
def receiver(servers: Servers, engine: AttributionEngine) -> Iterator[tuple[str, TraceStats]]:
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,)))])
    app = otlp_app(receiver, token=None, max_body_bytes=1 << 20)
    yield servers.serve(app, **RUNNER_OPTIONS), receiver.stats


def finals(engine: AttributionEngine) -> dict[str, RequestEnergy]:
    return {e.request.id: e for e in engine.advance(time.monotonic() + 2_000)}


def test_vllm_request_spans_from_the_real_exporter_become_requests(
        receiver: tuple[str, TraceStats], engine: AttributionEngine) -> None:
    url, stats = receiver
    provider = provider_for(f"{url}/v1/traces", "vllm-a")
    arrival = time.time() - 5.0
    offset = time.time() - time.monotonic()
    vllm_span(provider, "cmpl-1", arrival, queue=0.5, ttft=0.75, e2e=2.0, prompt=12,
              completion=40)
    vllm_span(provider, "cmpl-2", arrival + 1, queue=0.0, ttft=0.1, e2e=1.0, prompt=3,
              completion=9)
    with provider.get_tracer("fastapi").start_as_current_span("POST /v1/completions"):
        pass  # the HTTP server's own span: not a request span
    provider.shutdown()

    out = finals(engine)
    assert sorted(out) == ["cmpl-1", "cmpl-2"]
    first = out["cmpl-1"].request
    assert (first.source, first.model, first.gpus) == ("trace:vllm-a", "vllm-a", (0,))
    assert (first.prompt_tokens, first.completion_tokens, first.status) == (12, 40, "ok")
    # vLLM sets the sampling options it has that are not 0: a greedy request's temperature
    # is absent, and unknown rather than guessed.
    assert first.sampling == Sampling(max_tokens=256, temperature=None, top_p=1.0, n=1)
    # Wall-clock span times on this host's monotonic clock, to the offset's own jitter.
    times = (first.start, first.scheduled, first.first_token, first.end)
    expected = (arrival, arrival + 0.5, arrival + 0.75, arrival + 2.0)
    assert times == pytest.approx(tuple(t - offset for t in expected), abs=0.05)
    assert out["cmpl-1"].gpu_j > 0
    assert stats.spans == {("accepted", "trace:vllm-a"): 2,
                           ("ignored", "not_a_request"): 1}
    assert stats.exports == {("http", "200"): 3}


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/v1/traces", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


TRACE_ID = "5b8efff798038103d269b633813fc60c"


def otlp_json(*spans: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """(service, span name, attributes) spans, arrived 5 s ago, 1 s long, in OTLP JSON
    (hex ids, integer enums, 64-bit integers as strings)."""
    start = int((time.time() - 5) * NS)
    document: dict[str, Any] = {"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": [{
            "traceId": TRACE_ID, "spanId": f"{index + 1:016x}",
            "name": name, "kind": 2, "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(start + NS),
            "attributes": [{"key": k, "value": ({"intValue": str(v)} if type(v) is int else
                                                {"doubleValue": v} if type(v) is float else
                                                {"stringValue": v})}
                           for k, v in attributes.items()]}]}]}
        for index, (service, name, attributes) in enumerate(spans)]}
    return document


def export_of(*spans: tuple[str, str, dict[str, Any]]) -> ExportTraceServiceRequest:
    """The same as a protobuf message (whose JSON mapping has base64 ids)."""
    document = otlp_json(*spans)
    for resource_spans in document["resourceSpans"]:
        for span in resource_spans["scopeSpans"][0]["spans"]:
            for key in ("traceId", "spanId"):
                span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json_format.ParseDict(document, ExportTraceServiceRequest())


REQUEST = {"gen_ai.request.id": "r", "gen_ai.usage.prompt_tokens": 5,
           "gen_ai.usage.completion_tokens": 6, "gen_ai.latency.e2e": 1.0}


def test_otlp_json_gzipped_with_a_partial_success_for_what_could_not_be_used(
        receiver: tuple[str, TraceStats], engine: AttributionEngine) -> None:
    url, stats = receiver
    document = otlp_json(("vllm-a", "llm_request", REQUEST),
                         ("vllm-a", "llm_request", {**REQUEST, "gen_ai.request.id": "bad",
                                                    "gen_ai.usage.prompt_tokens": -3}),
                         ("vllm-b", "llm_request", {**REQUEST, "gen_ai.request.id": "other"}))
    body = gzip.compress(json.dumps(document).encode())
    status, headers, answer = post(url, body, {"Content-Type": "application/json",
                                               "Content-Encoding": "gzip"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    partial = json.loads(answer)["partialSuccess"]
    assert partial["rejectedSpans"] == "2"
    assert ("1 x 'llm_request' span with gen_ai.usage.prompt_tokens = -3"
            in partial["errorMessage"])
    assert "1 x no [[trace]] table for service.name 'vllm-b'" in partial["errorMessage"]
    assert stats.spans["rejected", "unknown_service"] == stats.spans[
        "rejected", "bad_tokens"] == 1
    assert sorted(finals(engine)) == ["r"]


def test_a_batch_sent_again_is_not_counted_twice(
        receiver: tuple[str, TraceStats], engine: AttributionEngine) -> None:
    url, stats = receiver
    body = export_of(("vllm-a", "llm_request", REQUEST)).SerializeToString()
    for _ in range(2):
        status, _, answer = post(url, body, {"Content-Type": "application/x-protobuf"})
        response = ExportTraceServiceResponse.FromString(answer)
        assert status == 200 and response.partial_success.rejected_spans == 0
    assert len(finals(engine)) == 1
    assert stats.spans["ignored", "sent_again"] == 1


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b"\xff\x00 not protobuf", {"Content-Type": "application/x-protobuf"}, 400),
    (b"{not json", {"Content-Type": "application/json"}, 400),
    (b'{"resourceSpans": 5}', {"Content-Type": "application/json"}, 400),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
     {"Content-Type": "application/json"}, 400),  # ids are hex in OTLP JSON
    (b"x" * (2 << 20), {"Content-Type": "application/x-protobuf"}, 413),
    (gzip.compress(b"\x00" * (2 << 20)), {"Content-Type": "application/x-protobuf",
                                          "Content-Encoding": "gzip"}, 413),  # a small bomb
    (b"x", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400),
    (b"x", {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, 415),
    (b"{}", {"Content-Type": "text/plain"}, 415),
])
def test_bodies_it_cannot_take_get_a_4xx_and_leave_the_engine_alone(
        receiver: tuple[str, TraceStats], engine: AttributionEngine, body: bytes,
        headers: dict[str, str], status: int) -> None:
    url, stats = receiver
    answer = post(url, body, headers)
    assert answer[0] == status, answer
    assert finals(engine) == {} and stats.spans == {}
    assert post(url, export_of(("vllm-a", "llm_request", REQUEST)).SerializeToString(),
                {"Content-Type": "application/x-protobuf"})[0] == 200  # still up


def test_at_capacity_the_exporter_is_told_to_retry_and_nothing_is_lost(
        servers: Servers) -> None:
    now = time.monotonic()
    line = Timeline(max_points=2_000)
    for i in range(1_100):
        line.append(EnergyPoint(now - 10 + i, 100.0 * i))
    engine = AttributionEngine({0: line}, settle_s=0.0, max_age_s=1e6, max_pending=1)
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,)))])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    body = export_of(("vllm-a", "llm_request", REQUEST),
                     ("vllm-a", "llm_request", {**REQUEST, "gen_ai.request.id": "s"})
                     ).SerializeToString()
    status, headers, _ = post(url, body, {"Content-Type": "application/x-protobuf"})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert [e.request.id for e in engine.advance(now + 2_000)] == ["r"]
    status, _, _ = post(url, body, {"Content-Type": "application/x-protobuf"})  # the retry
    assert status == 200
    assert [e.request.id for e in engine.advance(now + 2_000)] == ["s"]
    assert receiver.stats.spans["accepted", "trace:vllm-a"] == 2


def test_off_loopback_only_the_token_gets_in(servers: Servers,
                                              engine: AttributionEngine) -> None:
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,)))])
    url = servers.serve(otlp_app(receiver, token="s3cret", max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    body = export_of(("vllm-a", "llm_request", REQUEST)).SerializeToString()
    protobuf = {"Content-Type": "application/x-protobuf"}
    assert post(url, body, protobuf)[0] == 401
    assert post(url, body, {**protobuf, "Authorization": "Bearer wrong"})[0] == 401
    assert post(url, body, {**protobuf, "Authorization": "Bearer s3cret"})[0] == 200
    wait_until(lambda: len(finals(engine)) == 1, "the request")


def test_each_sequence_of_an_n_request_is_a_request_and_the_model_is_found(
        servers: Servers, engine: AttributionEngine) -> None:
    """vLLM gives each sequence of an n > 1 request its own span with the parent's id; V0
    names the model on the span (`gen_ai.response.model`), v1 does not."""
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,))),
                                      TraceSource("vllm-b", fixed((0,)), model="llama-70b")])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    v0 = {**REQUEST, "gen_ai.request.id": "v0", "gen_ai.response.model": "facebook/opt-125m"}
    body = export_of(("vllm-a", "llm_request", REQUEST), ("vllm-a", "llm_request", REQUEST),
                     ("vllm-a", "llm_request", v0),
                     ("vllm-b", "llm_request", {**v0, "gen_ai.request.id": "b"})
                     ).SerializeToString()
    assert post(url, body, {"Content-Type": "application/x-protobuf"})[0] == 200
    models = {e.request.id: e.request.model for e in finals(engine).values()}
    assert models == {"r": "vllm-a", f"r/{TRACE_ID}{2:016x}": "vllm-a",
                      "v0": "facebook/opt-125m", "b": "llama-70b"}


def test_over_grpc_as_vllm_exports_by_default(servers: Servers,
                                              engine: AttributionEngine) -> None:
    """The real OTLP/gRPC exporter (vLLM's default protocol) into the same receiver: the
    request is taken, a span it cannot use comes back in partial_success, and without the
    token nothing gets in."""
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,)))])
    port = free_port()
    server = servers.call(start_grpc(receiver, f"127.0.0.1:{port}", token="s3cret",
                                     max_body_bytes=1 << 20, max_concurrent=4))
    try:
        spans: list[Any] = []
        provider = TracerProvider(resource=Resource.create({"service.name": "vllm-a"}))
        provider.add_span_processor(SimpleSpanProcessor(Collect(spans)))
        vllm_span(provider, "cmpl-g", time.time() - 3, queue=0.1, ttft=0.2, e2e=1.0,
                  prompt=7, completion=8)
        exporter = GrpcExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=5,
                                headers={"authorization": "Bearer s3cret"})
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        stranger = GrpcExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=5)
        assert stranger.export(spans) == SpanExportResult.FAILURE
        (record,) = finals(engine).values()
        assert (record.request.id, record.request.source, record.request.prompt_tokens) == (
            "cmpl-g", "trace:vllm-a", 7)
        assert receiver.stats.exports == {("grpc", "OK"): 1, ("grpc", "UNAUTHENTICATED"): 1}
    finally:
        servers.call(server.stop(grace=None))


class Collect(SpanExporter):
    """Keeps the finished spans, for an exporter under test to send."""

    def __init__(self, spans: list[Any]) -> None:
        self.spans = spans

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_sglang_request_spans_with_the_queue_from_the_scheduler_process(
        servers: Servers, engine: AttributionEngine) -> None:
    receiver = TraceReceiver(engine, [TraceSource("sglang", fixed((0,)))])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    tokenizer, scheduler = (provider_for(f"{url}/v1/traces", "sglang") for _ in range(2))
    arrival = time.time() - 5.0
    offset = time.time() - time.monotonic()
    sglang_request(tokenizer, scheduler, "5f3a9c0d1e2b4a6c8d0e2f4a6b8c0d1e", arrival,
                   queue=0.4, ttft=0.6, e2e=2.0, prompt=30, completion=64)
    sglang_request(tokenizer, scheduler, "9a8b7c6d5e4f30211203040506070809", arrival,
                   queue=0.1, ttft=0.3, e2e=0.5, prompt=9, completion=2, aborted=True)
    tokenizer.shutdown()
    scheduler.shutdown()

    out = {e.request.id: e.request for e in finals(engine).values()}
    done = out["5f3a9c0d1e2b4a6c8d0e2f4a6b8c0d1e"]
    assert (done.source, done.model, done.status) == (
        "trace:sglang", "Qwen/Qwen2.5-7B-Instruct", "ok")
    assert (done.prompt_tokens, done.completion_tokens) == (30, 64)
    assert (done.start, done.scheduled, done.first_token, done.end) == pytest.approx(
        tuple(arrival + t - offset for t in (0.0, 0.4, 0.6, 2.0)), abs=0.05)
    aborted = out["9a8b7c6d5e4f30211203040506070809"]
    assert (aborted.status, aborted.model, aborted.prompt_tokens) == ("cancelled", "sglang",
                                                                       None)
    # The thread span and every phase: spans of the trace, not requests.
    assert receiver.stats.spans["ignored", "not_a_request"] == 2 * 6


def test_triton_model_spans_weigh_by_time_from_their_compute_start(
        servers: Servers, engine: AttributionEngine) -> None:
    receiver = TraceReceiver(engine, [TraceSource("triton-inference-server", fixed((0,)))])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    provider = provider_for(f"{url}/v1/traces", "triton-inference-server")
    arrival = time.time() - 5.0
    offset = time.time() - time.monotonic()
    triton_request(provider, arrival, queue=0.25, compute=1.0, request_id="req-7")
    triton_request(provider, arrival, queue=0.0, compute=0.5, model="preprocess",
                   parent_id=1)  # a model inside an ensemble
    provider.shutdown()

    (record,) = finals(engine).values()
    request = record.request
    assert (request.id, request.model, request.source) == (
        "req-7", "simple", "trace:triton-inference-server")
    assert (request.prompt_tokens, request.completion_tokens) == (None, None)
    assert request.scheduled - request.start == pytest.approx(0.25, abs=1e-3)
    assert request.start == pytest.approx(arrival + 50e-6 - offset, abs=0.05)
    assert receiver.stats.spans["ignored", "composing_model"] == 1


def test_the_same_load_through_the_proxy_and_by_its_spans_gives_the_same_records(
        servers: Servers) -> None:
    """One simulated vLLM server, its clients through the proxy into one engine, its spans
    (the real SDK's OTLP/HTTP exporter) into the receiver of another, over the same
    energy timeline: per request the same tokens, and nearly the same energy (the proxy
    sees each request from a little earlier to a little later than the server). No queue
    here: with one, the spans' energy would be the smaller by the queue's share."""
    from agent.config import ProxyTable
    from agent.intake.proxy import RUNNER_OPTIONS as PROXY_RUNNER_OPTIONS
    from agent.intake.proxy import proxy_app
    from agent.sim.upstream import fake_upstream_app

    now = time.monotonic()
    line = Timeline(max_points=2_000)
    for i in range(1_100):
        line.append(EnergyPoint(now - 10 + i, 100.0 * i))
    proxied_engine, traced_engine = (AttributionEngine({0: line}, settle_s=0.0, max_age_s=1e6)
                                     for _ in range(2))
    receiver = TraceReceiver(traced_engine, [TraceSource("vllm-a", fixed((0,)))])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    # Batched, as vLLM exports (a simple processor would export on the server's event
    # loop, which serves the receiver too).
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm-a"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"{url}/v1/traces"), schedule_delay_millis=100))
    upstream = servers.serve(fake_upstream_app(models={"llama": 100.0}, traces=provider))
    proxy = servers.serve(proxy_app(ProxyTable(name="p", listen="127.0.0.1:0",
                                               upstream=upstream, gpus=(0,)),
                                    proxied_engine, lambda: (0,)), **PROXY_RUNNER_OPTIONS)
    for words in (3, 30, 12):
        prompt = " ".join(["joules"] * words)
        status, _, _ = post_json(proxy, "/v1/completions",
                                 {"model": "llama", "prompt": prompt, "max_tokens": 20})
        assert status == 200
        time.sleep(0.3)  # one at a time: each request has the GPU to itself
    provider.shutdown()
    wait_until(lambda: proxied_engine.totals().pending_requests == 3, "the proxy's records")
    later = time.monotonic() + 2_000
    proxied = sorted(proxied_engine.advance(later), key=lambda e: e.request.start)
    traced = sorted(traced_engine.advance(later), key=lambda e: e.request.start)
    assert len(proxied) == len(traced) == 3
    for through, spanned in zip(proxied, traced, strict=True):
        assert (through.request.prompt_tokens, through.request.completion_tokens) == (
            spanned.request.prompt_tokens, spanned.request.completion_tokens)
        # At a steady 100 W energy follows the window: the server's lies inside the
        # proxy's, a few ms shorter at each end (the clocks' offset aside).
        assert 0.85 * through.gpu_j <= spanned.gpu_j <= 1.01 * through.gpu_j


def post_json(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", path, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_while_a_sources_gpus_are_being_found_the_exporter_is_told_to_retry(
        servers: Servers, engine: AttributionEngine) -> None:
    from agent.intake.discovery import StillResolving

    answers = iter([StillResolving('gpus = "auto" (PID 7): still being resolved'), (0,)])

    def gpus(resource: Any) -> tuple[int, ...]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    receiver = TraceReceiver(engine, [TraceSource("vllm-a", gpus)])
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    body = export_of(("vllm-a", "llm_request", REQUEST)).SerializeToString()
    status, headers, answer = post(url, body, {"Content-Type": "application/x-protobuf"})
    assert (status, int(headers["Retry-After"]) >= 1) == (429, True)
    assert b"still being resolved" in answer
    assert post(url, body, {"Content-Type": "application/x-protobuf"})[0] == 200
    assert [e.request.id for e in finals(engine).values()] == ["r"]


def test_a_scraped_trace_source_says_what_share_of_its_work_came_as_spans(
        servers: Servers, engine: AttributionEngine) -> None:
    """vLLM sends no span for a request its client aborted: where its counters are scraped
    too, each window compares them with the spans of the requests that ended in it, once
    the spans have had time to come."""
    from agent.intake.otlp.coverage import Coverage
    from agent.intake.scrapers.window import ModelWindow, Usage, WindowFigures

    coverage = Coverage({"trace:vllm-a": 5.0})
    receiver = TraceReceiver(engine, [TraceSource("vllm-a", fixed((0,)))], coverage=coverage)
    url = servers.serve(otlp_app(receiver, token=None, max_body_bytes=1 << 20),
                        **RUNNER_OPTIONS)
    provider = provider_for(f"{url}/v1/traces", "vllm-a")
    arrival = time.time() - 20.0
    offset = time.time() - time.monotonic()
    for i in range(3):  # three requests ended in the window, 10 tokens each
        vllm_span(provider, f"c-{i}", arrival + i, queue=0.0, ttft=0.1, e2e=1.0, prompt=5,
                  completion=10)
    provider.shutdown()
    start, end = arrival - offset - 1.0, arrival - offset + 5.0
    # The server's counters: 4 requests (one aborted by its client, 6 tokens) and 36 tokens.
    usage = Usage(requests=4.0, prompt_tokens=20.0, completion_tokens=36.0)
    figures = WindowFigures(start, end, (0,), "tokens",
                            {"llama": ModelWindow("llama", usage, 1.0, 1.0)}, 0.0, 2.0)
    coverage.window("trace:vllm-a", figures)
    assert coverage.settle(end + 1.0) == []  # its spans may still be on their way
    (compared,) = coverage.settle(end + 5.0)
    assert (compared.requests, compared.completion_tokens) == (0.75, pytest.approx(30 / 36))
    assert coverage.latest == {"trace:vllm-a": compared}


def test_the_gpus_of_a_trace_source_wait_its_settle_and_auto_makes_every_gpu_wait(
        tmp_path) -> None:
    """`[[trace]].settle` per source: a listed source's GPUs wait it (by UUID too), the
    longest where two feed one GPU; an "auto" source's GPUs are known only from its spans,
    so every GPU waits; a GPU no source feeds keeps attribution.settle (not listed)."""
    from agent.app.node import trace_settle
    from agent.config import load
    from agent.devices.base import GpuInfo

    gpus = [GpuInfo(i, f"GPU-{i}", "H100", "counter", "instant") for i in range(4)]
    path = tmp_path / "jouleprobe.toml"
    path.write_text('[[trace]]\nservice = "a"\ngpus = [0]\nsettle = 30.0\n'
                    '[[trace]]\nservice = "b"\ngpus = ["GPU-0", 1]\n')
    assert trace_settle(load(path, environ={}), gpus) == {0: 60.0, 1: 60.0}
    path.write_text('[[trace]]\nservice = "a"\ngpus = [2]\nsettle = 10.0\n'
                    '[[trace]]\nservice = "b"\ngpus = "auto"\nsettle = 5.0\n')
    assert trace_settle(load(path, environ={}), gpus) == {0: 5.0, 1: 5.0, 2: 10.0, 3: 5.0}
    path.write_text('[[proxy]]\nname = "p"\nlisten = "127.0.0.1:1"\n'
                    'upstream = "http://127.0.0.1:2"\ngpus = [0]\n')
    assert trace_settle(load(path, environ={}), gpus) == {}
