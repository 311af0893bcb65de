"""What several benchmarks share: GPU timelines of a steady power, for requests to join."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.timeline import EnergyPoint, Timeline


def steady_timelines(start: float, seconds: float, gpus: int = 8, hz: float = 10.0,
                     watts: float = 300.0) -> dict[int, Timeline]:
    """`watts` on each of `gpus` GPUs, sampled at `hz` from `start` for `seconds`."""
    points = round(seconds * hz)
    lines = {}
    for gpu in range(gpus):
        line = Timeline(max_points=points + 1)
        for i in range(points + 1):
            line.append(EnergyPoint(start + i / hz, watts * i / hz))
        lines[gpu] = line
    return lines
