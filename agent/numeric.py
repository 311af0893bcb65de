"""Numerical helpers shared by the attribution engine, the simulated load, the sampler and
the exporters."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate


class CompensatedSum:
    """Neumaier summation: a running sum of values that are added and later removed again
    (rates of requests starting and ending) leaves no floating-point residue behind."""

    __slots__ = ("_comp", "_sum")

    def __init__(self) -> None:
        self._sum = self._comp = 0.0

    def add(self, x: float) -> None:
        total = self._sum + x
        if abs(self._sum) >= abs(x):
            self._comp += (self._sum - total) + x
        else:
            self._comp += (x - total) + self._sum
        self._sum = total

    @property
    def value(self) -> float:
        return self._sum + self._comp

    def clear(self) -> None:
        self._sum = self._comp = 0.0


class CumulativeHistogram:
    """Observations counted into buckets, read back cumulatively as Prometheus exposes them.

    `bounds` are the buckets' upper bounds, ascending; +Inf is implied. A value equal to a
    bound is counted in that bound's bucket (Prometheus' `le`). Not thread-safe: its owner
    holds the lock.
    """

    __slots__ = ("_counts", "bounds", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        """Sum of the values observed."""

    def observe(self, value: float) -> int:
        """Count `value`; returns the index of its bucket (len(bounds): +Inf)."""
        bucket = bisect_left(self.bounds, value)
        self._counts[bucket] += 1
        self.sum += value
        return bucket

    def cumulative(self) -> tuple[int, ...]:
        """Observations up to each bound, then all of them (+Inf)."""
        return tuple(accumulate(self._counts))
