"""Attribution: splits each GPU's and the host's measured energy among inference requests.

The rules are those of DESIGN.md §4:

- Each interval between two consecutive points of a timeline has energy ΔE, unless its later
  point is a gap (then nothing is attributed and nothing counted). With no active request,
  all of ΔE is unattributed. On a GPU, the idle-baseline energy of the part of the interval
  when no request was active, `min(ΔE, P_idle × empty_s)`, is unattributed too: energy with
  no active request belongs to nobody, inside an interval as between intervals. The rest
  splits into a static part `min(rest, P_idle × occupied_s)` and a dynamic part (what is
  left); host energy has no static part. Both parts go to the requests active in the
  interval in proportion to their weight.
- `equal` policy: a request weighs its overlap with the interval, in seconds.
- `tokens` policy: a request weighs the tokens it processed in the interval, its prompt
  tokens × the prefill weight spread uniformly over [start, first token) and its completion
  tokens over [first token, end). Where the first token does not split the lifetime in two
  (unknown, or at either end), both counts are spread over [start, end). Where a token count
  is unknown, the request weighs its overlap times the mean token rate of the requests with
  known tokens in the same interval (or plain overlap if there are none): it is assumed to
  be an average request, instead of mixing seconds and tokens. If every active request
  weighs zero (all token counts zero), the interval is split by overlap.
- Prefill weight: a fixed number, or `"auto"` (the default), which measures it per GPU as
  the ratio of dynamic energy per prompt token to dynamic energy per completion token
  (`_PrefillWeightLearner`). Until a GPU's weight has first been measured, its intervals are
  split by overlap, as under `equal`: a prompt token costs one to two orders of magnitude
  less than a generated one on current hardware, so a guessed weight such as 1.0 would hand
  most of a busy interval to whichever request is in prefill, whereas time is a neutral
  proxy. Once measured, the last measured weight is held while the load (a board at its
  power limit, say) does not let it be measured again. The weight in use applies to the
  intervals processed while it is in use: figures already credited stay as they are, and
  since weights only split an interval's energy, conservation holds whatever the weight
  does. The host, which has no idle baseline to separate dynamic energy from, splits by
  overlap under `"auto"`.
- Idle power: configured per GPU, or learned as a low percentile of the power of stretches
  with no active request. Until something is learned it is taken as 0 W, so all GPU energy
  counts as dynamic: the IT total is exact either way and only the static/dynamic split
  waits for a measurement, whereas any guessed baseline would be a silent error.
  `idle_power_w()` returns None until then, so exporters can show that it is not known.

When intervals are processed: an interval is processed once it has settled (its end is at
least `settle_s` old, so that batched start events have arrived) and every request that
overlaps it has ended; a request still open after `max_age_s` is closed at
`start + max_age_s` and marked expired. A request is final once every timeline it uses
has been processed past its end; a timeline with no point for `max_age_s` is considered
stalled and its waiting requests are finalised with what was measured. A request reported
after intervals it overlapped were processed gets only the unprocessed part (`late`).

Implementation. Walking every active request for every interval would cost
O(intervals × active requests). Instead, each timeline ("lane") keeps, per energy part,
the cumulative energy per unit of weight since the lane was last empty, Λ(t), and each
request's lifetime is cut into segments of constant rates (prompt tokens/s, and completion
tokens/s or 1/s for `equal`). A segment [a, b) then receives ρ · (Λ(b) − Λ(a)), summed over
its rates, so an interval costs O(1) plus O(1) per segment boundary inside it, and a
request costs O(segments) per GPU. Prompt tokens have a Λ of their own, whose slope carries
the interval's prefill weight, so the weight can change from one interval to the next
without touching the segments already scheduled. The total weight of an interval comes
from the sums of the active rates, kept with compensated summation so that energy is
conserved even when rates differ by many orders of magnitude.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from agent.numeric import CompensatedSum
from agent.requests import Request, RequestEnergy, RequestStatus
from agent.timeline import EnergyPoint, Timeline
from agent.units import check_pue

Policy = Literal["equal", "tokens"]

PrefillWeight = float | Literal["auto"]

DEFAULT_PREFILL_WEIGHT: PrefillWeight = "auto"
"""Measure the weight on the node's own hardware. A fixed number is a guess about the model,
the board, the batch size and the serving engine all at once; the measurement is not."""

SATURATION_FRACTION = 0.95
"""A learner's sample whose mean power is at least this fraction of the board's power limit
is left out of the fit: there the firmware lowers clocks to hold the power, so energy stops
following the work done and the fit would learn nothing but noise."""

PREFILL_WEIGHT_BOUNDS = (1e-3, 1.0)
"""The range of a plausible measured prefill weight; a fit outside it is not trusted. Above 1:
a prompt token carries the same matrix FLOPs as a generated one and prefill runs them in
large, compute-bound batches, so it never costs more. Below 1e-3: fast prefill (~50,000
tokens/s on an H100-class board) against slow single-stream decode (~50 tokens/s) at similar
power gives ~1e-3, so anything lower is not a property of prefill but a fit that found no
marginal cost of prompt tokens (a board saturated at its power limit, where more work does
not draw more power)."""


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


class _Segment(NamedTuple):
    """A stretch of a request's lifetime with constant weight rates."""

    prompt_rate: float
    """Prompt tokens per second, weighed by the interval's prefill weight."""
    rate: float
    """Completion tokens per second. Under the equal policy both rates are 0 and every
    interval is split by time."""
    fallback: bool
    """Token counts unknown: weighs its overlap × the interval's mean known token rate."""


