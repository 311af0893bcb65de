"""The servers that export their request spans to the agent (`[[trace]]` tables): each
known by its spans' `service.name`, with its GPUs (a list, or for `gpus = "auto"` those of
the pod or the process its spans' resource names) and, optionally, its model.

With `gpus = "auto"` on Kubernetes, the pod comes first: the resource's `k8s.pod.uid` (or
`k8s.pod.name` with `k8s.namespace.name`), set by the OpenTelemetry operator or from the
downward API, is looked up in the node's pod list, and its GPUs are those the kubelet
allocated to its containers (`PodGpus`). That needs neither the host's PID namespace nor
NVML's process lists. Where the resource names no such pod, or its GPUs are not known,
the process it names is looked up as elsewhere (`ProcessGpus`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

from agent.devices.base import GpuInfo
from agent.intake.discovery import GpuResolutionError, GpuResolver, StillResolving
from agent.workloads.kubernetes import NodePods, Pod
from agent.workloads.podresources import DeviceHolders

T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True, slots=True)
class TraceSource:
    """One `[[trace]]` table: the server whose resource has this `service.name`."""

    service: str
    gpus: Callable[[Mapping[str, Any]], tuple[int, ...]]
    """The GPUs serving it, given its spans' resource attributes (`ProcessGpus` reads the
    pod or the process there); raises ValueError while they are not known
    (`StillResolving`: ask again shortly)."""
    model: str = ""
    """The model to record; by default the span's own, else the service name."""

    @property
    def name(self) -> str:
        """`Request.source` of its requests."""
        return f"trace:{self.service}"


def fixed(gpus: tuple[int, ...]) -> Callable[[Mapping[str, Any]], tuple[int, ...]]:
    """The GPUs of a trace source configured with a list: whatever its spans' resource."""
    return lambda _resource: gpus


PROCESS_ATTRIBUTES = ("vllm.process_id", "process.pid")
"""Resource attributes that name the exporting process: vLLM's (a string), OpenTelemetry's
semantic convention (an int)."""
POD_UID, POD_NAME, NAMESPACE = "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name"
POD_ATTRIBUTES = (POD_UID, POD_NAME, NAMESPACE)
"""Resource attributes that name the exporting pod (OpenTelemetry's semantic conventions)."""


class Latest(Protocol[T_co]):
    """A value that another thread reads again now and then (`Refreshed` of the workload
    observer): only its latest good value is looked at here, so that no span or scrape
    ever waits for the API server or the kubelet."""

    @property
    def value(self) -> T_co | None:
        """The latest good read; None before one."""
        ...


