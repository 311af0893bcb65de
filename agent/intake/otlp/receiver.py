"""The OTLP trace receiver, whichever transport brings the exports (`http_service` for
OTLP/HTTP, `grpc_service` for OTLP/gRPC): it reads each export's spans (`spans`), matches
each resource's `service.name` to a `TraceSource`, and adds the requests to the engine.

Spans that are not requests (an HTTP server's, vLLM's startup spans) are counted and
ignored: a collector fanning a whole trace stream out to the agent is not told it sent
anything wrong. A request span that cannot be used is rejected, with a reason the answer's
`partial_success` carries. While the engine is at capacity, or a source's GPUs are still
being found, an export is refused whole, to be sent again: the spans taken before are
recognised by their ids and not counted twice.

Span times are the server's wall clock; each is converted to this host's monotonic clock
with the offset between the two at receipt (a wall clock stepped between the request and
its export moves the request by that step).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.intake.discovery import StillResolving
from agent.intake.otlp.coverage import Coverage
from agent.intake.otlp.sources import PROCESS_ATTRIBUTES, TraceSource
from agent.intake.otlp.spans import (
    Ignored,
    Phases,
    Rejected,
    TracedRequest,
    attributes,
    read_span,
)
from agent.requests import Request

log = logging.getLogger(__name__)

MAX_AHEAD_S = 60.0
"""A span that ends further ahead of this host's clock is refused: its clock is wrong."""
REMEMBERED_SPANS = 100_000
"""Spans remembered as taken, so that a batch sent again is not counted twice."""
WARNING_INTERVAL_S = 60.0
_RESOURCE = frozenset(("service.name", *PROCESS_ATTRIBUTES))


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
        self.retry_after_s = max(1, math.ceil(engine.longest_settle_s))
        self._warned = -math.inf

    def take(self, export: ExportTraceServiceRequest
             ) -> tuple[str | None, ExportTraceServiceResponse]:
        """Applies the request spans of `export`. Returns why it must be sent again (the
        engine at capacity, a source's GPUs still being found), None where it was taken
        whole; and the answer, whose `partial_success` counts the rejected spans and says
        why (also logged, once a minute at most: every export of a misconfigured server
        would say the same)."""
        retry, rejected = self._take(export)
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = sum(rejected.values())
            response.partial_success.error_message = _summary(rejected)
            now = self.clock()
            if now >= self._warned + WARNING_INTERVAL_S:
                self._warned = now
                log.warning("OTLP: %d span(s) of requests rejected (jouleprobe_otlp_spans_total"
                            " counts them all): %s", response.partial_success.rejected_spans,
                            response.partial_success.error_message)
        return retry, response

    def _take(self, export: ExportTraceServiceRequest) -> tuple[str | None, Counter[str]]:
        now = self.clock()
        offset = self.wall_clock() - now
        rejected: Counter[str] = Counter()
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                if (scope := scope_spans.scope.name) in Phases.SCOPES:
                    for span in scope_spans.spans:
                        self.phases.note(span, scope)
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
                        return str(exc), rejected
                    if isinstance(outcome, Rejected):
                        rejected[outcome.detail] += 1
                        self.stats.spans["rejected", outcome.reason] += 1
                    elif isinstance(outcome, Ignored):
                        self.stats.spans["ignored", outcome.reason] += 1
        return None, rejected

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
        name = source.name
        request = Request(
            traced.id, source.model or traced.model or source.service, name, gpus,
            traced.start - offset, traced.end - offset,
            None if first is None else first - offset, traced.prompt_tokens,
            traced.completion_tokens, traced.status,
            None if scheduled is None else scheduled - offset, sampling=traced.sampling)
        try:
            try:
                self.engine.add(request)
            except ValueError:
                # vLLM gives each sequence of an n > 1 request a span of the parent's id.
                self.engine.add(replace(request, id=f"{traced.id}/{span_id.hex()}"))
        except ValueError as exc:  # an unknown GPU
            return Rejected("refused", str(exc))
        if self.coverage is not None:
            self.coverage.ended(name, traced.end - offset, traced.completion_tokens)
        self.taken[span_id] = None
        if len(self.taken) > REMEMBERED_SPANS:
            self.taken.popitem(last=False)
        self.stats.spans["accepted", name] += 1
        return None


def _summary(details: Counter[str]) -> str:
    """The distinct reasons, most frequent first (a few at most), with their counts."""
    shown = [f"{count} x {detail}" for detail, count in details.most_common(5)]
    more = len(details) - len(shown)
    return "; ".join(shown) + (f"; and {more} other reason(s)" if more > 0 else "")
