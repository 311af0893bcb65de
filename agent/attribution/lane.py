"""The per-timeline sweep: one lane (a GPU, or the host) credits its intervals' energy.

Walking every active request for every interval would cost O(intervals × active requests).
Instead, each timeline ("lane") keeps, per energy part, the cumulative energy per unit of
weight since the lane was last empty, Λ(t), and each request's lifetime is cut into
segments of constant rates (prompt tokens/s, and completion tokens/s or 1/s for `equal`).
A segment [a, b) then receives ρ · (Λ(b) − Λ(a)), summed over its rates, so an interval
costs O(1) plus O(1) per segment boundary inside it, and a request costs O(segments) per
GPU. Prompt tokens have a Λ of their own, whose slope carries the interval's prefill
weight, so the weight can change from one interval to the next without touching the
segments already scheduled. The total weight of an interval comes from the sums of the
active rates, kept with compensated summation so that energy is conserved even when rates
differ by many orders of magnitude.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from agent.attribution.learners import SATURATION_FRACTION, IdleBaseline, PrefillWeightLearner
from agent.numeric import CompensatedSum
from agent.requests import Request
from agent.timeline import EnergyPoint, Timeline


def static_share(energy_j: float, idle_w: float, seconds: float) -> float:
    """The static part of `energy_j` measured over `seconds`: min(ΔE, P_idle × Δt).

    The rest of the energy is dynamic. The cap keeps the dynamic part from going negative
    where the board drew less than its idle baseline (a low percentile of idle power, which
    some stretches fall below)."""
    return min(energy_j, idle_w * seconds)


class IntervalObserver(Protocol):
    def __call__(self, t0: float, t1: float, energy_j: float, idle_w: float | None,
                 serving: bool, *, requests_j: float = 0.0) -> None:
        """A measured interval (t0, t1] of `energy_j`, with the lane's idle baseline then;
        `serving`: requests occupied some of it; `requests_j`: what they received of it."""


class Segment(NamedTuple):
    """A stretch of a request's lifetime with constant weight rates."""

    prompt_rate: float
    """Prompt tokens per second, weighed by the interval's prefill weight."""
    rate: float
    """Completion tokens per second. Under the equal policy both rates are 0 and every
    interval is split by time."""
    fallback: bool
    """Token counts unknown: weighs its overlap × the interval's mean known token rate."""
    queue_aware: bool = False
    """Its request's server said when it left its queue (`Request.scheduled`), so the
    segment starts when its work did, not when it arrived."""


BY_TIME = Segment(0.0, 0.0, False)
FALLBACK = Segment(0.0, 0.0, True)


class _PerWeight(NamedTuple):
    """Energy per unit of weight, as (static, dynamic) pairs: per prompt token, per unit of
    rate weight, per second of a known segment, per second of a fallback segment. Λ is one
    (cumulative since the lane was last empty); an interval's step, the slope of Λ in it,
    is another."""

    prompt_static: float = 0.0
    prompt_dynamic: float = 0.0
    rate_static: float = 0.0
    rate_dynamic: float = 0.0
    known_static: float = 0.0
    known_dynamic: float = 0.0
    fallback_static: float = 0.0
    fallback_dynamic: float = 0.0

    def after(self, step: _PerWeight, seconds: float) -> _PerWeight:
        """Λ after `seconds` at the slope `step`."""
        pairs = zip(self, step, strict=True)
        return _PerWeight._make(lam + slope * seconds for lam, slope in pairs)


_NO_STEP = _PerWeight()
"""The slope of Λ in an interval that gives nothing to anyone."""


class _Usage(NamedTuple):
    """What the active requests did during one interval."""

    prompt_tokens: float
    """Prompt tokens processed (unweighted)."""
    completion_tokens: float
    known_s: float
    """Request-seconds of segments with known token counts."""
    fallback_s: float
    """Request-seconds of segments with unknown token counts."""
    empty_s: float
    """Seconds during which no request was active."""
    unaware_s: float = 0.0
    """Request-seconds of segments that are not queue-aware."""