class PodGpus:
    """The GPUs the kubelet allocated to a pod's containers, from the node's latest pod list
    and allocations. Safe from any thread: each new read of either is indexed once, by the
    first caller that sees it."""

    def __init__(self, gpus: Sequence[GpuInfo], pods: Latest[NodePods],
                 allocations: Latest[Mapping[str, DeviceHolders]] | None) -> None:
        """`allocations`: None where the kubelet's are not read on this node."""
        self._indices = {gpu.uuid.lower(): gpu.index for gpu in gpus}
        self._pods = pods
        self._allocations = allocations
        self._by_name: tuple[NodePods | None, dict[tuple[str, str], Pod]] = (None, {})
        self._by_pod: tuple[Mapping[str, DeviceHolders] | None,
                            dict[tuple[str, str], tuple[str, ...]]] = (None, {})
        """Per (namespace, pod), the devices its containers hold, for the allocations read."""

    def of_pod(self, namespace: str, pod: str) -> tuple[int, ...]:
        """The indices of the GPUs held by the pod's containers, in order; raises
        GpuResolutionError saying why where it holds none that this node measures."""
        if self._allocations is None:
            raise GpuResolutionError(f"pod {namespace}/{pod}: the kubelet's GPU allocations "
                                     "are not read on this node (workloads.pod_resources)")
        allocations = self._allocations.value
        if allocations is None:
            raise GpuResolutionError(f"pod {namespace}/{pod}: the kubelet's GPU allocations "
                                     "have not been read (see jouleprobe doctor)")
        held, by_pod = self._by_pod
        if held is not allocations:
            by_pod = _devices_by_pod(allocations)
            self._by_pod = (allocations, by_pod)
        devices = by_pod.get((namespace, pod), ())
        indices = sorted({self._indices[d.lower()] for d in devices if d.lower() in self._indices})
        if indices:
            return tuple(indices)
        if not devices:
            raise GpuResolutionError(f"pod {namespace}/{pod} holds no GPU: the kubelet "
                                     "allocated no nvidia.com/gpu to its containers")
        raise GpuResolutionError(
            f"pod {namespace}/{pod} holds {', '.join(devices)}, none of them a GPU of this "
            "node (a MIG instance is measured only as its whole board)")

    def of_resource(self, resource: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The GPUs of the pod that a span's resource names; None where it names none;
        raises GpuResolutionError where the pod or its GPUs are not known."""
        uid, name, namespace = (_text(resource.get(key)) for key in POD_ATTRIBUTES)
        if not uid and not (name and namespace):
            return None
        who = f"pod {namespace}/{name}" if name and namespace else f"pod UID {uid}"
        listed = self._pods.value
        if listed is None:
            raise GpuResolutionError(f"{who}: this node's pod list has not been read "
                                     "(see jouleprobe doctor)")
        pod = listed.pod(uid) if uid else None
        if pod is None and name and namespace:
            indexed, by_name = self._by_name
            if indexed is not listed:
                by_name = {(p.namespace, p.name): p for p in listed.pods}
                self._by_name = (listed, by_name)
            pod = by_name.get((namespace, name))
        if pod is None:
            raise GpuResolutionError(f"{who} is not on the pod list of node {listed.node}")
        return self.of_pod(pod.namespace, pod.name)


def _devices_by_pod(allocations: Mapping[str, DeviceHolders]
                    ) -> dict[tuple[str, str], tuple[str, ...]]:
    found: dict[tuple[str, str], set[str]] = {}
    for holders in allocations.values():
        for holder in holders.holders:
            found.setdefault((holder.namespace, holder.pod), set()).add(holders.device)
    return {pod: tuple(sorted(devices)) for pod, devices in found.items()}


class ProcessGpus:
    """`gpus = "auto"` for a trace source: the GPUs allocated to the pod of the spans'
    resource where `pods` is given and knows them, else those that NVML lists the process
    of the resource (or its descendants: vLLM's workers) on, through the discovery that
    the proxy and the scrapers use (`GpuResolver`), one per process, refreshed in the
    background so that the event loop never waits for NVML."""

    MAX_PROCESSES = 256

    def __init__(self, gpus: Sequence[GpuInfo], nvml_module: ModuleType | None = None, *,
                 pods: PodGpus | None = None) -> None:
        """`pods`: the node's pods and their GPUs, where the agent runs on Kubernetes."""
        self._gpus = list(gpus)
        self._nvml_module = nvml_module
        self._pods = pods
        self._resolvers: OrderedDict[int, GpuResolver] = OrderedDict()

    def __call__(self, resource: Mapping[str, Any]) -> tuple[int, ...]:
        pod_error: str | None = None
        if self._pods is not None:
            try:
                held = self._pods.of_resource(resource)
            except GpuResolutionError as exc:
                pod_error = str(exc)
            else:
                if held is not None:
                    return held
        pid = _process(resource)
        if pid is None:
            if pod_error is not None:
                raise GpuResolutionError(f"{pod_error}, and its resource names no process "
                                         '(vllm.process_id, process.pid) for gpus = "auto"')
            if self._pods is not None:
                raise GpuResolutionError(
                    "its resource names no pod (k8s.pod.uid, or k8s.pod.name and "
                    "k8s.namespace.name) and no process (vllm.process_id, process.pid) for "
                    'gpus = "auto": set OTEL_RESOURCE_ATTRIBUTES=k8s.pod.uid=... from the '
                    "downward API, or give the GPUs in its [[trace]] table")
            raise ValueError("its resource names no process (vllm.process_id, process.pid) "
                             'for gpus = "auto": give the GPUs in its [[trace]] table')
        resolver = self._resolvers.get(pid)
        if resolver is None:
            resolver = GpuResolver("auto", self._gpus, None, self._nvml_module, wait_s=0.0,
                                   pid=pid)
            self._resolvers[pid] = resolver
            if len(self._resolvers) > self.MAX_PROCESSES:
                self._resolvers.popitem(last=False)
        try:
            return resolver.current()
        except StillResolving:
            raise
        except ValueError as exc:
            if pod_error is None:
                raise
            raise GpuResolutionError(f"{pod_error}; by its process: {exc}") from None


def _process(resource: Mapping[str, Any]) -> int | None:
    for key in PROCESS_ATTRIBUTES:
        value = resource.get(key)
        if type(value) is int and value > 0:
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit() and value != "0":
            return int(value)
    return None


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""
