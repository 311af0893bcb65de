"""CPU cost of the workload view: 8 GPUs × 20 processes, observed at 1 Hz and at 10 Hz.

Run: python bench/workloads.py [--gpus 8] [--processes 20] [--seconds 20]

The pieces are the agent's own, wired as `agent.app.workloads.WorkloadView` wires them: the
real `NvmlGpuSource` over the scripted fake pynvml (`tests/fake_pynvml.py`, on the real
clock), a `WorkloadObserver` on a thread of its own reading each process's cgroup from a
temporary proc_root and naming pods through a `NodePods` list, and the `WorkloadAccounts`
that the attribution lanes feed: one `interval` per GPU per sample at the sampler's 10 Hz,
handed over as the daemon's attribution rounds run them (every `ATTRIBUTION_PERIOD_S`, all
the intervals settled since the last round, `settle` (2 s) behind the clock), then
`take_records`.

Each GPU carries 20 processes: three Kubernetes pods (burstable, guaranteed and besteffort,
systemd cgroup driver, containerd; one of them with two containers), two systemd services
and one process in a login session (named by its command). Every 5 s one process per GPU
is replaced by a new PID, so some cgroups are read during the run.

NVML's per-process utilisation is the driver's as documented: one sample per process that
was busy in the driver's last sample period (1/6 s), stamped with that period, NotFound
when there is none newer than asked. The fake's own `nvmlDeviceGetProcessUtilization`
scans every sample scripted so far, which would grow with the run, so this benchmark
replaces that one function of the fake's module (the fake itself is unchanged).

Figures, per observer period: the share of one core of the observer thread and of the
accounts thread (`time.thread_time`, so nothing else in the process is counted) and of the
whole process; the CPU per observer round, per attribution round and per interval; the peak
RSS growth; and the size of the occupancy history once full (it fills after
settle + 30 s + 2 periods, longer than a default run, so it is extrapolated from what is
held). The fake's calls cost far less than real NVML calls; the fake's own share of a round
is measured alone and printed, so the rest is the agent's. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import resource
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # fake_pynvml

from agent.app.daemon import ATTRIBUTION_PERIOD_S
from agent.app.workloads import HISTORY_MARGIN_S
from agent.attribution import AttributionEngine
from agent.attribution.workloads import WorkloadAccounts
from agent.devices.nvml import NvmlGpuSource
from agent.sampler import Sampler
from agent.workloads.kubernetes import KubeContainer, NodePods, Pod
from agent.workloads.naming import PodNames
from agent.workloads.observer import Refreshed, WorkloadObserver

SAMPLER_HZ = 10.0
SETTLE_S = 2.0
"""`attribution.settle`'s default: how far behind the clock the lanes hand intervals over."""
DRIVER_PERIOD_S = 1 / 6
"""The driver's per-process sample period, about a sixth of a second."""
CHURN_S = 5.0
BUSY = 0.75
"""Share of (process, driver period) pairs with SM activity."""

# Per GPU: pods as (QoS class, containers, processes per container); units as (unit, comm,
# processes).
PODS = (("burstable", 1, 6), ("guaranteed", 1, 5), ("besteffort", 2, 3))
UNITS = (("triton.service", "tritonserver", 1), ("jupyterhub.service", "python3", 1))
"""19 processes so far; the 20th (and any beyond) is in a login session, named `python`."""


@dataclass
class Process:
    pid: int
    cgroup: str
    comm: str