@dataclass(slots=True, eq=False)
class Pending:
    """A request accepted by the engine and not yet final, with its energy so far."""

    request: Request
    late: bool
    expired: bool = False
    lanes_left: int = 0
    """Lanes that have not yet processed the request's whole lifetime."""
    gpu_static_j: float = 0.0
    gpu_dynamic_j: float = 0.0
    host_j: float = 0.0


@dataclass(slots=True, eq=False)
class _Membership:
    """A closed request on one lane: its segment now active and the Λ marks it started at."""

    pending: Pending
    events_left: int
    active: Segment | None = None
    mark_static: float = 0.0
    mark_dynamic: float = 0.0


SATURATION_WINDOW_S = 2.0
"""Time constant over which a board's saturation (its dynamic energy ÷ what its work costs
alone) is measured for queue-aware intervals: long enough that spreading each request's
tokens evenly over its phases, which moves tokens between neighbouring intervals, washes
out; short enough to follow the load."""

_TIME_RESOLUTION_S = 1e-6
"""Rate changes closer than this to an interval's end are at its end (see `_offset`)."""

class _Event(NamedTuple):
    """A rate change: a member's segment ending and the next one starting (either None).
    `sequence` orders changes at the same time and keeps the heap from comparing members."""

    time: float
    sequence: int
    member: _Membership
    ending: Segment | None
    starting: Segment | None


