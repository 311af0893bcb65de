"""The attribution engine: accepts requests, sweeps every lane, returns the final requests.

The rules it applies are those of `agent.attribution`.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from agent.attribution.lane import BY_TIME, FALLBACK, Lane, Pending, Segment
from agent.attribution.learners import IdleBaseline, PrefillWeightLearner
from agent.attribution.workloads import WorkloadAccounts
from agent.config import Policy, PrefillWeight
from agent.requests import Request, RequestEnergy, RequestStatus, Split
from agent.timeline import Timeline
from agent.units import check_pue

DEFAULT_PREFILL_WEIGHT: PrefillWeight = "auto"
"""Measure the weight on the node's own hardware. A fixed number is a guess about the model,
the board, the batch size and the serving engine all at once; the measurement is not."""


class CapacityExceeded(RuntimeError):
    """Too many requests are pending attribution; the new one was not accepted."""


@dataclass(frozen=True, slots=True)
class GpuTotals:
    """One GPU's energy processed so far, in joules."""

    gpu_dynamic_j: float
    gpu_static_j: float
    """Energy credited to requests. A request's share is credited when each of its weight
    segments ends, so until every request has finished this lags behind `measured_j`."""
    unattributed_j: float
    measured_j: float
    """Energy of every processed interval except gaps."""
    idle_power_w: float | None
    """The idle baseline in use (configured or learned); None while still unknown."""
    prefill_weight: float | None = None
    """The prefill weight in use under the tokens policy (configured, or learned); None
    under the equal policy, or while a learned weight is not yet trusted and intervals are
    split by time instead."""
    alone_costs_j: tuple[float, float] | None = None
    """Dynamic joules of a prompt and of a completion token measured on requests running
    alone, which queue-aware intervals use; None until measured (or not learned)."""


@dataclass(frozen=True, slots=True)
class HostTotals:
    attributed_j: float
    unattributed_j: float
    measured_j: float


@dataclass(frozen=True, slots=True)
class AttributionTotals:
    gpus: dict[int, GpuTotals]
    host: HostTotals | None
    pending_requests: int
    """Requests accepted and not yet final (open, or waiting for their intervals)."""
    late_requests: int
    expired_requests: int
    unknown_gpu_requests: int
    """Requests rejected because they named a GPU that is not measured on this node."""
    over_capacity_requests: int
    unmatched_ends: int
    """End events for a request that is not open (never started, or already expired)."""


