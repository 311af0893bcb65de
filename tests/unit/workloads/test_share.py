"""The per-workload split of a GPU's interval energy: one test per rule, then conservation
under random loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from fake_pynvml import FakeNvml
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted import FIXTURES

from agent.devices.base import ProcessSample
from agent.devices.nvml import NvmlGpuSource
from agent.workloads.cgroups import Container, PodContainer, Workload, workload_of
from agent.workloads.share import (
    IntervalEnergy,
    Ledger,
    Part,
    Split,
    exclusive,
    shared,
    sm_weights,
)

TRAINER, SERVER, NOTEBOOK = "trainer", "server", "notebook"
OWNERS = {101: TRAINER, 102: SERVER, 103: SERVER, 104: NOTEBOOK}
"""PID → workload; other PIDs are unknown."""


def owner_of(pid: int) -> str | None:
    return OWNERS.get(pid)


def total(split: Split[str]) -> float:
    return math.fsum([*(p.energy_j for p in split.parts.values()), split.unattributed.energy_j])


def joules(part: Part) -> tuple[float, float]:
    return part.static_j, part.dynamic_j


def test_an_exclusive_owner_gets_the_whole_interval() -> None:
    split = exclusive(IntervalEnergy(120.0, 40.0), TRAINER)
    assert split.parts == {TRAINER: Part(40.0, 80.0)}
    assert split.unattributed == Part(0.0, 0.0)


def test_dynamic_by_sm_utilisation_static_equally_by_presence() -> None:
    split = shared(IntervalEnergy(100.0, 20.0), {101: 60.0, 102: 20.0}, [101, 102], owner_of)
    assert split.parts[TRAINER].dynamic_j == pytest.approx(60.0)
    assert split.parts[SERVER].dynamic_j == pytest.approx(20.0)
    assert split.parts[TRAINER].static_j == pytest.approx(10.0)
    assert split.parts[SERVER].static_j == pytest.approx(10.0)
    assert split.unattributed.energy_j == pytest.approx(0.0)


def test_processes_of_one_workload_are_one_party() -> None:
    split = shared(IntervalEnergy(90.0, 30.0), {101: 10.0, 102: 10.0, 103: 10.0},
                   [101, 102, 103], owner_of)
    assert split.parts[SERVER].static_j == pytest.approx(15.0)
    assert split.parts[TRAINER].static_j == pytest.approx(15.0)
    assert split.parts[SERVER].dynamic_j == pytest.approx(40.0)
    assert split.parts[TRAINER].dynamic_j == pytest.approx(20.0)


def test_an_unknown_pid_keeps_its_shares_unattributed() -> None:
    split = shared(IntervalEnergy(100.0, 30.0), {101: 50.0, 999: 20.0}, [101, 999], owner_of)
    assert set(split.parts) == {TRAINER}
    assert joules(split.parts[TRAINER]) == pytest.approx((15.0, 50.0))
    assert split.unattributed.static_j == pytest.approx(15.0)
    assert split.unattributed.dynamic_j == pytest.approx(20.0)


def test_a_present_process_without_samples_pays_static_only() -> None:
    split = shared(IntervalEnergy(100.0, 40.0), {101: 80.0}, [101, 104], owner_of)
    assert joules(split.parts[NOTEBOOK]) == pytest.approx((20.0, 0.0))
    assert joules(split.parts[TRAINER]) == pytest.approx((20.0, 60.0))


def test_zero_utilisation_everywhere_leaves_the_dynamic_part_unattributed() -> None:
    split = shared(IntervalEnergy(100.0, 40.0), {101: 0.0, 102: 0.0}, [101, 102], owner_of)
    assert split.unattributed == Part(0.0, 60.0)
    assert joules(split.parts[TRAINER]) == pytest.approx((20.0, 0.0))


def test_no_process_leaves_everything_unattributed() -> None:
    split: Split[str] = shared(IntervalEnergy(100.0, 40.0), {}, [], owner_of)
    assert split.parts == {}
    assert split.unattributed == Part(40.0, 60.0)


def test_sm_weights_sum_the_samples_inside_the_interval() -> None:
    samples = [ProcessSample(101, t, sm, 0, 0, 0)
               for t, sm in [(1_000, 50), (1_500, 30), (2_000, 10), (2_001, 99)]]
    samples.append(ProcessSample(102, 1_800, 40, 0, 0, 0))
    assert sm_weights(samples, 1_000, 2_000) == {101: 40.0, 102: 40.0}


@pytest.mark.parametrize(("energy", "static"), [(10.0, 11.0), (10.0, -1.0), (math.nan, 0.0)])
def test_an_impossible_interval_is_refused(energy: float, static: float) -> None:
    with pytest.raises(ValueError):
        IntervalEnergy(energy, static)


def test_a_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError):
        shared(IntervalEnergy(1.0, 0.0), {101: -1.0}, [], owner_of)


def test_a_shared_gpu_with_two_processes_on_the_scripted_node(fake_nvml: FakeNvml) -> None:
    """NVML's samples and process list → the fixture /proc's cgroups → the split."""
    fake_nvml.add_gpu()
    pod_pid, docker_pid = 1001, 2001
    fake_nvml.set_processes(0, [(pod_pid, 2**30), (docker_pid, 2**30)])
    fake_nvml.add_process_samples(0, [(0.2, pod_pid, 75, 10), (0.2, docker_pid, 25, 5),
                                      (0.7, pod_pid, 50, 10)])
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    fake_nvml.advance(1.0)
    samples = source.process_utilization(0, 0).samples
    assert samples is not None

    def resolve(pid: int) -> Workload | None:
        found = workload_of(pid, proc_root=FIXTURES / "proc")
        return found if isinstance(found, PodContainer | Container) else None

    weights = sm_weights(samples, fake_nvml.sample_stamp_us(0.0), fake_nvml.sample_stamp_us(1.0))
    split = shared(IntervalEnergy(300.0, 100.0), weights, source.processes(0).pids, resolve)
    pod, container = resolve(pod_pid), resolve(docker_pid)
    assert pod is not None and container is not None
    assert joules(split.parts[pod]) == pytest.approx((50.0, 200.0 * 125 / 150))
    assert joules(split.parts[container]) == pytest.approx((50.0, 200.0 * 25 / 150))
    assert split.unattributed.energy_j == pytest.approx(0.0)


# -- conservation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    gpu: int
    energy_j: float
    static_fraction: float
    owner: str | None
    """The exclusive owner, or None: shared by `weights`."""
    weights: dict[int, float]
    present: list[int]


energies = st.one_of(st.just(0.0), st.floats(1e-6, 5e4, allow_nan=False))
pids = st.sampled_from([101, 102, 103, 104, 998, 999])
steps = st.builds(
    Step,
    gpu=st.integers(0, 2),
    energy_j=energies,
    static_fraction=st.floats(0.0, 1.0),
    owner=st.one_of(st.none(), st.sampled_from([TRAINER, SERVER, NOTEBOOK])),
    weights=st.dictionaries(pids, st.one_of(st.just(0.0), st.floats(0.0, 100.0)), max_size=5),
    present=st.lists(pids, max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, min_size=1, max_size=60))
def test_every_joule_is_a_workloads_or_unattributed(run: list[Step]) -> None:
    ledgers: dict[int, Ledger[str]] = {}
    counters: dict[int, list[float]] = {}
    for step in run:
        interval = IntervalEnergy(step.energy_j, step.energy_j * step.static_fraction)
        split = (exclusive(interval, step.owner) if step.owner is not None
                 else shared(interval, step.weights, step.present, owner_of))
        parts = [*split.parts.values(), split.unattributed]
        assert all(p.static_j >= 0.0 and p.dynamic_j >= 0.0 for p in parts)
        assert total(split) == pytest.approx(step.energy_j, rel=1e-9, abs=1e-12)
        if step.owner is None and not any(step.weights.get(p, 0.0) for p in OWNERS):
            assert sum(p.dynamic_j for p in split.parts.values()) == 0.0
        ledgers.setdefault(step.gpu, Ledger()).add(split)
        counters.setdefault(step.gpu, []).append(step.energy_j)
    for gpu, ledger in ledgers.items():
        counter = math.fsum(counters[gpu])
        assert ledger.energy_j == pytest.approx(counter, rel=1e-12, abs=1e-12)
        credited = math.fsum([*ledger.by_owner().values(), ledger.unattributed_j])
        assert credited == pytest.approx(counter, rel=1e-9, abs=1e-9)
