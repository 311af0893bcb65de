"""Per-GPU energy timeline: the sampler writes it, attribution reads it.

Each point holds the GPU's *measured* cumulative energy since the agent started. The
energy of an interval is the difference of two consecutive points, except where the later
point is marked `gap`: then the interval's energy is unknown (counter reset, failed reads,
an implausible jump) and is in neither point's `energy_j`, so it is never attributed to
anything and never invented.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EnergyPoint:
    time: float
    """`time.monotonic()` seconds, taken at the read."""
    energy_j: float
    """Measured cumulative energy since the agent started, gaps excluded."""
    power_w: float | None = None
    gap: bool = False
    """True when the interval that ends at this point has unknown energy."""


class Timeline:
    """A bounded, append-only, thread-safe series of `EnergyPoint`s for one GPU.

    The oldest points fall off once `max_points` is reached, so memory stays bounded even
    when no reader consumes it.
    """

    def __init__(self, max_points: int) -> None:
        if max_points < 2:
            raise ValueError("a timeline needs room for at least two points")
        self._points: deque[EnergyPoint] = deque(maxlen=max_points)
        self._lock = threading.Lock()

    def append(self, point: EnergyPoint) -> None:
        with self._lock:
            if self._points and point.time <= self._points[-1].time:
                raise ValueError("timeline points must have strictly increasing times")
            if self._points and point.energy_j < self._points[-1].energy_j:
                raise ValueError("cumulative energy must never decrease")
            self._points.append(point)

    def latest(self) -> EnergyPoint | None:
        """The newest point. No lock: a deque's last item is read in one step, and the
        oldest points that `append` drops never empty it (the engine asks for every
        request it takes)."""
        points = self._points
        return points[-1] if points else None

    def after(self, time: float) -> list[EnergyPoint]:
        """Points with a time strictly later than `time`, oldest first.

        Walks back from the newest point, so the cost is that of what is new, not of the
        whole timeline."""
        with self._lock:
            newer = list(itertools.takewhile(lambda p: p.time > time, reversed(self._points)))
        newer.reverse()
        return newer

    def __len__(self) -> int:
        with self._lock:
            return len(self._points)
