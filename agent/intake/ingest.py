"""The ingest API: custom inference servers report their own requests (docs/design.md §6).

`POST /api/v1/events` takes a batch of events as JSON:

    {"clock": "monotonic" | "wall",          # optional, "monotonic" by default
     "events": [
       {"type": "start", "id": "r1", "model": "llama-8b", "gpus": [0, 1], "time": 812.5},
       {"type": "end", "id": "r1", "time": 814.0, "first_token_time": 812.9,
        "prompt_tokens": 12, "completion_tokens": 80, "status": "ok",
        "scheduled_time": 812.6},             # optional: when the server began on it
       {"type": "request", "id": "r2", "model": "llama-8b", "gpus": ["GPU-5d1f..."],
        "start": 812.0, "end": 813.1, ...}]}

`tokens_estimated: true` on an end or request event says that its token counts are the
server's estimate, not its tokenizer's figures. `scheduled_time`, where a server knows it,
is when it took the request from its queue: the time before it gets none of the request's
energy (it goes to what the GPU did then).
A start or request event may also say the generation parameters the request asked for
(`max_tokens`, `temperature`, `top_p`, `n`, each optional), which the report breaks
energy down by.

Times are `time.monotonic()` seconds of this host: CLOCK_MONOTONIC is shared by every
process of one Linux host, so a server on the node sends its own monotonic times and no
clock is converted. A client elsewhere sends epoch seconds with `"clock": "wall"`; they are
converted with the offset between the two clocks at the time of the POST.

Every event is checked on its own: a bad one gets an error entry naming its index and the
field, and the good events of the same batch are still taken (answer 400 with the count),
so that a client never has to guess which part of a batch landed. A report whose time is far
from this host's clock is refused instead of attributed: it is almost always a server
sending wall-clock seconds as monotonic ones, or the reverse.

Events are applied on the event loop: each is one short engine call under the engine's
lock, and the cap on events per POST bounds how long one batch holds the loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.devices.base import GpuInfo
from agent.intake.access import refused
from agent.intake.client import EVENTS_PATH
from agent.intake.validate import (
    MAX_MODEL_LENGTH,
    BusyLimit,
    label_text_problem,
    show,
    token_count_problem,
)
from agent.requests import (
    SAMPLING_FIELDS,
    STATUSES,
    Request,
    Sampling,
    sampling_of,
    sampling_problem,
)

log = logging.getLogger(__name__)

SOURCE = "ingest"
"""`Request.source` of every request reported through this API."""

MAX_EVENTS = 10_000
"""Events per POST at most."""
MAX_ID_LENGTH = 128
DEFAULT_MAX_CONCURRENT = 32
"""POSTs handled at once by default; each may hold up to `max_body_bytes` while its body
arrives, so this bounds what a flood of connections can make the agent buffer."""
MAX_AHEAD_S = 60.0
MAX_BEHIND_S = 86_400.0
"""Accepted window of event times around this host's clock at the time of the POST."""

CLOCKS = ("monotonic", "wall")

_REQUIRED = {
    "start": ("id", "model", "gpus", "time"),
    "end": ("id", "time"),
    "request": ("id", "model", "gpus", "start", "end"),
}
_OPTIONAL_END = ("first_token_time", "scheduled_time", "prompt_tokens", "completion_tokens",
                 "status", "tokens_estimated")
_FIELDS = {
    "start": frozenset(("type", *_REQUIRED["start"], *SAMPLING_FIELDS)),
    "end": frozenset(("type", *_REQUIRED["end"], *_OPTIONAL_END)),
    "request": frozenset(("type", *_REQUIRED["request"], *_OPTIONAL_END, *SAMPLING_FIELDS)),
}
_NUMBER = (int, float)


class _Invalid(Exception):
    """One event's field is not acceptable."""

    def __init__(self, field: str, error: str) -> None:
        super().__init__(error)
        self.field = field
        self.error = error