def _hex(seed: int, digits: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()[:digits]


def _uid(seed: int) -> str:
    h = _hex(seed + 7, 32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def pod_cgroup(qos: str, uid: str, container_id: str) -> str:
    """The cgroup v2 path of a container with the systemd driver and containerd."""
    scope = f"cri-containerd-{container_id}.scope"
    pod = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"0::/kubepods.slice/kubepods-pod{pod}.slice/{scope}"
    return (f"0::/kubepods.slice/kubepods-{qos}.slice/"
            f"kubepods-{qos}-pod{pod}.slice/{scope}")


class Node:
    """The scripted node: pods, processes per GPU (with churn), their /proc entries."""

    def __init__(self, gpus: int, processes: int, proc_root: Path) -> None:
        self.proc_root = proc_root
        self.per_gpu: list[list[Process]] = []
        """Each GPU's processes now; `churn` replaces one."""
        pods: list[Pod] = []
        self._next_pid = 40_000
        for gpu in range(gpus):
            listed: list[Process] = []
            pid = 10_000 + gpu * 1000
            for p, (qos, containers, workers) in enumerate(PODS):
                seed = gpu * 10 + p
                uid = _uid(seed)
                kube = []
                for c in range(containers):
                    cid = _hex(seed * 100 + c + 1, 64)
                    kube.append(KubeContainer(f"c{c}", "container", cid, "containerd"))
                    for _ in range(workers):
                        listed.append(Process(pid, pod_cgroup(qos, uid, cid), "python3"))
                        pid += 1
                pods.append(Pod(uid, "ml" if p != 2 else "research", f"server-{gpu}-{p}",
                                "Running", f"10.0.{gpu}.{p + 1}", containers=tuple(kube)))
            for unit, comm, count in UNITS:
                for _ in range(count):
                    listed.append(Process(pid, f"0::/system.slice/{unit}", comm))
                    pid += 1
            while len(listed) < processes:
                listed.append(Process(pid, "0::/user.slice/user-1000.slice/session-4.scope",
                                      "python"))
                pid += 1
            del listed[processes:]
            self.per_gpu.append(listed)
        self.pods = NodePods("gpu-node-1", tuple(sorted(pods, key=lambda p: (p.namespace,
                                                                                 p.name))))
        for listed in self.per_gpu:
            for process in listed:
                self._write(process)

    def _write(self, process: Process) -> None:
        folder = self.proc_root / str(process.pid)
        folder.mkdir()
        (folder / "cgroup").write_text(process.cgroup + "\n")
        (folder / "comm").write_text(process.comm + "\n")

    def churn(self, gpu: int, turn: int) -> list[Process]:
        """GPU `gpu`'s list at churn `turn` (1, 2, ...): a worker of its first pod restarted
        under a new PID, whose /proc entry is written now."""
        listed = self.per_gpu[gpu] = list(self.per_gpu[gpu])
        slot = (turn - 1) % PODS[0][2]
        new = Process(self._next_pid, listed[slot].cgroup, listed[slot].comm)
        self._next_pid += 1
        self._write(new)
        listed[slot] = new
        return listed


def script_nvml(node: Node, duration_s: float) -> tuple[Any, ModuleType]:
    """The fake pynvml on the real clock, with every GPU's process lists scripted for
    `duration_s`, and the driver's per-process samples generated on demand."""
    fake_pynvml = importlib.import_module("fake_pynvml")
    fake = fake_pynvml.FakeNvml(clock=time.monotonic)
    real = fake_pynvml._real
    lists: list[list[tuple[float, frozenset[int]]]] = []
    for gpu, _ in enumerate(node.per_gpu):
        fake.add_gpu(300.0, idle_w=70.0, limit_w=700.0)
        schedule: list[tuple[float, frozenset[int]]] = []
        turns = int(duration_s // CHURN_S) + 1
        for turn in range(turns):
            listed = node.churn(gpu, turn) if turn else node.per_gpu[gpu]
            at = turn * CHURN_S
            fake.set_processes(gpu, [(p.pid, 2 * 2**30) for p in listed], at=at)
            schedule.append((at, frozenset(p.pid for p in listed)))
        lists.append(schedule)

    def utilization(handle: Any, timeStamp: int) -> Any:  # pynvml's argument name
        """One sample per process busy in the driver's last period, if newer than asked."""
        fake._enter("nvmlDeviceGetProcessUtilization", handle)
        now = fake.now()
        period = int(now / DRIVER_PERIOD_S)
        stamp = fake.sample_stamp_us(period * DRIVER_PERIOD_S)
        if stamp <= timeStamp:
            raise real.NVMLError_NotFound()
        pids: frozenset[int] = frozenset()
        for begins, listed in lists[handle.index]:
            if begins <= now:
                pids = listed
        busy = [pid for pid in sorted(pids)
                if (pid * 2654435761 + period * 40503) % 1000 < BUSY * 1000]
        if not busy:
            raise real.NVMLError_NotFound()
        samples = (real.c_nvmlProcessUtilizationSample_t * len(busy))()
        for sample, pid in zip(samples, busy, strict=True):
            sample.pid, sample.timeStamp = pid, stamp
            sample.smUtil = 5 + (pid * 31 + period * 17) % 90
            sample.memUtil = sample.smUtil // 3
        return samples

    fake.module.nvmlDeviceGetProcessUtilization = utilization
    return fake, fake.module


class Loop:
    """A thread running `step` every `period_s` (as WorkloadView's does for the observer),
    keeping its own CPU time and rounds for the main thread to read."""

    def __init__(self, name: str, period_s: float, step: Callable[[], None],
                 *, deadline: bool) -> None:
        self.period_s = period_s
        self.step = step
        self.deadline = deadline
        self.cpu = 0.0
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        if not self.deadline:  # WorkloadView._run, exactly
            while not self.stop.wait(self.period_s):
                self.step()
                self.rounds += 1
                self.cpu = time.thread_time()
            return
        next_at = time.monotonic()
        while True:  # the sampler's fixed-rate ticks
            next_at += self.period_s
            if self.stop.wait(max(0.0, next_at - time.monotonic())):
                return
            self.step()
            self.rounds += 1
            self.cpu = time.thread_time()

    def reading(self) -> tuple[float, int]:
        return self.cpu, self.rounds


def deep_size(root: object) -> int:
    """Bytes held by `root` and everything it reaches, each object counted once."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            stack.extend(obj)
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, name) for name in obj.__slots__
                         if hasattr(obj, name))
    return total


def fake_round_cost(nvml: ModuleType, gpus: int, rounds: int) -> float:
    """CPU seconds of one round of the fake's own calls (no agent code), every GPU giving
    samples: at most what of the observer's round is the stand-in for the driver."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
    since = 0
    cpu0 = time.thread_time()
    for _ in range(rounds):
        for handle in handles:
            nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlDeviceGetProcessUtilization(handle, since)
    return (time.thread_time() - cpu0) / rounds


def run(period_s: float, args: argparse.Namespace) -> dict[str, float]:
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warmup_s = SETTLE_S + 1.0
    with tempfile.TemporaryDirectory(prefix="jouleprobe-proc-") as proc_root:
        node = Node(args.gpus, args.processes, Path(proc_root))
        fake, nvml = script_nvml(node, warmup_s + args.seconds + 5.0)
        source = NvmlGpuSource.open(nvml_module=nvml)
        gpus = source.gpus()
        pod_names: Refreshed[PodNames] = Refreshed(lambda: node.pods, 10.0)
        observer = WorkloadObserver(
            source, gpus, history_s=SETTLE_S + HISTORY_MARGIN_S + 2 * period_s,
            proc_root=proc_root, pod_names=pod_names,
            wall_us=lambda: int(time.monotonic() * 1e6),  # the fake stamps on this clock
        )
        accounts = WorkloadAccounts(observer)
        last_t1 = {gpu.index: time.monotonic() - SETTLE_S for gpu in gpus}
        ticks = 0
        records = 0
        intervals = 0

        def tick() -> None:
            """One attribution round, as `Node.attribute` runs it every
            ATTRIBUTION_PERIOD_S: every GPU's intervals settled since the last round (one per
            sample at the sampler's rate), then the closed stretches taken."""
            nonlocal ticks, records, intervals
            settled = time.monotonic() - SETTLE_S
            for gpu in gpus:
                t0 = last_t1[gpu.index]
                while t0 + 1 / SAMPLER_HZ <= settled:
                    t1 = t0 + 1 / SAMPLER_HZ
                    accounts.interval(gpu.index, t0, t1, 300.0 * (t1 - t0), 70.0,
                                      serving=intervals % 3 != 0)
                    intervals += 1
                    t0 = t1
                last_t1[gpu.index] = t0
            ticks += 1
            records += len(accounts.take_records(settled))

        observing = Loop("jouleprobe-workloads", period_s, observer.observe, deadline=False)
        feeding = Loop("lanes", ATTRIBUTION_PERIOD_S, tick, deadline=True)
        observer.observe()  # as WorkloadView.start does
        observing.thread.start()
        feeding.thread.start()
        time.sleep(warmup_s)  # let the first intervals reach a settled occupancy

        (o_cpu0, o_rounds0), (a_cpu0, a_ticks0) = observing.reading(), feeding.reading()
        intervals0 = intervals
        p_cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(args.seconds)
        (o_cpu1, o_rounds1), (a_cpu1, a_ticks1) = observing.reading(), feeding.reading()
        intervals1 = intervals
        p_cpu1, wall1 = time.process_time(), time.monotonic()
        observing.stop.set()
        feeding.stop.set()
        observing.thread.join()
        feeding.thread.join()

        wall = wall1 - wall0
        status = observer.status()
        held = sum(len(h) for h in observer._history.values())
        full = args.gpus * round((SETTLE_S + HISTORY_MARGIN_S + 2 * period_s) / period_s)
        history_bytes = deep_size(list(observer._history.values()))
        fake_us = fake_round_cost(nvml, args.gpus, 200) * 1e6
        maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        source.close()
        del fake
    o_rounds, a_ticks = o_rounds1 - o_rounds0, a_ticks1 - a_ticks0
    return {
        "period_s": period_s,
        "observer_core_pct": (o_cpu1 - o_cpu0) / wall * 100,
        "accounts_core_pct": (a_cpu1 - a_cpu0) / wall * 100,
        "both_core_pct": (o_cpu1 - o_cpu0 + a_cpu1 - a_cpu0) / wall * 100,
        "process_core_pct": (p_cpu1 - p_cpu0) / wall * 100,
        "observer_rounds": o_rounds,
        "observer_us_per_round": (o_cpu1 - o_cpu0) / max(1, o_rounds) * 1e6,
        "fake_nvml_us_per_round": fake_us,
        "accounts_ticks": a_ticks,
        "accounts_us_per_tick": (a_cpu1 - a_cpu0) / max(1, a_ticks) * 1e6,
        "accounts_us_per_interval": (a_cpu1 - a_cpu0) / max(1, intervals1 - intervals0) * 1e6,
        "records": records,
        "processes": status.processes,
        "workloads": len(status.workloads),
        "unresolved": sum(status.unresolved.values()),
        "peak_rss_growth_mib": (maxrss1 - maxrss0) / 1024,
        "history_held": held,
        "history_full": full,
        "history_full_mib": history_bytes / max(1, held) * full / 2**20,
    }


def run_node(with_view: bool, args: argparse.Namespace) -> float:
    """Share of one core of the whole process for a node's measurement path: the real
    Sampler at 10 Hz over the same fake GPUs (scheduled, its reader thread), a real
    AttributionEngine advanced every ATTRIBUTION_PERIOD_S on a thread of its own (no
    requests: every interval unattributed), and, `with_view`, the workload view wired into
    it as `Node` wires it (the observer at 1 Hz, the accounts fed by the engine's lanes)."""
    with tempfile.TemporaryDirectory(prefix="jouleprobe-proc-") as proc_root:
        node = Node(args.gpus, args.processes, Path(proc_root))
        fake, nvml = script_nvml(node, 2 * SETTLE_S + args.node_seconds + 5.0)
        source = NvmlGpuSource.open(nvml_module=nvml)
        gpus = source.gpus()
        sampler = Sampler(source, interval_s=1 / SAMPLER_HZ, clock=time.monotonic)
        loops: list[Loop] = []
        accounts: WorkloadAccounts | None = None
        if with_view:
            observer = WorkloadObserver(
                source, gpus, history_s=SETTLE_S + HISTORY_MARGIN_S + 2.0,
                proc_root=proc_root, pod_names=Refreshed(lambda: node.pods, 10.0),
                wall_us=lambda: int(time.monotonic() * 1e6))
            accounts = WorkloadAccounts(observer)
            observer.observe()
            loops.append(Loop("jouleprobe-workloads", 1.0, observer.observe, deadline=False))
        engine = AttributionEngine(sampler.timelines, settle_s=SETTLE_S, workloads=accounts)

        def attribute() -> None:
            now = time.monotonic()
            engine.advance(now)
            if accounts is not None:
                accounts.take_records(now)

        loops.append(Loop("attribution", ATTRIBUTION_PERIOD_S, attribute, deadline=True))
        sampler.start()
        for loop in loops:
            loop.thread.start()
        time.sleep(2 * SETTLE_S)  # intervals settle, the learners start
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(args.node_seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        for loop in loops:
            loop.stop.set()
            loop.thread.join()
        sampler.stop()
        source.close()
        del fake
    return (cpu1 - cpu0) / (wall1 - wall0) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--processes", type=int, default=20, help="per GPU")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured, per period")
    parser.add_argument("--node-seconds", type=float, default=15.0,
                        help="measured, per run of the whole node path (4 runs)")
    args = parser.parse_args()

    results = [run(period_s, args) for period_s in (1.0, 0.1)]
    print(f"{args.gpus} GPUs × {args.processes} processes (fake pynvml, NVML code path), "
          f"accounts fed {SAMPLER_HZ:.0f} intervals/s per GPU in rounds every "
          f"{ATTRIBUTION_PERIOD_S:g} s, {args.seconds:.0f} s measured per period")
    for r in results:
        hz = 1 / r["period_s"]
        print(f"observer at {hz:.0f} Hz: {r['processes']:.0f} PIDs, {r['workloads']:.0f} "
              f"workloads, {r['unresolved']:.0f} unresolved, {r['records']:.0f} records")
        print(f"  observer thread:  {r['observer_core_pct']:.3f} % of one core, "
              f"{r['observer_us_per_round']:.0f} µs per round ({r['observer_rounds']:.0f} "
              f"rounds; of which the fake pynvml ≤ {r['fake_nvml_us_per_round']:.0f} µs)")
        print(f"  accounts thread:  {r['accounts_core_pct']:.3f} % of one core, "
              f"{r['accounts_us_per_tick']:.0f} µs per attribution round "
              f"({r['accounts_ticks']:.0f} rounds; {r['accounts_us_per_interval']:.1f} µs per "
              "interval)")
        print(f"  together:         {r['both_core_pct']:.3f} % of one core "
              f"(whole process: {r['process_core_pct']:.3f} %)")
        print(f"  peak RSS growth:  {r['peak_rss_growth_mib']:.1f} MiB; occupancy history "
              f"{r['history_held']:.0f} of {r['history_full']:.0f} held, "
              f"~{r['history_full_mib']:.1f} MiB when full")
    node: dict[str, list[float]] = {"without_view": [], "with_view": []}
    for with_view in (False, True, False, True):  # alternated: this VM's speed drifts
        node["with_view" if with_view else "without_view"].append(run_node(with_view, args))
    without, with_ = (sum(node[k]) / 2 for k in ("without_view", "with_view"))
    print(f"node path (sampler at {SAMPLER_HZ:.0f} Hz + engine every {ATTRIBUTION_PERIOD_S:g} s"
          f", whole process, {args.node_seconds:.0f} s per run, alternated):")
    print(f"  without the workload view: "
          f"{' / '.join(f'{v:.3f}' for v in node['without_view'])} % of one core")
    print(f"  with it (observer at 1 Hz): "
          f"{' / '.join(f'{v:.3f}' for v in node['with_view'])} % of one core")
    print(f"  the view adds {with_ - without:.3f} % of one core (means {without:.3f} -> "
          f"{with_:.3f} %)")
    summary: dict[str, Any] = {f"{1 / r['period_s']:.0f}hz": {k: round(v, 4) for k, v in r.items()}
                               for r in results}
    summary["node"] = {k: [round(v, 4) for v in vs] for k, vs in node.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
