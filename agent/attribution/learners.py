"""What a GPU's own measurements teach the engine: its idle power and its prefill weight."""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

SATURATION_FRACTION = 0.95
"""A learner's sample whose mean power is at least this fraction of the board's power limit
is left out of the fit: there the firmware lowers clocks to hold the power, so energy stops
following the work done and the fit would learn nothing but noise."""

ALONE_CONCURRENCY = 1.5
"""A sample whose busy time held at most this many requests on average (request-seconds ÷
busy seconds) is one of requests running alone, from which a prompt token's own cost is
measured (`PrefillWeightLearner.prompt_cost_j`)."""

PREFILL_WEIGHT_BOUNDS = (1e-3, 1.0)
"""The range of a plausible measured prefill weight; a fit outside it is not trusted. Above 1:
a prompt token carries the same matrix FLOPs as a generated one and prefill runs them in
large, compute-bound batches, so it never costs more. Below 1e-3: fast prefill (~50,000
tokens/s on an H100-class board) against slow single-stream decode (~50 tokens/s) at similar
power gives ~1e-3, so anything lower is not a property of prefill but a fit that found no
marginal cost of prompt tokens (a board saturated at its power limit, where more work does
not draw more power)."""


class IdleBaseline:
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


@dataclass(slots=True)
class _PooledSample:
    """Consecutive intervals pooled into one sample of the prefill-weight fit."""

    dynamic_j: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    busy_s: float = 0.0
    request_s: float = 0.0
    """Request-seconds of the requests active in it: ÷ busy_s, their mean number."""
    seconds: float = 0.0
    limit_j: float = 0.0
    """The dynamic energy at which the pooled stretch would be at the board's power limit."""


@dataclass(slots=True)
class _FitSums:
    """The exponentially weighted sums the least-squares fit is computed from.

    Each field but `n` (the total weight of the samples) is a sum of products, named after
    its factors: p prompt tokens, d completion tokens, e dynamic energy, t busy seconds.
    """

    n: float = 0.0
    pp: float = 0.0
    pd: float = 0.0
    dd: float = 0.0
    pe: float = 0.0
    de: float = 0.0
    ee: float = 0.0
    tt: float = 0.0
    te: float = 0.0

    def add(self, keep: float, sample: _PooledSample) -> None:
        """Fade every sum by `keep`, then add the sample's terms."""
        e, p = sample.dynamic_j, sample.prompt_tokens
        d, t = sample.completion_tokens, sample.busy_s
        self.n = self.n * keep + 1.0
        self.pp = self.pp * keep + p * p
        self.pd = self.pd * keep + p * d
        self.dd = self.dd * keep + d * d
        self.pe = self.pe * keep + p * e
        self.de = self.de * keep + d * e
        self.ee = self.ee * keep + e * e
        self.tt = self.tt * keep + t * t
        self.te = self.te * keep + t * e


class PrefillWeightLearner:
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

    What a token costs alone. The same fit over only the samples of requests running
    alone (at most `ALONE_CONCURRENCY` on average) gives `alone_costs_j`, the dynamic
    joules of one prompt token and of one completion token, held once trusted as `value`
    is. Under continuous batching the weight fitted over every sample drifts low (decode
    tokens are spread evenly over a request's decode, but the steps that carry another
    request's prefill chunk are longer, so decode seems to cost what prefill did), while a
    prompt token processed alone costs what it costs in a batch below the power limit: its
    compute does not share. `agent.attribution.lane` uses these costs where it knows when
    each request left its server's queue.

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
        self._pool = _PooledSample()
        self._sums = _FitSums()
        self._count = 0
        self.value: float | None = None
        self._alone = _FitSums()
        self._alone_count = 0
        self.alone_costs_j: tuple[float, float] | None = None
        """Dynamic joules of one prompt token and of one completion token, measured on
        requests running alone; None until measured."""

    def observe(
        self, dynamic_j: float, prompt: float, completion: float, busy_s: float, seconds: float,
        limit_j: float = math.inf, request_s: float | None = None,
    ) -> None:
        """One interval: its dynamic energy, tokens, busy and whole seconds, the dynamic
        energy at which it would be at the board's power limit (inf where unknown), and the
        request-seconds of its requests (busy seconds where not given: one at a time)."""
        pool = self._pool
        pool.dynamic_j += dynamic_j
        pool.prompt_tokens += prompt
        pool.completion_tokens += completion
        pool.busy_s += busy_s
        pool.request_s += busy_s if request_s is None else request_s
        pool.seconds += seconds
        pool.limit_j += limit_j
        if pool.seconds >= self.sample_s * (1 - 1e-9):  # ten 0.1 s intervals make one second
            self.interrupt()
            worked = pool.prompt_tokens > 0 or pool.completion_tokens > 0
            if worked and pool.dynamic_j < pool.limit_j:  # idle or at the limit: says nothing
                self._add(pool)

    def interrupt(self) -> None:
        """An interval that cannot be used (a gap, unknown token counts, no idle baseline)
        ends the current sample, so that no sample holds energy it has no tokens for."""
        self._pool = _PooledSample()

    def _add(self, sample: _PooledSample) -> None:
        self._count += 1
        self._sums.add(self._keep, sample)
        fitted = self._fit(self._sums, self._count)
        if fitted is not None:
            self.value = fitted[0] / fitted[1]
        if sample.busy_s > 0 and sample.request_s <= ALONE_CONCURRENCY * sample.busy_s:
            self._alone_count += 1
            self._alone.add(self._keep, sample)
            alone = self._fit(self._alone, self._alone_count)
            if alone is not None:
                self.alone_costs_j = alone

    def _fit(self, sums: _FitSums, count: int) -> tuple[float, float] | None:
        """(a, b) of the non-negative least-squares fit, or None where it is not trusted."""
        n, pp, pd, dd, pe = sums.n, sums.pp, sums.pd, sums.dd, sums.pe
        de, ee, tt, te = sums.de, sums.ee, sums.tt, sums.te
        if count < self.min_samples or pp <= 0 or dd <= 0 or tt <= 0:
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
        return (a, b) if low <= a / b <= high else None
