"""Window-level figures: what a server did between two scrapes, and the GPU energy it cost.

Pure functions and one small state holder, so that every rule here is tested without HTTP:

- **Deltas** (`CounterDeltas`): each series' increase since the previous scrape, as
  Prometheus's `increase()` sees a counter: a value lower than the previous one means
  the counter was reset (the server restarted), and the new value is the whole increase.
  The first scrape only sets the baseline. A series that appears after the baseline (a
  model loaded, a histogram's first observation) was created since the previous scrape
  and counts from 0. Deltas are taken per series, then summed per model, so that one
  series disappearing (an unloaded adapter) is not mistaken for a reset of the model.
  A server that writes values with few significant digits (llama.cpp: six) moves a
  counter past 999999 in steps (of 10, then 100, …): a window in which such a coarse
  counter did not move may still have done up to a step of work, so it is not closed:
  its work is carried into the next window (the baseline stays), for at most
  `max_carry_s`. A step then lands in a window that worked, never a window of zero by
  rounding, and a rounded value is never lower than the one before, so no delta is
  negative; the sum of the windows stays the counter's increase, within one step.
- **Window energy** (`gpu_window_energy`): per GPU, the energy of [start, end] from the
  sampler's timeline: each interval between two points contributes its energy times the
  fraction of it inside the window (power taken as constant within an interval); gap
  intervals contribute nothing. Each interval's static part is `static_share`, with the
  attribution engine's idle baseline, the rest is dynamic, as for per-request figures.
- **Split** (`split_window`): the window's energy on the server's GPUs is shared among its
  models in proportion to their tokens, `prefill_weight × prompt + completion` (weight 1 by
  default: a token is a token). Token counters advance while requests run, so tokens
  measure the work done inside the window, whereas a request is counted only when it
  ends, maybe windows later. Where no model reports tokens, the split is by finished
  requests; where nothing happened in the window, its energy is unattributed.

Boundaries: `gpu_dynamic` and `gpu_static` only. Host energy is not given to windows: the
host serves every server of the node and the agent itself, and a window has no per-request
timing to share it by. Window figures are coarser than per-request ones: a window in which
one short request ran gives that request's model the whole window's energy, idle
stretches included (they land in `gpu_static`, which is why it is kept apart). A source
claims all the energy of its GPUs: two sources on the same GPUs each claim all of it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.attribution import static_share
from agent.intake.scrapers.kinds import Quantity, SeriesKey
from agent.timeline import EnergyPoint

Weighting = Literal["tokens", "requests", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    """What one model did in one window; None for a quantity the server does not count."""

    requests: float | None = None
    prompt_tokens: float | None = None
    completion_tokens: float | None = None


MAX_CARRY_S = 60.0
"""The longest a window is carried on for a coarse counter that stood still (an idle
server's windows are then this long)."""


@dataclass(frozen=True, slots=True)
class CounterWindow:
    """What the counters say of [start, end]: per model, its increases."""

    start: float
    end: float
    usage: dict[str, Usage]


class CounterDeltas:
    """Turns successive scrapes' cumulative series into per-model increases."""

    def __init__(self, significant_digits: int | None = None,
                 max_carry_s: float = MAX_CARRY_S) -> None:
        """`significant_digits`: how many the server writes (`ServerKind`); None: all."""
        self._digits = significant_digits
        self.max_carry_s = max_carry_s
        self._previous: dict[SeriesKey, float] | None = None
        self._since = 0.0

    def update(self, counts: Mapping[SeriesKey, float], now: float) -> CounterWindow | None:
        """The window from the baseline to `now`, which becomes the baseline; None on the
        first call (the baseline), and while a coarse counter stands still (carried).

        A model's quantity is None where none of its series counts it (a Triton model
        outside LLM backends has no token series), 0 where its series did not move."""
        if self._previous is None:
            self._previous, self._since = dict(counts), now
            return None
        if now - self._since < self.max_carry_s and self._stood_still(counts):
            return None
        previous, start = self._previous, self._since
        self._previous, self._since = dict(counts), now
        sums: dict[str, dict[Quantity, float]] = {}
        for key, value in counts.items():
            quantity, model, _ = key
            before = previous.get(key, 0.0)
            increase = value - before if value >= before else value
            per_model = sums.setdefault(model, {})
            per_model[quantity] = per_model.get(quantity, 0.0) + increase
        return CounterWindow(start, now,
                             {model: Usage(**values) for model, values in sums.items()})

    def _stood_still(self, counts: Mapping[SeriesKey, float]) -> bool:
        """Whether a series written with too few digits to count by 1 did not move."""
        if self._digits is None or self._previous is None:
            return False
        coarse = 10.0 ** self._digits  # from here on, a value is written to a step > 1
        return any(value >= coarse and value == self._previous.get(key)
                   for key, value in counts.items())


@dataclass(frozen=True, slots=True)
class GpuWindowEnergy:
    static_j: float
    dynamic_j: float
    measured_s: float
    """Seconds of the window with known energy (outside gaps and inside the timeline)."""

    @property
    def total_j(self) -> float:
        return self.static_j + self.dynamic_j


def gpu_window_energy(
    points: Sequence[EnergyPoint], start: float, end: float, idle_w: float | None
) -> GpuWindowEnergy:
    """One GPU's energy in [start, end] from its timeline points (oldest first).

    `idle_w` is the GPU's idle baseline; None (not yet known) counts all energy as dynamic,
    as the attribution engine does."""
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    idle = idle_w or 0.0
    static = dynamic = measured = 0.0
    for before, after in itertools.pairwise(points):
        if after.gap or after.time <= start or before.time >= end:
            continue
        span = after.time - before.time
        inside = min(after.time, end) - max(before.time, start)
        energy = (after.energy_j - before.energy_j) * inside / span
        part_static = static_share(energy, idle, inside)
        static += part_static
        dynamic += energy - part_static
        measured += inside
    return GpuWindowEnergy(static, dynamic, measured)


@dataclass(frozen=True, slots=True)
class ModelWindow:
    """One model's share of one window. Its ratios (Wh per query, J per token) are the
    report's, over the windows of a period (`agent.store.ModelWindows`)."""

    model: str
    usage: Usage
    gpu_dynamic_j: float
    gpu_static_j: float

    @property
    def gpu_j(self) -> float:
        return self.gpu_dynamic_j + self.gpu_static_j


@dataclass(frozen=True, slots=True)
class WindowFigures:
    start: float
    end: float
    gpus: tuple[int, ...]
    weighting: Weighting
    models: dict[str, ModelWindow]
    unattributed_j: float
    """The window's GPU energy when no model did anything in it."""
    measured_j: float
    """All GPU energy of the window on `gpus`: attributed to models + unattributed."""


def split_window(
    usage: Mapping[str, Usage],
    energy: Mapping[int, GpuWindowEnergy],
    start: float,
    end: float,
    *,
    prefill_weight: float = 1.0,
) -> WindowFigures:
    """Share the window's energy on the GPUs of `energy` among the models of `usage`."""
    if not (prefill_weight > 0 and math.isfinite(prefill_weight)):
        raise ValueError(f"prefill weight must be a finite number > 0, got {prefill_weight}")
    static = sum(gpu.static_j for gpu in energy.values())
    dynamic = sum(gpu.dynamic_j for gpu in energy.values())
    weights, weighting = _weights(usage, prefill_weight)
    total = sum(weights.values())
    models = {
        model: ModelWindow(
            model, usage[model],
            gpu_dynamic_j=dynamic * weights.get(model, 0.0) / total if total else 0.0,
            gpu_static_j=static * weights.get(model, 0.0) / total if total else 0.0,
        )
        for model in usage
    }
    return WindowFigures(
        start, end, tuple(sorted(energy)), weighting if total else "none", models,
        unattributed_j=0.0 if total else static + dynamic,
        measured_j=static + dynamic,
    )


def _weights(
    usage: Mapping[str, Usage], prefill_weight: float
) -> tuple[dict[str, float], Weighting]:
    tokens = {
        model: prefill_weight * (u.prompt_tokens or 0.0) + (u.completion_tokens or 0.0)
        for model, u in usage.items()
    }
    if any(tokens.values()):
        return tokens, "tokens"
    return {model: u.requests or 0.0 for model, u in usage.items()}, "requests"
