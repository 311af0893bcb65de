"""One GPU's interval energy split among the workloads that used it, conserved.

An interval (two points of a GPU's timeline) has energy ΔE, already split into a static part
(the idle baseline's share, `agent.attribution.static_share`) and a dynamic part. Either:

- **exclusive**: the GPU (or MIG instance) is allocated to one container by the kubelet
  (pod-resources): that workload gets all of ΔE, static and dynamic, while it holds it;
- **shared** (time-slicing, MPS, bare metal): the dynamic part splits by each workload's SM
  utilisation in the interval, the sum of the `smUtil` of NVML's per-process samples taken in
  it (`sm_weights`): SM activity is what the dynamic energy pays for (as in Kepler). The
  static part splits equally among the parties present in the interval: each workload with
  a process on the GPU (listed by NVML, or sampled), and each PID whose workload is not
  known, alone. The idle baseline is the cost of the board being powered for whoever holds
  it, however busy: a process that holds memory and computes nothing keeps the board
  from being given back as much as a busy one does, so presence, not activity, is what it
  pays for (the attribution engine gives static energy by presence to queue-aware requests
  for the same reason).

What cannot be given to a workload stays unattributed: the dynamic part where no sample in
the interval has any SM utilisation, the shares of PIDs whose workload is unknown (exited,
unreadable, another PID namespace), the static part where no process is present. Per
interval and per GPU over any run of intervals, Σ workloads + unattributed = ΔE, to 1e-9
relative (tested under random loads).

Owners are any hashable identity: `cgroups.Workload` for processes, `ContainerRef` for the
kubelet's allocations; the wiring decides how the two are matched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agent.numeric import CompensatedSum

Owner = TypeVar("Owner", bound=Hashable)


@dataclass(frozen=True, slots=True)
class IntervalEnergy:
    """One interval's energy on one GPU and its static part (0 ≤ static ≤ energy)."""

    energy_j: float
    static_j: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.energy_j) and 0.0 <= self.static_j <= self.energy_j):
            raise ValueError(f"need 0 <= static <= energy, finite: {self}")

    @property
    def dynamic_j(self) -> float:
        return self.energy_j - self.static_j


@dataclass(frozen=True, slots=True)
class Part:
    """A workload's static and dynamic joules."""

    static_j: float = 0.0
    dynamic_j: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.static_j + self.dynamic_j


@dataclass(frozen=True, slots=True)
class Split(Generic[Owner]):
    """How one interval's energy was split."""

    interval: IntervalEnergy
    parts: Mapping[Owner, Part]
    unattributed: Part


class UtilisationSample(Protocol):
    """What `sm_weights` reads of a sample (`agent.devices.base.ProcessSample` has it)."""

    @property
    def pid(self) -> int: ...
    @property
    def time_us(self) -> int: ...
    @property
    def sm_util(self) -> int: ...


def sm_weights(
    samples: Iterable[UtilisationSample], start_us: int, end_us: int
) -> dict[int, float]:
    """Σ smUtil by PID over the samples stamped in (start_us, end_us]. NVML stamps samples on
    the wall clock in µs: the caller gives the interval's bounds on that clock."""
    weights: dict[int, float] = {}
    for sample in samples:
        if start_us < sample.time_us <= end_us:
            weights[sample.pid] = weights.get(sample.pid, 0.0) + sample.sm_util
    return weights


def exclusive(interval: IntervalEnergy, owner: Owner) -> Split[Owner]:
    """The whole interval to the one workload the device is allocated to."""
    return Split(interval, {owner: Part(interval.static_j, interval.dynamic_j)}, Part())


def shared(
    interval: IntervalEnergy,
    weights: Mapping[int, float],
    present: Iterable[int],
    owner_of: Callable[[int], Owner | None],
) -> Split[Owner]:
    """The interval split among the workloads of the PIDs on the GPU: dynamic by `weights`
    (PID → SM utilisation, `sm_weights`), static equally among the parties present
    (`present` PIDs and weighted ones). `owner_of` gives a PID's workload, None if unknown."""
    owners = {pid: owner_of(pid) for pid in {*present, *weights}}
    dynamic: dict[Owner, float] = {}
    unknown_weight = 0.0
    for pid, weight in weights.items():
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"PID {pid}: a weight is finite and >= 0, not {weight}")
        owner = owners[pid]
        if owner is None:
            unknown_weight += weight
        else:
            dynamic[owner] = dynamic.get(owner, 0.0) + weight
    total_weight = math.fsum([*dynamic.values(), unknown_weight])
    known = {owner for owner in owners.values() if owner is not None}
    unknown_parties = sum(owner is None for owner in owners.values())
    parties = len(known) + unknown_parties

    def dynamic_of(weight: float) -> float:
        return interval.dynamic_j * (weight / total_weight) if total_weight > 0 else 0.0

    def static_of(count: int) -> float:
        return interval.static_j * count / parties if parties else 0.0

    parts = {owner: Part(static_of(1), dynamic_of(dynamic.get(owner, 0.0))) for owner in known}
    unattributed = Part(
        static_of(unknown_parties) if parties else interval.static_j,
        dynamic_of(unknown_weight) if total_weight > 0 else interval.dynamic_j,
    )
    return Split(interval, parts, unattributed)


class Ledger(Generic[Owner]):
    """One GPU's splits, summed (compensated) over a run of intervals."""

    __slots__ = ("_energy", "_owners", "_unattributed")

    def __init__(self) -> None:
        self._energy = CompensatedSum()
        self._unattributed = CompensatedSum()
        self._owners: dict[Owner, CompensatedSum] = {}

    def add(self, split: Split[Owner]) -> None:
        self._energy.add(split.interval.energy_j)
        self._unattributed.add(split.unattributed.energy_j)
        for owner, part in split.parts.items():
            self._owners.setdefault(owner, CompensatedSum()).add(part.energy_j)

    @property
    def energy_j(self) -> float:
        """The intervals' energy: what the GPU's counter advanced over them."""
        return self._energy.value

    @property
    def unattributed_j(self) -> float:
        return self._unattributed.value

    def by_owner(self) -> dict[Owner, float]:
        return {owner: total.value for owner, total in self._owners.items()}
