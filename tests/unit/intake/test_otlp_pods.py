"""`gpus = "auto"` for a trace source on Kubernetes: the pod its spans' resource names, looked
up in a real API server's PodList (tests/fixtures/kubernetes) and in the kubelet's
allocations, before the process; the process through the scripted NVML, as elsewhere."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

import psutil
import pytest
from fake_pynvml import FakeNvml
from kube_node import GPUS, NODE, UUIDS, Latest, allocated
from scripted import FIXTURES, wait_until

from agent.intake.discovery import StillResolving
from agent.intake.otlp import PodGpus, ProcessGpus
from agent.workloads.kubernetes import NodePods, parse_pod_list
from agent.workloads.podresources import ContainerRef, DeviceHolders

SERVER = ("kube-system", "coredns-7f5998f4c-5fblt")
"""A pod of the capture, with its UID there."""
SERVER_UID = "7461d1f1-76f1-446c-9d4b-ed86a5fbc765"
OTHER = ("stress-test", "stress2")


def node_pods() -> NodePods:
    return parse_pod_list((FIXTURES / "kubernetes" / "eks_node_pods.json").read_bytes(), NODE)


def gpus_of(allocations: dict[str, DeviceHolders] | None, pods: NodePods | None = None,
            nvml_module: Any = None) -> ProcessGpus:
    source = PodGpus(GPUS, Latest(node_pods() if pods is None else pods), Latest(allocations))
    return ProcessGpus(GPUS, nvml_module, pods=source)


def error(gpus: ProcessGpus, resource: dict[str, Any]) -> Exception | None:
    try:
        gpus(resource)
    except ValueError as exc:
        return exc
    return None


def resolved(gpus: ProcessGpus, resource: dict[str, Any]) -> bool:
    """Whether the discovery of the resource's process has finished, one way or another."""
    return not isinstance(error(gpus, resource), StillResolving)


def missing_pid() -> int:
    return next(pid for pid in range(4_000_000, 4_100_000) if not psutil.pid_exists(pid))


@pytest.fixture
def nvml(fake_nvml: FakeNvml) -> FakeNvml:
    for uuid in UUIDS:
        fake_nvml.add_gpu(uuid=uuid)
    return fake_nvml


def test_the_spans_of_a_pod_get_the_gpus_allocated_to_its_containers() -> None:
    gpus = gpus_of(allocated((UUIDS[2], SERVER), (UUIDS[0].lower(), SERVER), (UUIDS[1], OTHER)))
    by_uid = {"service.name": "vllm-a", "k8s.pod.uid": SERVER_UID.upper()}
    assert gpus(by_uid) == (0, 2)
    by_name = {"k8s.namespace.name": SERVER[0], "k8s.pod.name": SERVER[1]}
    assert gpus(by_name) == (0, 2)
    # The pod comes first: its process is never looked for (there is no NVML here).
    assert gpus({**by_uid, "vllm.process_id": str(missing_pid())}) == (0, 2)
    # A UID of no pod (a newer list would have it): its name and namespace still find it.
    assert gpus({**by_name, "k8s.pod.uid": "00000000-0000-4000-8000-000000000000"}) == (0, 2)


def test_a_new_read_of_the_allocations_is_followed() -> None:
    allocations = Latest(allocated((UUIDS[0], SERVER)))
    gpus = ProcessGpus(GPUS, pods=PodGpus(GPUS, Latest(node_pods()), allocations))
    resource = {"k8s.pod.uid": SERVER_UID}
    assert gpus(resource) == (0,)
    allocations.value = allocated((UUIDS[1], SERVER), (UUIDS[0], OTHER))
    assert gpus(resource) == (1,)


def test_a_pod_that_holds_no_gpu_falls_back_to_its_process(nvml: FakeNvml) -> None:
    """Its GPUs are not the kubelet's to tell (a pod given every GPU by NVIDIA_VISIBLE_DEVICES,
    or a pod list not read yet): the process its resource names is, as without pods."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as worker:
        try:
            nvml.set_processes(1, [(worker.pid, 2**30)])
            process = {"vllm.process_id": str(os.getpid())}
            for gpus in (gpus_of(allocated((UUIDS[2], OTHER)), nvml_module=nvml.module),
                         ProcessGpus(GPUS, nvml.module, pods=PodGpus(
                             GPUS, Latest(None), Latest(allocated((UUIDS[2], SERVER)))))):
                resource = {**process, "k8s.pod.uid": SERVER_UID}
                wait_until(functools.partial(resolved, gpus, resource), "the discovery")
                assert gpus(resource) == (1,)
        finally:
            worker.kill()


def test_an_unknown_pod_without_a_process_is_refused_saying_why() -> None:
    gpus = gpus_of(allocated((UUIDS[0], SERVER)))
    unknown = "00000000-0000-4000-8000-000000000000"
    assert str(error(gpus, {"k8s.pod.uid": unknown})) == (
        f"pod UID {unknown} is not on the pod list of node {NODE}, and its resource names no "
        'process (vllm.process_id, process.pid) for gpus = "auto"')
    by_name = str(error(gpus, {"k8s.namespace.name": "default", "k8s.pod.name": "vllm-0"}))
    assert by_name.startswith(f"pod default/vllm-0 is not on the pod list of node {NODE}")
    held_none = str(error(gpus, {"k8s.namespace.name": OTHER[0], "k8s.pod.name": OTHER[1]}))
    assert held_none.startswith("pod stress-test/stress2 holds no GPU: the kubelet allocated "
                                "no nvidia.com/gpu to its containers")
    not_read = ProcessGpus(GPUS, pods=PodGpus(GPUS, Latest(None), Latest(allocated())))
    assert "this node's pod list has not been read" in str(
        error(not_read, {"k8s.pod.uid": unknown}))
    no_reader = ProcessGpus(GPUS, pods=PodGpus(GPUS, Latest(node_pods()), None))
    assert "allocations are not read on this node" in str(
        error(no_reader, {"k8s.pod.uid": SERVER_UID}))


def test_a_pod_and_a_process_that_both_fail_give_both_reasons(nvml: FakeNvml) -> None:
    gpus = gpus_of(allocated(), nvml_module=nvml.module)
    resource = {"k8s.pod.uid": SERVER_UID, "process.pid": missing_pid()}
    wait_until(functools.partial(resolved, gpus, resource), "the discovery")
    said = str(error(gpus, resource))
    assert said.startswith(f"pod {SERVER[0]}/{SERVER[1]} holds no GPU")
    assert "; by its process: " in said


def test_a_pod_holding_mig_instances_only_is_named_with_them() -> None:
    mig = "MIG-9f1c2d3e-4b5a-5c6d-8e7f-0a1b2c3d4e5f"
    held = {mig: DeviceHolders(mig, "nvidia.com/mig-1g.10gb",
                               (ContainerRef(*SERVER, "coredns"),))}
    said = str(error(gpus_of(held), {"k8s.pod.uid": SERVER_UID}))
    assert f"holds {mig}, none of them a GPU of this node" in said


def test_without_pods_the_pod_attributes_are_not_read() -> None:
    """The behaviour before pods: a resource that names no process is refused as it was."""
    plain = ProcessGpus(GPUS)
    with pytest.raises(ValueError, match=r"^its resource names no process \(vllm.process_id"):
        plain({"k8s.pod.uid": SERVER_UID})
    with pytest.raises(ValueError, match=r"^its resource names no pod \(k8s.pod.uid, or "):
        gpus_of(allocated((UUIDS[0], SERVER)))({"service.name": "vllm-a"})