def _uuid_key(uuid: str) -> str:
    """NVML writes `GPU-5d1f...`, PyTorch's device properties `5d1f...`: both are accepted."""
    uuid = uuid.strip().lower()
    return uuid.removeprefix("gpu-")


class _Window:
    """The accepted range of one batch's event times, in the sender's clock, and their
    conversion to this host's monotonic clock."""

    __slots__ = ("high", "low", "now", "offset")

    def __init__(self, now: float, offset: float) -> None:
        self.now = now
        self.offset = offset
        self.low = now + offset - MAX_BEHIND_S
        self.high = now + offset + MAX_AHEAD_S

    def time(self, event: dict[str, Any], name: str) -> float:
        value: Any = event.get(name)
        # The range check also refuses NaN and infinities.
        if type(value) in _NUMBER and self.low <= value <= self.high:
            return float(value - self.offset)
        if type(value) is int:
            value = float(value) if abs(value) < 1e300 else math.inf  # float() may overflow
        if type(value) is not float or not math.isfinite(value):
            raise _Invalid(name, f"expected a finite number of seconds, got {show(value)}")
        raise _Invalid(name, (
            f"{value - self.offset - self.now:+.0f} s away from this host's clock: monotonic "
            'times must come from time.monotonic() on this host; send epoch seconds with '
            '"clock": "wall"'
        ))


