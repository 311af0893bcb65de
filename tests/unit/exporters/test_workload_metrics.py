"""The workload view on /metrics: a real `WorkloadAccounts` fed scripted occupancies, rendered
through a node's registry and read back by prometheus_client's own parsers.

Two GPUs, 1 s intervals with a 60 W idle baseline:

    GPU 0  held by SERVER (the kubelet's allocation) while requests ran
    GPU 1  shared: TRAINER (pod) at 60 % SM, NOTEBOOK (process) at 30 %, an unknown PID at 10 %

so every figure below can be worked out by hand.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from scripted import ScriptedOccupancies, Series, exposed_samples, series

from agent.attribution.workloads import OTHER, WorkloadAccounts
from agent.devices.base import GpuInfo
from agent.sampler import NodeSnapshot
from agent.workloads.naming import WorkloadName, pod_container
from agent.workloads.observer import ObserverStatus
from exporters.prometheus import NodeCollector, build_registry
from exporters.workload_metrics import WorkloadMetrics

GPUS = [
    GpuInfo(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", "counter", "instant"),
    GpuInfo(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", "counter", "instant"),
]
SERVER = pod_container("ml", "vllm-0", "vllm")
TRAINER = pod_container("research", "train-7", "trainer")
NOTEBOOK = WorkloadName("process:python", "process")
IDLE_W = 60.0
ENERGY = "jouleprobe_workload_gpu_energy_joules_total"
INFO = "jouleprobe_workload_info"
UNATTRIBUTED = "jouleprobe_workload_unattributed_gpu_energy_joules_total"
STATUS = ObserverStatus(rounds=5, processes=3, unresolved={"vanished": 1}, allocations="ok",
                        pod_names="ok", no_utilization=())




def _node_script() -> ScriptedOccupancies:
    script = ScriptedOccupancies()
    script.at(0, 1e9, exclusive=SERVER)
    script.at(1, 1e9, present={11: TRAINER, 12: NOTEBOOK, 13: None},
              weights={11: 60, 12: 30, 13: 10})
    return script


def scrape(accounts: WorkloadAccounts, status: ObserverStatus = STATUS) -> dict[Series, float]:
    """What a scrape of a node with the workload view reads, parsed."""
    collector = NodeCollector(lambda: NodeSnapshot(0.0, (), None), pue=1.0, version="test")
    collector.add(WorkloadMetrics(accounts.totals, GPUS, lambda: status).families)
    return exposed_samples(generate_latest(build_registry(collector)).decode())


def named(samples: Mapping[Series, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def energy_series(gpu: GpuInfo, name: WorkloadName) -> Series:
    return series(ENERGY, gpu=str(gpu.index), uuid=gpu.uuid, namespace=name.namespace,
                  pod=name.pod, container=name.container, workload=name.workload)


def per_gpu(samples: Mapping[Series, float]) -> dict[str, float]:
    """Σ workloads + unattributed, per GPU, from the scraped series alone."""
    sums: dict[str, list[float]] = defaultdict(list)
    for name in (ENERGY, UNATTRIBUTED):
        for labels, value in named(samples, name).items():
            sums[dict(labels)["gpu"]].append(value)
    return {gpu: math.fsum(values) for gpu, values in sums.items()}


def test_each_workload_has_its_gpu_energy_with_pod_labels_and_one_info() -> None:
    accounts = WorkloadAccounts(_node_script())
    accounts.interval(0, 0.0, 1.0, 300.0, IDLE_W, serving=True)
    accounts.interval(1, 0.0, 1.0, 360.0, IDLE_W, serving=False)  # static 60, dynamic 300
    samples = scrape(accounts)
    assert named(samples, ENERGY) == {
        energy_series(GPUS[0], SERVER)[1]: 300.0,
        energy_series(GPUS[1], TRAINER)[1]: pytest.approx(20.0 + 180.0),
        energy_series(GPUS[1], NOTEBOOK)[1]: pytest.approx(20.0 + 90.0),
    }
    assert energy_series(GPUS[1], NOTEBOOK) in samples, "empty pod labels off Kubernetes"
    assert named(samples, INFO) == {
        series(INFO, workload="ml/vllm-0/vllm", kind="pod", namespace="ml", pod="vllm-0",
               container="vllm", inference="true")[1]: 1.0,
        series(INFO, workload="research/train-7/trainer", kind="pod", namespace="research",
               pod="train-7", container="trainer", inference="false")[1]: 1.0,
        series(INFO, workload="process:python", kind="process", namespace="", pod="",
               container="", inference="false")[1]: 1.0,
    }
    assert named(samples, UNATTRIBUTED) == {
        series(UNATTRIBUTED, gpu="0", uuid="GPU-aaaa")[1]: 0.0,
        series(UNATTRIBUTED, gpu="1", uuid="GPU-bbbb")[1]: pytest.approx(20.0 + 30.0),
    }


def test_per_gpu_workloads_and_unattributed_add_up_to_the_energy_measured() -> None:
    script = _node_script()
    accounts = WorkloadAccounts(script)
    measured = {0: [], 1: []}
    for second in range(50):
        for gpu in (0, 1):
            joules = 100.0 + 7.3 * second + 41.0 * gpu
            accounts.interval(gpu, float(second), second + 1.0, joules,
                              IDLE_W if second % 3 else None, serving=second % 2 == 0)
            measured[gpu].append(joules)
    totals = accounts.totals()
    expected = {str(gpu): math.fsum(values) for gpu, values in measured.items()}
    assert per_gpu(scrape(accounts)) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx({str(gpu): j for gpu, j in totals.measured_j.items()})


def test_a_gpu_not_split_yet_shows_zero_unattributed_and_no_workload() -> None:
    accounts = WorkloadAccounts(ScriptedOccupancies())
    accounts.interval(1, 0.0, 0.5, 40.0, None, serving=False)  # no occupancy observed yet
    samples = scrape(accounts)
    assert named(samples, ENERGY) == {} and named(samples, INFO) == {}
    assert named(samples, UNATTRIBUTED) == {
        series(UNATTRIBUTED, gpu="0", uuid="GPU-aaaa")[1]: 0.0,
        series(UNATTRIBUTED, gpu="1", uuid="GPU-bbbb")[1]: 40.0,
    }


def test_workloads_past_the_cap_are_exported_as_other() -> None:
    script = ScriptedOccupancies()
    names = [WorkloadName(f"process:p{i}", "process") for i in range(3)]
    script.at(0, 1e9, present={1: names[0], 2: names[1], 3: names[2]},
              weights={1: 1, 2: 1, 3: 2})
    accounts = WorkloadAccounts(script, max_series=1)
    accounts.interval(0, 0.0, 1.0, 40.0, None, serving=False)
    samples = scrape(accounts)
    assert named(samples, ENERGY) == {
        energy_series(GPUS[0], names[0])[1]: 10.0,
        energy_series(GPUS[0], OTHER)[1]: 30.0,
    }
    assert {dict(labels)["workload"] for labels in named(samples, INFO)} == {
        "process:p0", "other"}
    assert per_gpu(samples)["0"] == 40.0


def test_a_workload_gone_for_a_while_leaves_the_metrics() -> None:
    script = ScriptedOccupancies()
    script.at(0, 10.0, present={1: TRAINER, 2: NOTEBOOK}, weights={1: 50, 2: 50})
    script.at(0, 1e9, present={2: NOTEBOOK}, weights={2: 50})
    accounts = WorkloadAccounts(script, gone_after_s=300.0)
    accounts.interval(0, 0.0, 1.0, 100.0, None, serving=False)
    assert energy_series(GPUS[0], TRAINER) in scrape(accounts)
    accounts.interval(0, 400.0, 401.0, 100.0, None, serving=False)
    accounts.take_records(401.0)  # TRAINER last seen at 1 s: gone
    samples = scrape(accounts)
    assert named(samples, ENERGY) == {energy_series(GPUS[0], NOTEBOOK)[1]: 150.0}
    assert {dict(labels)["workload"] for labels in named(samples, INFO)} == {"process:python"}
    assert samples[series(UNATTRIBUTED, gpu="0", uuid="GPU-aaaa")] == 0.0


def test_the_observers_health() -> None:
    status = ObserverStatus(rounds=7, processes=4, unresolved={"vanished": 2, "no_permission": 1},
                            allocations="no_socket", pod_names="off", no_utilization=(1,))
    samples = scrape(WorkloadAccounts(ScriptedOccupancies()), status)
    assert samples[series("jouleprobe_workload_observer_rounds_total")] == 7
    assert samples[series("jouleprobe_workload_processes")] == 4
    assert named(samples, "jouleprobe_workload_unresolved_processes") == {
        series("", reason="vanished")[1]: 2, series("", reason="no_permission")[1]: 1}
    assert named(samples, "jouleprobe_workload_source_up") == {
        series("", source="allocations")[1]: 0}, "pod_names is off: not exported"
    assert named(samples, "jouleprobe_workload_process_utilization_up") == {
        series("", gpu="0", uuid="GPU-aaaa")[1]: 1, series("", gpu="1", uuid="GPU-bbbb")[1]: 0}
    ok = scrape(WorkloadAccounts(ScriptedOccupancies()), STATUS)
    assert named(ok, "jouleprobe_workload_source_up") == {
        series("", source="allocations")[1]: 1, series("", source="pod_names")[1]: 1}


def test_before_the_first_round_utilisation_is_not_claimed_readable() -> None:
    first = ObserverStatus(0, 0, {}, "off", "off", ())
    samples = scrape(WorkloadAccounts(ScriptedOccupancies()), first)
    assert named(samples, "jouleprobe_workload_process_utilization_up") == {}
    assert samples[series("jouleprobe_workload_observer_rounds_total")] == 0


def test_families_have_their_types_and_parse_as_strict_openmetrics() -> None:
    accounts = WorkloadAccounts(_node_script())
    accounts.interval(0, 0.0, 1.0, 300.0, IDLE_W, serving=True)
    families = list(WorkloadMetrics(accounts.totals, GPUS, lambda: STATUS).families(
        NodeSnapshot(0.0, (), None)))
    collector = NodeCollector(lambda: NodeSnapshot(0.0, (), None), pue=1.0, version="test")
    collector.add(lambda _snapshot: families)
    registry = build_registry(collector)
    text = {f.name: f.type for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert {name: text[name] for name in (
        "jouleprobe_workload_gpu_energy_joules",
        "jouleprobe_workload_unattributed_gpu_energy_joules",
        "jouleprobe_workload_observer_rounds", "jouleprobe_workload_info",
        "jouleprobe_workload_processes")} == {
        "jouleprobe_workload_gpu_energy_joules": "counter",
        "jouleprobe_workload_unattributed_gpu_energy_joules": "counter",
        "jouleprobe_workload_observer_rounds": "counter",
        "jouleprobe_workload_info": "gauge",
        "jouleprobe_workload_processes": "gauge",
    }
    strict = {f.name for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert {family.name for family in families} <= strict
