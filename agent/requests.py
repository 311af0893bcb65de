"""The request model that every intake path (proxy, ingest API, ...) hands to attribution.

Times are `time.monotonic()` seconds, the clock the sampler stamps energy readings with, so
that a request's lifetime and the energy timeline can be compared directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

RequestStatus = Literal["ok", "cancelled", "failed"]
Split = Literal["time", "weighted", "queue-aware", "counts-unknown"]
SPLITS: tuple[Split, ...] = get_args(Split)
STATUSES: tuple[RequestStatus, ...] = get_args(RequestStatus)
MAX_TOKENS = 2**53
"""Largest token count taken: beyond it a count no longer converts to a float exactly."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """The generation parameters a request asked for, where its intake saw them (the
    proxy in the request body, a span's attributes, an ingest event): what the report
    breaks energy down by. Never the request's text."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "n")
MAX_TEMPERATURE = 100.0
"""Largest temperature taken (servers accept up to 2, some more; none sensibly 100)."""


_WHOLE_FROM = {"max_tokens": 0, "n": 1}
_NUMBER_UP_TO = {"temperature": MAX_TEMPERATURE, "top_p": 1.0}


def _whole(value: Any, least: int) -> int | None:
    return value if type(value) is int and least <= value <= MAX_TOKENS else None


def _number(value: Any, highest: float) -> float | None:
    return float(value) if type(value) in (int, float) and 0 <= value <= highest else None


def sampling_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the `Sampling` field `name`; None where it is fine."""
    if name in _WHOLE_FROM:
        if _whole(value, _WHOLE_FROM[name]) is None:
            return f"expected a whole number in {_WHOLE_FROM[name]}..{MAX_TOKENS}, got {value!r}"
        return None
    if _number(value, _NUMBER_UP_TO[name]) is None:
        return f"expected a number in [0, {_NUMBER_UP_TO[name]:g}], got {value!r}"
    return None


def sampling_of(values: Mapping[str, Any]) -> Sampling | None:
    """The `Sampling` of the fields of `values` that are fine (others are left out: a
    request body is the server's to judge); None where none is. Runs for every span the
    trace receiver takes, so it reads each field once."""
    get = values.get
    max_tokens = _whole(get("max_tokens"), _WHOLE_FROM["max_tokens"])
    n = _whole(get("n"), _WHOLE_FROM["n"])
    temperature = _number(get("temperature"), _NUMBER_UP_TO["temperature"])
    top_p = _number(get("top_p"), _NUMBER_UP_TO["top_p"])
    if max_tokens is None and temperature is None and top_p is None and n is None:
        return None
    return Sampling(max_tokens, temperature, top_p, n)


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request: when it ran, on which GPUs, and what it processed.

    `end` is None while the request is running. Token counts and `first_token` are None
    where the intake path could not learn them; attribution then falls back to weighting
    by time (see `agent.attribution`).
    """

    id: str
    model: str
    source: str
    """Which intake path reported it, e.g. "ingest" or "proxy:vllm"."""
    gpus: tuple[int, ...]
    """Indices of the GPUs that served it; never empty."""
    start: float
    end: float | None = None
    first_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: RequestStatus = "ok"
    scheduled: float | None = None
    """When the server began to work on it, where the server says (llama.cpp `timings`,
    Ollama's durations): the time before it was queued in the server and gets no energy.
    None: taken to be `start`."""
    tokens_estimated: bool = False
    """The token counts are the intake's estimate (content chunks counted), not the
    server's own figures."""
    sampling: Sampling | None = None
    """The generation parameters it asked for, where the intake saw them."""

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError(f"request {self.id!r}: its GPU set is empty (unknown GPUs)")
        if len(self.gpus) > 1 and len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"request {self.id!r}: GPU set {self.gpus} names a GPU twice")
        if self.status not in STATUSES:
            raise ValueError(f"request {self.id!r}: unknown status {self.status!r}")
        if self.end is not None and self.end < self.start:
            raise ValueError(f"request {self.id!r}: ends ({self.end}) before it starts")
        latest = self.end if self.end is not None else math.inf
        if self.first_token is not None and not self.start <= self.first_token <= latest:
            raise ValueError(f"request {self.id!r}: first token outside its lifetime")
        if self.scheduled is not None and not self.start <= self.scheduled <= min(
                latest, math.inf if self.first_token is None else self.first_token):
            raise ValueError(f"request {self.id!r}: scheduled outside [start, first token]")
        for name, value in (("prompt_tokens", self.prompt_tokens),
                            ("completion_tokens", self.completion_tokens)):
            if value is not None and not 0 <= value <= MAX_TOKENS:
                raise ValueError(f"request {self.id!r}: {name} outside 0..{MAX_TOKENS}")


class BoundaryEnergy:
    """The boundary totals of a request's energy components, defined once for every type
    that holds the components (`RequestEnergy`, and `agent.store.StoredRequest` as stored):
    `gpu` = gpu_dynamic + gpu_static, `it` = gpu + host."""

    __slots__ = ()
    gpu_dynamic_j: float
    gpu_static_j: float
    host_j: float

    @property
    def gpu_j(self) -> float:
        return self.gpu_dynamic_j + self.gpu_static_j

    @property
    def it_j(self) -> float:
        return self.gpu_j + self.host_j


@dataclass(frozen=True, slots=True)
class RequestEnergy(BoundaryEnergy):
    """The final energy figures of one request, in joules, at the four boundaries
    (docs/design.md §3)."""

    request: Request
    gpu_dynamic_j: float
    gpu_static_j: float
    host_j: float
    facility_j: float
    """Facility overhead: `it_j × (PUE − 1)`."""
    late: bool = False
    """Reported after some of its lifetime had already been attributed to others: the
    figures cover only the part that was still unprocessed."""
    expired: bool = False
    """Still running at the maximum age: the figures cover its first `max_age_s` seconds
    and `request.end` stays None."""
    split: Split = "time"
    """How its GPU split the intervals it ran in, as the rule stood when the request became
    final (`agent.attribution`): by time, weighted by tokens, queue-aware, or as an average
    request where its counts are unknown."""
    prefill_weight: float | None = None
    """The prefill weight its GPU used then; None where it split by time."""
