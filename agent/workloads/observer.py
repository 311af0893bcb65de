"""Who is on each GPU, observed about once a second: the occupancy that energy is split by.

One round reads, per GPU, NVML's process lists and the per-process utilisation samples taken
since the previous round, resolves each new PID to its workload (its cgroup, read once per
PID while it stays listed) and, every `allocation_period_s`, which container the kubelet
allocated each GPU to. The result is an `Occupancy` per GPU and round: the window (previous
round, this round] on the monotonic clock, the GPU's exclusive holder if one container holds
it, the workload of each PID present, and each PID's summed SM utilisation in the window.

The window is the round's, not the samples' own stamps: NVML stamps its samples on the wall
clock, and asking for those after the previous round's newest stamp gives exactly the ones
taken since, so no clock conversion is needed. The split is therefore resolved to one round
(`period_s`), which is what the per-process samples allow: the driver averages them over its
own sample period, about a sixth of a second.

A failing reading degrades its own part only: a process list that fails gives no PIDs for
that GPU this round; utilisation that fails or is unsupported (MIG) gives no weights, so that
GPU's dynamic energy stays unattributed; an allocation or pod list that cannot be read leaves
the split to the processes, and the reason is kept for `jouleprobe doctor` and the metrics.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from agent.devices.base import GpuInfo, ProcessSource
from agent.workloads.cgroups import Unresolved, Workload, workload_of
from agent.workloads.naming import PodNames, WorkloadName, of_allocation, of_process
from agent.workloads.podresources import DeviceHolders

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Occupancy:
    """One GPU over one observation window (since, time], monotonic seconds."""

    since: float
    time: float
    exclusive: WorkloadName | None
    """The container the kubelet allocated the whole GPU to, alone; None otherwise."""
    present: Mapping[int, WorkloadName | None]
    """Each PID on the GPU (listed, or sampled in the window) → its workload, None if unknown."""
    weights: Mapping[int, float]
    """PID → Σ smUtil (percent) of its samples in the window; empty without samples."""


class Refreshed(Generic[T_co]):
    """A value read again every `period_s` (at the first `get` after the period), keeping the
    last good one while a read fails; `error` is the last failure's reason, None once a read
    succeeds. The readers raise any exception with a `reason` attribute, or another."""

    def __init__(self, read: Callable[[], T_co], period_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._period_s = period_s
        self._clock = clock
        self._next = -float("inf")
        self.value: T_co | None = None
        self.error: str | None = None
        self.detail: str | None = None
        """The last failure's message, for `jouleprobe doctor`; None once a read succeeds."""

    def get(self) -> T_co | None:
        now = self._clock()
        if now >= self._next:
            self._next = now + self._period_s
            try:
                self.value, self.error, self.detail = self._read(), None, None
            except Exception as exc:  # any failure is one reason, kept
                reason = getattr(exc, "reason", type(exc).__name__)
                if reason != self.error:
                    log.warning("workloads: %s", exc)
                self.error, self.detail = str(reason), str(exc)
        return self.value


@dataclass(frozen=True, slots=True)
class ObserverStatus:
    """What the last round saw, for `jouleprobe doctor` and the metrics."""

    rounds: int
    processes: int
    """PIDs on any GPU in the last round."""
    unresolved: Mapping[str, int]
    """PIDs whose workload is unknown, by reason (`cgroups.Unresolved.reason`)."""
    allocations: str
    """`ok`, `off` (not configured), or why the kubelet's pod-resources could not be read."""
    pod_names: str
    """`ok`, `off`, or why the pod list could not be read."""
    no_utilization: tuple[int, ...]
    """GPUs whose per-process utilisation could not be read in the last round."""
    workloads: tuple[WorkloadName, ...] = field(default=())
    """The workloads present in the last round, sorted."""


