"""The OTLP/HTTP trace receiver: `POST /v1/traces` (and `/`, for an exporter configured
without the path), as the OpenTelemetry Protocol specifies it.

Bodies: `application/x-protobuf` or `application/json` (OTLP JSON: lowerCamelCase, hex
ids, integer enums), `Content-Encoding` gzip, deflate or none; at most `max_body_bytes`,
compressed or not (413). The answer is an `ExportTraceServiceResponse` in the request's
encoding, with `partial_success` (how many spans were rejected, and why) where a span of a
request could not be used. Spans that are not requests (an HTTP server's, vLLM's startup
spans) are counted and ignored: a collector fanning a whole trace stream out to the agent
is not told it sent anything wrong.

Statuses, as the specification has exporters read them: 400 for a body that cannot be
decoded (never retried), 401 without the token where one is set, 413, 415 for another
content type or coding, 503 with Retry-After while `max_concurrent` exports are being
handled, 429 with Retry-After while the engine is at capacity (the exporter sends the
batch again; the spans taken before are recognised by their ids and not counted twice).

Each request span's resource names its source: its `service.name` must be that of a
`TraceSource`, which gives the GPUs (and, optionally, the model). Span times are the
server's wall clock; each is converted to this host's monotonic clock with the offset
between the two at receipt (a wall clock stepped between the request and its export moves
the request by that step).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.devices.base import GpuInfo
from agent.intake.access import refused
from agent.intake.discovery import GpuResolver, StillResolving
from agent.intake.encoding import DECODABLE, TooLarge, decoded
from agent.intake.otlp.coverage import Coverage
from agent.intake.otlp.spans import (
    Ignored,
    Phases,
    Rejected,
    TracedRequest,
    attributes,
    read_span,
)
from agent.intake.validate import BusyLimit
from agent.requests import Request

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_AHEAD_S = 60.0
"""A span that ends further ahead of this host's clock is refused: its clock is wrong."""
REMEMBERED_SPANS = 100_000
"""Spans remembered as taken, so that a batch sent again is not counted twice."""
DEFAULT_MAX_CONCURRENT = 16
WARNING_INTERVAL_S = 60.0
RUNNER_OPTIONS: dict[str, bool] = {"auto_decompress": False}
"""Keyword arguments for the `web.AppRunner` that serves `otlp_app`: the receiver decodes
bodies itself, within `max_body_bytes` of output."""


@dataclass(frozen=True, slots=True)
class TraceSource:
    """One `[[trace]]` table: the server whose resource has this `service.name`."""

    service: str
    gpus: Callable[[Mapping[str, Any]], tuple[int, ...]]
    """The GPUs serving it, given its spans' resource attributes (`ProcessGpus` reads the
    process there); raises ValueError while they are not known (`StillResolving`: ask
    again shortly)."""
    model: str = ""
    """The model to record; by default the span's own, else the service name."""

    @property
    def name(self) -> str:
        """`Request.source` of its requests."""
        return f"trace:{self.service}"


def fixed(gpus: tuple[int, ...]) -> Callable[[Mapping[str, Any]], tuple[int, ...]]:
    """The GPUs of a trace source configured with a list: whatever its spans' resource."""
    return lambda _resource: gpus


PROCESS_ATTRIBUTES = ("vllm.process_id", "process.pid")
"""Resource attributes that name the exporting process: vLLM's (a string), OpenTelemetry's
semantic convention (an int)."""


class ProcessGpus:
    """`gpus = "auto"` for a trace source: the GPUs that NVML lists the process of the
    spans' resource (or its descendants: vLLM's workers) on, through the discovery that
    the proxy and the scrapers use (`GpuResolver`), one per process, refreshed in the
    background so that the event loop never waits for NVML."""

    MAX_PROCESSES = 256

    def __init__(self, gpus: Sequence[GpuInfo], nvml_module: ModuleType | None = None) -> None:
        self._gpus = list(gpus)
        self._nvml_module = nvml_module
        self._resolvers: OrderedDict[int, GpuResolver] = OrderedDict()

    def __call__(self, resource: Mapping[str, Any]) -> tuple[int, ...]:
        pid = _process(resource)
        if pid is None:
            raise ValueError("its resource names no process (vllm.process_id, process.pid) "
                             'for gpus = "auto": give the GPUs in its [[trace]] table')
        resolver = self._resolvers.get(pid)
        if resolver is None:
            resolver = GpuResolver("auto", self._gpus, None, self._nvml_module, wait_s=0.0,
                                   pid=pid)
            self._resolvers[pid] = resolver
            if len(self._resolvers) > self.MAX_PROCESSES:
                self._resolvers.popitem(last=False)
        return resolver.current()


