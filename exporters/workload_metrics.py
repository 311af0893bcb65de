"""The workload view as Prometheus metrics: each GPU's energy by workload, the rest
unattributed, and the health of the observer that says who is on each GPU.

Read once per scrape, as a `FamilyProducer` for `NodeCollector`: the accounts
(`WorkloadAccounts.totals`) and the observer (`WorkloadObserver.status`) keep the figures,
so copying them into client metrics would be a second source of truth.

Per GPU, Σ `jouleprobe_workload_gpu_energy_joules_total` over its workloads (`other`
included) + `jouleprobe_workload_unattributed_gpu_energy_joules_total` is the energy of the
intervals split so far: the same intervals the request view splits, so the same figure as
its attributed + unattributed, and `jouleprobe_gpu_energy_joules_total` less what has not
settled yet. A workload gone for `workloads.gone_after` leaves the metrics (back later, it
starts again from 0), so the sum holds for `increase()` over a window, not for the values
now. Series are bounded by `workloads.max_series`; the workloads past it share
`workload="other"`.

The pod labels (namespace, pod, container) are empty off Kubernetes, and for a pod whose
names the agent could not read; `workload` is unique on the node, so it is what
`jouleprobe_workload_info` joins on. No PID is ever a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.attribution.workloads import WorkloadTotals
from agent.devices.base import GpuInfo
from agent.sampler import NodeSnapshot
from agent.units import flag_text
from agent.workloads.observer import ObserverStatus
from exporters.prometheus import GPU_LABELS

NAME_LABELS = ("namespace", "pod", "container", "workload")
"""A workload's labels on its energy series; `kind` and `inference` are on its info."""

SOURCES = ("allocations", "pod_names")
"""The observer's optional readers, as `ObserverStatus` names them and `source` labels them."""

_OFF = "off"
_OK = "ok"


class WorkloadMetrics:
    """The workload view's families; `families` is the `FamilyProducer` to give
    `NodeCollector.add`."""

    def __init__(self, totals: Callable[[], WorkloadTotals], gpus: Sequence[GpuInfo],
                 status: Callable[[], ObserverStatus]) -> None:
        """`totals`: the accounts' counters (`accounts.totals`), `status`: the observer's
        last round (`observer.status`), each read once per scrape; `gpus`: the GPUs observed,
        for their uuids and so that each has its series before its first interval."""
        self._totals = totals
        self._uuids = {gpu.index: gpu.uuid for gpu in gpus}
        self._status = status

    def families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        yield from self._energy_families(self._totals())
        yield from self._observer_families(self._status())

    def _gpu_labels(self, gpu: int) -> list[str]:
        return [str(gpu), self._uuids.get(gpu, "")]  # accounts' GPUs = the observer's

    def _energy_families(self, totals: WorkloadTotals) -> Iterator[Metric]:
        energy = CounterMetricFamily(
            "jouleprobe_workload_gpu_energy_joules",
            "GPU energy credited to each workload (pod container, container, systemd unit or "
            "process) since it was first seen: all of an interval to the container the "
            "kubelet allocated the GPU to, else dynamic energy by SM utilisation and idle "
            "baseline by presence. Per GPU, the sum over workloads plus "
            "jouleprobe_workload_unattributed_gpu_energy_joules_total is the GPU energy "
            "split so far (for increase() over any window: a workload gone for "
            "workloads.gone_after leaves). Workloads past workloads.max_series are "
            "workload=\"other\".",
            labels=[*GPU_LABELS, *NAME_LABELS], unit="joules",
        )
        info = GaugeMetricFamily(
            "jouleprobe_workload_info",
            "Each workload with energy series, always 1: its kind (pod, container, unit, "
            "process) and inference=\"true\" once it held a GPU alone, or was the only "
            "workload busy on it, while requests ran there. Join on workload.",
            labels=["workload", "kind", "namespace", "pod", "container", "inference"],
        )
        unattributed = CounterMetricFamily(
            "jouleprobe_workload_unattributed_gpu_energy_joules",
            "GPU energy split so far that no workload owns: all of an interval with no "
            "process on the GPU (or before the observer's first round), the dynamic part of "
            "one with no SM activity sampled, and the shares of processes whose workload is "
            "unknown. Per GPU, this plus the sum of "
            "jouleprobe_workload_gpu_energy_joules_total is the GPU energy split so far.",
            labels=GPU_LABELS, unit="joules",
        )
        names = set()
        for (name, gpu), joules in sorted(totals.energy_j.items()):
            energy.add_metric([*self._gpu_labels(gpu), name.namespace, name.pod,
                               name.container, name.workload], joules)
            names.add(name)
        for name in sorted(names):
            info.add_metric([name.workload, name.kind, name.namespace, name.pod,
                             name.container, flag_text(name in totals.inference)], 1)
        for gpu in sorted(self._uuids.keys() | totals.unattributed_j.keys()):
            unattributed.add_metric(self._gpu_labels(gpu), totals.unattributed_j.get(gpu, 0.0))
        yield from (energy, info, unattributed)

    def _observer_families(self, status: ObserverStatus) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "jouleprobe_workload_observer_rounds",
            "Rounds of the workload observer (one a workloads.period): each reads every "
            "GPU's processes and their utilisation. A rate below 1/period means rounds run "
            "late, and the split is resolved more coarsely.",
            value=status.rounds,
        )
        yield GaugeMetricFamily(
            "jouleprobe_workload_processes",
            "Processes (PIDs) on any GPU in the observer's last round.",
            value=status.processes,
        )
        unresolved = GaugeMetricFamily(
            "jouleprobe_workload_unresolved_processes",
            "Processes of the last round whose workload is unknown, by reason (vanished: "
            "exited, or in another PID namespace; no_permission; unreadable); their share "
            "of GPU energy is unattributed.",
            labels=["reason"],
        )
        for reason, count in sorted(status.unresolved.items()):
            unresolved.add_metric([reason], count)
        yield unresolved
        up = GaugeMetricFamily(
            "jouleprobe_workload_source_up",
            "1 where the latest read of the source succeeded, 0 where it failed (the split "
            "then keeps its last good value, or goes by processes alone; jouleprobe doctor "
            "says why): allocations, the kubelet's GPU allocations; pod_names, this node's "
            "pod list. Absent for a source that is not configured.",
            labels=["source"],
        )
        for source, state in zip(SOURCES, (status.allocations, status.pod_names), strict=True):
            if state != _OFF:
                up.add_metric([source], float(state == _OK))
        yield up
        readable = GaugeMetricFamily(
            "jouleprobe_workload_process_utilization_up",
            "1 where the last round read the GPU's per-process utilisation, 0 where it "
            "could not (MIG, unsupported, failed): a GPU shared by workloads then leaves its "
            "dynamic energy unattributed. Absent before the first round.",
            labels=GPU_LABELS,
        )
        if status.rounds:  # before the first round nothing has been read
            missing = set(status.no_utilization)
            for gpu in sorted(self._uuids):
                readable.add_metric(self._gpu_labels(gpu), float(gpu not in missing))
        yield readable