class AttributionEngine:
    """Splits measured energy among requests; see `agent.attribution` for the rules.

    Requests come in through `add` (open, or complete in one go with `end` set) and `end`;
    the daemon calls `advance(now)` periodically from one thread and gets back the requests
    that became final. Every public method is safe to call from any thread.
    """

    def __init__(
        self,
        timelines: Mapping[int, Timeline],
        host_timeline: Timeline | None = None,
        *,
        policy: Policy = "equal",
        prefill_weight: PrefillWeight = DEFAULT_PREFILL_WEIGHT,
        pue: float = 1.0,
        idle_power_w: Mapping[int, float] | None = None,
        settle_s: float = 2.0,
        gpu_settle_s: Mapping[int, float] | None = None,
        max_age_s: float = 300.0,
        max_pending: int = 10_000,
        idle_sample_s: float = 1.0,
        idle_window: int = 600,
        idle_percentile: float = 10.0,
        prefill_sample_s: float = 1.0,
        prefill_window: int = 600,
        prefill_min_samples: int = 30,
        power_limit_w: Callable[[int], float | None] | None = None,
        workloads: WorkloadAccounts | None = None,
    ) -> None:
        """`prefill_*` tune the learner of `prefill_weight="auto"`: seconds pooled into one
        sample, the time constant of its exponential forgetting (samples), and the samples
        needed before it is trusted (`PrefillWeightLearner`). `power_limit_w`: a GPU's
        power limit now (`Sampler.power_limit_w`), None where unknown; the learner leaves
        out samples taken at the limit. `gpu_settle_s`: GPUs whose intervals wait longer
        than `settle_s` (those fed by a trace source wait for its spans); the host, which
        every request shares, waits as long as the longest. `workloads`: the workload view,
        told of every GPU interval as the lanes process it."""
        if policy not in ("equal", "tokens"):
            raise ValueError(f"unknown attribution policy {policy!r} (equal or tokens)")
        if prefill_weight != "auto" and not (
            isinstance(prefill_weight, int | float) and prefill_weight >= 0
        ):
            raise ValueError(f"prefill weight must be 'auto' or a number >= 0 "
                             f"(got {prefill_weight!r})")
        if prefill_sample_s <= 0 or not 3 <= prefill_min_samples < prefill_window:
            raise ValueError("prefill_sample_s > 0 and 3 <= prefill_min_samples < "
                             "prefill_window are required")
        check_pue(pue, "pue")
        if settle_s < 0 or max_age_s <= 0 or max_pending < 1:
            raise ValueError("settle_s >= 0, max_age_s > 0 and max_pending >= 1 are required")
        longer = dict(gpu_settle_s or {})
        if unknown := sorted(set(longer) - set(timelines)):
            raise ValueError(f"settle configured for GPU(s) {unknown} with no timeline")
        if any(not seconds >= 0 for seconds in longer.values()):
            raise ValueError("a GPU's settle must be >= 0 seconds")
        if idle_sample_s <= 0 or idle_window < 1 or not 0 < idle_percentile <= 100:
            raise ValueError("idle_sample_s > 0, idle_window >= 1, 0 < idle_percentile <= 100")
        configured = dict(idle_power_w or {})
        if unknown := sorted(set(configured) - set(timelines)):
            raise ValueError(f"idle power configured for GPU(s) {unknown} with no timeline")
        if any(watts < 0 for watts in configured.values()):
            raise ValueError("idle power must not be negative")

        self.policy = policy
        self.prefill_weight = prefill_weight
        self.pue = pue
        self.settle_s = settle_s
        """What an interval waits for late request reports, on a GPU with no longer wait."""
        self.gpu_settle_s = {gpu: max(settle_s, longer.get(gpu, 0.0)) for gpu in timelines}
        self.longest_settle_s = max([settle_s, *self.gpu_settle_s.values()])
        """What the host's intervals wait, and so the longest any request waits to be final."""
        self.max_age_s = max_age_s
        self.max_pending = max_pending
        def prefill(host: bool) -> float | PrefillWeightLearner | None:
            if policy == "equal":
                return None  # no segment has a prompt rate
            if prefill_weight != "auto":
                return float(prefill_weight)
            if host:
                return None  # no idle baseline to find the dynamic energy with: by time
            return PrefillWeightLearner(prefill_sample_s, prefill_window, prefill_min_samples)

        self._gpus = {
            gpu: Lane(
                timeline, host=False, idle_w=configured.get(gpu),
                idle_learner=None if gpu in configured
                else IdleBaseline(idle_sample_s, idle_window, idle_percentile),
                prefill=prefill(host=False),
                power_limit_w=functools.partial(power_limit_w, gpu) if power_limit_w else None,
                on_interval=functools.partial(workloads.interval, gpu) if workloads else None,
            )
            for gpu, timeline in timelines.items()
        }
        self._host = (
            Lane(host_timeline, host=True, idle_w=None, idle_learner=None,
                  prefill=prefill(host=True))
            if host_timeline is not None else None
        )
        self._pending: dict[str, Pending] = {}
        self._open: dict[str, Pending] = {}
        self._ready: list[Pending] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._late = 0
        self._expired = 0
        self._unknown_gpu = 0
        self._over_capacity = 0
        self._unmatched_ends = 0

    def add(self, request: Request) -> None:
        """Accept a request: running (`end` None) or already complete.

        Raises ValueError if it names a GPU this node does not measure or its id is already
        pending, and CapacityExceeded if `max_pending` requests are pending.
        """
        with self._lock:
            if unknown := [gpu for gpu in request.gpus if gpu not in self._gpus]:
                self._unknown_gpu += 1
                raise ValueError(
                    f"request {request.id!r} names GPU(s) {unknown}, which are not measured on "
                    f"this node (measured: {sorted(self._gpus)}); check the source's GPU set"
                )
            if request.id in self._pending:
                raise ValueError(f"request {request.id!r} is already pending")
            if len(self._pending) >= self.max_pending:
                self._over_capacity += 1
                raise CapacityExceeded(
                    f"{len(self._pending)} requests are pending attribution (max_pending); "
                    f"request {request.id!r} was not accepted"
                )
            lanes = self._lanes_of(request)
            late = False
            for lane in lanes:
                if lane.processed_overlap(request.start, request.end):
                    late = True
                    break
            pending = Pending(request, late)
            self._late += late
            self._pending[request.id] = pending
            if request.end is None:
                self._open[request.id] = pending
                for lane in lanes:
                    lane.open_starts[request.id] = request.start
            else:
                self._close(pending, request.end, lanes)

    def end(
        self,
        request_id: str,
        end: float,
        *,
        first_token: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        status: RequestStatus = "ok",
        scheduled: float | None = None,
        tokens_estimated: bool = False,
    ) -> bool:
        """Close an open request. Fields left None keep what `add` was given.

        Returns False, and counts it, if no such request is open (never added, or already
        closed at its maximum age). Raises ValueError for inconsistent times or counts.
        """
        with self._lock:
            pending = self._open.get(request_id)
            if pending is None:
                self._unmatched_ends += 1
                return False
            old = pending.request
            pending.request = replace(
                old,
                end=end,
                first_token=old.first_token if first_token is None else first_token,
                prompt_tokens=old.prompt_tokens if prompt_tokens is None else prompt_tokens,
                completion_tokens=(
                    old.completion_tokens if completion_tokens is None else completion_tokens
                ),
                status=status,
                scheduled=old.scheduled if scheduled is None else scheduled,
                tokens_estimated=tokens_estimated,
            )
            self._close(pending, end, self._unopen(pending))
            return True

    def advance(self, now: float) -> list[RequestEnergy]:
        """Process every settled, unblocked interval; return the requests now final."""
        with self._lock:
            self._expire(now)
            finished, self._ready = self._ready, []
            stalled = now - self.max_age_s
            lanes = [(lane, self.gpu_settle_s[gpu]) for gpu, lane in self._gpus.items()]
            if self._host is not None:
                lanes.append((self._host, self.longest_settle_s))
            for lane, settle_s in lanes:
                lane.advance(min(now - settle_s,
                                 min(lane.open_starts.values(), default=math.inf)), finished)
                latest = lane.timeline.latest()
                if latest is None or latest.time < stalled:
                    lane.drop(finished)
            return [self._final(pending) for pending in finished]

    def totals(self) -> AttributionTotals:
        with self._lock:
            host = self._host
            return AttributionTotals(
                gpus={
                    gpu: GpuTotals(
                        gpu_dynamic_j=lane.attributed_dynamic_j,
                        gpu_static_j=lane.attributed_static_j,
                        unattributed_j=lane.unattributed_j,
                        measured_j=lane.measured_j,
                        idle_power_w=lane.idle_w,
                        prefill_weight=lane.prefill_weight,
                        alone_costs_j=lane.alone_costs_j if self.policy == "tokens" else None,
                    )
                    for gpu, lane in self._gpus.items()
                },
                host=None if host is None else HostTotals(
                    attributed_j=host.attributed_static_j + host.attributed_dynamic_j,
                    unattributed_j=host.unattributed_j,
                    measured_j=host.measured_j,
                ),
                pending_requests=len(self._pending),
                late_requests=self._late,
                expired_requests=self._expired,
                unknown_gpu_requests=self._unknown_gpu,
                over_capacity_requests=self._over_capacity,
                unmatched_ends=self._unmatched_ends,
            )

    def idle_power_w(self, gpu: int) -> float | None:
        """The GPU's idle baseline: configured, learned, or None while still unknown."""
        with self._lock:
            return self._gpus[gpu].idle_w

    def _lanes_of(self, request: Request) -> list[Lane]:
        lanes = [self._gpus[gpu] for gpu in request.gpus]
        if self._host is not None:
            lanes.append(self._host)
        return lanes

    def _unopen(self, pending: Pending) -> list[Lane]:
        """Takes an open request off the open lists; returns its lanes."""
        del self._open[pending.request.id]
        lanes = self._lanes_of(pending.request)
        for lane in lanes:
            del lane.open_starts[pending.request.id]
        return lanes

    def _expire(self, now: float) -> None:
        cutoff = now - self.max_age_s
        if not self._open or min(p.request.start for p in self._open.values()) > cutoff:
            return
        for pending in [p for p in self._open.values() if p.request.start <= cutoff]:
            lanes = self._unopen(pending)
            pending.expired = True
            self._expired += 1
            self._close(pending, pending.request.start + self.max_age_s, lanes)

    def _close(self, pending: Pending, until: float, lanes: list[Lane]) -> None:
        segments = self._segments(pending.request, until)
        for lane in lanes:
            pending.lanes_left += lane.join(pending, segments, self._seq)
        if pending.lanes_left == 0:
            self._ready.append(pending)

    def _segments(self, request: Request, until: float) -> list[tuple[float, float, Segment]]:
        """The request's lifetime [start, until) cut into stretches of constant weight rate.

        Where the server said when it began on the request (`scheduled`), the time before
        it, queued in the server, has no weight: the energy of that time goes to what the
        GPU was doing instead."""
        start = request.start if request.scheduled is None else request.scheduled
        if until <= start:
            return []
        if self.policy == "equal":
            return [(start, until, BY_TIME)]
        prompt, completion = request.prompt_tokens, request.completion_tokens
        if prompt is None or completion is None:
            return [(start, until, FALLBACK)]
        first = request.first_token
        aware = request.scheduled is not None
        if first is not None and start < first < until:
            return [
                (start, first, Segment(prompt / (first - start), 0.0, False, aware)),
                (first, until, Segment(0.0, completion / (until - first), False, aware)),
            ]
        life = until - start
        return [(start, until, Segment(prompt / life, completion / life, False, aware))]

    def _final(self, pending: Pending) -> RequestEnergy:
        del self._pending[pending.request.id]
        it_j = pending.gpu_dynamic_j + pending.gpu_static_j + pending.host_j
        split, weight = self._split(pending.request)
        return RequestEnergy(
            request=pending.request,
            gpu_dynamic_j=pending.gpu_dynamic_j,
            gpu_static_j=pending.gpu_static_j,
            host_j=pending.host_j,
            facility_j=it_j * (self.pue - 1),
            late=pending.late,
            expired=pending.expired,
            split=split,
            prefill_weight=weight,
        )

    def _split(self, request: Request) -> tuple[Split, float | None]:
        """How the request's (first) GPU splits intervals now, and with what weight."""
        lane = self._gpus[request.gpus[0]]
        weight = lane.prefill_weight if self.policy == "tokens" else None
        if weight is None:
            return "time", None
        if request.prompt_tokens is None or request.completion_tokens is None:
            return "counts-unknown", weight
        if request.scheduled is not None and lane.alone_costs_j is not None:
            return "queue-aware", weight
        return "weighted", weight
