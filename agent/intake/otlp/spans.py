"""Which OpenTelemetry spans are inference requests, and what each one says.

An inference server's trace holds many spans; a request is recognised by its span's name
and attributes, per server, never guessed: a span of another shape is `Ignored` (counted
by reason), and a span of a request's shape that cannot be used (a missing or impossible
figure) is `Rejected`, with the reason the OTLP answer carries back to the exporter.

The shapes, as the servers' code makes them (sources in tests/otel_spans.py):
- vLLM (`--otlp-traces-endpoint`): one span `llm_request` per finished request, started at
  its arrival (wall-clock ns), with its id, token counts and latencies in seconds since
  arrival: `gen_ai.latency.time_in_queue` (waiting to be scheduled), `time_to_first_token`,
  `e2e` (arrival to last token). No model name since the v1 engine (V0 set
  `gen_ai.response.model`). A request its client aborted has no span.
- SGLang (`--enable-trace`, scope `sglang server`): the request span `" Req <rid[:8]>"`
  from the tokenizer process, with `module = "sglang::request"`, the counts, id, model and
  `time_to_first_token`; its queue time is the `prefill_waiting` phase, a span of the
  scheduler process (`Phases`). An aborted request's span has no id or counts: recorded
  cancelled under its `rid`.
- Triton (`--trace-config mode=opentelemetry`, scope `triton-server`): under
  `InferRequest`, a span named after the model (`triton.model_name`), from REQUEST_START to
  REQUEST_END, whose child `compute` starts when the request left the queue. No token
  counts: such requests weigh by time. The models composing an ensemble
  (`triton.trace_parent_id` set) are inside their ensemble's request, not requests.

Each request occupies its GPUs from when it left the queue; the queue gets no energy, which
a proxy (which sees only arrival) cannot know.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.intake.validate import MAX_MODEL_LENGTH, label_text_problem, token_count_problem
from agent.requests import SAMPLING_FIELDS, RequestStatus, Sampling, sampling_of

VLLM_SPAN = "llm_request"
SGLANG_SCOPE = "sglang server"
TRITON_SCOPE = "triton-server"
_SGLANG_ROOT = re.compile(r"(?:prefill|decode)? Req ")
"""SGLang's request span: `" Req <rid[:8]>"` (unified), `"prefill Req …"`, `"decode Req …"`."""
_SAMPLING = tuple((name, f"gen_ai.request.{name}") for name in SAMPLING_FIELDS)
"""The OpenTelemetry GenAI attributes of a request's generation parameters, which vLLM and
SGLang set (vLLM only where they are not 0: a span without a temperature does not say
that it was greedy, so none is read)."""
_COUNTS = ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
           "gen_ai.response.model", *(key for _, key in _SAMPLING))
_VLLM_LATENCIES = ("gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token",
                   "gen_ai.latency.e2e")
_SGLANG_LATENCIES = ("gen_ai.latency.time_to_first_token",)
_VLLM_KEYS = frozenset((*_COUNTS, "gen_ai.request.id", *_VLLM_LATENCIES))
_SGLANG_KEYS = frozenset((*_COUNTS, "gen_ai.request.id", "rid", "module",
                          *_SGLANG_LATENCIES))
_TRITON_KEYS = frozenset(("triton.model_name", "triton.trace_parent_id", "triton.request_id"))
MAX_ID_LENGTH = 128


class TracedRequest(NamedTuple):
    """A request as its span tells it; times in wall-clock seconds since the epoch. (A
    tuple: one is made for every span taken, and a frozen dataclass costs a call per
    field to build.)"""

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
    status: RequestStatus = "ok"
    """"cancelled" for a request its server says it aborted."""
    sampling: Sampling | None = None


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


