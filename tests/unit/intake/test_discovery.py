"""GPU discovery for `gpus = "auto"`, through the scripted NVML, this test process's own PID
and real listening sockets; and the static GPU lists with their UUID mapping and errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from fake_pynvml import FakeNvml
from scripted import free_port, wait_until

from agent.devices.base import GpuInfo
from agent.intake.discovery import GpuResolutionError, GpuResolver, StillResolving, local_port

UUIDS = ("GPU-5d1f0c3a-9b7e-4f6a-8c2d-1e3f5a7b9c0d", "GPU-a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
         "GPU-00000000-1111-4222-8333-444444444444")
GPUS = [GpuInfo(i, uuid, "NVIDIA H100 80GB HBM3", "counter", "instant")
        for i, uuid in enumerate(UUIDS)]


@pytest.fixture
def nvml(fake_nvml: FakeNvml) -> FakeNvml:
    for uuid in UUIDS:
        fake_nvml.add_gpu(uuid=uuid)
    return fake_nvml


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on which this test process listens."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def _missing_pid() -> int:
    return next(pid for pid in range(4_000_000, 4_100_000) if not psutil.pid_exists(pid))


# --- static lists --------------------------------------------------------------------------


def test_indices_and_uuids_map_to_indices() -> None:
    resolver = GpuResolver((2, UUIDS[0].lower(), 0), GPUS, None)
    assert resolver.current() == (2, 0)  # case-insensitive UUIDs; a GPU named twice once
    assert resolver.describe().endswith("-> 2, 0")


def test_unknown_gpus_are_named_in_one_error() -> None:
    with pytest.raises(ValueError, match=r"unknown GPU 7, 'GPU-nope'") as info:
        GpuResolver((0, 7, "GPU-nope"), GPUS, None)
    assert UUIDS[1] in str(info.value)  # says what this node has


# --- auto ----------------------------------------------------------------------------------


def test_auto_finds_the_gpus_of_the_listening_process(nvml: FakeNvml, listening: int) -> None:
    nvml.set_processes(1, [(os.getpid(), 2**30)])
    nvml.set_processes(2, [(_missing_pid(), 2**30)])  # someone else's process
    resolver = GpuResolver("auto", GPUS, listening, nvml.module)
    assert resolver.current() == (1,)
    assert resolver.describe().startswith(f"auto (port {listening}): GPU 1 (PID {os.getpid()}")
    assert nvml.initialized == 0  # every nvmlInit was matched by nvmlShutdown


def test_auto_includes_the_listeners_descendants(nvml: FakeNvml, listening: int) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            nvml.set_processes(0, [(child.pid, 2**30)])
            nvml.set_processes(2, [(os.getpid(), 2**30)])
            assert GpuResolver("auto", GPUS, listening, nvml.module).current() == (0, 2)
        finally:
            child.kill()


def test_nothing_listening_is_said_plainly(nvml: FakeNvml) -> None:
    port = free_port()
    resolver = GpuResolver("auto", GPUS, port, nvml.module)
    assert resolver.describe() == f"auto (port {port}): cannot resolve: nothing listens on " \
                                  f"port {port}"
    with pytest.raises(GpuResolutionError, match="nothing listens"):
        resolver.current()


def test_pid_namespace_mismatch_asks_for_host_pid(nvml: FakeNvml, listening: int) -> None:
    nvml.set_processes(0, [(_missing_pid(), 2**30)])
    text = GpuResolver("auto", GPUS, listening, nvml.module).describe()
    assert "another PID namespace" in text and "hostPID" in text


def test_no_compute_process_at_all(nvml: FakeNvml, listening: int) -> None:
    text = GpuResolver("auto", GPUS, listening, nvml.module).describe()
    assert "NVML lists no compute process" in text


def test_a_known_set_survives_a_failed_refresh(nvml: FakeNvml, listening: int) -> None:
    now = [100.0]
    nvml.set_processes(1, [(os.getpid(), 2**30)])
    resolver = GpuResolver("auto", GPUS, listening, nvml.module, refresh_s=30,
                           clock=lambda: now[0])
    assert resolver.current() == (1,)
    nvml.set_processes(1, [])
    nvml.set_processes(0, [(os.getpid(), 2**30)])
    assert resolver.current() == (1,)  # not yet stale: no new resolution
    now[0] += 31
    resolver.current()  # starts a refresh in the background and answers at once
    assert resolver._refreshing is not None
    resolver._refreshing.join(5)
    assert resolver.current() == (0,)


def test_no_nvml_is_a_clear_error(fake_nvml: FakeNvml, listening: int) -> None:
    fake_nvml.init_error = "LibraryNotFound"
    text = GpuResolver("auto", GPUS, listening, fake_nvml.module).describe()
    assert "NVML unavailable" in text and "LibraryNotFound" in text


def test_auto_is_refused_on_simulated_gpus_and_without_a_port() -> None:
    simulated = [GpuInfo(0, "SIM-0", "H100 (simulated)", "counter", "instant", simulated=True)]
    with pytest.raises(ValueError, match="simulated GPUs"):
        GpuResolver("auto", simulated, 8000)
    with pytest.raises(ValueError, match="needs the server's port"):
        GpuResolver("auto", GPUS, None)


def test_local_port() -> None:
    assert local_port("http://127.0.0.1:8000/metrics") == 8000
    assert local_port("http://localhost/v1") == 80
    with pytest.raises(ValueError, match="on this node"):
        local_port("http://192.0.2.7:8000/metrics")  # TEST-NET-1: never a local address


def test_a_listener_without_gpus_is_followed_to_its_parents_tree(nvml: FakeNvml) -> None:
    """TGI's shape: the router listens, the shards on the GPUs are its siblings."""
    code = ("import socket, sys, time; s = socket.create_server(('127.0.0.1', 0)); "
            "print(s.getsockname()[1], flush=True); time.sleep(30)")
    with (subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                           text=True) as router,
          subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as shard):
        try:
            assert router.stdout is not None
            port = int(router.stdout.readline())
            nvml.set_processes(2, [(shard.pid, 2**30)])
            resolver = GpuResolver("auto", GPUS, port, nvml.module)
            assert resolver.current() == (2,)
            assert f"through its parent PID {os.getpid()}" in resolver.describe()
        finally:
            router.kill()
            shard.kill()


