"""Fixtures of the proxy tests: the servers' event loop, and an engine with energy to share."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from scripted import Servers

from agent.attribution import AttributionEngine
from agent.timeline import EnergyPoint, Timeline


@pytest.fixture
def servers() -> Iterator[Servers]:
    serving = Servers()
    yield serving
    serving.close()


@pytest.fixture
def engine() -> AttributionEngine:
    """One GPU at a steady 100 W, with points from 10 s ago to well after the test."""
    now = time.monotonic()
    line = Timeline(max_points=2_000)
    for i in range(1_100):
        line.append(EnergyPoint(now - 10 + i, 100.0 * i))
    return AttributionEngine({0: line}, settle_s=0.0, max_age_s=1e6)