_BY_TIME = _Segment(0.0, 0.0, False)
_FALLBACK = _Segment(0.0, 0.0, True)
_NO_STEP = (0.0,) * 8
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


@dataclass(slots=True, eq=False)
class _Pending:
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

    pending: _Pending
    events_left: int
    active: _Segment | None = None
    mark_static: float = 0.0
    mark_dynamic: float = 0.0


_TIME_RESOLUTION_S = 1e-6
"""Rate changes closer than this to an interval's end are at its end (see `_offset`)."""

_Event = tuple[float, int, _Membership, _Segment | None, _Segment | None]
"""(time, sequence, membership, segment ending, segment starting): a rate change."""


class _IdleBaseline:
    """Learns a GPU's idle power from stretches with no active request.

    Consecutive idle intervals are pooled into samples of at least `sample_s` seconds,
    because the energy of one ~100 ms window is unreliable (the counter updates every
    20–100 ms; the power sensor covers a fraction of each period). The baseline is the
    `percentile`-th of the last `window` samples, kept sorted so that a sample costs
    O(log n) comparisons instead of a sort.
    """

    def __init__(self, sample_s: float, window: int, percentile: float) -> None:
        self.sample_s = sample_s
        self.percentile = percentile
        self._recent: deque[float] = deque()
        self._window = window
        self._sorted: list[float] = []
        self._energy_j = 0.0
        self._seconds = 0.0
        self.value: float | None = None

    def idle(self, energy_j: float, seconds: float) -> None:
        self._energy_j += energy_j
        self._seconds += seconds
        if self._seconds >= self.sample_s:
            self._add(self._energy_j / self._seconds)
            self.interrupt()

    def interrupt(self) -> None:
        """A busy or unmeasured interval ends the current idle stretch."""
        self._energy_j = self._seconds = 0.0

    def _add(self, power_w: float) -> None:
        if len(self._recent) == self._window:
            oldest = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(power_w)
        bisect.insort(self._sorted, power_w)
        rank = max(0, math.ceil(self.percentile / 100 * len(self._sorted)) - 1)
        self.value = self._sorted[rank]


