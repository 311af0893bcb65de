"""Scrapers of inference servers' own Prometheus endpoints (docs/design.md §6): zero-touch
intake that gives window-level figures per model, with no per-request records (the windows
are kept in the record store apart from them).

`kinds` says what each server exports, `window` turns two scrapes and the GPU timelines
into a window's figures (pure), `scraper` does the HTTP and the bookkeeping.
"""

from agent.intake.scrapers.kinds import KINDS, ServerKind, read_counts
from agent.intake.scrapers.scraper import WindowScraper, WindowSink
from agent.intake.scrapers.window import (
    CounterDeltas,
    CounterWindow,
    GpuWindowEnergy,
    ModelWindow,
    Usage,
    WindowFigures,
    gpu_window_energy,
    split_window,
)

__all__ = [
    "KINDS",
    "CounterDeltas",
    "CounterWindow",
    "GpuWindowEnergy",
    "ModelWindow",
    "ServerKind",
    "Usage",
    "WindowFigures",
    "WindowScraper",
    "WindowSink",
    "gpu_window_energy",
    "read_counts",
    "split_window",
]
