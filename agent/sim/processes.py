"""SIMULATED processes on simulated GPUs, for the workload view of the demo and the tests.

Each simulated board runs its server (the process of the served model, whose SM utilisation
`SimulatedGpuSource` derives from the request load) and, optionally, `Job`s beside it, such
as a training job with its own SM utilisation and power, which the board's power includes.
None of it is a real process: the PIDs are at or above the kernel's PID_MAX_LIMIT, so that
no host's `/proc` can hold them, and their `/proc` files exist only where `write_proc` puts
them. What the agent reads of them is what it reads of real ones: NVML-like process lists
and samples (`SimulatedGpuSource.processes`, `process_utilization`), a cgroup v2 kubepods
path of the systemd driver with containerd (as in tests/fixtures/proc), and the pods' names
(`SimulatedProcesses.name_of`, a `PodNames` by its shape: `agent.workloads` is of this
package's layer, so nothing is imported from it).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PID_BASE = 4_194_304
"""PID_MAX_LIMIT of a 64-bit Linux kernel: real PIDs are all below it."""
PIDS_PER_GPU = 1000
"""GPU g's server is PID_BASE + g × PIDS_PER_GPU, its jobs the PIDs after it: stable numbers
that say which board a process is on."""
_UID_NAMESPACE = uuid.UUID("5a1e0000-0000-4000-8000-6a6f756c6570")
"""Pod UIDs are uuid5 of the pod's name in this namespace: stable from run to run."""


@dataclass(frozen=True, slots=True)
class Job:
    """A process beside the served model on board `gpu`, in pod container
    `namespace/pod/container`: `sm_util` percent and `power_w` watts (added to the board's
    power) while busy. With `cycle_s`, it is busy for the first `busy_s` of each cycle of the
    monotonic clock and idle for the rest (a training loop's steps, then its data loading or
    checkpoint); without, always busy."""

    gpu: int
    namespace: str
    pod: str
    container: str
    comm: str
    sm_util: float
    power_w: float
    cycle_s: float = 0.0
    busy_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.gpu >= 0 and 0 <= self.sm_util <= 100 and self.power_w >= 0
                and math.isfinite(self.power_w)):
            raise ValueError(f"job {self.pod!r}: need gpu >= 0, 0 <= sm_util <= 100 and a "
                             "finite power_w >= 0")
        if self.cycle_s and not 0 < self.busy_s <= self.cycle_s:
            raise ValueError(f"job {self.pod!r}: need 0 < busy_s <= cycle_s")

    def busy(self, t: float) -> bool:
        return not self.cycle_s or t % self.cycle_s < self.busy_s

    def power_at(self, t: float) -> float:
        """What the job adds to its board's power at time t: a function of t alone, as the
        `LoadModel` contract asks."""
        return self.power_w if self.busy(t) else 0.0

    def sm_at(self, t: float) -> float:
        return self.sm_util if self.busy(t) else 0.0


@dataclass(frozen=True, slots=True)
class SimProcess:
    """One simulated process: the server of board `gpu` (`job` None) or one of its jobs."""

    pid: int
    gpu: int
    namespace: str
    pod: str
    container: str
    comm: str
    job: Job | None = None

    @property
    def pod_uid(self) -> str:
        """The pod's UID, as the API server writes it (dashes)."""
        return str(uuid.uuid5(_UID_NAMESPACE, f"{self.namespace}/{self.pod}"))

    @property
    def container_id(self) -> str:
        """The container's id as containerd writes it: 64 hex digits."""
        name = f"{self.namespace}/{self.pod}/{self.container}"
        return hashlib.sha256(name.encode()).hexdigest()

    def cgroup(self) -> str:
        """The `/proc/<pid>/cgroup` text of a burstable pod's container: cgroup v2, the
        kubelet's systemd driver (`-` of the UID as `_`), containerd."""
        uid = self.pod_uid.replace("-", "_")
        return (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
                f"/cri-containerd-{self.container_id}.scope\n")


class PodCgroup(Protocol):
    """What `name_of` reads of a process's pod container (`cgroups.PodContainer`'s shape)."""

    @property
    def pod_uid(self) -> str: ...

    @property
    def container_id(self) -> str | None: ...


class SimulatedProcesses:
    """The simulated processes of every board: board i's server is in pod container
    `servers[i]` (namespace, pod, container); `jobs` run beside the servers."""

    def __init__(self, servers: Sequence[tuple[str, str, str]], jobs: Sequence[Job] = (), *,
                 server_comm: str = "vllm") -> None:
        if not servers:
            raise ValueError("simulated processes need at least one GPU's server")
        processes = [SimProcess(PID_BASE + gpu * PIDS_PER_GPU, gpu, *names, server_comm)
                     for gpu, names in enumerate(servers)]
        slots = [1] * len(servers)
        for job in jobs:
            if job.gpu >= len(servers):
                raise ValueError(f"job {job.pod!r}: no GPU {job.gpu} (have {len(servers)})")
            if slots[job.gpu] == PIDS_PER_GPU:
                raise ValueError(f"more than {PIDS_PER_GPU - 1} jobs on GPU {job.gpu}")
            processes.append(SimProcess(PID_BASE + job.gpu * PIDS_PER_GPU + slots[job.gpu],
                                        job.gpu, job.namespace, job.pod, job.container,
                                        job.comm, job))
            slots[job.gpu] += 1
        self.gpu_count = len(servers)
        self.processes = tuple(processes)
        self._on = [tuple(p for p in processes if p.gpu == gpu) for gpu in range(len(servers))]
        self._jobs = [tuple(p.job for p in on if p.job is not None) for on in self._on]
        self._names = {(p.pod_uid, p.container_id): (p.namespace, p.pod, p.container)
                       for p in processes}
        if len(self._names) < len(processes):
            raise ValueError("two simulated processes share a pod container")

    @classmethod
    def serving(cls, models: Sequence[str], jobs: Sequence[Job] = ()) -> SimulatedProcesses:
        """Board i's server as pod `inference/<models[i]>-<i>`, container `server`: every
        board's server a pod of its own."""
        return cls([("inference", f"{model}-{gpu}", "server") for gpu, model in
                    enumerate(models)], jobs)

    def on(self, gpu: int) -> tuple[SimProcess, ...]:
        """Board `gpu`'s processes, its server first."""
        return self._on[gpu]

    def job_power_w(self, gpu: int, t: float) -> float:
        """What the jobs on board `gpu` add to its power at time t."""
        return math.fsum(job.power_at(t) for job in self._jobs[gpu])

    def write_proc(self, root: str | Path) -> Path:
        """Write `<root>/<pid>/cgroup` and `comm` of every process (a `proc_root` for the
        workload view); returns the root."""
        folder = Path(root)
        for process in self.processes:
            own = folder / str(process.pid)
            own.mkdir(parents=True, exist_ok=True)
            (own / "cgroup").write_text(process.cgroup())
            (own / "comm").write_text(f"{process.comm}\n")
        return folder

    def name_of(self, container: PodCgroup) -> tuple[str, str, str] | None:
        """(namespace, pod, container) of a simulated process's pod container; None for any
        other (a `PodNames`)."""
        return self._names.get((container.pod_uid, container.container_id or ""))