class Lane:
    """Sweeps one timeline (a GPU, or the host) and credits its energy to requests."""

    def __init__(
        self, timeline: Timeline, *, host: bool, idle_w: float | None,
        idle_learner: IdleBaseline | None, prefill: float | PrefillWeightLearner | None,
        power_limit_w: Callable[[], float | None] | None = None,
        on_interval: IntervalObserver | None = None,
    ) -> None:
        """`prefill` is a fixed prefill weight, a learner of it, or None to split by time.
        `power_limit_w`: the board's power limit now, for the learner. `on_interval` is
        told of every measured interval as it is processed (the workload view)."""
        self.timeline = timeline
        self.on_interval = on_interval
        self.power_limit_w = power_limit_w
        self.host = host
        self.configured_idle_w = idle_w
        self.idle_learner = idle_learner
        self.fixed_prefill_weight = prefill if isinstance(prefill, float) else None
        self.weight_learner = prefill if isinstance(prefill, PrefillWeightLearner) else None
        self.origin: float | None = None
        """Time of the first point: nothing before it was measured."""
        self.cursor: EnergyPoint | None = None
        """The last processed point."""
        self.open_starts: dict[str, float] = {}
        """Start times of the open requests that use this lane: they block processing."""
        self._events: list[_Event] = []
        self._members: dict[str, _Membership] = {}
        self._prompt_rate = CompensatedSum()
        self._rate = CompensatedSum()
        self._prompting = 0
        """Active segments with a positive prompt rate."""
        self._weighted = 0
        """Active segments with a positive rate."""
        self._known = 0
        self._fallback = 0
        self._unaware = 0
        """Active segments that are not queue-aware."""
        self._lam = _PerWeight()
        """Λ since the lane was last empty."""
        self._recent_dynamic_j = 0.0
        self._recent_alone_j = 0.0
        """Dynamic energy of the latest queue-aware intervals and what their tokens cost
        alone, exponentially weighted over `SATURATION_WINDOW_S`."""
        self.measured_j = 0.0
        self.unattributed_j = 0.0
        self.attributed_static_j = 0.0
        self.attributed_dynamic_j = 0.0

    @property
    def idle_w(self) -> float | None:
        if self.configured_idle_w is not None:
            return self.configured_idle_w
        return self.idle_learner.value if self.idle_learner is not None else None

    @property
    def alone_costs_j(self) -> tuple[float, float] | None:
        """Dynamic joules of a prompt and of a completion token, where measured on requests
        running alone."""
        return self.weight_learner.alone_costs_j if self.weight_learner is not None else None

    @property
    def prefill_weight(self) -> float | None:
        """The weight of a prompt token in this lane's next interval; None splits by time."""
        if self.fixed_prefill_weight is not None:
            return self.fixed_prefill_weight
        return self.weight_learner.value if self.weight_learner is not None else None

    def processed_overlap(self, start: float, end: float | None) -> bool:
        """Whether [start, end) overlaps an interval this lane has already processed."""
        if self.cursor is None or self.origin is None:
            return False
        return max(start, self.origin) < min(math.inf if end is None else end, self.cursor.time)

    def join(
        self, pending: Pending, segments: list[tuple[float, float, Segment]],
        seq: Iterator[int],
    ) -> bool:
        """Schedule a closed request's segments; False if this lane has nothing to give it."""
        if not segments or self.timeline.latest() is None:
            return False
        if self.cursor is not None:
            floor = self.cursor.time
            segments = [(max(a, floor), b, s) for a, b, s in segments if b > floor]
            if not segments:
                return False
        member = _Membership(pending, len(segments) + 1)
        events = self._events
        previous: Segment | None = None
        for a, _, segment in segments:
            heapq.heappush(events, _Event(a, next(seq), member, previous, segment))
            previous = segment
        heapq.heappush(events, _Event(segments[-1][1], next(seq), member, previous, None))
        self._members[pending.request.id] = member
        return True

    def advance(self, horizon: float, finished: list[Pending]) -> None:
        """Process every interval that ends at or before `horizon`."""
        if self.cursor is None:
            points = self.timeline.after(-math.inf)
            if not points:
                return
            self.cursor, points = points[0], points[1:]
            self.origin = self.cursor.time
        else:
            points = self.timeline.after(self.cursor.time)
        for point in points:
            if point.time > horizon:
                break
            self._interval(self.cursor, point, finished)
            self.cursor = point

    def drop(self, finished: list[Pending]) -> None:
        """The timeline has stalled: finalise the waiting requests with what was measured."""
        for member in self._members.values():
            if member.active is not None:
                static, dynamic = self._value(member.active, _NO_STEP, 0.0)
                self._credit(member, static - member.mark_static, dynamic - member.mark_dynamic)
            self._leave_lane(member, finished)
        self._members.clear()
        self._events.clear()
        self._reset_sweep()

    def _interval(self, p0: EnergyPoint, p1: EnergyPoint, finished: list[Pending]) -> None:
        t0, t1 = p0.time, p1.time
        dt = t1 - t0
        events: list[_Event] = []
        while self._events and self._events[0].time <= t1:
            events.append(heapq.heappop(self._events))

        # Weight integrals over the interval, from the rates at t0 and each change inside it
        # (events come in time order, so the stretches with nothing active add up too).
        prompt_w = self._prompt_rate.value * dt
        rate_w = self._rate.value * dt
        known_s = self._known * dt
        fallback_s = self._fallback * dt
        unaware_s = self._unaware * dt
        offsets = [_offset(event.time, t0, dt) for event in events]  # as credits will use them
        empty_s = since = 0.0
        for offset, (_, _, _, ending, starting) in zip(offsets, events, strict=True):
            if self._known + self._fallback == 0:
                empty_s += offset - since
            since = offset
            left = dt - offset
            for segment, sign in ((ending, -1), (starting, 1)):
                if segment is None:
                    continue
                if segment.prompt_rate > 0:
                    self._prompting += sign
                    _change(self._prompt_rate, sign * segment.prompt_rate, self._prompting)
                    prompt_w += sign * segment.prompt_rate * left
                if segment.rate > 0:
                    self._weighted += sign
                    _change(self._rate, sign * segment.rate, self._weighted)
                    rate_w += sign * segment.rate * left
                if segment.fallback:
                    self._fallback += sign
                    fallback_s += sign * left
                else:
                    self._known += sign
                    known_s += sign * left
                if not segment.queue_aware:
                    self._unaware += sign
                    unaware_s += sign * left
        if self._known + self._fallback == 0:
            empty_s += dt - since
        usage = _Usage(max(prompt_w, 0.0), max(rate_w, 0.0), max(known_s, 0.0),
                       max(fallback_s, 0.0), min(empty_s, dt), max(unaware_s, 0.0))
        step = self._step(p0, p1, usage)

        for offset, (_, _, member, ending, starting) in zip(offsets, events, strict=True):
            if ending is not None:
                static, dynamic = self._value(ending, step, offset)
                self._credit(member, static - member.mark_static, dynamic - member.mark_dynamic)
            member.active = starting
            if starting is not None:
                member.mark_static, member.mark_dynamic = self._value(starting, step, offset)
            member.events_left -= 1
            if member.events_left == 0:
                del self._members[member.pending.request.id]
                self._leave_lane(member, finished)

        if self._known + self._fallback == 0:
            self._reset_sweep()  # nothing holds a mark: rebase Λ to keep it small
        else:
            self._lam = self._lam.after(step, dt)

    def _step(self, p0: EnergyPoint, p1: EnergyPoint, usage: _Usage) -> _PerWeight:
        """Energy per unit weight (the slope of Λ) in this interval; counts its energy."""
        if p1.gap:
            self._interrupt_learners()
            return _NO_STEP
        energy = p1.energy_j - p0.energy_j
        seconds = p1.time - p0.time
        self.measured_j += energy
        idle_w = None if self.host else self.idle_w
        weight = self.prefill_weight  # before this interval teaches the learner anything
        alone_costs = self.alone_costs_j
        self._learn_prefill_weight(energy, seconds, idle_w, usage)
        occupied_s = usage.known_s + usage.fallback_s
        if occupied_s <= 0:
            if self.on_interval is not None:
                self.on_interval(p0.time, p1.time, energy, idle_w, False)
            self.unattributed_j += energy
            if self.idle_learner is not None:
                self.idle_learner.idle(energy, seconds)
            return _NO_STEP
        if self.idle_learner is not None:
            self.idle_learner.interrupt()
        empty_j = static_share(energy, idle_w, usage.empty_s) if idle_w is not None else 0.0
        if self.on_interval is not None:
            self.on_interval(p0.time, p1.time, energy, idle_w, True,
                             requests_j=energy - empty_j)
        static = 0.0
        if idle_w is not None:
            self.unattributed_j += empty_j
            energy -= empty_j
            static = static_share(energy, idle_w, seconds - usage.empty_s)
        dynamic = energy - static
        if (weight is not None and alone_costs is not None and usage.fallback_s <= 0
                and usage.unaware_s <= 0 and usage.known_s > 0):
            prompt_cost, completion_cost = alone_costs
            keep = math.exp(-seconds / SATURATION_WINDOW_S)
            self._recent_dynamic_j = self._recent_dynamic_j * keep + dynamic
            self._recent_alone_j = self._recent_alone_j * keep + (
                prompt_cost * usage.prompt_tokens + completion_cost * usage.completion_tokens)
            saturation = (min(1.0, self._recent_dynamic_j / self._recent_alone_j)
                          if self._recent_alone_j > 0 else 1.0)
            return _queue_aware_step(static, dynamic, usage, prompt_cost * saturation)
        if weight is not None:
            tokens = weight * usage.prompt_tokens + usage.completion_tokens
            mean_rate = tokens / usage.known_s if usage.known_s > 0 else 1.0
            total = tokens + mean_rate * usage.fallback_s
            if total > 0:
                s, d, fb = static / total, dynamic / total, mean_rate / total
                return _PerWeight(
                    prompt_static=weight * s, prompt_dynamic=weight * d,
                    rate_static=s, rate_dynamic=d,
                    fallback_static=static * fb, fallback_dynamic=dynamic * fb,
                )
        per_s_static, per_s_dynamic = static / occupied_s, dynamic / occupied_s
        return _PerWeight(
            known_static=per_s_static, known_dynamic=per_s_dynamic,
            fallback_static=per_s_static, fallback_dynamic=per_s_dynamic,
        )

    def _learn_prefill_weight(
        self, energy: float, seconds: float, idle_w: float | None, usage: _Usage
    ) -> None:
        learner = self.weight_learner
        if learner is None:
            return
        if idle_w is None or usage.fallback_s > 0:
            learner.interrupt()  # no dynamic energy to fit, or tokens it cannot count
            return
        limit_w = self.power_limit_w() if self.power_limit_w is not None else None
        limit_j = (SATURATION_FRACTION * limit_w - idle_w) * seconds if limit_w else math.inf
        learner.observe(energy - idle_w * seconds, usage.prompt_tokens, usage.completion_tokens,
                        seconds - usage.empty_s, seconds, limit_j, usage.known_s)

    def _interrupt_learners(self) -> None:
        if self.idle_learner is not None:
            self.idle_learner.interrupt()
        if self.weight_learner is not None:
            self.weight_learner.interrupt()

    def _value(self, segment: Segment, step: _PerWeight, offset: float) -> tuple[float, float]:
        """ρ·Λ summed over the segment's rates, at `offset` seconds into the current interval."""
        lam = self._lam
        if segment.fallback:
            per_s_static = lam.fallback_static + step.fallback_static * offset
            per_s_dynamic = lam.fallback_dynamic + step.fallback_dynamic * offset
        else:
            per_s_static = lam.known_static + step.known_static * offset
            per_s_dynamic = lam.known_dynamic + step.known_dynamic * offset
        p, r = segment.prompt_rate, segment.rate
        return (
            p * (lam.prompt_static + step.prompt_static * offset)
            + r * (lam.rate_static + step.rate_static * offset) + per_s_static,
            p * (lam.prompt_dynamic + step.prompt_dynamic * offset)
            + r * (lam.rate_dynamic + step.rate_dynamic * offset) + per_s_dynamic,
        )

    def _credit(self, member: _Membership, static: float, dynamic: float) -> None:
        pending = member.pending
        if self.host:
            pending.host_j += static + dynamic
        else:
            pending.gpu_static_j += static
            pending.gpu_dynamic_j += dynamic
        self.attributed_static_j += static
        self.attributed_dynamic_j += dynamic

    @staticmethod
    def _leave_lane(member: _Membership, finished: list[Pending]) -> None:
        member.pending.lanes_left -= 1
        if member.pending.lanes_left == 0:
            finished.append(member.pending)

    def _reset_sweep(self) -> None:
        self._prompt_rate.clear()
        self._rate.clear()
        self._prompting = self._weighted = self._known = self._fallback = self._unaware = 0
        self._lam = _PerWeight()