def _process(resource: Mapping[str, Any]) -> int | None:
    for key in PROCESS_ATTRIBUTES:
        value = resource.get(key)
        if type(value) is int and value > 0:
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit() and value != "0":
            return int(value)
    return None


@dataclass(slots=True)
class TraceStats:
    """Spans received since the start, by outcome (accepted, ignored, rejected) and reason
    (the source of an accepted one), for the agent's own metrics."""

    spans: Counter[tuple[str, str]] = field(default_factory=Counter)
    exports: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Export requests answered, by transport (http, grpc) and status (HTTP's, or gRPC's
    code)."""


class TraceReceiver:
    """Takes exports into the engine, whichever transport brought them (`otlp_app` over
    HTTP, `grpc_service.start_grpc` over gRPC); one per agent, so that a batch sent again
    over either is recognised."""

    def __init__(self, engine: AttributionEngine, sources: Sequence[TraceSource], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 coverage: Coverage | None = None) -> None:
        self.engine = engine
        self.sources = {source.service: source for source in sources}
        self.clock = clock
        self.wall_clock = wall_clock
        self.stats = TraceStats()
        self.coverage = coverage
        """Where the accepted requests' ends are counted against scrapes of their server."""
        self.phases = Phases()
        self.taken: OrderedDict[bytes, None] = OrderedDict()
        """The spans (trace and span id) taken lately: a batch sent again is recognised."""
        self.retry_after_s = max(1, math.ceil(engine.settle_s))
        self.retry_reason = ""
        """Why the latest export that could not be taken whole was refused."""
        self._warned = -math.inf

    def take(self, export: ExportTraceServiceRequest) -> tuple[bool, int, str]:
        """Applies the request spans of `export`; returns whether the engine had room for
        them all, how many spans were rejected, and why (also logged, once a minute at
        most: every export of a misconfigured server would say the same)."""
        room, rejected, reason = self._take(export)
        now = self.clock()
        if rejected and now >= self._warned + WARNING_INTERVAL_S:
            self._warned = now
            log.warning("OTLP: %d span(s) of requests rejected (jouleprobe_otlp_spans_total "
                        "counts them all): %s", rejected, reason)
        return room, rejected, reason

    def _take(self, export: ExportTraceServiceRequest) -> tuple[bool, int, str]:
        now = self.clock()
        offset = self.wall_clock() - now
        rejected: Counter[str] = Counter()
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.phases.note(span, scope_spans.scope.name)
        for resource_spans in export.resource_spans:
            resource = attributes(resource_spans.resource.attributes, _RESOURCE)
            service = resource.get("service.name")
            source = self.sources.get(service) if isinstance(service, str) else None
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                for span in scope_spans.spans:
                    try:
                        outcome = self._span(span, scope, source, resource, now, offset)
                    except (CapacityExceeded, StillResolving) as exc:
                        self.retry_reason = str(exc)
                        return False, sum(rejected.values()), _summary(rejected)
                    if isinstance(outcome, Rejected):
                        rejected[outcome.detail] += 1
                        self.stats.spans["rejected", outcome.reason] += 1
                    elif isinstance(outcome, Ignored):
                        self.stats.spans["ignored", outcome.reason] += 1
        return True, sum(rejected.values()), _summary(rejected)

    def _span(self, span: Span, scope: str, source: TraceSource | None,
              resource: Mapping[str, Any], now: float, offset: float
              ) -> Ignored | Rejected | None:
        """What became of `span`: None where its request was accepted."""
        traced = read_span(span, scope, self.phases)
        if not isinstance(traced, TracedRequest):
            return traced
        if source is None:
            return Rejected("unknown_service", "no [[trace]] table for service.name "
                                               f"{resource.get('service.name')!r}")
        return self._accept(traced, span.trace_id + span.span_id, source, resource, now,
                            offset)

    def _accept(self, traced: TracedRequest, span_id: bytes, source: TraceSource,
                resource: Mapping[str, Any], now: float, offset: float
                ) -> Ignored | Rejected | None:
        if span_id in self.taken:
            return Ignored("sent_again")
        if traced.end - offset > now + MAX_AHEAD_S:
            return Rejected("clock", f"ends {traced.end - offset - now:.0f} s ahead of this "
                                     "host's clock: the server's clock is wrong")
        try:
            gpus = source.gpus(resource)
        except StillResolving:
            raise
        except ValueError as exc:
            return Rejected("gpus_unknown", f"the GPUs of {source.service!r} are not known: {exc}")

        first, scheduled = traced.first_token, traced.scheduled
        request = Request(
            traced.id, source.model or traced.model or source.service, source.name, gpus,
            traced.start - offset, traced.end - offset,
            None if first is None else first - offset, traced.prompt_tokens,
            traced.completion_tokens, traced.status,
            None if scheduled is None else scheduled - offset)
        try:
            try:
                self.engine.add(request)
            except ValueError:
                # vLLM gives each sequence of an n > 1 request a span of the parent's id.
                self.engine.add(replace(request, id=f"{traced.id}/{span_id.hex()}"))
        except ValueError as exc:  # an unknown GPU
            return Rejected("refused", str(exc))
        if self.coverage is not None:
            self.coverage.ended(source.name, traced.end - offset, traced.completion_tokens)
        self.taken[span_id] = None
        if len(self.taken) > REMEMBERED_SPANS:
            self.taken.popitem(last=False)
        self.stats.spans["accepted", source.name] += 1
        return None


