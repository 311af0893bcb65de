"""Which container holds which GPU: the kubelet's pod-resources API, v1.

`v1.PodResourcesLister/List` over gRPC on the kubelet's unix socket
(`/var/lib/kubelet/pod-resources/kubelet.sock`) lists every pod on the node with the devices
the device plugins allocated to each of its containers. The messages are those of
kubernetes' `staging/src/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`, built here at
runtime from their descriptors (`_SCHEMA`, with the proto's names and field numbers), so that
no generated code is kept and no protoc is needed. Only the fields read are declared; the
others (a container's `cpu_ids` = 3, `memory` = 4, `dynamic_resources` = 5, a device's
`topology` = 3) arrive as unknown fields, which the parser skips as proto3 prescribes.

NVIDIA's device plugin lists whole GPUs as `nvidia.com/gpu` with their UUIDs (`GPU-...`) and
MIG instances as `nvidia.com/mig-<profile>` (or as `nvidia.com/gpu` under the single MIG
strategy) with MIG UUIDs (`MIG-...`). With time-slicing it lists replicas, `<uuid>::<n>`
(under `nvidia.com/gpu.shared` where it renames them), as dcgm-exporter reads them too: a
device held by more than one container is shared, not owned.

Every failure is one `PodResourcesError`, whose `reason` names it and whose message says what
an operator can do about it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
GPU_RESOURCES = frozenset({"nvidia.com/gpu", "nvidia.com/gpu.shared"})
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
REPLICA_SEPARATOR = "::"
"""Between a GPU's UUID and its replica number in time-sliced device ids."""
MAX_MESSAGE_BYTES = 16 * 2**20
"""Room for a full node's pod list, beyond gRPC's 4 MiB default."""

_SCHEMA: dict[str, tuple[tuple[str, int, bool, str | None], ...]] = {
    "ListPodResourcesRequest": (),
    "ListPodResourcesResponse": (("pod_resources", 1, True, "PodResources"),),
    "PodResources": (
        ("name", 1, False, None),
        ("namespace", 2, False, None),
        ("containers", 3, True, "ContainerResources"),
    ),
    "ContainerResources": (
        ("name", 1, False, None),
        ("devices", 2, True, "ContainerDevices"),
    ),
    "ContainerDevices": (
        ("resource_name", 1, False, None),
        ("device_ids", 2, True, None),
    ),
}
"""message → (field, number, repeated, message type or None for string), package `v1`."""

Reason = Literal[
    "no_socket", "no_permission", "unavailable", "timeout", "unimplemented", "rate_limited",
    "failed",
]


class PodResourcesError(Exception):
    """The pod-resources API could not be read; `reason` says why, the message what to do."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True, order=True)
class ContainerRef:
    """A container of a pod, by name."""

    namespace: str
    pod: str
    container: str


@dataclass(frozen=True, slots=True)
class DeviceHolders:
    """The containers a GPU or MIG instance is allocated to."""

    device: str
    """The GPU UUID (`GPU-...`) or MIG UUID (`MIG-...`), without a replica suffix."""
    resource: str
    """The resource name it was allocated as (`nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`)."""
    holders: tuple[ContainerRef, ...]
    """Sorted, each once."""

    @property
    def owner(self) -> ContainerRef | None:
        """The one container that holds the device alone, if one does."""
        return self.holders[0] if len(self.holders) == 1 else None


def _message_classes() -> dict[str, type[Message]]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="k8s.io/kubelet/pkg/apis/podresources/v1/api.proto", package="v1", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    for name, fields in _SCHEMA.items():
        message = proto.message_type.add(name=name)
        for field_name, number, repeated, type_name in fields:
            added = message.field.add(
                name=field_name, number=number,
                label=field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL,
                type=field.TYPE_MESSAGE if type_name else field.TYPE_STRING,
            )
            if type_name:
                added.type_name = f".v1.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
            for name in _SCHEMA}


_MESSAGES = _message_classes()


def list_gpu_holders(
    socket: str = DEFAULT_SOCKET, *, timeout_s: float = 5.0
) -> dict[str, DeviceHolders]:
    """Every GPU and MIG instance allocated to a container on this node, by device UUID;
    raises PodResourcesError, saying why, where the kubelet cannot be asked."""
    path = os.path.abspath(socket)
    _check_socket(path)
    request_class, response_class = (_MESSAGES["ListPodResourcesRequest"],
                                     _MESSAGES["ListPodResourcesResponse"])
    with grpc.insecure_channel(
        f"unix:{path}", options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    ) as channel:
        call = channel.unary_unary(
            LIST_METHOD,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        try:
            response = call(request_class(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _failure(path, timeout_s, exc) from exc
    return _holders(response)


def _check_socket(path: str) -> None:
    """Fails where there is no socket to connect to, before gRPC would say only that the
    connection failed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PodResourcesError("no_socket", (
            f"no kubelet pod-resources socket at {path}: mount /var/lib/kubelet/pod-resources "
            "into the agent (read-only hostPath), or set the socket's path"
        )) from None
    except PermissionError:
        raise PodResourcesError("no_permission", (
            f"no permission to reach {path}: run the agent as root, or give its user access "
            "to the socket's folder"
        )) from None
    if not stat.S_ISSOCK(mode):
        raise PodResourcesError("no_socket", f"{path} is not a unix socket: is the path right?")


def _holders(response: Any) -> dict[str, DeviceHolders]:
    """`response` is a ListPodResourcesResponse (built at runtime: mypy knows no fields)."""
    found: dict[str, tuple[str, set[ContainerRef]]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = ContainerRef(pod.namespace, pod.name, container.name)
            for devices in container.devices:
                resource = devices.resource_name
                if resource not in GPU_RESOURCES and not resource.startswith(MIG_RESOURCE_PREFIX):
                    continue
                for device_id in devices.device_ids:
                    device = device_id.split(REPLICA_SEPARATOR, 1)[0]
                    found.setdefault(device, (resource, set()))[1].add(ref)
    return {device: DeviceHolders(device, resource, tuple(sorted(holders)))
            for device, (resource, holders) in found.items()}


def _failure(path: str, timeout_s: float, exc: grpc.RpcError) -> PodResourcesError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PodResourcesError("timeout", (
            f"the kubelet did not answer {LIST_METHOD} on {path} within {timeout_s:g} s"
        ))
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return PodResourcesError("unimplemented", (
            f"{path} does not serve {LIST_METHOD}: the pod-resources API v1 needs kubelet "
            f"1.20 or newer ({details})"
        ))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PodResourcesError("rate_limited", (
            f"the kubelet refused {LIST_METHOD} ({details}): it rate-limits the pod-resources "
            "API, so ask it less often"
        ))
    if code == grpc.StatusCode.UNAVAILABLE and "permission denied" in details.lower():
        return PodResourcesError("no_permission", (
            f"no permission to connect to {path}: run the agent as root, or give its user "
            "write access to the socket"
        ))
    if code == grpc.StatusCode.UNAVAILABLE:
        return PodResourcesError("unavailable", (
            f"nothing answers on {path} (is the kubelet running? a stopped kubelet leaves its "
            f"socket behind): {details}"
        ))
    return PodResourcesError("failed", f"{LIST_METHOD} on {path} failed: {code.name}: {details}")
