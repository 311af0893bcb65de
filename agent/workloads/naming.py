"""A workload's name: the labels its energy is exported and recorded under.

Two readings name the same workload alike: a process's cgroup (`cgroups.PodContainer`, by pod
UID and container id) once the pod list gives it names, and the kubelet's allocation of a GPU
(`podresources.ContainerRef`, by names). Both become `namespace/pod/container`, so a GPU held
by a container and that container's processes add up under one name. Without the pod list a
pod's container is known by its UID and container id only, and its pod labels stay empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from agent.workloads.cgroups import Command, Container, PodContainer, Unit, Workload
from agent.workloads.podresources import ContainerRef

Kind = Literal["pod", "container", "unit", "process", "none"]
"""What a workload is; "none" is the energy no workload owns (`attribution.workloads`)."""

SHORT_ID = 12
"""Characters of a container id in a name, as `docker ps` shows it."""


@dataclass(frozen=True, slots=True, order=True)
class WorkloadName:
    """What a workload is called: `workload` is unique on the node; the pod labels are empty
    off Kubernetes."""

    workload: str
    kind: Kind
    namespace: str = ""
    pod: str = ""
    container: str = ""

    def __hash__(self) -> int:
        """`workload` alone (unique on the node; equal names have equal ones): the accounts
        look names up several times per interval, and the generated hash builds a tuple
        of all five fields each time."""
        return hash(self.workload)


class PodNames(Protocol):
    """The pods on this node by UID (the Kubernetes pod list)."""

    def name_of(self, container: PodContainer) -> tuple[str, str, str] | None:
        """(namespace, pod, container) of a pod's container; None where the pod is unknown."""
        ...


def pod_container(namespace: str, pod: str, container: str) -> WorkloadName:
    return WorkloadName(f"{namespace}/{pod}/{container}", "pod", namespace, pod, container)


def of_allocation(holder: ContainerRef) -> WorkloadName:
    """The container the kubelet allocated a device to."""
    return pod_container(holder.namespace, holder.pod, holder.container)


def of_process(workload: Workload, pods: PodNames | None) -> WorkloadName:
    """The workload a process's cgroup names, with the pod's names where `pods` knows it."""
    match workload:
        case PodContainer(pod_uid=uid, container_id=cid):
            names = pods.name_of(workload) if pods is not None else None
            if names is not None:
                return pod_container(*names)
            return WorkloadName(f"pod-uid:{uid}/{(cid or '')[:SHORT_ID]}", "pod")
        case Container(container_id=cid, runtime=runtime):
            return WorkloadName(f"{runtime or 'container'}:{cid[:SHORT_ID]}", "container")
        case Unit(name=name):
            return WorkloadName(f"unit:{name}", "unit")
        case Command(name=name):
            return WorkloadName(f"process:{name}", "process")
