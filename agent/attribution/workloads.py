"""Every GPU joule to a workload or to unattributed: the workload view of the timelines.

This view runs beside the per-request one and changes nothing of it. Each GPU lane hands
every measured interval (`interval`) here as it processes it, with the lane's idle baseline,
so the two views split the same intervals, with the same static part
(`lane.static_share`), at the same settle. The interval's occupancy (who was on the GPU,
`agent.workloads.observer`) decides the split (`agent.workloads.share`): all of it to the
container holding the GPU, or dynamic by SM utilisation and static by presence. Per GPU,
Σ workloads + unattributed = the energy measured, to 1e-9 (property-tested).

Also kept per workload and GPU: GPU-seconds (an interval's length to a sole holder, and
1/parties of it to each of the parties sharing it, so that a GPU's GPU-seconds never exceed
its time), peak power (the largest share of an interval over its length) and whether it
served inference: it held the GPU alone, or was the only workload with SM activity on it,
in an interval in which requests ran. Where several workloads were busy beside requests,
that interval marks none of them: which one served is not known.

Metrics stay bounded: the first `max_series` workloads seen get series of their own, later
ones go to `OTHER` until a workload gone for `gone_after_s` frees its place. Records are
stretches of one workload on one GPU, closed when it is gone, every `record_period_s` for
one that runs on, and at drain; each GPU's unattributed energy is recorded the same way,
under `UNATTRIBUTED` (it has no series: the metrics carry it per GPU).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.attribution.lane import static_share
from agent.numeric import CompensatedSum
from agent.workloads.naming import WorkloadName
from agent.workloads.observer import Occupancy
from agent.workloads.share import IntervalEnergy, Part, Split, exclusive, shared

OTHER = WorkloadName("other", "process")
"""The series of the workloads past `max_series`."""
UNATTRIBUTED = WorkloadName("unattributed", "none")
"""The records' name for each GPU's energy that no workload owns: with it, a stretch of
records sums to everything the GPU measured, so the report can give each workload's share
of the node."""


class Occupancies(Protocol):
    def covering(self, index: int, time: float) -> Occupancy | None: ...


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """One workload on one GPU over a stretch [start, end] (monotonic seconds)."""

    name: WorkloadName
    gpu: int
    start: float
    end: float
    energy_j: float
    gpu_seconds: float
    peak_w: float
    inference: bool
    alone_j: float = 0.0
    """Its energy in the intervals it had the GPU to itself (allocated, or the only party
    on it)."""
    requests_j: float = 0.0
    """What the per-request view gave requests in those intervals: for an inference
    server, its requests' energy; `alone_j - requests_j` is its idle and overhead."""


@dataclass(frozen=True, slots=True)
class WorkloadTotals:
    """Counters since the agent started, for the exporter."""

    energy_j: Mapping[tuple[WorkloadName, int], float]
    """(series, GPU) → joules; a series is a workload, or `OTHER`."""
    inference: frozenset[WorkloadName]
    measured_j: Mapping[int, float]
    """Per GPU: the energy of the intervals split so far."""
    unattributed_j: Mapping[int, float]


