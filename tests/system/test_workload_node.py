"""Issue 16's scripted node, end to end through a real `Node`: every GPU joule has an owner.

Three boards on the scripted NVML, read by the real sampler at 10 Hz: GPU 0 allocated by the
kubelet (a real pod-resources gRPC server) to an inference server's container that serves
requests, GPU 1 allocated to a training job's container, GPU 2 shared by two systemd units
(no allocation) whose per-process SM utilisation is 3:1. The processes resolve through a
/proc tree of kubepods cgroup v2 lines, and the pods' names come from a real API server's
PodList (served over HTTP by a double and read by the real client). The records go to a real
SQLite file and the report reads them back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_pynvml import FakeNvml
from kube_node import PODS
from kube_node import api_server as kube_api_server
from podresources_server import Behaviour, Devices, PodSpec, serve
from prometheus_client import generate_latest
from scripted import exposed_samples

from agent.app.node import Node
from agent.cli import main
from agent.config import load
from agent.devices.host import EstimatedHostSource
from agent.devices.nvml import NvmlGpuSource
from agent.requests import Request
from agent.store import RecordReader
from agent.workloads.naming import WorkloadName, pod_container

# Two pods of the PodList, by their UIDs and container ids there.
SERVER_POD = ("kube-system", "coredns-7f5998f4c-5fblt", "coredns",
              "7461d1f1-76f1-446c-9d4b-ed86a5fbc765",
              "a2e2fbf075bcbdbf913eaf5877b95c242ac9835ea0258910b411238bd3bddc36")
TRAINER_POD = ("stress-test", "stress2", "stress2", "9a83f44d-f904-44a2-b276-15fc4d43593c",
               "6f33e55dfc4792c5de9332b92ea659945a4ddfb23e80ee014a704bebac925ccc")
SERVER = pod_container(*SERVER_POD[:3])
TRAINER = pod_container(*TRAINER_POD[:3])
NOTEBOOK = WorkloadName("unit:jupyter.service", "unit")
BATCH = WorkloadName("unit:slurmd.service", "unit")
POWER_W = (300.0, 500.0, 400.0)
IDLE_W = 50.0
RUN_S = 5.0


def kubepods_line(uid: str, container_id: str) -> str:
    """A cgroup v2 line of a container, systemd driver, docker runtime."""
    slice_uid = uid.replace("-", "_")
    return (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice_uid}"
            f".slice/docker-{container_id}.scope\n")


def proc_tree(root: Path) -> Path:
    for pid, line in ((7001, kubepods_line(*SERVER_POD[3:])),
                      (7002, kubepods_line(*TRAINER_POD[3:])),
                      (7003, "0::/system.slice/slurmd.service\n"),
                      (7004, "0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
                             "jupyter.service\n")):
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(line)
    return root


@pytest.fixture
def api_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The API server's PodList over HTTP; the agent finds it as in a pod."""
    with kube_api_server(monkeypatch, tmp_path, [PODS.read_bytes()]):
        yield


