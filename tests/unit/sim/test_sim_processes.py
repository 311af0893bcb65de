"""Simulated processes: NVML-like lists and samples, a training job's power in the counter,
and a /proc tree that the real cgroup reader and naming resolve to the pods' names."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted import ConstantLoad, FakeClock, StepLoad

from agent.devices.base import ProcessSource
from agent.sim.gpus import MODELS, LoadModel, SimulatedGpuSource
from agent.sim.processes import PID_BASE, Job, SimulatedProcesses
from agent.workloads.cgroups import PodContainer, workload_of
from agent.workloads.naming import WorkloadName, of_process, pod_container
from agent.workloads.observer import Refreshed, WorkloadObserver

H100 = MODELS["H100"]
HEADROOM = H100.tdp_w - H100.idle_w
T0 = 1000.0
WALL_T0_US = 1_700_000_000_000_000
PERIOD = 1 / SimulatedGpuSource.SAMPLES_PER_S
SERVER_0 = pod_container("inference", "small-8b-0", "server")
SERVER_1 = pod_container("inference", "large-70b-1", "server")
TRAINER = pod_container("research", "finetune-7b", "trainer")






def trainer(**overrides: float) -> Job:
    figures = {"sm_util": 40.0, "power_w": 150.0, **overrides}
    return Job(0, "research", "finetune-7b", "trainer", "torchrun", **figures)


def demo_processes(*jobs: Job) -> SimulatedProcesses:
    return SimulatedProcesses.serving(["small-8b", "large-70b"], jobs)


def source_of(load: LoadModel, processes: SimulatedProcesses | None,
              clock: FakeClock) -> SimulatedGpuSource:
    return SimulatedGpuSource([H100, H100], load, clock=clock, processes=processes,
                              wall_us=lambda: WALL_T0_US)


# --- lists and samples ---------------------------------------------------------------------


def test_each_board_lists_its_server_and_its_jobs_as_compute_processes() -> None:
    source = source_of(ConstantLoad(H100.idle_w), demo_processes(trainer()), FakeClock(T0))
    assert isinstance(source, ProcessSource)
    server_0, job, server_1 = PID_BASE, PID_BASE + 1, PID_BASE + 1000
    assert source.processes(0).compute == frozenset({server_0, job})
    assert source.processes(0).graphics == frozenset()
    assert source.processes(1).pids == {server_1}
    with pytest.raises(IndexError):
        source.processes(2)


def test_pids_are_stable_and_can_name_no_real_process() -> None:
    first = [p.pid for p in demo_processes(trainer()).processes]
    assert first == [p.pid for p in demo_processes(trainer()).processes]
    assert min(first) >= 4_194_304, "PID_MAX_LIMIT: no Linux process has such a PID"


def test_samples_are_stamped_after_since_and_last_seen_advances() -> None:
    clock = FakeClock(T0)
    source = source_of(ConstantLoad(H100.idle_w), demo_processes(trainer()), clock)
    clock.now = T0 + 1.0
    first = source.process_utilization(0, WALL_T0_US)
    assert first.samples is not None and first.errors == ()
    stamps = sorted({s.time_us for s in first.samples})
    assert stamps == [WALL_T0_US + k * 1_000_000 // 6 for k in range(1, 7)]  # every 1/6 s
    assert all({s.pid for s in first.samples if s.time_us == t} == {PID_BASE, PID_BASE + 1}
               for t in stamps), "one sample per process per period"
    assert first.last_seen_us == stamps[-1]

    clock.now = T0 + 1.0 + PERIOD / 2  # no new sample yet
    none = source.process_utilization(0, first.last_seen_us)
    assert (none.samples, none.last_seen_us) == ((), first.last_seen_us)

    clock.now = T0 + 1.5
    later = source.process_utilization(0, first.last_seen_us)
    assert later.samples is not None
    assert all(s.time_us > first.last_seen_us for s in later.samples)
    assert sorted({s.time_us for s in later.samples}) == [
        WALL_T0_US + k * 1_000_000 // 6 for k in range(7, 10)]
    assert later.last_seen_us == WALL_T0_US + 9 * 1_000_000 // 6
    # Asked again from the same point, the same samples: the past does not change.
    assert source.process_utilization(0, first.last_seen_us) == later


def test_a_query_from_zero_gets_the_retained_samples_only() -> None:
    clock = FakeClock(T0)
    source = source_of(ConstantLoad(H100.idle_w), demo_processes(), clock)
    clock.now = T0 + 60.0
    everything = source.process_utilization(1, 0)
    assert everything.samples is not None
    assert len(everything.samples) == SimulatedGpuSource.RETAINED_SAMPLES  # one process
    assert everything.last_seen_us == WALL_T0_US + 360 * 1_000_000 // 6


def test_a_board_without_simulated_processes_lists_none() -> None:
    clock = FakeClock(T0)
    source = source_of(ConstantLoad(H100.idle_w), None, clock)
    clock.now = T0 + 5.0
    assert source.processes(0).compute == frozenset()
    assert source.process_utilization(0, 123) == source.process_utilization(0, 123)
    assert source.process_utilization(0, 123).samples == ()
    assert source.process_utilization(0, 123).last_seen_us == 123


# --- SM utilisation ------------------------------------------------------------------------


def sm_of(source: SimulatedGpuSource, pid: int, since_us: int = WALL_T0_US) -> list[int]:
    utilization = source.process_utilization(0, since_us)
    assert utilization.samples is not None
    return [s.sm_util for s in sorted(utilization.samples, key=lambda s: s.time_us)
            if s.pid == pid]


@pytest.mark.parametrize(("above_idle", "percent"), [
    (0.0, 0), (0.3 * HEADROOM, 50), (0.6 * HEADROOM, 100), (0.9 * HEADROOM, 100)])
def test_the_servers_sm_follows_its_power_as_the_boards_utilisation_does(
        above_idle: float, percent: int) -> None:
    clock = FakeClock(T0)
    source = source_of(ConstantLoad(H100.idle_w + above_idle), demo_processes(), clock)
    clock.now = T0 + 1.0
    assert sm_of(source, PID_BASE) == [percent] * 6
    utilization = source.read(0).utilization
    assert utilization is not None and round(100 * utilization) == percent


def test_the_servers_sm_follows_the_load_over_each_period() -> None:
    clock = FakeClock(T0)
    # Busy (above the 60 % saturation) from a quarter into the third period on.
    step = T0 + 2 * PERIOD + PERIOD / 4
    load = StepLoad(H100.idle_w, H100.tdp_w, step, boards=(0,), rest_w=H100.idle_w)
    source = source_of(load, demo_processes(), clock)
    clock.now = T0 + 4 * PERIOD
    assert sm_of(source, PID_BASE) == [0, 0, 75, 100]


def test_a_job_reports_its_own_sm_and_not_the_servers() -> None:
    clock = FakeClock(T0)
    job = trainer(sm_util=40.0, cycle_s=1.0, busy_s=0.5)
    source = source_of(ConstantLoad(H100.idle_w), demo_processes(job), clock)
    clock.now = T0 + 1.0
    assert sm_of(source, PID_BASE + 1) == [40, 40, 40, 0, 0, 0]  # busy the first half
    assert sm_of(source, PID_BASE) == [0] * 6, "the server is idle: the job's power is not its"


# --- power and energy ----------------------------------------------------------------------


def test_the_training_jobs_power_is_in_the_boards_counter() -> None:
    clock = FakeClock(T0)
    load = ConstantLoad(H100.idle_w + 100.0)
    alone = source_of(load, demo_processes(), clock)
    beside = source_of(load, demo_processes(trainer(power_w=150.0)), clock)
    before = [beside.read(gpu).energy_j for gpu in (0, 1)]
    before_alone = alone.read(0).energy_j
    clock.now = T0 + 10.0
    assert beside.true_energy_j(0, clock.now) - alone.true_energy_j(0, clock.now) == (
        pytest.approx(150.0 * 10.0, rel=1e-9))
    assert beside.true_energy_j(1, clock.now) == alone.true_energy_j(1, clock.now)
    read, read_alone = beside.read(0), alone.read(0)
    assert read.energy_j is not None and read_alone.energy_j is not None
    assert before[0] is not None and before_alone is not None
    assert (read.energy_j - before[0]) - (read_alone.energy_j - before_alone) == (
        pytest.approx(1500.0, abs=0.002))  # whole mJ each
    assert read.power_w == pytest.approx(H100.idle_w + 250.0)


def test_a_job_on_a_cycle_adds_its_power_while_busy_only() -> None:
    clock = FakeClock(T0)
    load = ConstantLoad(H100.idle_w)
    job = trainer(power_w=200.0, cycle_s=4.0, busy_s=3.0)
    alone = source_of(load, demo_processes(), clock)
    beside = source_of(load, demo_processes(job), clock)
    # T0 = 1000 s is a whole number of cycles: 10 s from it holds 3 + 3 + 2 s busy.
    assert beside.true_energy_j(0, T0 + 10.0) - alone.true_energy_j(0, T0 + 10.0) == (
        pytest.approx(200.0 * 8.0, rel=1e-9))
    assert beside.power_w(0, T0 + 3.5) == H100.idle_w
    assert beside.power_w(0, T0 + 4.5) == H100.idle_w + 200.0


# --- /proc and pod names -------------------------------------------------------------------


def test_the_proc_tree_resolves_through_the_cgroup_reader_to_the_pods_names(
        tmp_path: Path) -> None:
    processes = demo_processes(trainer())
    root = processes.write_proc(tmp_path / "proc")
    names: dict[int, WorkloadName] = {}
    for process in processes.processes:
        found = workload_of(process.pid, root)
        assert isinstance(found, PodContainer) and found.runtime == "containerd"
        assert (found.pod_uid, found.container_id) == (process.pod_uid, process.container_id)
        names[process.pid] = of_process(found, processes)
    assert names == {PID_BASE: SERVER_0, PID_BASE + 1: TRAINER, PID_BASE + 1000: SERVER_1}
    assert (root / str(PID_BASE + 1) / "comm").read_text() == "torchrun\n"
    unknown = PodContainer("0c4d2b8f-6e11-4b1d-9a53-7e1c7a526c0e", "ab" * 32, "containerd")
    assert processes.name_of(unknown) is None


def test_the_real_observer_sees_the_server_and_the_job_with_their_sm(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    processes = demo_processes(trainer(sm_util=40.0))
    source = source_of(ConstantLoad(H100.idle_w + 0.3 * HEADROOM), processes, clock)
    watch = WorkloadObserver(source, source.gpus(), history_s=60.0,
                             proc_root=processes.write_proc(tmp_path),
                             pod_names=Refreshed(lambda: processes, 10.0, clock), clock=clock,
                             wall_us=lambda: WALL_T0_US)
    clock.now = T0 + 1.0
    watch.observe()
    shared, alone = watch.covering(0, clock.now), watch.covering(1, clock.now)
    assert shared is not None and alone is not None
    assert shared.present == {PID_BASE: SERVER_0, PID_BASE + 1: TRAINER}
    assert shared.weights == {PID_BASE: 6 * 50.0, PID_BASE + 1: 6 * 40.0}
    assert alone.present == {PID_BASE + 1000: SERVER_1}
    assert watch.status().unresolved == {}


# --- checks --------------------------------------------------------------------------------


def test_bad_processes_are_refused() -> None:
    with pytest.raises(ValueError, match="no GPU 2"):
        SimulatedProcesses.serving(["small-8b"], [Job(2, "a", "b", "c", "d", 10.0, 10.0)])
    with pytest.raises(ValueError, match="share a pod container"):
        SimulatedProcesses([("a", "b", "c"), ("a", "b", "c")])
    with pytest.raises(ValueError, match="0 <= sm_util <= 100"):
        trainer(sm_util=140.0)
    with pytest.raises(ValueError, match="busy_s <= cycle_s"):
        trainer(cycle_s=1.0, busy_s=2.0)
    with pytest.raises(ValueError, match="for 1 GPUs on a source of 2"):
        source_of(ConstantLoad(100.0), SimulatedProcesses.serving(["small-8b"]), FakeClock(T0))
