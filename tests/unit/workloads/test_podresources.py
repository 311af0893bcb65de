"""The pod-resources client against a real gRPC server on a unix socket
(tests/podresources_server.py), speaking kubelet's v1 messages."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
import pytest
from podresources_server import Behaviour, Devices, PodSpec, response, serve
from scripted import unprivileged

from agent.workloads.podresources import (
    _SCHEMA,
    LIST_METHOD,
    ContainerRef,
    DeviceHolders,
    PodResourcesError,
    _holders,
    _message_classes,
    list_gpu_holders,
)

GPU0 = "GPU-3b7a1c2e-5d4f-4e6a-9b8c-0d1e2f3a4b5c"
GPU1 = "GPU-8f9e0d1c-2b3a-4c5d-8e7f-6a5b4c3d2e1f"
MIG_A = "MIG-4a1b2c3d-5e6f-5a7b-8c9d-0e1f2a3b4c5d"
MIG_B = "MIG-9d8c7b6a-5f4e-5d3c-2b1a-0f9e8d7c6b5a"


def ref(pod: str, container: str, namespace: str = "ml") -> ContainerRef:
    return ContainerRef(namespace, pod, container)


def holders_of(pods: list[PodSpec]) -> dict[str, DeviceHolders]:
    with serve(Behaviour(pods=pods)) as path:
        return list_gpu_holders(path)


def reason_of(path: str, *, timeout_s: float = 5.0) -> PodResourcesError:
    with pytest.raises(PodResourcesError) as caught:
        list_gpu_holders(path, timeout_s=timeout_s)
    return caught.value


def test_the_method_and_field_numbers_are_kubelets() -> None:
    assert LIST_METHOD == "/v1.PodResourcesLister/List"
    numbers = {(message, name): number
               for message, fields in _SCHEMA.items() for name, number, _, _ in fields}
    assert numbers == {
        ("ListPodResourcesResponse", "pod_resources"): 1,
        ("PodResources", "name"): 1,
        ("PodResources", "namespace"): 2,
        ("PodResources", "containers"): 3,
        ("ContainerResources", "name"): 1,
        ("ContainerResources", "devices"): 2,
        ("ContainerDevices", "resource_name"): 1,
        ("ContainerDevices", "device_ids"): 2,
    }


def test_the_client_decodes_the_full_message_skipping_undeclared_fields() -> None:
    wire = response([PodSpec("ml", "train", {"main": [Devices("nvidia.com/gpu", [GPU0])]})])
    decoded = _message_classes()["ListPodResourcesResponse"].FromString(wire.SerializeToString())
    assert _holders(decoded) == {
        GPU0: DeviceHolders(GPU0, "nvidia.com/gpu", (ref("train", "main"),))}


def test_a_gpu_allocated_to_one_container_is_owned_by_it() -> None:
    holders = holders_of([
        PodSpec("ml", "train-0", {"trainer": [Devices("nvidia.com/gpu", [GPU0, GPU1])]}),
        PodSpec("kube-system", "coredns", {"coredns": []}),
    ])
    assert set(holders) == {GPU0, GPU1}
    assert holders[GPU0].owner == ref("train-0", "trainer")
    assert holders[GPU1] == DeviceHolders(GPU1, "nvidia.com/gpu", (ref("train-0", "trainer"),))


def test_mig_instances_belong_to_their_containers() -> None:
    holders = holders_of([
        PodSpec("serve", "embed", {"server": [Devices("nvidia.com/mig-1g.10gb", [MIG_A])]}),
        PodSpec("serve", "chat", {"server": [Devices("nvidia.com/mig-3g.40gb", [MIG_B])]}),
    ])
    assert holders[MIG_A] == DeviceHolders(
        MIG_A, "nvidia.com/mig-1g.10gb", (ref("embed", "server", "serve"),))
    assert holders[MIG_B].owner == ref("chat", "server", "serve")


def test_a_pod_with_two_containers_each_holding_a_gpu() -> None:
    holders = holders_of([PodSpec("ml", "pair", {
        "generator": [Devices("nvidia.com/gpu", [GPU0])],
        "scorer": [Devices("nvidia.com/gpu", [GPU1]), Devices("example.com/fpga", ["fpga0"])],
    })])
    assert set(holders) == {GPU0, GPU1}
    assert holders[GPU0].owner == ref("pair", "generator")
    assert holders[GPU1].owner == ref("pair", "scorer")


def test_time_sliced_replicas_make_a_shared_gpu_with_no_owner() -> None:
    holders = holders_of([
        PodSpec("dev", "nb-a", {"jupyter": [Devices("nvidia.com/gpu.shared", [f"{GPU0}::0"])]}),
        PodSpec("dev", "nb-b", {"jupyter": [Devices("nvidia.com/gpu.shared", [f"{GPU0}::3"])]}),
        PodSpec("dev", "nb-c", {"jupyter": [
            Devices("nvidia.com/gpu", [f"{GPU1}::1", f"{GPU1}::2"])]}),
    ])
    assert holders[GPU0].holders == (ref("nb-a", "jupyter", "dev"), ref("nb-b", "jupyter", "dev"))
    assert holders[GPU0].owner is None
    assert holders[GPU1].owner == ref("nb-c", "jupyter", "dev")  # two replicas, one holder


def test_no_pod_holds_a_gpu() -> None:
    assert holders_of([PodSpec("web", "nginx", {"nginx": []})]) == {}


def test_an_absent_socket(tmp_path: Path) -> None:
    error = reason_of(str(tmp_path / "kubelet.sock"))
    assert error.reason == "no_socket"
    assert "/var/lib/kubelet/pod-resources" in str(error)


def test_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "kubelet.sock").write_text("")
    assert reason_of(str(tmp_path / "kubelet.sock")).reason == "no_socket"


def test_a_socket_nobody_listens_on_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    left = socket.socket(socket.AF_UNIX)
    left.bind(path)  # bound, never listening: what a stopped kubelet leaves
    left.close()
    assert reason_of(path).reason == "unavailable"


def test_permission_denied_on_the_socket() -> None:
    behaviour = Behaviour(pods=[PodSpec("ml", "p", {"c": [Devices("nvidia.com/gpu", [GPU0])]})])
    with serve(behaviour) as path:
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o600)
        with unprivileged():
            error = reason_of(path)
    assert error.reason == "no_permission"
    assert behaviour.calls == 0


def test_permission_denied_on_the_socket_folder() -> None:
    with serve(Behaviour()) as path:
        os.chmod(os.path.dirname(path), 0o700)
        with unprivileged():
            error = reason_of(path)
    assert error.reason == "no_permission"
    assert "folder" in str(error)


def test_a_kubelet_without_the_v1_api_is_unimplemented() -> None:
    with serve(None) as path:
        error = reason_of(path)
    assert error.reason == "unimplemented"


def test_a_kubelet_that_does_not_answer_in_time() -> None:
    behaviour = Behaviour(block=True)
    with serve(behaviour) as path:
        error = reason_of(path, timeout_s=0.2)
    assert error.reason == "timeout"
    assert behaviour.calls == 1


@pytest.mark.parametrize(("code", "details", "reason"), [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit", "rate_limited"),
    (grpc.StatusCode.INTERNAL, "device manager not ready", "failed"),
    (grpc.StatusCode.PERMISSION_DENIED, "no", "failed"),
])
def test_a_server_error_maps_to_one_reason(
    code: grpc.StatusCode, details: str, reason: str
) -> None:
    with serve(Behaviour(error=(code, details))) as path:
        error = reason_of(path)
    assert error.reason == reason
    assert details in str(error)