_IDS = ("traceId", "spanId", "parentSpanId")
_RESOURCE = frozenset(("service.name", *PROCESS_ATTRIBUTES))


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP JSON, whose ids are hex where protobuf's JSON mapping has base64."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    for resource_spans in _items(document, "resourceSpans"):
        for scope_spans in _items(resource_spans, "scopeSpans"):
            for span in _items(scope_spans, "spans"):
                for holder in (span, *_items(span, "links")):
                    for key in _IDS:
                        if isinstance(holder.get(key), str):
                            holder[key] = base64.b64encode(bytes.fromhex(holder[key])).decode()
    return json_format.ParseDict(document, ExportTraceServiceRequest(),
                                 ignore_unknown_fields=True)


def _items(holder: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The objects of the list `holder[key]`; the parser refuses what is of another shape."""
    value = holder.get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _summary(details: Counter[str]) -> str:
    """The distinct reasons, most frequent first (a few at most), with their counts."""
    shown = [f"{count} x {detail}" for detail, count in details.most_common(5)]
    more = len(details) - len(shown)
    return "; ".join(shown) + (f"; and {more} other reason(s)" if more > 0 else "")


def otlp_app(receiver: TraceReceiver, *, token: str | None, max_body_bytes: int,
             max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> web.Application:
    """OTLP/HTTP into `receiver`. Serve it with `web.AppRunner(app, **RUNNER_OPTIONS)`."""
    limit = BusyLimit(max_concurrent)

    def answer(status: int, binary: bool, message: str = "", rejected: int = 0,
               headers: dict[str, str] | None = None) -> web.Response:
        receiver.stats.exports["http", str(status)] += 1
        if status != 200:  # a google.rpc.Status would do; the message in text says as much
            return web.Response(status=status, text=message, headers=headers)
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
        if binary:
            return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)
        return web.Response(text=json_format.MessageToJson(response, indent=None),
                            content_type=JSON)

    async def traces(request: web.Request) -> web.Response:
        binary = request.content_type == PROTOBUF
        if (refusal := refused(request, token, b"a valid bearer token is required",
                               "text/plain")) is not None:
            receiver.stats.exports["http", "401"] += 1
            return refusal
        if request.content_type not in (PROTOBUF, JSON):
            return answer(415, binary, f"content type {request.content_type!r}: "
                                       f"expected {PROTOBUF} or {JSON}")
        if limit.full:
            return answer(503, binary, f"{max_concurrent} exports are being handled; retry",
                          headers={"Retry-After": "1"})
        with limit.slot():
            encoding = request.headers.get("Content-Encoding", "")
            if encoding.strip().lower() not in DECODABLE:
                return answer(415, binary, f"content coding {encoding!r}: expected gzip, "
                                           "deflate or none")
            try:
                body = decoded(await request.read(), encoding, max_body_bytes)
            except (web.HTTPRequestEntityTooLarge, TooLarge):
                return answer(413, binary, f"larger than {max_body_bytes} bytes "
                                           "(otlp.max_body_bytes): send smaller batches")
            except ValueError as exc:
                return answer(400, binary, str(exc))
            try:
                export = (ExportTraceServiceRequest.FromString(body) if binary
                          else _from_json(body))
            except (DecodeError, json_format.ParseError, ValueError, RecursionError) as exc:
                return answer(400, binary, f"not an OTLP ExportTraceServiceRequest: {exc}")
            room, rejected, reason = receiver.take(export)
        if not room:
            return answer(429, binary, f"{receiver.retry_reason}; retry",
                          headers={"Retry-After": str(receiver.retry_after_s)})
        return answer(200, binary, reason, rejected)

    app = web.Application(client_max_size=max_body_bytes)
    for path in (TRACES_PATH, "/"):
        app.router.add_post(path, traces)
    return app