@dataclass(slots=True)
class _Stretch:
    start: float
    end: float
    energy: CompensatedSum = field(default_factory=CompensatedSum)
    gpu_seconds: float = 0.0
    peak_w: float = 0.0
    inference: bool = False
    alone_j: float = 0.0
    requests_j: float = 0.0


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one GPU's intervals split under one occupancy: fractions of an interval's static
    and dynamic energy."""

    parts: tuple[tuple[WorkloadName, float, float], ...]
    """(workload, static fraction, dynamic fraction), by name."""
    unattributed: tuple[float, float]
    held: float
    """Each workload's share of the interval's GPU-seconds."""
    busy: tuple[WorkloadName, ...]
    """The workloads with SM activity (or the holder)."""
    alone: WorkloadName | None
    """The workload that has the GPU to itself, if one does."""


class WorkloadAccounts:
    """The workload view of every GPU's intervals. `interval` is called by the lanes (under
    the engine's lock), the rest from any thread."""

    def __init__(self, occupancies: Occupancies, *, max_series: int = 200,
                 gone_after_s: float = 300.0, record_period_s: float = 3600.0) -> None:
        if max_series < 1 or gone_after_s <= 0 or record_period_s <= 0:
            raise ValueError("max_series >= 1, gone_after_s > 0, record_period_s > 0")
        self._occupancies = occupancies
        self._max_series = max_series
        self._gone_after_s = gone_after_s
        self._record_period_s = record_period_s
        self._lock = threading.Lock()
        self._measured: dict[int, CompensatedSum] = {}
        self._unattributed: dict[int, CompensatedSum] = {}
        self._series: dict[WorkloadName, WorkloadName] = {}
        self._totals: dict[tuple[WorkloadName, int], CompensatedSum] = {}
        self._inference: set[WorkloadName] = set()
        self._last_seen: dict[WorkloadName, float] = {}
        self._open: dict[tuple[WorkloadName, int], _Stretch] = {}
        self._closed: list[WorkloadRecord] = []
        self._plans: dict[int, tuple[Occupancy | None, _Plan]] = {}
        """Per GPU: the latest occupancy and its plan (intervals come in time order)."""

    def interval(self, gpu: int, t0: float, t1: float, energy_j: float, idle_w: float | None,
                 serving: bool, *, requests_j: float = 0.0) -> None:
        """Split one measured interval (t0, t1] of GPU `gpu`; `serving`: requests ran in it,
        `requests_j`: what the per-request view gave them of it."""
        seconds = t1 - t0
        if not (energy_j >= 0 and math.isfinite(energy_j) and seconds > 0):
            return  # the lanes measure no such interval; nothing to split
        static = static_share(energy_j, idle_w, seconds) if idle_w is not None else 0.0
        static = min(max(0.0, static), energy_j)
        dynamic = energy_j - static
        plan = self._plan(gpu, self._occupancies.covering(gpu, t1))
        with self._lock:
            self._measured.setdefault(gpu, CompensatedSum()).add(energy_j)
            rest_static, rest_dynamic = plan.unattributed
            rest = rest_static * static + rest_dynamic * dynamic
            self._unattributed.setdefault(gpu, CompensatedSum()).add(rest)
            self._stretch(UNATTRIBUTED, gpu, t0, t1, rest, 0.0)
            for name, static_f, dynamic_f in plan.parts:  # by name: the cap's order
                stretch = self._credit(name, gpu, t0, t1, static_f * static + dynamic_f * dynamic,
                                       plan.held * seconds, serving and plan.busy == (name,))
                if plan.alone == name:
                    stretch.alone_j += energy_j
                    if serving:
                        stretch.requests_j += requests_j

    def _plan(self, gpu: int, occupancy: Occupancy | None) -> _Plan:
        """How GPU `gpu`'s intervals under `occupancy` split, as fractions: worked out once
        per occupancy (one observer round) rather than per interval, by the one rule
        (`agent.workloads.share`) applied to an interval of one joule static, one dynamic."""
        cached = self._plans.get(gpu)
        if cached is not None and cached[0] is occupancy:
            return cached[1]
        unit = IntervalEnergy(2.0, 1.0)
        split: Split[WorkloadName]
        busy: tuple[WorkloadName, ...]
        if occupancy is None:
            split, held, busy = Split(unit, {}, Part(1.0, 1.0)), 0.0, ()
        elif occupancy.exclusive is not None:
            split, held, busy = exclusive(unit, occupancy.exclusive), 1.0, (occupancy.exclusive,)
        else:
            split = shared(unit, occupancy.weights, occupancy.present, occupancy.present.get)
            names = list(occupancy.present.values())
            parties = len(set(names) - {None}) + names.count(None)
            held = 1.0 / parties if parties else 0.0
            busy = tuple(sorted({name for pid, name in occupancy.present.items()
                                 if name is not None and occupancy.weights.get(pid, 0.0) > 0}))
        parts = tuple((name, part.static_j, part.dynamic_j)
                      for name, part in sorted(split.parts.items()))
        plan = _Plan(parts, (split.unattributed.static_j, split.unattributed.dynamic_j), held,
                     busy, parts[0][0] if len(parts) == 1 and held == 1.0 else None)
        self._plans[gpu] = (occupancy, plan)
        return plan

    def totals(self) -> WorkloadTotals:
        with self._lock:
            return WorkloadTotals(
                {key: total.value for key, total in self._totals.items()},
                frozenset(self._inference),
                {gpu: total.value for gpu, total in self._measured.items()},
                {gpu: total.value for gpu, total in self._unattributed.items()},
            )

    def take_records(self, now: float, *, final: bool = False) -> list[WorkloadRecord]:
        """The stretches closed since the last call: those of workloads gone since
        `now - gone_after_s`, those open for `record_period_s`, and with `final` (the
        drain, `now` infinite) all. Gone workloads leave the totals, but not at the final
        call: the totals are still what the metrics say until the agent exits."""
        with self._lock:
            for key, stretch in list(self._open.items()):
                gone = stretch.end <= now - self._gone_after_s
                if final or gone or stretch.end - stretch.start >= self._record_period_s:
                    self._closed.append(_record(key, stretch))
                    del self._open[key]
            for name, seen in list(self._last_seen.items()):
                if not final and seen <= now - self._gone_after_s:
                    self._forget(name)
            closed, self._closed = self._closed, []
            return closed

    def _credit(self, name: WorkloadName, gpu: int, t0: float, t1: float, joules: float,
                gpu_seconds: float, inference: bool) -> _Stretch:
        series = self._series.get(name)
        if series is None:
            named = sum(s is not OTHER for s in self._series.values())
            series = self._series[name] = name if named < self._max_series else OTHER
        self._totals.setdefault((series, gpu), CompensatedSum()).add(joules)
        self._last_seen[name] = t1
        stretch = self._stretch(name, gpu, t0, t1, joules, gpu_seconds)
        if inference:
            stretch.inference = True
            self._inference.add(series)
        return stretch

    def _stretch(self, name: WorkloadName, gpu: int, t0: float, t1: float, joules: float,
                 gpu_seconds: float) -> _Stretch:
        """The open stretch of `name` on `gpu`, extended by the interval (t0, t1]."""
        stretch = self._open.get((name, gpu))
        if stretch is None:
            stretch = self._open[(name, gpu)] = _Stretch(t0, t1)
        stretch.end = t1
        stretch.energy.add(joules)
        stretch.gpu_seconds += gpu_seconds
        stretch.peak_w = max(stretch.peak_w, joules / (t1 - t0))
        return stretch

    def _forget(self, name: WorkloadName) -> None:
        """A workload gone for a while: its series stops being exported (`OTHER` stays)."""
        del self._last_seen[name]
        series = self._series.pop(name)
        if series is not OTHER:
            self._inference.discard(series)
            for key in [key for key in self._totals if key[0] == series]:
                del self._totals[key]


def _record(key: tuple[WorkloadName, int], stretch: _Stretch) -> WorkloadRecord:
    name, gpu = key
    return WorkloadRecord(name, gpu, stretch.start, stretch.end, stretch.energy.value,
                          stretch.gpu_seconds, stretch.peak_w, stretch.inference,
                          stretch.alone_j, stretch.requests_j)
