"""How many requests ran beside each one: its concurrency, from the records themselves.

A request's concurrency is the time-weighted mean number of requests running on its GPUs
(itself included) while it ran, from when its server began on it (`scheduled`, else its
start) to its end, averaged over its GPUs. It is computed from the stored records of the
report's period, every intake path together, so requests that began before the period
and ended before it are not seen: the first minutes of a period read a little low.

Per GPU, the count n(t) is a step function of the records' boundaries; its running
integral C(t) at the boundaries gives each request ∫n dt = C(end) − C(begin) by two
bisections, so the whole costs O(n log n).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence

from agent.store import StoredRequest

BANDS: tuple[tuple[str, float], ...] = (("1", 1.5), ("2-4", 4.5), ("5-16", 16.5),
                                        ("17+", float("inf")))
"""Concurrency bands by their upper bound (exclusive): alone, a small batch, a full one as
serving engines commonly run (16), beyond."""


def band_of(value: float, bounds: tuple[tuple[str, float], ...]) -> str:
    """The name of the first band of `bounds` (name, exclusive upper bound) holding value."""
    return next(name for name, upper in bounds if value < upper)


def band(concurrency: float) -> str:
    return band_of(concurrency, BANDS)


def mean_concurrency(records: Sequence[StoredRequest]) -> list[float | None]:
    """Per record (in order), its concurrency; None for one that has no end (expired)."""
    spans = [(_begin(r), r.end) for r in records]
    per_gpu: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for record, (begin, end) in zip(records, spans, strict=True):
        if end is not None:
            for gpu in record.gpus:
                per_gpu[gpu] += [(begin, 1), (end, -1)]
    steps = {gpu: _steps(changes) for gpu, changes in per_gpu.items()}
    result: list[float | None] = []
    for record, (begin, end) in zip(records, spans, strict=True):
        if end is None or not record.gpus:
            result.append(None)
            continue
        means = []
        for gpu in record.gpus:
            times, counts, integral = steps[gpu]
            if end > begin:
                means.append((_integral(times, counts, integral, end)
                              - _integral(times, counts, integral, begin)) / (end - begin))
            else:  # an instant: the requests running then, itself counted
                at = bisect.bisect_right(times, begin) - 1
                means.append(max(counts[at], 0) + 1.0)
        result.append(sum(means) / len(means))
    return result


def _begin(record: StoredRequest) -> float:
    return record.scheduled if record.scheduled is not None else record.start


def _steps(changes: list[tuple[float, int]]
           ) -> tuple[list[float], list[int], list[float]]:
    """The boundaries in time order, the count just after each, and ∫n dt up to each.
    Ends sort before starts at the same time: back-to-back requests did not overlap."""
    changes.sort(key=lambda change: (change[0], change[1]))
    times: list[float] = []
    counts: list[int] = []
    integral: list[float] = []
    count, area = 0, 0.0
    for time, delta in changes:
        if times:
            area += count * (time - times[-1])
        count += delta
        if times and times[-1] == time:
            counts[-1], integral[-1] = count, area
        else:
            times.append(time)
            counts.append(count)
            integral.append(area)
    return times, counts, integral


def _integral(times: list[float], counts: list[int], integral: list[float], t: float
              ) -> float:
    at = bisect.bisect_right(times, t) - 1
    if at < 0:
        return 0.0
    return integral[at] + counts[at] * (t - times[at])