class EventIntake:
    """Validates batches of events and applies them to the engine, as requests of `source`:
    the ingest API's, or a proxy worker's (`agent.intake.proxy.channel`)."""

    def __init__(
        self,
        engine: AttributionEngine,
        gpus: list[GpuInfo],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        source: str = SOURCE,
    ) -> None:
        measured = set(engine.totals().gpus)
        if missing := sorted(info.index for info in gpus if info.index not in measured):
            raise ValueError(f"GPU(s) {missing} have no timeline in the attribution engine")
        self._engine = engine
        self._source = source
        self._clock = clock
        self._wall_clock = wall_clock
        self._indices = frozenset(info.index for info in gpus)
        self._uuids = {_uuid_key(info.uuid): info.index for info in gpus}
        self._listing = ", ".join(str(info.index) for info in gpus)
        self._uuid_listing = ", ".join(f"{info.index} = {info.uuid}" for info in gpus)
        self.retry_after_s = max(1, math.ceil(engine.longest_settle_s))
        """Pending requests become final only after the engine's settle: sooner, a retry fails
        too."""

    def take(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON answer for one POST body."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return 400, _refusal("body", f"not valid JSON: {exc}")
        if type(document) is not dict:
            return 400, _refusal("body", 'expected a JSON object {"events": [...]}')
        if unknown := sorted(set(document) - {"clock", "events"}):
            return 400, _refusal(unknown[0], "unknown field (known: clock, events)")
        clock = document.get("clock") or "monotonic"
        if clock not in CLOCKS:
            return 400, _refusal("clock", f"expected monotonic or wall, got {show(clock)}")
        events = document.get("events")
        if type(events) is not list:
            return 400, _refusal("events", f"expected a list of events, got {show(events)}")
        if len(events) > MAX_EVENTS:
            return 400, _refusal(
                "events", f"{len(events)} events in one POST; at most {MAX_EVENTS}"
            )
        now = self._clock()
        offset = self._wall_clock() - now if clock == "wall" else 0.0
        return self._apply(events, _Window(now, offset))

    def apply_each(self, events: list[Any]) -> list[tuple[Any, str]]:
        """Applies each event (monotonic times) on its own, an engine at capacity refusing
        only the events it meets, and returns those refused with why. For a proxy worker's
        events: a request the engine cannot take is proxied unmeasured, and the ends of
        those it took must land all the same."""
        window = _Window(self._clock(), 0.0)
        refused: list[tuple[Any, str]] = []
        for event in events:
            try:
                self._event(event, window)
            except (_Invalid, CapacityExceeded) as exc:
                refused.append((event, str(exc)))
        return refused

    def _apply(self, events: list[Any], window: _Window) -> tuple[int, dict[str, Any]]:
        accepted = 0
        errors: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            try:
                self._event(event, window)
            except _Invalid as exc:
                errors.append({"index": index, "field": exc.field, "error": exc.error})
            except CapacityExceeded as exc:
                errors.append({"index": index, "field": None, "error": str(exc)})
                return 429, {"accepted": accepted, "errors": errors, "retry_from": index}
            else:
                accepted += 1
        return (400 if errors else 200), {"accepted": accepted, "errors": errors}

    def _event(self, event: Any, window: _Window) -> None:
        if type(event) is not dict:
            raise _Invalid("event", f"expected a JSON object, got {show(event)}")
        kind: Any = event.get("type")
        allowed = _FIELDS.get(kind) if type(kind) is str else None
        if allowed is None:
            raise _Invalid("type", f"expected start, end or request, got {show(kind)}")
        if not allowed.issuperset(event):
            unknown = sorted(set(event) - allowed)[0]
            raise _Invalid(unknown, f"unknown field for a {kind} event "
                                    f"(known: {', '.join(sorted(allowed))})")
        for name in _REQUIRED[kind]:
            if event.get(name) is None:
                raise _Invalid(name, f"required for a {kind} event")
        request_id = _string(event, "id", MAX_ID_LENGTH)
        if kind == "end":
            self._end(event, request_id, window)
            return
        model = _string(event, "model", MAX_MODEL_LENGTH)
        gpus = self._gpus(event["gpus"])
        sampling = _sampling(event)
        if kind == "start":
            request = Request(request_id, model, self._source, gpus,
                              window.time(event, "time"), sampling=sampling)
        else:
            start = window.time(event, "start")
            end = window.time(event, "end")
            if end < start:
                raise _Invalid("end", "the request ends before it starts")
            first_token = _time_within(event, "first_token_time", start, end, window)
            scheduled = _time_within(event, "scheduled_time", start,
                                     end if first_token is None else first_token, window)
            request = Request(
                request_id, model, self._source, gpus, start, end, first_token,
                _tokens(event, "prompt_tokens"), _tokens(event, "completion_tokens"),
                _status(event), scheduled, _estimated(event), sampling=sampling,
            )
        try:
            self._engine.add(request)
        except ValueError as exc:  # GPUs and times are checked above: a duplicate id
            raise _Invalid("id", str(exc)) from None

    def _end(self, event: dict[str, Any], request_id: str, window: _Window) -> None:
        end = window.time(event, "time")
        first_token = _time_within(event, "first_token_time", -math.inf, end, window)
        scheduled = _time_within(event, "scheduled_time", -math.inf,
                                 end if first_token is None else first_token, window)
        try:
            found = self._engine.end(
                request_id, end, first_token=first_token,
                prompt_tokens=_tokens(event, "prompt_tokens"),
                completion_tokens=_tokens(event, "completion_tokens"),
                status=_status(event), scheduled=scheduled,
                tokens_estimated=_estimated(event),
            )
        except ValueError as exc:
            # Only the engine knows the start, and its message says what is out of place.
            message = str(exc)
            field = ("scheduled_time" if "scheduled" in message else
                     "first_token_time" if "first token" in message else "time")
            raise _Invalid(field, message) from None
        if not found:
            raise _Invalid("id", f"no open request {show(request_id)}: never started, "
                                 "already ended, or closed at the maximum age")

    def _gpus(self, value: Any) -> tuple[int, ...]:
        if type(value) is not list or not value:
            raise _Invalid("gpus", f"expected a non-empty list of GPU indices or UUIDs, "
                                   f"got {show(value)}")
        if len(value) == 1:
            return (self._gpu(value[0]),)
        indices = tuple([self._gpu(gpu) for gpu in value])
        if len(set(indices)) != len(indices):
            raise _Invalid("gpus", f"names a GPU twice: {show(value)}")
        return indices

    def _gpu(self, gpu: Any) -> int:
        if type(gpu) is int:
            if gpu in self._indices:
                return gpu
            raise _Invalid("gpus", f"GPU {gpu} is not on this node (GPUs: {self._listing})")
        if type(gpu) is str:
            index = self._uuids.get(_uuid_key(gpu))
            if index is not None:
                return index
            raise _Invalid("gpus", f"GPU {show(gpu)} is not on this node "
                                   f"(GPUs: {self._uuid_listing})")
        raise _Invalid("gpus", f"expected a GPU index or UUID, got {show(gpu)}")


def _string(event: dict[str, Any], name: str, limit: int) -> str:
    value = event[name]
    problem = label_text_problem(value, limit)
    if problem is not None:
        raise _Invalid(name, problem)
    return cast(str, value)


_WITHIN = {"first_token_time": "the request's lifetime [start, end]",
           "scheduled_time": "[start, first token (or end)]"}


def _time_within(event: dict[str, Any], name: str, start: float, end: float,
                 window: _Window) -> float | None:
    """The optional time `name` of `event`, which must lie in [start, end]."""
    if event.get(name) is None:
        return None
    value = window.time(event, name)
    if not start <= value <= end:
        raise _Invalid(name, f"outside {_WITHIN[name]}")
    return value


def _tokens(event: dict[str, Any], name: str) -> int | None:
    value = event.get(name)
    if value is None:
        return None
    problem = token_count_problem(value)
    if problem is not None:
        raise _Invalid(name, problem)
    return cast(int, value)


def _sampling(event: dict[str, Any]) -> Sampling | None:
    """The event's generation parameters, each checked (a bad one is the client's error,
    named); None where it gives none."""
    for name in SAMPLING_FIELDS:
        value = event.get(name)
        if value is not None and (problem := sampling_problem(name, value)) is not None:
            raise _Invalid(name, problem)
    return sampling_of(event)


def _status(event: dict[str, Any]) -> Any:
    value = event.get("status")
    if value is None:
        return "ok"
    if value not in STATUSES:  # a list or dict is simply not among them
        raise _Invalid("status", f"expected one of {', '.join(STATUSES)}, got {show(value)}")
    return value


def _estimated(event: dict[str, Any]) -> bool:
    value = event.get("tokens_estimated", False)
    if type(value) is not bool:
        raise _Invalid("tokens_estimated", f"expected true or false, got {show(value)}")
    return value


def _refusal(field: str | None, error: str) -> dict[str, Any]:
    """The answer to a POST refused as a whole: same shape as per-event errors, no index."""
    return {"accepted": 0, "errors": [{"field": field, "error": error}]}


def ingest_app(
    engine: AttributionEngine,
    gpus: list[GpuInfo],
    *,
    token: str | None,
    max_body_bytes: int,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> web.Application:
    """`POST /api/v1/events` into `engine`; see the module docstring for the protocol.

    `gpus` are the GPUs that a request may name, by index or UUID. With `token` set, every
    POST must carry `Authorization: Bearer <token>`. At most `max_concurrent` POSTs are
    handled at once; any further one is answered 503 with Retry-After at once, unread,
    instead of queueing: with the engine full (429) and the connections many, memory then
    stays within `max_concurrent × max_body_bytes` of request bodies.
    """
    limit = BusyLimit(max_concurrent)
    intake = EventIntake(engine, gpus, clock, wall_clock)

    unauthorized = json.dumps(_refusal("Authorization", "a valid bearer token is required"))

    async def events(request: web.Request) -> web.Response:
        if (refusal := refused(request, token, unauthorized.encode(), "application/json")
                ) is not None:
            return refusal
        if limit.full:
            return limit.answer(
                _refusal(None, f"{max_concurrent} POSTs are being handled already; retry later"))
        with limit.slot():
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return web.json_response(_refusal(
                    "body", f"larger than {max_body_bytes} bytes (ingest.max_body_bytes); "
                            "send smaller batches"), status=413)
        status, answer = intake.take(body)
        headers = {"Retry-After": str(intake.retry_after_s)} if status == 429 else None
        return web.json_response(answer, status=status, headers=headers)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_post(EVENTS_PATH, events)
    return app
