"""A PID's workload from its cgroup, on the fixture /proc trees (tests/fixtures/proc)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from scripted import FIXTURES, unprivileged

from agent.workloads.cgroups import (
    Command,
    Container,
    PodContainer,
    Unit,
    Unresolved,
    Workload,
    workload_from_cgroup,
    workload_of,
)

PROC = FIXTURES / "proc"
C1 = "5c2e3f0b8d4a1e6f7a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5"
C5 = "2fa3e04b676df750842faf017052dd37ea0cc5bc7259a3487a1718c7fe100c94"
C7 = "99f3a16ea25b7724cb56a4f0c0df1113ad9474fbf5545bead97fd5c7f61c13f4"

EXPECTED: dict[int, Workload] = {
    1001: PodContainer("2c9f8a79-5391-454b-88cb-86190881cb96", C1, "containerd"),
    1002: PodContainer(
        "d0511cd2-29d2-4215-be0f-f77bc0609d99",
        "a09343ca97901516c25036e2b954421254f8c68b384b536064e8999f0c4ed18d", "cri-o"),
    1003: PodContainer(
        "f6adb0af-0855-4bab-b25b-c853f18d0ce2",
        "35b97177dada20362ab90d90ac63cd54e8a41cf87bea34f270631b6da17f4a93", None),
    1004: PodContainer(
        "0043435f-1854-4327-b76b-730f681a781d",
        "01fd96f7ad292b02a8317cde4ecb8c7ef3cc06ffdd113f13410e0837eb2b2a20", "containerd"),
    1005: PodContainer("7e1c7a52-6c0e-4b1d-9a53-0c4d2b8f6e11", C5, "docker"),
    1006: PodContainer(
        "9b0f2c64-1d3e-4f5a-8b7c-6d9e0f1a2b3c",
        "f93ee491b8ed2680d5a909eb098b14a9430173b57ca1c4efedd8768566d67e8e", "cri-o"),
    1007: PodContainer("eab5a334-93fe-48a8-b139-9e8079c1f163", C7, "containerd"),
    1008: PodContainer("3cae2e45-052c-4b11-80d3-4d7b2d2d3464", C7, "containerd"),
    1009: PodContainer("6b3c1e1d5f2a4a7b9c0d8e7f6a5b4c3d", C1, "containerd"),
    2001: Container(C5, "docker"),
    2002: Container(C5, "docker"),
    2003: Container("3f05ee050f82c0145f1d88c94269c39dff0f07dbf8bba20aafd54b3a75dcaecc", "podman"),
    2004: Container("8e363eb2287da4ccc9f52ffc5de11252ac5fe707e3ddb917a3c0bdf9bb64165b",
                    "containerd"),
    3001: Unit("slurmd.service"),
    3002: Unit("jupyter.service"),
    3003: Unit("ollama.service"),
    4001: Command("python3"),
    4002: Command("gpu_burn"),
}


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_each_fixture_pid_resolves_to_its_workload(pid: int) -> None:
    assert workload_of(pid, proc_root=PROC) == EXPECTED[pid]


def test_a_vanished_pid_says_so() -> None:
    assert not (PROC / "5001").exists()
    outcome = workload_of(5001, proc_root=PROC)
    assert isinstance(outcome, Unresolved)
    assert (outcome.pid, outcome.reason) == (5001, "vanished")


def test_a_pid_that_exits_between_its_reads_has_vanished() -> None:
    outcome = workload_of(5002, proc_root=PROC)
    assert isinstance(outcome, Unresolved)
    assert outcome.reason == "vanished"
    assert "FileNotFoundError" in outcome.detail


def test_an_unreadable_cgroup_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "77" / "cgroup").mkdir(parents=True)  # a directory where the file should be
    outcome = workload_of(77, proc_root=tmp_path)
    assert isinstance(outcome, Unresolved)
    assert outcome.reason == "unreadable"


def test_a_cgroup_without_permission_is_no_permission(tmp_path: Path) -> None:
    folder = tmp_path / "88"
    shutil.copytree(PROC / "1001", folder)
    tmp_path.chmod(0o755)
    (folder / "cgroup").chmod(0o000)
    with unprivileged():
        outcome = workload_of(88, proc_root=tmp_path)
    assert isinstance(outcome, Unresolved)
    assert outcome.reason == "no_permission"


def test_the_real_proc_resolves_this_process() -> None:
    if not Path("/proc/self/cgroup").exists():
        pytest.skip("no /proc on this system")
    assert not isinstance(workload_of(os.getpid()), Unresolved)


@pytest.mark.parametrize("text", [
    "",
    "0::/\n",
    "0::/init.scope\n",
    "0::/system.slice/run-r1b2.scope\n",
    "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-term.scope\n",
    "0::/kubepods.slice/kubepods-burstable.slice\n",  # a QoS slice, no pod
    "0::/system.slice/podman.slice\n",
    "0::/system.slice/docker-abc.scope\n",  # not a container id
])
def test_paths_that_name_no_container_or_unit(text: str) -> None:
    assert workload_from_cgroup(text) is None


def test_a_process_in_a_pods_own_cgroup_has_no_container() -> None:
    text = "0::/kubepods.slice/kubepods-pod7e1c7a52_6c0e_4b1d_9a53_0c4d2b8f6e11.slice\n"
    assert workload_from_cgroup(text) == PodContainer(
        "7e1c7a52-6c0e-4b1d-9a53-0c4d2b8f6e11", None, None)


def test_a_pod_on_any_v1_hierarchy_wins_over_a_unit_on_another() -> None:
    text = ("1:name=systemd:/system.slice/containerd.service\n"
            f"4:memory:/kubepods/besteffort/pod9b0f2c64-1d3e-4f5a-8b7c-6d9e0f1a2b3c/{C5}\n")
    assert workload_from_cgroup(text) == PodContainer(
        "9b0f2c64-1d3e-4f5a-8b7c-6d9e0f1a2b3c", C5, None)


def test_a_service_with_a_delegated_subtree_is_the_service() -> None:
    assert workload_from_cgroup("0::/system.slice/jobs.service/worker-3\n") == Unit(
        "jobs.service")