def test_a_trace_sources_gpus_follow_the_process_of_its_spans(nvml: FakeNvml) -> None:
    """`gpus = "auto"` for a trace source: vLLM's resource names its API server process
    (`vllm.process_id`, a string); its GPU workers are that process's children."""
    from agent.intake.otlp import ProcessGpus

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as worker:
        try:
            nvml.set_processes(2, [(worker.pid, 2**30)])
            gpus = ProcessGpus(GPUS, nvml.module)
            resource = {"service.name": "vllm-a", "vllm.process_id": str(os.getpid())}
            wait_until(lambda: _resolved(gpus, resource), "the discovery")
            assert gpus(resource) == (2,)
            assert gpus({"process.pid": os.getpid()}) == (2,)  # the one discovery, shared
            with pytest.raises(ValueError, match="names no process"):
                gpus({"service.name": "vllm-a"})
            lost = {"vllm.process_id": str(_missing_pid())}
            wait_until(lambda: not isinstance(_error(gpus, lost), StillResolving), "the discovery")
            assert "no process" in str(_error(gpus, lost))
        finally:
            worker.kill()


def _error(gpus: Any, resource: dict[str, Any]) -> Exception | None:
    try:
        gpus(resource)
    except ValueError as exc:
        return exc
    return None


def _resolved(gpus: Any, resource: dict[str, Any]) -> bool:
    return _error(gpus, resource) is None