class WorkloadObserver:
    """Observes every GPU's occupancy; `observe` runs one round (from one thread), `covering`
    answers from any thread."""

    def __init__(
        self,
        source: ProcessSource,
        gpus: Sequence[GpuInfo],
        *,
        history_s: float,
        proc_root: str | Path = "/proc",
        allocations: Refreshed[Mapping[str, DeviceHolders]] | None = None,
        pod_names: Refreshed[PodNames] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """`history_s`: how long occupancies are kept; at least the longest an interval
        waits to be attributed (the settle), with a margin."""
        self._source = source
        self._gpus = list(gpus)
        self._history_s = history_s
        self._proc_root = proc_root
        self._allocations = allocations
        self._pod_names = pod_names
        self._clock = clock
        now_us = wall_us()
        self._since_us = {gpu.index: now_us for gpu in self._gpus}
        """The newest sample stamp seen per GPU: the first round asks for samples after the
        start, not for the driver's whole history."""
        self._last = clock()
        self._resolved: dict[int, Workload | Unresolved] = {}
        self._names: dict[int, WorkloadName | None] = {}
        """Each PID's name, kept while the pod list read is the same object: a round names
        only new PIDs, and a workload keeps one name object across rounds, which the
        accounts' dicts then match by identity."""
        self._named_with: PodNames | None = None
        self._history: dict[int, deque[Occupancy]] = {gpu.index: deque() for gpu in self._gpus}
        self._lock = threading.Lock()
        self._status = ObserverStatus(0, 0, {}, self._state(allocations),
                                      self._state(pod_names), ())

    def observe(self) -> None:
        """One round over every GPU."""
        allocations = self._allocations.get() if self._allocations is not None else None
        pods = self._pod_names.get() if self._pod_names is not None else None
        since, now = self._last, self._clock()
        self._last = now
        listed: dict[int, set[int]] = {}
        weights: dict[int, dict[int, float]] = {}
        no_utilization: list[int] = []
        for gpu in self._gpus:
            listed[gpu.index] = set(self._source.processes(gpu.index).pids)
            utilization = self._source.process_utilization(gpu.index, self._since_us[gpu.index])
            self._since_us[gpu.index] = utilization.last_seen_us
            summed: dict[int, float] = {}
            if utilization.samples is None:
                no_utilization.append(gpu.index)
            else:
                for sample in utilization.samples:
                    summed[sample.pid] = summed.get(sample.pid, 0.0) + sample.sm_util
            weights[gpu.index] = summed
        pids = set().union(*listed.values(), *weights.values()) if listed else set()
        self._resolved = {pid: self._resolved.get(pid) or workload_of(pid, self._proc_root)
                          for pid in pids}
        if pods is not self._named_with:
            self._names, self._named_with = {}, pods
        known = self._names
        names: dict[int, WorkloadName | None] = {
            pid: known[pid] if pid in known
            else None if isinstance(found, Unresolved) else of_process(found, pods)
            for pid, found in self._resolved.items()
        }
        self._names = names
        occupancies = {
            gpu.index: Occupancy(
                since, now, _exclusive(allocations, gpu),
                {pid: names[pid] for pid in listed[gpu.index] | weights[gpu.index].keys()},
                weights[gpu.index],
            )
            for gpu in self._gpus
        }
        unresolved: Counter[str] = Counter(found.reason for found in self._resolved.values()
                             if isinstance(found, Unresolved))
        present = {name for name in names.values() if name is not None}
        present |= {o.exclusive for o in occupancies.values() if o.exclusive is not None}
        with self._lock:
            for index, occupancy in occupancies.items():
                history = self._history[index]
                history.append(occupancy)
                while history and history[0].time < now - self._history_s:
                    history.popleft()
            self._status = ObserverStatus(
                self._status.rounds + 1, len(pids), dict(unresolved),
                self._state(self._allocations), self._state(self._pod_names),
                tuple(no_utilization), tuple(sorted(present)),
            )

    def covering(self, index: int, time: float) -> Occupancy | None:
        """The occupancy of GPU `index` whose window holds `time` (the first observed at or
        after it), else the latest one; None before any round."""
        with self._lock:
            history = self._history.get(index)
            if not history:
                return None
            at = bisect.bisect_left(history, time, key=lambda occupancy: occupancy.time)
            return history[min(at, len(history) - 1)]

    def status(self) -> ObserverStatus:
        with self._lock:
            return self._status

    @staticmethod
    def _state(refreshed: Refreshed[T] | None) -> str:
        if refreshed is None:
            return "off"
        return refreshed.error or "ok"


def _exclusive(allocations: Mapping[str, DeviceHolders] | None,
               gpu: GpuInfo) -> WorkloadName | None:
    """The one container holding the whole GPU. A MIG-enabled GPU is allocated by instance
    (MIG UUIDs), so it is never held whole: its split is by processes."""
    holders = allocations.get(gpu.uuid) if allocations is not None else None
    owner = holders.owner if holders is not None else None
    return of_allocation(owner) if owner is not None else None