def test_pods_training_and_a_shared_gpu_conserve_to_the_joule_and_are_reported(
        tmp_path: Path, api_server: None, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml(clock=time.time)  # wall-clock stamps on the samples, as NVML's
    gpus = [fake.add_gpu(power) for power in POWER_W]
    for index, pid in ((0, 7001), (1, 7002)):
        fake.set_processes(index, [(pid, None)], at=0.0)
    fake.set_processes(2, [(7003, None), (7004, None)], at=0.0)
    steps = [k / 6 for k in range(int(6 * (RUN_S + 30)))]
    fake.add_process_samples(2, [(t, pid, sm, 0) for t in steps
                                 for pid, sm in ((7003, 60), (7004, 20))])
    pods = [PodSpec(*SERVER_POD[:2], {SERVER_POD[2]: [Devices("nvidia.com/gpu",
                                                              [gpus[0].uuid])]}),
            PodSpec(*TRAINER_POD[:2], {TRAINER_POD[2]: [Devices("nvidia.com/gpu",
                                                                [gpus[1].uuid])]})]
    store = tmp_path / "records.db"
    with serve(Behaviour(pods=pods)) as socket, pytest.MonkeyPatch.context() as patch:
        patch.setitem(__import__("sys").modules, "pynvml", fake.module)
        config = load(environ={}, overrides={
            "records.path": str(store), "attribution.idle_watts": IDLE_W,
            "workloads.proc_root": str(proc_tree(tmp_path / "proc")),
            "workloads.pod_resources": socket, "workloads.kubernetes": "on",
        })
        node = Node(config, NvmlGpuSource.open(), EstimatedHostSource(100.0, 400.0))
        assert node.workloads is not None
        node.start()
        t0 = time.monotonic()
        for k in range(4):  # four requests on the inference server's GPU
            node.engine.add(Request(f"r{k}", "llama", "ingest", (0,), t0 + k, t0 + k + 0.8,
                                    prompt_tokens=10, completion_tokens=20))
        time.sleep(RUN_S)
        node.attribute()  # as the daemon does every attribution.period
        text = generate_latest(node.registry).decode()
        node.drain()

    accounts = node.workloads.accounts.totals()
    requests = node.engine.totals()
    for gpu in range(3):
        owned = math.fsum(j for (_, g), j in accounts.energy_j.items() if g == gpu)
        measured = accounts.measured_j[gpu]
        assert measured > POWER_W[gpu] * (RUN_S - 2)
        assert owned + accounts.unattributed_j[gpu] == pytest.approx(measured, rel=1e-9)
        # The two views split the same intervals.
        assert measured == pytest.approx(requests.gpus[gpu].measured_j, rel=1e-9)
    by_name = {(name, gpu): joules for (name, gpu), joules in accounts.energy_j.items()}
    # A GPU held by one container: all of it, from the first interval observed.
    assert by_name[(SERVER, 0)] == pytest.approx(accounts.measured_j[0], rel=1e-9)
    assert by_name[(TRAINER, 1)] == pytest.approx(accounts.measured_j[1], rel=1e-9)
    # The serving pod's energy covers its requests'; the rest is its idle and overhead.
    served = math.fsum(r.gpu_dynamic_j + r.gpu_static_j for r in RecordReader(store).query())
    assert 0 < served < by_name[(SERVER, 0)]
    # The shared GPU: dynamic 3:1 by SM, static halved by presence.
    seconds = accounts.measured_j[2] / POWER_W[2]
    static, dynamic = IDLE_W * seconds, (POWER_W[2] - IDLE_W) * seconds
    assert by_name[(BATCH, 2)] == pytest.approx(static / 2 + dynamic * 3 / 4, rel=0.02)
    assert by_name[(NOTEBOOK, 2)] == pytest.approx(static / 2 + dynamic / 4, rel=0.02)
    assert accounts.inference == frozenset({SERVER})

    samples = exposed_samples(text)
    labelled = {labels: value for (name, labels), value in samples.items()
                if name == "jouleprobe_workload_gpu_energy_joules_total"}
    server_labels = {dict(labels)["pod"] for labels in labelled if dict(labels)["gpu"] == "0"}
    assert server_labels == {SERVER_POD[1]}

    stored = RecordReader(store).workloads()
    assert {group.key for group in stored.groups} == {SERVER.workload, TRAINER.workload,
                                                      BATCH.workload, NOTEBOOK.workload}
    assert stored.measured_j == pytest.approx(math.fsum(accounts.measured_j.values()),
                                              rel=1e-9)
    assert stored.unattributed_j == pytest.approx(
        math.fsum(accounts.unattributed_j.values()), rel=1e-9, abs=1e-9)
    assert math.fsum(g.energy_j for g in stored.groups) + stored.unattributed_j == (
        pytest.approx(stored.measured_j, rel=1e-9))
    # The serving pod held its GPU alone: its requests' energy, as the per-request view
    # split it, and the rest, its idle and overhead; training is other work.
    assert stored.requests_j == pytest.approx(served, rel=1e-9)
    assert stored.overhead_j == pytest.approx(by_name[(SERVER, 0)] - served, rel=1e-9)
    assert stored.inference_j == pytest.approx(by_name[(SERVER, 0)], rel=1e-9)
    assert stored.other_j == pytest.approx(
        by_name[(TRAINER, 1)] + by_name[(BATCH, 2)] + by_name[(NOTEBOOK, 2)], rel=1e-9)
    assert main(["report", "--store", str(store), "--workloads", "--by", "namespace"]) == 0
    table = capsys.readouterr().out
    assert "kube-system" in table and "stress-test" in table and "(none)" in table
