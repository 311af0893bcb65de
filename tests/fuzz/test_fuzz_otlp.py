"""The OTLP receiver against bad input: property-based exports of request spans with odd
values, and bodies that are not exports at all, over real HTTP.

The properties:
- whatever the body, the answer is 200, 400, 413 or 415: never a 5xx, never a traceback;
- in a 200, every span is accounted for once (accepted, ignored or rejected), the rejected
  ones are those `partial_success` counts, and a request span is accepted exactly when
  its figures are usable (an oracle written from the rules, not from the code);
- every accepted request reaches the engine with its span's counts, and nothing else does.
Cases per run: 400 exports and 300 bodies.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from scripted import Servers

from agent.attribution import AttributionEngine
from agent.intake.otlp import RUNNER_OPTIONS, TraceReceiver, TraceSource, fixed, otlp_app
from agent.intake.otlp.http_service import TRACES_PATH
from agent.timeline import EnergyPoint, Timeline

SERVICE = "vllm-a"
LIMIT = 1 << 16
"""max_body_bytes while fuzzing: some bodies are larger."""


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, TraceReceiver, AttributionEngine, Tracebacks]]:
    now = time.monotonic()
    line = Timeline(max_points=4_000)
    for i in range(3_700):
        line.append(EnergyPoint(now - 100 + i, 100.0 * i))
    engine = AttributionEngine({0: line}, settle_s=0.0, max_age_s=1e7, max_pending=10**7)
    receiver = TraceReceiver(engine, [TraceSource(SERVICE, fixed((0,)))])
    servers = Servers()
    errors = Tracebacks()
    for name in ("aiohttp.server", "aiohttp.web", "asyncio", "agent"):
        logging.getLogger(name).addHandler(errors)
    try:
        yield (servers.serve(otlp_app(receiver, token=None, max_body_bytes=LIMIT),
                             **RUNNER_OPTIONS), receiver, engine, errors)
    finally:
        for name in ("aiohttp.server", "aiohttp.web", "asyncio", "agent"):
            logging.getLogger(name).removeHandler(errors)
        servers.close()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", TRACES_PATH, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- exports of request spans --------------------------------------------------------------

ODD = st.sampled_from([None, -1, 0, 3, 2**53, 2**53 + 1, 2**62, 1.5, math.nan, math.inf,
                       -0.5, "7", "", True, False])
"""Values of the wrong type or out of range, and a few good ones."""
LATENCY = st.one_of(st.floats(0.0, 30.0), ODD)
COUNT = st.one_of(st.integers(0, 100_000), ODD)


@st.composite
def spans(draw: st.DrawFn, index: int) -> dict[str, Any]:
    attrs = {
        "gen_ai.request.id": draw(st.one_of(st.just(f"cmpl-{index}"), ODD, st.text(max_size=3),
                                            st.just("x" * 200))),
        "gen_ai.usage.prompt_tokens": draw(COUNT),
        "gen_ai.usage.completion_tokens": draw(COUNT),
        "gen_ai.latency.time_in_queue": draw(LATENCY),
        "gen_ai.latency.time_to_first_token": draw(LATENCY),
        "gen_ai.latency.e2e": draw(LATENCY),
    }
    arrival = time.time() - draw(st.sampled_from([60.0, 10.0, 0.0, -3_600.0, 1e9]))
    length = draw(st.sampled_from([1.0, 0.0, -1.0]))
    return {"name": draw(st.sampled_from(["llm_request"] * 4 + ["POST /v1/chat", "Load model"])),
            "service": draw(st.sampled_from([SERVICE] * 4 + ["other"])),
            "start": int(max(arrival, 1e-9) * 1e9) if arrival > 0 else 0,
            "end": int(max(arrival + length, 1e-9) * 1e9) if arrival > 0 else 0,
            "attributes": {k: v for k, v in attrs.items() if v is not None}}


@st.composite
def exports(draw: st.DrawFn) -> list[dict[str, Any]]:
    return [draw(spans(i)) for i in range(draw(st.integers(0, 6)))]


def _value(pair: KeyValue, value: Any) -> None:
    if isinstance(value, bool):
        pair.value.bool_value = value
    elif isinstance(value, int):
        if not -2**63 <= value < 2**63:
            pair.value.string_value = str(value)  # protobuf ints are 64-bit
        else:
            pair.value.int_value = value
    elif isinstance(value, float):
        pair.value.double_value = value
    else:
        pair.value.string_value = value


def encode(drawn: list[dict[str, Any]], run: str) -> bytes:
    export = ExportTraceServiceRequest()
    for number, span in enumerate(drawn):
        resource = export.resource_spans.add()
        _value(resource.resource.attributes.add(key="service.name"), span["service"])
        scope = resource.scope_spans.add()
        scope.scope.name = "vllm.tracing.otel"
        item = scope.spans.add(name=span["name"], trace_id=f"{run:>12}{number:04d}".encode(),
                               span_id=f"{number:08d}".encode(),
                               start_time_unix_nano=span["start"],
                               end_time_unix_nano=span["end"])
        for key, value in span["attributes"].items():
            _value(item.attributes.add(key=key), value)
    return export.SerializeToString()


def usable(span: dict[str, Any]) -> bool:
    """The rules of a usable vLLM request span, as the README states them."""
    a = span["attributes"]
    request_id = a.get("gen_ai.request.id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        return False
    if not span["start"] or span["end"] < span["start"]:
        return False
    latencies = [a.get(f"gen_ai.latency.{n}") for n in ("time_in_queue", "time_to_first_token",
                                                      "e2e")]
    for value in latencies:
        if value is not None and not (type(value) in (int, float) and math.isfinite(value)
                                      and 0 <= value < 1e7):
            return False
    # Ordered as times (seconds since the epoch), as the server's clock gives them: a
    # latency finer than their resolution (5e-324 s) orders nothing.
    queue, ttft, e2e = latencies
    start = span["start"] / 1e9
    end = start + e2e if e2e is not None else span["end"] / 1e9
    first = None if ttft is None else start + ttft
    if first is not None and first > end:
        return False
    if queue is not None and start + queue > (end if first is None else first):
        return False
    for name in ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens"):
        value = a.get(name)
        if value is not None and not (type(value) is int and 0 <= value <= 2**53):
            return False
    ahead = end - time.time()
    return ahead <= 59.0  # the receiver refuses a span that ends > 60 s ahead of its clock


def test_every_span_of_an_export_is_accounted_for_once(
        stack: tuple[str, TraceReceiver, AttributionEngine, Tracebacks]) -> None:
    url, receiver, engine, errors = stack
    runs = iter(range(10**9))

    @settings(max_examples=400, deadline=None)
    @given(drawn=exports())
    def case(drawn: list[dict[str, Any]]) -> None:
        run = f"r{next(runs)}"
        for span in drawn:  # ids unique per case, as a server's are
            if str(span["attributes"].get("gen_ai.request.id")).startswith("cmpl-"):
                span["attributes"]["gen_ai.request.id"] += f"-{run}"
        before = receiver.stats.spans.copy()
        status, body = post(url, encode(drawn, run), {"Content-Type": "application/x-protobuf"})
        assert status == 200, body
        rejected = ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans
        counted = receiver.stats.spans - before
        assert sum(counted.values()) == len(drawn)
        assert sum(n for (outcome, _), n in counted.items() if outcome == "rejected") == rejected
        requests = [s for s in drawn if s["name"] == "llm_request"]
        expected = sum(1 for s in requests if s["service"] == SERVICE and usable(s))
        assert counted["accepted", f"trace:{SERVICE}"] == expected
        assert sum(n for (o, _), n in counted.items() if o == "ignored") == len(drawn) - len(
            requests)

    case()
    finals = engine.advance(time.monotonic() + 4_000)
    assert sum(n for (o, _), n in receiver.stats.spans.items() if o == "accepted") == len(finals)
    assert errors.records == []


# --- bodies that are not exports -----------------------------------------------------------

VALID = encode([{"name": "llm_request", "service": SERVICE, "start": int(time.time() * 1e9),
                 "end": int(time.time() * 1e9) + 1,
                 "attributes": {"gen_ai.request.id": "cmpl-valid"}}], "valid")
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n: VALID[:n], st.integers(0, len(VALID))),  # truncated protobuf
    st.builds(lambda b: bytes(x ^ 0x5A for x in b), st.just(VALID)),
    st.sampled_from([b"", b"{}", b'{"resourceSpans": [{}]}', b"[]", b"null", b"{" * 5_000,
                     b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "zz"}]}]}]}',
                     b"\x0a\xff\xff\xff\xff\x0f", b"x" * (LIMIT + 1)]),
)


def test_whatever_the_body_the_answer_is_a_clear_4xx_or_a_200(
        stack: tuple[str, TraceReceiver, AttributionEngine, Tracebacks]) -> None:
    url, _, _, errors = stack

    @settings(max_examples=300, deadline=None)
    @given(body=bodies, content_type=st.sampled_from(["application/x-protobuf",
                                                      "application/json", "text/plain"]),
           encoding=st.sampled_from(["", "gzip", "deflate", "br", "identity"]),
           compress=st.booleans())
    def case(body: bytes, content_type: str, encoding: str, compress: bool) -> None:
        headers = {"Content-Type": content_type}
        if encoding:
            headers["Content-Encoding"] = encoding
            if compress and encoding == "gzip":
                body = gzip.compress(body)
        status, answer = post(url, body, headers)
        assert status in (200, 400, 413, 415), (status, answer)
        if status == 200 and content_type == "application/x-protobuf":
            ExportTraceServiceResponse.FromString(answer)

    case()
    assert errors.records == []