def attributes(pairs: Iterable[KeyValue], wanted: frozenset[str]) -> dict[str, Any]:
    """The scalar attributes (string, bool, int, double) of the `wanted` keys, by key (a
    span carries many that are not read); others are left out."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key = pair.key
        if key in wanted:
            value = pair.value
            kind = value.WhichOneof("value")
            if kind == "int_value":  # the commonest first: this runs for every attribute
                found[key] = value.int_value
            elif kind == "double_value":
                found[key] = value.double_value
            elif kind == "string_value":
                found[key] = value.string_value
            elif kind == "bool_value":
                found[key] = value.bool_value
    return found


class Phases:
    """The phase spans that tell when a request left its server's queue, which servers
    export apart from the request's own span: SGLang's `prefill_waiting` (from a scheduler
    process, while the request span comes from the tokenizer process), Triton's `compute`
    (a child of the model span). Kept for the latest `MAX_REMEMBERED` requests, so that a
    phase exported in an earlier batch than its request still counts."""

    MAX_REMEMBERED = 100_000

    def __init__(self) -> None:
        self._exits: OrderedDict[bytes, int] = OrderedDict()

    SCOPES = frozenset((SGLANG_SCOPE, TRITON_SCOPE))
    """The instrumentation scopes whose spans may be such phases."""

    def note(self, span: Span, scope: str) -> None:
        """Remembers `span` if it is such a phase."""
        if scope == SGLANG_SCOPE and span.name == "prefill_waiting":
            self._keep(span.trace_id, span.end_time_unix_nano)
        elif scope == TRITON_SCOPE and span.name == "compute":
            self._keep(span.trace_id + span.parent_span_id, span.start_time_unix_nano)

    def queue_exit(self, key: bytes) -> int | None:
        """When the request of `key` (SGLang: its trace id; Triton: its trace and model
        span ids) left the queue, in wall-clock ns, if its phase came."""
        return self._exits.get(key)

    def _keep(self, key: bytes, ns: int) -> None:
        self._exits[key] = ns
        if len(self._exits) > self.MAX_REMEMBERED:
            self._exits.popitem(last=False)


def read_span(span: Span, scope: str, phases: Phases) -> TracedRequest | Ignored | Rejected:
    """What `span` (of the instrumentation scope `scope`) says, if it is a request of a
    server this module knows."""
    if span.name == VLLM_SPAN:
        return _vllm(span, attributes(span.attributes, _VLLM_KEYS))
    if scope == SGLANG_SCOPE and _SGLANG_ROOT.match(span.name):
        return _sglang(span, attributes(span.attributes, _SGLANG_KEYS), phases)
    if scope == TRITON_SCOPE and span.name not in ("InferRequest", "compute"):
        return _triton(span, attributes(span.attributes, _TRITON_KEYS), phases)
    return Ignored("not_a_request")


def _vllm(span: Span, attrs: Mapping[str, Any]) -> TracedRequest | Rejected:
    latencies = _latencies(attrs, _VLLM_LATENCIES)
    if isinstance(latencies, Rejected):
        return latencies
    start = span.start_time_unix_nano / 1e9
    queued, ttft, e2e = latencies
    return _traced(
        span, attrs.get("gen_ai.request.id"), attrs,
        scheduled=None if queued is None else start + queued,
        first_token=None if ttft is None else start + ttft,
        end=None if e2e is None else start + e2e)


def _sglang(span: Span, attrs: Mapping[str, Any], phases: Phases
            ) -> TracedRequest | Ignored | Rejected:
    if attrs.get("module") != "sglang::request":
        return Ignored("not_a_request")  # a KV-transfer context's root span, say
    latencies = _latencies(attrs, _SGLANG_LATENCIES)
    if isinstance(latencies, Rejected):
        return latencies
    (ttft,) = latencies
    start = span.start_time_unix_nano / 1e9
    left_queue = phases.queue_exit(span.trace_id)
    # A request aborted before it finished has no gen_ai.request.id (nor counts): its rid.
    request_id = attrs.get("gen_ai.request.id", attrs.get("rid"))
    return _traced(span, request_id, attrs,
                   scheduled=None if left_queue is None else left_queue / 1e9,
                   first_token=None if ttft is None else start + ttft,
                   cancelled="gen_ai.request.id" not in attrs)


def _triton(span: Span, attrs: Mapping[str, Any], phases: Phases
            ) -> TracedRequest | Ignored | Rejected:
    model = attrs.get("triton.model_name")
    if not isinstance(model, str):
        return Ignored("not_a_request")  # a backend's custom span
    if attrs.get("triton.trace_parent_id", 0) != 0:
        return Ignored("composing_model")  # inside an ensemble's (or BLS) request
    request_id = attrs.get("triton.request_id") or (
        f"triton-{span.trace_id.hex()}-{span.span_id.hex()}")
    left_queue = phases.queue_exit(span.trace_id + span.span_id)
    return _traced(span, request_id, {"gen_ai.response.model": model},
                   scheduled=None if left_queue is None else left_queue / 1e9)


def _latencies(attrs: Mapping[str, Any], keys: tuple[str, ...]
               ) -> tuple[float | None, ...] | Rejected:
    """The seconds of the `gen_ai.latency.*` attributes `keys`, each None where absent."""
    found = tuple(map(attrs.get, keys))
    for key, value in zip(keys, found, strict=True):
        if value is not None and not (type(value) in (int, float) and 0 <= value < 1e7):
            return Rejected("bad_times", f"{key} = {value!r}")  # NaN fails the range too
    return found


def _traced(span: Span, request_id: Any, attrs: Mapping[str, Any], *,
            scheduled: float | None = None, first_token: float | None = None,
            end: float | None = None, cancelled: bool = False) -> TracedRequest | Rejected:
    """The request of `span`, checked: its id, times in order, counts (from `attrs`)."""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_LENGTH:
        return Rejected("bad_id", f"{span.name!r} span without a usable request id")
    if not span.start_time_unix_nano or span.end_time_unix_nano < span.start_time_unix_nano:
        return Rejected("bad_times", f"{span.name!r} span with no start, or an end before "
                                     "its start")
    start = span.start_time_unix_nano / 1e9
    end = span.end_time_unix_nano / 1e9 if end is None else end
    latest = end if first_token is None else first_token
    if (first_token is not None and first_token > end) or (scheduled is not None and not (
            start <= scheduled <= latest)):
        return Rejected("bad_times", f"{span.name!r} span whose times are out of order "
                                     "(arrival <= queue exit <= first token <= end)")
    prompt = attrs.get("gen_ai.usage.prompt_tokens")
    completion = attrs.get("gen_ai.usage.completion_tokens")
    for name, value in (("prompt_tokens", prompt), ("completion_tokens", completion)):
        if value is not None and token_count_problem(value) is not None:
            return Rejected("bad_tokens", f"{span.name!r} span with gen_ai.usage.{name} = "
                                          f"{value!r}")
    model = attrs.get("gen_ai.response.model")
    if model is not None and label_text_problem(model, MAX_MODEL_LENGTH) is not None:
        model = None
    sampling = sampling_of({field: attrs[key] for field, key in _SAMPLING if key in attrs})
    return TracedRequest(request_id, model, start, scheduled, first_token, end, prompt,
                         completion, "cancelled" if cancelled else "ok", sampling)
