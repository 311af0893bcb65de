"""The workload view on one node, wired from `[workloads]`: who is on each GPU, observed on a
thread of its own, and the accounts that split every measured interval among them.

The observer's readers are chosen here: the kubelet's allocations where its pod-resources
socket is (or is configured), and the node's pod list where the agent runs in a pod (or
Kubernetes is configured). A reader that is configured but cannot work now (no socket, no
permission, no `NODE_NAME`) does not stop the agent: the split falls back to the processes,
and the reason is shown by `jouleprobe doctor` and the metrics.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.attribution.workloads import WorkloadAccounts
from agent.config import WorkloadsSection
from agent.devices.base import GpuInfo, GpuSource, ProcessSource
from agent.workloads.kubernetes import ApiServer, KubernetesError, NodePods, list_node_pods
from agent.workloads.naming import PodNames
from agent.workloads.observer import Refreshed, WorkloadObserver
from agent.workloads.podresources import DEFAULT_SOCKET, DeviceHolders, list_gpu_holders

log = logging.getLogger(__name__)

HISTORY_MARGIN_S = 30.0
"""Occupancies are kept this much longer than the longest an interval waits to be shared."""


@dataclass(frozen=True)
class Readers:
    """The observer's optional readers, and why each is off where it is."""

    allocations: Refreshed[Mapping[str, DeviceHolders]] | None
    pods: Refreshed[NodePods] | None
    off: Mapping[str, str]
    """`allocations` / `pod_names` → why it is not read."""


def readers(config: WorkloadsSection, environ: Mapping[str, str] | None = None) -> Readers:
    """The allocation and pod-list readers `config` asks for. Raises ValueError for one that
    is asked for explicitly (a socket path, `kubernetes = "on"`) and cannot be set up."""
    env = os.environ if environ is None else environ
    off: dict[str, str] = {}
    allocations: Refreshed[Mapping[str, DeviceHolders]] | None = None
    socket = DEFAULT_SOCKET if config.pod_resources == "auto" else config.pod_resources
    if not socket:
        off["allocations"] = "workloads.pod_resources is ''"
    elif config.pod_resources == "auto" and not os.path.exists(socket):
        off["allocations"] = f"no kubelet pod-resources socket at {socket}"
    else:
        allocations = Refreshed(lambda: list_gpu_holders(socket), config.refresh)
    pods: Refreshed[NodePods] | None = None
    in_pod = bool(env.get("KUBERNETES_SERVICE_HOST"))
    if config.kubernetes == "off" or (config.kubernetes == "auto" and not in_pod):
        off["pod_names"] = ("workloads.kubernetes is off" if config.kubernetes == "off"
                            else "not running in a Kubernetes pod")
    else:
        try:
            server = ApiServer.from_environment(env)
        except KubernetesError as exc:
            if config.kubernetes == "on":
                raise ValueError(f"workloads.kubernetes = 'on': {exc}") from None
            off["pod_names"] = str(exc)
        else:
            pods = Refreshed(lambda: list_node_pods(server), config.refresh)
    return Readers(allocations, pods, off)


class WorkloadView:
    """The observer, its thread, and the accounts the attribution engine feeds."""

    def __init__(self, config: WorkloadsSection, source: ProcessSource, gpus: list[GpuInfo], *,
                 settle_s: float, pod_names: PodNames | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        """`settle_s`: the longest an interval waits before it is shared; `pod_names`: names
        of pods from elsewhere than the API server (the demo's simulated pods)."""
        self.readers = readers(config, environ)
        names: Refreshed[PodNames] | None = self.readers.pods
        if names is None and pod_names is not None:
            names = Refreshed(_constant(pod_names), float("inf"))
        self.observer = WorkloadObserver(
            source, gpus, history_s=settle_s + HISTORY_MARGIN_S + 2 * config.period,
            proc_root=config.proc_root, allocations=self.readers.allocations,
            pod_names=names,
        )
        self.accounts = WorkloadAccounts(
            self.observer, max_series=config.max_series, gone_after_s=config.gone_after,
            record_period_s=config.record_period,
        )
        self._period_s = config.period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jouleprobe-workloads",
                                        daemon=True)

    def start(self) -> None:
        self.observer.observe()  # the first occupancy, before the first interval ends
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.observer.observe()
            except Exception:  # one bad round must not end the workload view
                log.exception("workload observation round failed")


def open_view(config: WorkloadsSection, source: GpuSource, gpus: list[GpuInfo], *,
              settle_s: float, pod_names: PodNames | None = None) -> WorkloadView | str:
    """The workload view, or why there is none."""
    if not config.enabled:
        return "workloads.enabled is false"
    if not isinstance(source, ProcessSource):
        return "the GPU source lists no processes"
    return WorkloadView(config, source, gpus, settle_s=settle_s, pod_names=pod_names)


def _constant(pod_names: PodNames) -> Callable[[], PodNames]:
    return lambda: pod_names
