"""A Kubernetes node of the tests: the EKS pod-list captures' node, three GPUs, the kubelet's
allocations by hand, and an API server double that the agent finds as in a pod."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Generic, TypeVar

import pytest
from scripted import FIXTURES, serve_http

from agent.app import workloads as view
from agent.devices.base import GpuInfo
from agent.workloads.kubernetes import ApiServer
from agent.workloads.podresources import ContainerRef, DeviceHolders

T = TypeVar("T")

PODS = FIXTURES / "kubernetes" / "eks_node_pods_annotated.json"
"""The annotated capture (its README lists the annotations added)."""
NODE = "ip-172-26-67-126.ec2.internal"
"""The node of the captures' pods."""
UUIDS = ("GPU-5d1f0c3a-9b7e-4f6a-8c2d-1e3f5a7b9c0d", "GPU-a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
         "GPU-00000000-1111-4222-8333-444444444444")
GPUS = [GpuInfo(i, uuid, "NVIDIA H100 80GB HBM3", "counter", "instant")
        for i, uuid in enumerate(UUIDS)]


@dataclass
class Latest(Generic[T]):
    """What the workload observer's `Refreshed` shows: the latest good read."""

    value: T | None


def allocated(*held: tuple[str, tuple[str, str]]) -> dict[str, DeviceHolders]:
    """The kubelet's allocations: each device to a container "c" of a pod."""
    found: dict[str, list[ContainerRef]] = {}
    for device, pod in held:
        found.setdefault(device, []).append(ContainerRef(*pod, "c"))
    return {device: DeviceHolders(device, "nvidia.com/gpu", tuple(sorted(holders)))
            for device, holders in found.items()}


@contextlib.contextmanager
def api_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: list[bytes]
               ) -> Iterator[None]:
    """An API server double over HTTP answering `body[0]` (change it to change the pod
    list), found by the agent's workload view as in a pod."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body[0])))
            self.end_headers()
            self.wfile.write(body[0])

        def log_message(self, *args: object) -> None:
            pass

    token = tmp_path / "token"
    token.write_text("t0ken")
    with serve_http(Handler) as url:
        monkeypatch.setattr(view.ApiServer, "from_environment", classmethod(
            lambda cls, environ=None: ApiServer(url, NODE, token, None)))
        yield
