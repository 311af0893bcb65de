"""`[workloads]` wired: which readers the observer gets, and what `jouleprobe doctor` says."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from fake_pynvml import FakeNvml
from kube_node import PODS
from kube_node import api_server as kube_api_server
from podresources_server import Behaviour, Devices, PodSpec, serve
from scripted import FIXTURES

from agent.app.doctor import report
from agent.app.workloads import readers
from agent.config import ConfigError, WorkloadsSection, load

IN_POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_off_kubernetes_with_no_kubelet_socket_both_readers_are_off_and_say_why(
        tmp_path: Path) -> None:
    found = readers(WorkloadsSection(pod_resources="auto"), environ={})
    assert (found.allocations, found.pods) == (None, None)
    assert "no kubelet pod-resources socket" in found.off["allocations"]
    assert found.off["pod_names"] == "not running in a Kubernetes pod"
    none = readers(WorkloadsSection(pod_resources="", kubernetes="off"), environ=IN_POD)
    assert none.off == {"allocations": "workloads.pod_resources is ''",
                        "pod_names": "workloads.kubernetes is off"}


def test_a_socket_path_given_is_read_even_where_it_does_not_exist_yet(tmp_path: Path) -> None:
    found = readers(WorkloadsSection(pod_resources=str(tmp_path / "kubelet.sock")), environ={})
    assert found.allocations is not None
    assert found.allocations.get() is None
    assert found.allocations.error == "no_socket"
    assert str(tmp_path / "kubelet.sock") in (found.allocations.detail or "")


def test_in_a_pod_without_node_name_the_pod_list_is_off_unless_asked_for(
        tmp_path: Path) -> None:
    found = readers(WorkloadsSection(pod_resources=""), environ=IN_POD)
    assert found.pods is None and "NODE_NAME not set" in found.off["pod_names"]
    with pytest.raises(ValueError,
                       match=re.escape("workloads.kubernetes = 'on': NODE_NAME not set")):
        readers(WorkloadsSection(pod_resources="", kubernetes="on"), environ=IN_POD)


def test_workloads_config_keys_parse_from_the_environment_and_name_a_bad_value() -> None:
    config = load(environ={"JOULEPROBE_WORKLOADS_ENABLED": "False",
                           "JOULEPROBE_WORKLOADS_PROC_ROOT": "/host/proc"})
    assert (config.workloads.enabled, config.workloads.proc_root) == (False, "/host/proc")
    with pytest.raises(ConfigError, match=re.escape("workloads.enabled: expected true or false")):
        load(environ={"JOULEPROBE_WORKLOADS_ENABLED": "yes"})
    with pytest.raises(ConfigError,
                       match=re.escape("workloads.kubernetes: expected one of auto, on, off")):
        load(environ={"JOULEPROBE_WORKLOADS_KUBERNETES": "maybe"})


def test_doctor_shows_the_allocations_the_processes_and_why_some_are_unresolved(
        fake_nvml: FakeNvml) -> None:
    gpu = fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(3001, None), (9999, None)])
    pods = [PodSpec("ml", "vllm-0", {"vllm": [Devices("nvidia.com/gpu", [gpu.uuid])]})]
    with serve(Behaviour(pods=pods)) as socket:
        config = load(environ={}, overrides={"workloads.pod_resources": socket,
                                             "workloads.kubernetes": "off",
                                             "workloads.proc_root": str(FIXTURES / "proc")})
        text, ok = report(config)
    assert ok
    assert "kubelet allocations (pod-resources): 1 device(s) allocated" in text
    assert f"{gpu.uuid} -> ml/vllm-0/vllm" in text
    assert "pod list (API server): not read (workloads.kubernetes is off)" in text
    assert "processes on the GPUs: 2, in 2 workload(s)" in text  # the holder + slurmd
    assert "unit:slurmd.service (unit)" in text
    assert "1 process(es) unresolved, vanished: not found under workloads.proc_root" in text


def test_doctor_names_a_socket_it_cannot_read_and_the_workloads_switched_off(
        fake_nvml: FakeNvml, tmp_path: Path) -> None:
    fake_nvml.add_gpu()
    config = load(environ={}, overrides={"workloads.pod_resources": str(tmp_path / "none.sock"),
                                         "workloads.kubernetes": "off"})
    text, _ = report(config)
    assert "kubelet allocations (pod-resources): cannot be read:" in text
    assert str(tmp_path / "none.sock") in text
    text, _ = report(replace(config, workloads=replace(config.workloads, enabled=False)))
    assert "Workloads: off (workloads.enabled = false)" in text


def test_doctor_lists_the_annotated_pods_it_would_scrape_and_why_not_the_others(
        fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu = fake_nvml.add_gpu()
    pods = [PodSpec("kube-system", "coredns-7f5998f4c-5fblt",
                    {"coredns": [Devices("nvidia.com/gpu", [gpu.uuid])]})]
    with serve(Behaviour(pods=pods)) as socket, \
            kube_api_server(monkeypatch, tmp_path, [PODS.read_bytes()]):
        config = load(environ={}, overrides={"workloads.pod_resources": socket,
                                             "workloads.kubernetes": "on",
                                             "workloads.proc_root": str(FIXTURES / "proc")})
        text, _ = report(config)
    assert "Annotated pods (jouleprobe.io/scrape):" in text
    scraped = [line for line in text.splitlines()
               if line.startswith("    kube-system/coredns-7f5998f4c-5fblt: vllm at http://")]
    assert len(scraped) == 1 and scraped[0].endswith("on GPU(s) 0")
    assert "names no [[trace]] table" in text  # its jouleprobe.io/trace: vllm-chat
    assert "not scraped: pod kube-system/coredns-7f5998f4c-6bb5v holds no GPU" in text