class _PrefillWeightLearner:
    """Measures a GPU's prefill weight: dynamic energy per prompt token ÷ per completion token.

    Samples. Each pools consecutive intervals into at least `sample_s` seconds and gives the
    dynamic energy E (above the idle baseline, including that of empty stretches, so that
    the pooled figure is exact), the prompt tokens P and completion tokens D processed in
    it, and T, the seconds when some request was active. Pooling matters: one ~100 ms
    interval's energy is unreliable, and the counter refreshes up to one period after the
    work it counts, which moves energy across the boundary between a prefill interval and
    the decode interval after it. A sample whose mean power was within
    `SATURATION_FRACTION` of the board's power limit is left out (it would teach the fit
    that work costs nothing), and so is one with no tokens.

    Fit. E ≈ a·P + b·D by least squares over exponentially weighted samples (time constant
    `window` samples, so that the weight follows changes of batch size or model), kept as
    running sums of products: O(1) memory and work per sample. Both coefficients are kept
    non-negative (where the unconstrained optimum has a < 0, the best fit with a = 0), and
    the weight is a / b.

    Trust. `value` is None (intervals are split by time) until a window first measures the
    weight, which it can when:
    - it has seen at least `min_samples` samples;
    - P and D vary independently: weight × (1 − r²), with r their (uncentred) correlation,
      is at least `min_samples / 3`, that many samples' worth of variation of P that D does
      not explain. With one request at a time, samples are mostly pure decode or hold one
      prefill, which is ideal; where every request has the same shape, P and D grow
      together and no fit can tell them apart;
    - tokens explain the energy better than busy time does: the fit's residual variance
      (per degree of freedom) is below that of E ≈ c·T. A board held at its power limit
      draws the same power whatever it runs, so its energy follows time, not tokens: the
      ratio of such a fit is noise, and splitting by time is what the measurement supports;
    - the ratio is within `PREFILL_WEIGHT_BOUNDS`.

    Hold. Once measured, `value` keeps the last trusted weight while the window cannot
    measure it. Saturation is the common case: a board at its power limit lowers its clocks
    for all the work it runs alike, so the relative cost of a prompt and a completion token
    measured below the limit still says how to share the energy at the limit, whereas
    splitting by time there would give a request in prefill the weight of one in decode.
    The weight in use is exported (`jouleprobe_gpu_prefill_weight_ratio`); a fresh agent
    that meets saturation before any measurement splits by time until the load drops.
    """

    def __init__(self, sample_s: float, window: int, min_samples: int) -> None:
        self.sample_s = sample_s
        self.min_samples = min_samples
        self._keep = 1.0 - 1.0 / window
        self._pool = [0.0] * 6  # energy, prompt and completion tokens, busy s, seconds, limit
        self._sums = [0.0] * 9  # weight, then the products named in `_estimate`
        self._count = 0
        self.value: float | None = None

    def observe(
        self, dynamic_j: float, prompt: float, completion: float, busy_s: float, seconds: float,
        limit_j: float = math.inf,
    ) -> None:
        """One interval: its dynamic energy, tokens, busy and whole seconds, and the dynamic
        energy at which it would be at the board's power limit (inf where unknown)."""
        pool = self._pool
        pool[0] += dynamic_j
        pool[1] += prompt
        pool[2] += completion
        pool[3] += busy_s
        pool[4] += seconds
        pool[5] += limit_j
        if pool[4] >= self.sample_s * (1 - 1e-9):  # ten 0.1 s intervals make one second
            energy, p, d, t, _, limit = pool
            self.interrupt()
            if (p > 0 or d > 0) and energy < limit:  # idle or at the limit: says nothing
                self._add(energy, p, d, t)

    def interrupt(self) -> None:
        """An interval that cannot be used (a gap, unknown token counts, no idle baseline)
        ends the current sample, so that no sample holds energy it has no tokens for."""
        self._pool = [0.0] * 6

    def _add(self, e: float, p: float, d: float, t: float) -> None:
        keep, sums = self._keep, self._sums
        self._count += 1
        for i, x in enumerate((1.0, p * p, p * d, d * d, p * e, d * e, e * e, t * t, t * e)):
            sums[i] = sums[i] * keep + x
        estimate = self._estimate()
        if estimate is not None:
            self.value = estimate

    def _estimate(self) -> float | None:
        """a / b of the non-negative least-squares fit, or None where it is not trusted."""
        n, pp, pd, dd, pe, de, ee, tt, te = self._sums
        if self._count < self.min_samples or pp <= 0 or dd <= 0 or tt <= 0:
            return None
        det = pp * dd - pd * pd
        if n * det / (pp * dd) < self.min_samples / 3:
            return None
        a = (dd * pe - pd * de) / det
        b = (pp * de - pd * pe) / det
        if a < 0:
            a, b = 0.0, de / dd
        if b <= 0:  # decode costs nothing, or energy fell below the baseline: not a ratio
            return None
        tokens_rss = ee - 2 * (a * pe + b * de) + a * a * pp + 2 * a * b * pd + b * b * dd
        time_rss = ee - te * te / tt
        if tokens_rss / (n - 2) >= time_rss / (n - 1):
            return None
        low, high = PREFILL_WEIGHT_BOUNDS
        return a / b if low <= a / b <= high else None


