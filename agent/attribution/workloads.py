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

    def interval(self, gpu: int, t0: float, t1: float, energy_j: float, idle_w: float | None,
                 serving: bool) -> None:
        """Split one measured interval (t0, t1] of GPU `gpu`; `serving`: requests ran in it."""
        seconds = t1 - t0
        if not (energy_j >= 0 and math.isfinite(energy_j) and seconds > 0):
            return  # the lanes measure no such interval; nothing to split
        static = static_share(energy_j, idle_w, seconds) if idle_w is not None else 0.0
        energy = IntervalEnergy(energy_j, max(0.0, static))
        occupancy = self._occupancies.covering(gpu, t1)
        split: Split[WorkloadName]
        held: dict[WorkloadName, float]
        if occupancy is None:
            split, held, busy = Split(energy, {}, _all(energy)), {}, set()
        elif occupancy.exclusive is not None:
            owner = occupancy.exclusive
            split, held, busy = exclusive(energy, owner), {owner: seconds}, {owner}
        else:
            split = shared(energy, occupancy.weights, occupancy.present,
                           occupancy.present.get)
            names = list(occupancy.present.values())
            known = {name for name in names if name is not None}
            parties = len(known) + names.count(None)
            held = {name: seconds / parties for name in known}
            busy = {name for pid, name in occupancy.present.items()
                    if name is not None and occupancy.weights.get(pid, 0.0) > 0}
        with self._lock:
            self._measured.setdefault(gpu, CompensatedSum()).add(energy_j)
            self._unattributed.setdefault(gpu, CompensatedSum()).add(
                split.unattributed.energy_j)
            self._stretch(UNATTRIBUTED, gpu, t0, t1, split.unattributed.energy_j, 0.0)
            for name, part in sorted(split.parts.items()):  # the cap's order: by name
                self._credit(name, gpu, t0, t1, part.energy_j, held.get(name, 0.0),
                             serving and busy == {name})

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
                gpu_seconds: float, inference: bool) -> None:
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


def _all(energy: IntervalEnergy) -> Part:
    """All of an interval, unattributed: no occupancy observed yet."""
    return Part(energy.static_j, energy.dynamic_j)


def _record(key: tuple[WorkloadName, int], stretch: _Stretch) -> WorkloadRecord:
    name, gpu = key
    return WorkloadRecord(name, gpu, stretch.start, stretch.end, stretch.energy.value,
                          stretch.gpu_seconds, stretch.peak_w, stretch.inference)
