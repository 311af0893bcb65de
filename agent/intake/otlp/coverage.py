"""How much of a traced server's work arrived as spans.

Spans can miss requests: vLLM emits none for a request its client aborted, and an
exporter whose queue is full drops spans. Where the same server is also scraped (its
`[[scrape]]` table names the trace source), its counters say how many requests and
completion tokens it finished in each scrape window; the spans of the requests that ended
in that window say how many of those the receiver saw. Their ratio, per window, is the
coverage. It is reported beside the spans' figures, never added to them: the window's
own energy split stays in the window metrics, apart, as for any scraped server.

A window is compared only once its spans have had time to come (its source's settle after
its end), so that a span still in an exporter's batch does not count as missed.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from agent.intake.scrapers.window import WindowFigures

KEEP_S = 900.0
"""How long the ends of accepted requests are kept to be counted into windows."""
MAX_ENDS = 1_000_000
"""Ends kept per source at most, whatever the rate."""


@dataclass(frozen=True, slots=True)
class CoverageFigures:
    """One scrape window of a traced server: the spans' share of what its counters say."""

    source: str
    start: float
    end: float
    requests: float | None
    """Spans of requests that ended in the window ÷ requests the server finished in it;
    None where the server counts no requests, or finished none."""
    completion_tokens: float | None


class Coverage:
    """Counts the accepted spans' requests into the windows of the scrapes of their
    server. Called on the event loop."""

    def __init__(self, settle_s: Mapping[str, float]) -> None:
        """`settle_s`: per trace source (`trace:SERVICE`), how long its spans may take."""
        self.settle_s = dict(settle_s)
        self._ends: dict[str, list[tuple[float, int]]] = {}
        """Per source, (end, completion tokens) in order of end: spans come out of order
        (a batch late), and a window's are then found by bisection, not by a scan."""
        self._windows: deque[tuple[str, WindowFigures]] = deque(maxlen=10_000)
        self.latest: dict[str, CoverageFigures] = {}

    def ended(self, source: str, end: float, completion_tokens: int | None) -> None:
        """A request of `source` (`trace:SERVICE`) ended at `end`, as its span says."""
        ends = self._ends.setdefault(source, [])
        bisect.insort(ends, (end, completion_tokens or 0))  # near the end: spans are late
        if len(ends) > MAX_ENDS:                             # by seconds, not by hours
            del ends[:len(ends) - MAX_ENDS]

    def window(self, source: str, figures: WindowFigures) -> None:
        """A settled scrape window of the server of trace source `source`."""
        self._windows.append((source, figures))

    def settle(self, now: float) -> list[CoverageFigures]:
        """The windows whose spans have had time to come, compared; `latest` updated."""
        done = []
        waiting: deque[tuple[str, WindowFigures]] = deque()
        for source, figures in self._windows:
            if figures.end + self.settle_s[source] <= now:
                done.append(self._compare(source, figures))
                self.latest[source] = done[-1]
            else:
                waiting.append((source, figures))
        self._windows = deque(waiting, maxlen=self._windows.maxlen)
        for ends in self._ends.values():
            del ends[:bisect.bisect_left(ends, (now - KEEP_S, -1))]
        return done

    def _compare(self, source: str, figures: WindowFigures) -> CoverageFigures:
        ends = self._ends.get(source, [])
        spans = [tokens for _, tokens in ends[
            bisect.bisect_right(ends, (figures.start, math.inf)):
            bisect.bisect_right(ends, (figures.end, math.inf))]]
        usages = [window.usage for window in figures.models.values()]
        scraped_requests = _sum([u.requests for u in usages])
        scraped_tokens = _sum([u.completion_tokens for u in usages])
        return CoverageFigures(source, figures.start, figures.end,
                               _ratio(len(spans), scraped_requests),
                               _ratio(sum(spans), scraped_tokens))


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _ratio(seen: float, counted: float | None) -> float | None:
    return seen / counted if counted else None