class _Lane:
    """Sweeps one timeline (a GPU, or the host) and credits its energy to requests."""

    def __init__(
        self, timeline: Timeline, *, host: bool, idle_w: float | None,
        idle_learner: _IdleBaseline | None, prefill: float | _PrefillWeightLearner | None,
        power_limit_w: Callable[[], float | None] | None = None,
    ) -> None:
        """`prefill` is a fixed prefill weight, a learner of it, or None to split by time.
        `power_limit_w`: the board's power limit now, for the learner."""
        self.timeline = timeline
        self.power_limit_w = power_limit_w
        self.host = host
        self.configured_idle_w = idle_w
        self.idle_learner = idle_learner
        self.fixed_prefill_weight = prefill if isinstance(prefill, float) else None
        self.weight_learner = prefill if isinstance(prefill, _PrefillWeightLearner) else None
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
        self._lam = [0.0] * 8
        """Λ since the lane was last empty, as (static, dynamic) pairs: per prompt token,
        per unit of rate weight, per second of a known segment, per second of a fallback
        segment."""
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
        self, pending: _Pending, segments: list[tuple[float, float, _Segment]],
        seq: Iterator[int],
    ) -> bool:
        """Schedule a closed request's segments; False if this lane has nothing to give it."""
        if self.timeline.latest() is None:
            return False
        floor = self.cursor.time if self.cursor is not None else -math.inf
        clipped = [(max(a, floor), b, s) for a, b, s in segments if b > floor]
        if not clipped:
            return False
        member = _Membership(pending, events_left=len(clipped) + 1)
        previous: _Segment | None = None
        for a, _, segment in clipped:
            heapq.heappush(self._events, (a, next(seq), member, previous, segment))
            previous = segment
        heapq.heappush(self._events, (clipped[-1][1], next(seq), member, previous, None))
        self._members[pending.request.id] = member
        return True

    def advance(self, horizon: float, finished: list[_Pending]) -> None:
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

    def drop(self, finished: list[_Pending]) -> None:
        """The timeline has stalled: finalise the waiting requests with what was measured."""
        for member in self._members.values():
            if member.active is not None:
                static, dynamic = self._value(member.active, _NO_STEP, 0.0)
                self._credit(member, static - member.mark_static, dynamic - member.mark_dynamic)
            self._leave_lane(member, finished)
        self._members.clear()
        self._events.clear()
        self._reset_sweep()

    def _interval(self, p0: EnergyPoint, p1: EnergyPoint, finished: list[_Pending]) -> None:
        t0, t1 = p0.time, p1.time
        dt = t1 - t0
        events: list[_Event] = []
        while self._events and self._events[0][0] <= t1:
            events.append(heapq.heappop(self._events))

        # Weight integrals over the interval, from the rates at t0 and each change inside it
        # (events come in time order, so the stretches with nothing active add up too).
        prompt_w = self._prompt_rate.value * dt
        rate_w = self._rate.value * dt
        known_s = self._known * dt
        fallback_s = self._fallback * dt
        offsets = [_offset(time, t0, dt) for time, *_ in events]  # as credits will use them
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
        if self._known + self._fallback == 0:
            empty_s += dt - since
        usage = _Usage(max(prompt_w, 0.0), max(rate_w, 0.0), max(known_s, 0.0),
                       max(fallback_s, 0.0), min(empty_s, dt))
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
            for i, lam in enumerate(step):
                self._lam[i] += lam * dt

    def _step(self, p0: EnergyPoint, p1: EnergyPoint, usage: _Usage) -> tuple[float, ...]:
        """Energy per unit weight (the slope of Λ) in this interval; counts its energy."""
        if p1.gap:
            self._interrupt_learners()
            return _NO_STEP
        energy = p1.energy_j - p0.energy_j
        seconds = p1.time - p0.time
        self.measured_j += energy
        idle_w = None if self.host else self.idle_w
        weight = self.prefill_weight  # before this interval teaches the learner anything
        self._learn_prefill_weight(energy, seconds, idle_w, usage)
        occupied_s = usage.known_s + usage.fallback_s
        if occupied_s <= 0:
            self.unattributed_j += energy
            if self.idle_learner is not None:
                self.idle_learner.idle(energy, seconds)
            return _NO_STEP
        if self.idle_learner is not None:
            self.idle_learner.interrupt()
        static = 0.0
        if idle_w is not None:
            empty_j = min(energy, idle_w * usage.empty_s)
            self.unattributed_j += empty_j
            energy -= empty_j
            static = min(energy, idle_w * (seconds - usage.empty_s))
        dynamic = energy - static
        if weight is not None:
            tokens = weight * usage.prompt_tokens + usage.completion_tokens
            mean_rate = tokens / usage.known_s if usage.known_s > 0 else 1.0
            total = tokens + mean_rate * usage.fallback_s
            if total > 0:
                s, d, fb = static / total, dynamic / total, mean_rate / total
                return (weight * s, weight * d, s, d, 0.0, 0.0, static * fb, dynamic * fb)
        per_s_static, per_s_dynamic = static / occupied_s, dynamic / occupied_s
        return (0.0, 0.0, 0.0, 0.0, per_s_static, per_s_dynamic, per_s_static, per_s_dynamic)

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
                        seconds - usage.empty_s, seconds, limit_j)

    def _interrupt_learners(self) -> None:
        if self.idle_learner is not None:
            self.idle_learner.interrupt()
        if self.weight_learner is not None:
            self.weight_learner.interrupt()

    def _value(self, segment: _Segment, step: tuple[float, ...], offset: float) -> tuple[
        float, float
    ]:
        """ρ·Λ summed over the segment's rates, at `offset` seconds into the current interval."""
        lam = self._lam
        t = 6 if segment.fallback else 4
        p, r = segment.prompt_rate, segment.rate
        return (
            p * (lam[0] + step[0] * offset) + r * (lam[2] + step[2] * offset)
            + (lam[t] + step[t] * offset),
            p * (lam[1] + step[1] * offset) + r * (lam[3] + step[3] * offset)
            + (lam[t + 1] + step[t + 1] * offset),
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
    def _leave_lane(member: _Membership, finished: list[_Pending]) -> None:
        member.pending.lanes_left -= 1
        if member.pending.lanes_left == 0:
            finished.append(member.pending)

    def _reset_sweep(self) -> None:
        self._prompt_rate.clear()
        self._rate.clear()
        self._prompting = self._weighted = self._known = self._fallback = 0
        self._lam = [0.0] * 8


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


class AttributionEngine:
    """Splits measured energy among requests; see the module docstring for the rules.

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
        max_age_s: float = 300.0,
        max_pending: int = 10_000,
        idle_sample_s: float = 1.0,
        idle_window: int = 600,
        idle_percentile: float = 10.0,
        prefill_sample_s: float = 1.0,
        prefill_window: int = 600,
        prefill_min_samples: int = 30,
        power_limit_w: Callable[[int], float | None] | None = None,
    ) -> None:
        """`prefill_*` tune the learner of `prefill_weight="auto"`: seconds pooled into one
        sample, the time constant of its exponential forgetting (samples), and the samples
        needed before it is trusted (`_PrefillWeightLearner`). `power_limit_w`: a GPU's
        power limit now (`Sampler.power_limit_w`), None where unknown; the learner leaves
        out samples taken at the limit."""
        if policy not in ("equal", "tokens"):
            raise ValueError(f"unknown attribution policy {policy!r} (equal or tokens)")
        if prefill_weight != "auto" and (
            isinstance(prefill_weight, str) or not prefill_weight >= 0
        ):
            raise ValueError(f"prefill weight must be 'auto' or a number >= 0 "
                             f"(got {prefill_weight!r})")
        if prefill_sample_s <= 0 or not 3 <= prefill_min_samples < prefill_window:
            raise ValueError("prefill_sample_s > 0 and 3 <= prefill_min_samples < "
                             "prefill_window are required")
        check_pue(pue, "pue")
        if settle_s < 0 or max_age_s <= 0 or max_pending < 1:
            raise ValueError("settle_s >= 0, max_age_s > 0 and max_pending >= 1 are required")
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
        self.max_age_s = max_age_s
        self.max_pending = max_pending
        def prefill(host: bool) -> float | _PrefillWeightLearner | None:
            if policy == "equal":
                return None  # no segment has a prompt rate
            if prefill_weight != "auto":
                return float(prefill_weight)
            if host:
                return None  # no idle baseline to find the dynamic energy with: by time
            return _PrefillWeightLearner(prefill_sample_s, prefill_window, prefill_min_samples)

        self._gpus = {
            gpu: _Lane(
                timeline, host=False, idle_w=configured.get(gpu),
                idle_learner=None if gpu in configured
                else _IdleBaseline(idle_sample_s, idle_window, idle_percentile),
                prefill=prefill(host=False),
                power_limit_w=functools.partial(power_limit_w, gpu) if power_limit_w else None,
            )
            for gpu, timeline in timelines.items()
        }
        self._host = (
            _Lane(host_timeline, host=True, idle_w=None, idle_learner=None,
                  prefill=prefill(host=True))
            if host_timeline is not None else None
        )
        self._pending: dict[str, _Pending] = {}
        self._open: dict[str, _Pending] = {}
        self._ready: list[_Pending] = []
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
            request = replace(request)  # our own copy: the caller may reuse theirs
            lanes = self._lanes_of(request)
            pending = _Pending(
                request, late=any(lane.processed_overlap(request.start, request.end)
                                  for lane in lanes),
            )
            self._late += pending.late
            self._pending[request.id] = pending
            if request.end is None:
                self._open[request.id] = pending
                for lane in lanes:
                    lane.open_starts[request.id] = request.start
            else:
                self._close(pending, request.end)

    def end(
        self,
        request_id: str,
        end: float,
        *,
        first_token: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        status: RequestStatus = "ok",
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
            )
            self._unopen(pending)
            self._close(pending, end)
            return True

    def advance(self, now: float) -> list[RequestEnergy]:
        """Process every settled, unblocked interval; return the requests now final."""
        with self._lock:
            self._expire(now)
            finished, self._ready = self._ready, []
            settled = now - self.settle_s
            stalled = now - self.max_age_s
            lanes = list(self._gpus.values())
            if self._host is not None:
                lanes.append(self._host)
            for lane in lanes:
                lane.advance(min(settled, min(lane.open_starts.values(), default=math.inf)),
                             finished)
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

    def _lanes_of(self, request: Request) -> list[_Lane]:
        lanes = [self._gpus[gpu] for gpu in request.gpus]
        if self._host is not None:
            lanes.append(self._host)
        return lanes

    def _unopen(self, pending: _Pending) -> None:
        del self._open[pending.request.id]
        for lane in self._lanes_of(pending.request):
            del lane.open_starts[pending.request.id]

    def _expire(self, now: float) -> None:
        cutoff = now - self.max_age_s
        if not self._open or min(p.request.start for p in self._open.values()) > cutoff:
            return
        for pending in [p for p in self._open.values() if p.request.start <= cutoff]:
            self._unopen(pending)
            pending.expired = True
            self._expired += 1
            self._close(pending, pending.request.start + self.max_age_s)

    def _close(self, pending: _Pending, until: float) -> None:
        segments = self._segments(pending.request, until)
        for lane in self._lanes_of(pending.request):
            pending.lanes_left += lane.join(pending, segments, self._seq)
        if pending.lanes_left == 0:
            self._ready.append(pending)

    def _segments(self, request: Request, until: float) -> list[tuple[float, float, _Segment]]:
        """The request's lifetime [start, until) cut into stretches of constant weight rate."""
        start = request.start
        if until <= start:
            return []
        if self.policy == "equal":
            return [(start, until, _BY_TIME)]
        prompt, completion = request.prompt_tokens, request.completion_tokens
        if prompt is None or completion is None:
            return [(start, until, _FALLBACK)]
        first = request.first_token
        if first is not None and start < first < until:
            return [
                (start, first, _Segment(prompt / (first - start), 0.0, False)),
                (first, until, _Segment(0.0, completion / (until - first), False)),
            ]
        life = until - start
        return [(start, until, _Segment(prompt / life, completion / life, False))]

    def _final(self, pending: _Pending) -> RequestEnergy:
        del self._pending[pending.request.id]
        it_j = pending.gpu_dynamic_j + pending.gpu_static_j + pending.host_j
        return RequestEnergy(
            request=pending.request,
            gpu_dynamic_j=pending.gpu_dynamic_j,
            gpu_static_j=pending.gpu_static_j,
            host_j=pending.host_j,
            facility_j=it_j * (self.pue - 1),
            late=pending.late,
            expired=pending.expired,
        )
