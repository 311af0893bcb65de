"""Which OpenTelemetry spans are inference requests, and what each one says.

An inference server's trace holds many spans; a request is recognised by its span's name
and attributes, per server, never guessed: a span of another shape is `Ignored` (counted
by reason), and a span of a request's shape that cannot be used (a missing or impossible
figure) is `Rejected`, with the reason the OTLP answer carries back to the exporter.

vLLM (`--otlp-traces-endpoint`): one span `llm_request` per finished request, started at
the request's arrival (wall-clock ns), with its id, token counts and latencies in seconds
since arrival: `gen_ai.latency.time_in_queue` (waiting to be scheduled),
`gen_ai.latency.time_to_first_token`, `gen_ai.latency.e2e` (arrival to last token). The
request occupies its GPUs from arrival + queue time; the queue gets no energy, which a
proxy (which sees only arrival) cannot know.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.intake.validate import MAX_MODEL_LENGTH, label_text_problem, token_count_problem

VLLM_SPAN = "llm_request"
_VLLM_KEYS = frozenset((
    "gen_ai.request.id", "gen_ai.response.model", "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens", "gen_ai.latency.time_in_queue",
    "gen_ai.latency.time_to_first_token", "gen_ai.latency.e2e"))
MAX_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class TracedRequest:
    """A request as its span tells it; times in wall-clock seconds since the epoch."""

    id: str
    model: str | None
    """The span's own model name, if it carries one."""
    start: float
    """Arrival."""
    scheduled: float | None
    """When the server took it from its queue."""
    first_token: float | None
    end: float
    prompt_tokens: int | None
    completion_tokens: int | None


class Ignored(NamedTuple):
    """Not a request span, or one taken before."""

    reason: str
    """A short code, a metric label value."""


class Rejected(NamedTuple):
    """A request span that cannot be used."""

    reason: str
    """A short code, a metric label value (one of a fixed few)."""
    detail: str
    """What is wrong, for the exporter's and the operator's eyes."""


_SCALARS = frozenset(("string_value", "bool_value", "int_value", "double_value"))


def attributes(pairs: Iterable[KeyValue], wanted: frozenset[str] | None = None
               ) -> dict[str, Any]:
    """The scalar attributes (string, bool, int, double) by key, of the `wanted` keys only
    if given (a span carries many that are not read); others are left out."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key = pair.key
        if wanted is not None and key not in wanted:
            continue
        value = pair.value
        kind = value.WhichOneof("value")
        if kind in _SCALARS:
            found[key] = getattr(value, kind)
    return found


def read_span(span: Span) -> TracedRequest | Ignored | Rejected:
    """What `span` says, if it is a request of a server this module knows."""
    if span.name == VLLM_SPAN:
        return _vllm(span, attributes(span.attributes, _VLLM_KEYS))
    return Ignored("not_a_request")


def _vllm(span: Span, attrs: Mapping[str, Any]) -> TracedRequest | Rejected:
    request_id = attrs.get("gen_ai.request.id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_LENGTH:
        return Rejected("bad_id", "llm_request without a usable gen_ai.request.id")
    start = span.start_time_unix_nano / 1e9
    if not span.start_time_unix_nano or span.end_time_unix_nano < span.start_time_unix_nano:
        return Rejected("bad_times", "llm_request with no start, or an end before its start")
    latencies = {}
    for name in ("time_in_queue", "time_to_first_token", "e2e"):
        value = attrs.get(f"gen_ai.latency.{name}")
        if value is not None and not (type(value) in (int, float) and math.isfinite(value)
                                      and 0 <= value < 1e7):
            return Rejected("bad_times", f"llm_request with gen_ai.latency.{name} = {value!r}")
        latencies[name] = value
    e2e = latencies["e2e"]
    end = start + e2e if e2e is not None else span.end_time_unix_nano / 1e9
    queued, ttft = latencies["time_in_queue"], latencies["time_to_first_token"]
    first_token = None if ttft is None else start + ttft
    scheduled = None if queued is None else start + queued
    if (first_token is not None and first_token > end) or (scheduled is not None and (
            scheduled > (end if first_token is None else first_token))):
        return Rejected("bad_times", "llm_request whose latencies are out of order "
                                     "(queue <= first token <= e2e)")
    tokens = []
    for name in ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens"):
        value = attrs.get(name)
        if value is not None and token_count_problem(value) is not None:
            return Rejected("bad_tokens", f"llm_request with {name} = {value!r}")
        tokens.append(value)
    model = attrs.get("gen_ai.response.model")
    if not isinstance(model, str) or label_text_problem(model, MAX_MODEL_LENGTH) is not None:
        model = None
    return TracedRequest(request_id, model, start, scheduled, first_token, end, *tokens)
