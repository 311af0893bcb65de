"""A kubelet pod-resources server for tests: `v1.PodResourcesLister/List` over real gRPC
on a unix socket.

Its messages are built from their own copy of kubernetes'
`staging/src/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`, independent of the
client's and with the fields the client does not declare (cpu_ids, memory, topology), so
that a wrong field number on either side, or a field the client fails to skip, shows up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

_STRING, _INT64, _UINT64, _MESSAGE = "string", "int64", "uint64", "message"
_PROTO: dict[str, tuple[tuple[str, int, bool, str], ...]] = {
    "ListPodResourcesRequest": (),
    "ListPodResourcesResponse": (("pod_resources", 1, True, "PodResources"),),
    "PodResources": (
        ("name", 1, False, _STRING),
        ("namespace", 2, False, _STRING),
        ("containers", 3, True, "ContainerResources"),
    ),
    "ContainerResources": (
        ("name", 1, False, _STRING),
        ("devices", 2, True, "ContainerDevices"),
        ("cpu_ids", 3, True, _INT64),
        ("memory", 4, True, "ContainerMemory"),
    ),
    "ContainerMemory": (
        ("memory_type", 1, False, _STRING),
        ("size", 2, False, _UINT64),
        ("topology", 3, False, "TopologyInfo"),
    ),
    "ContainerDevices": (
        ("resource_name", 1, False, _STRING),
        ("device_ids", 2, True, _STRING),
        ("topology", 3, False, "TopologyInfo"),
    ),
    "TopologyInfo": (("nodes", 1, True, "NUMANode"),),
    "NUMANode": (("ID", 1, False, _INT64),),
}
"""api.proto v1 (the List path), package `v1`: message → (field, number, repeated, type)."""


def _classes() -> dict[str, type[Message]]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/podresources/v1/api.proto", package="v1", syntax="proto3")
    kinds = descriptor_pb2.FieldDescriptorProto
    scalar = {_STRING: kinds.TYPE_STRING, _INT64: kinds.TYPE_INT64, _UINT64: kinds.TYPE_UINT64}
    for name, fields in _PROTO.items():
        message = proto.message_type.add(name=name)
        for field_name, number, repeated, kind in fields:
            added = message.field.add(
                name=field_name, number=number,
                label=kinds.LABEL_REPEATED if repeated else kinds.LABEL_OPTIONAL,
                type=scalar.get(kind, kinds.TYPE_MESSAGE))
            if kind not in scalar:
                added.type_name = f".v1.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
            for name in _PROTO}


MESSAGES = _classes()


@dataclass
class Devices:
    resource: str
    ids: Sequence[str]


@dataclass
class PodSpec:
    namespace: str
    name: str
    containers: dict[str, Sequence[Devices]]
    """Container name → its devices."""


@dataclass
class Behaviour:
    """What List answers: the pods, or an error, or it blocks until `release` is set."""

    pods: list[PodSpec] = field(default_factory=list)
    error: tuple[grpc.StatusCode, str] | None = None
    block: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0


def response(pods: Sequence[PodSpec]) -> Any:
    """The ListPodResourcesResponse for `pods`, with cpu ids, memory and NUMA topology as
    a real kubelet adds them."""
    message: Any = MESSAGES["ListPodResourcesResponse"]()
    for pod in pods:
        resources = message.pod_resources.add(name=pod.name, namespace=pod.namespace)
        for container_name, devices in pod.containers.items():
            container = resources.containers.add(name=container_name, cpu_ids=[2, 3])
            container.memory.add(memory_type="memory", size=2**30).topology.nodes.add(ID=0)
            for device in devices:
                added = container.devices.add(resource_name=device.resource,
                                              device_ids=list(device.ids))
                added.topology.nodes.add(ID=1)
    return message


def _handler(behaviour: Behaviour) -> grpc.GenericRpcHandler:
    def list_pods(request: Any, context: grpc.ServicerContext) -> Any:
        behaviour.calls += 1
        if behaviour.block:
            behaviour.release.wait()
        if behaviour.error is not None:
            context.abort(*behaviour.error)
        return response(behaviour.pods)

    request_class = MESSAGES["ListPodResourcesRequest"]
    response_class = MESSAGES["ListPodResourcesResponse"]
    return grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
        "List": grpc.unary_unary_rpc_method_handler(
            list_pods, request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString),
    })


@contextmanager
def serve(behaviour: Behaviour | None) -> Iterator[str]:
    """A server on a fresh unix socket, answering as `behaviour` says (None: it serves no
    PodResourcesLister at all, as a kubelet before v1); yields the socket's path."""
    folder = tempfile.mkdtemp(prefix="podres-")  # short: a socket path has ≤ 107 bytes
    path = os.path.join(folder, "kubelet.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if behaviour is not None:
        server.add_generic_rpc_handlers((_handler(behaviour),))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield path
    finally:
        if behaviour is not None:
            behaviour.release.set()
        server.stop(grace=None)
        shutil.rmtree(folder, ignore_errors=True)