def _queue_aware_step(static: float, dynamic: float, usage: _Usage, prompt_cost: float
                      ) -> _PerWeight:
    """The split of an interval whose requests all started when their server began on them
    (the tokens policy, where the GPU's costs of a token alone are measured:
    `PrefillWeightLearner.alone_costs_j`).

    Static energy by presence: the idle baseline is the price of holding the board, which
    every running request pays alike, whatever it computes. Dynamic energy: each prompt
    token `prompt_cost` (its cost alone, scaled by the board's saturation: a board that
    draws less than its work would cost alone, nearing its power limit, charges all of it
    less), at most the interval's dynamic energy, and what is left to the completion
    tokens. An interval of only prefill gives it all to the prompt tokens, one of only
    decode to the completion tokens."""
    per_s_static = static / usage.known_s
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt > 0 and completion > 0:
        prompt_j = min(prompt_cost * prompt, dynamic)
        return _PerWeight(known_static=per_s_static, prompt_dynamic=prompt_j / prompt,
                          rate_dynamic=(dynamic - prompt_j) / completion)
    if prompt > 0:
        return _PerWeight(known_static=per_s_static, prompt_dynamic=dynamic / prompt)
    if completion > 0:
        return _PerWeight(known_static=per_s_static, rate_dynamic=dynamic / completion)
    return _PerWeight(known_static=per_s_static, known_dynamic=dynamic / usage.known_s)


def _offset(time: float, t0: float, dt: float) -> float:
    """Seconds from t0 to a rate change in the interval [t0, t0 + dt], snapped to either end
    within `_TIME_RESOLUTION_S`. An interval's total weight is its rates × dt corrected by
    ρ × (dt − offset) at each change, so a stretch of float noise (a request that ends at
    3.8000000000000003 against a point at 3.8) would be a difference of two nearly equal
    numbers: if it were all that was active, its weight would carry a large relative error
    and so would the energy credited for it, breaking conservation."""
    offset = max(time - t0, 0.0)
    if offset < _TIME_RESOLUTION_S:
        return 0.0
    if dt - offset < _TIME_RESOLUTION_S:
        return dt
    return offset


def _change(rates: CompensatedSum, delta: float, remaining: int) -> None:
    """Add a segment's rate to a sum of active rates, or remove it."""
    if remaining:
        rates.add(delta)
    else:
        rates.clear()  # no rounding residue may outlive the last rate

