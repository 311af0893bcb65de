"""The occupancy observer over the scripted NVML, the /proc fixtures and a pod-resources map."""

from __future__ import annotations

from fake_pynvml import FakeNvml
from scripted import FIXTURES

from agent.devices.nvml import NvmlGpuSource
from agent.workloads.cgroups import PodContainer
from agent.workloads.naming import PodNames, WorkloadName, pod_container
from agent.workloads.observer import Refreshed, WorkloadObserver
from agent.workloads.podresources import ContainerRef, DeviceHolders, PodResourcesError

PROC = FIXTURES / "proc"
SLURM = WorkloadName("unit:slurmd.service", "unit")


def observer(fake: FakeNvml, source: NvmlGpuSource, **kwargs: object) -> WorkloadObserver:
    return WorkloadObserver(source, source.gpus(), history_s=60.0, proc_root=PROC,
                            clock=fake.clock,
                            wall_us=lambda: fake.sample_stamp_us(fake.now()), **kwargs)


def test_a_round_gives_each_pid_its_workload_and_its_sm_in_the_window(
        fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(3001, None), (5001, None)])
    fake_nvml.add_process_samples(0, [(0.5, 3001, 40, 0), (0.8, 3001, 20, 0),
                                      (1.5, 3001, 90, 0)])
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    watch = observer(fake_nvml, source)
    fake_nvml.advance(1.0)
    watch.observe()
    fake_nvml.advance(1.0)
    watch.observe()
    first = watch.covering(0, fake_nvml.clock() - 1.5)
    latest = watch.covering(0, fake_nvml.clock())
    assert first is not None and latest is not None and first is not latest
    assert first.weights == {3001: 60.0} and latest.weights == {3001: 90.0}
    assert first.present == {3001: SLURM, 5001: None}
    assert first.exclusive is None
    status = watch.status()
    assert (status.rounds, status.processes, status.unresolved) == (2, 2, {"vanished": 1})
    assert (status.allocations, status.pod_names, status.workloads) == ("off", "off", (SLURM,))


def test_a_gpu_allocated_to_one_container_is_held_by_it(fake_nvml: FakeNvml) -> None:
    gpu = fake_nvml.add_gpu()
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    holder = ContainerRef("ml", "vllm-0", "vllm")
    allocations = Refreshed(
        lambda: {gpu.uuid: DeviceHolders(gpu.uuid, "nvidia.com/gpu", (holder,))}, 10.0,
        fake_nvml.clock)
    watch = observer(fake_nvml, source, allocations=allocations)
    watch.observe()
    occupancy = watch.covering(0, fake_nvml.clock())
    assert occupancy is not None
    assert occupancy.exclusive == pod_container("ml", "vllm-0", "vllm")


def test_an_allocation_that_cannot_be_read_leaves_the_split_to_processes(
        fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    source = NvmlGpuSource.open(clock=fake_nvml.clock)

    def fail() -> dict[str, DeviceHolders]:
        raise PodResourcesError("no_socket", "no kubelet socket")

    watch = observer(fake_nvml, source, allocations=Refreshed(fail, 10.0, fake_nvml.clock))
    watch.observe()
    occupancy = watch.covering(0, fake_nvml.clock())
    assert occupancy is not None and occupancy.exclusive is None
    assert watch.status().allocations == "no_socket"


def test_utilisation_that_fails_gives_no_weights_and_names_the_gpu(
        fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(3001, None)])
    fake_nvml.fail("nvmlDeviceGetProcessUtilization", "Unknown")
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    watch = observer(fake_nvml, source)
    watch.observe()
    occupancy = watch.covering(0, fake_nvml.clock())
    assert occupancy is not None
    assert occupancy.weights == {} and occupancy.present == {3001: SLURM}
    assert watch.status().no_utilization == (0,)


class OnePod:
    """A pod list that names one pod UID's containers."""

    def __init__(self, uid: str, names: tuple[str, str, str]) -> None:
        self.uid, self.names = uid, names

    def name_of(self, container: PodContainer) -> tuple[str, str, str] | None:
        return self.names if container.pod_uid == self.uid else None


def test_a_pid_keeps_its_name_while_the_pod_list_read_is_the_same_and_is_renamed_after(
        fake_nvml: FakeNvml) -> None:
    """Rounds name only new PIDs while the pod list is the one read before (the accounts
    then meet one name object per workload); a new read names every PID again."""
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(1001, None)])
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    uid = "2c9f8a79-5391-454b-88cb-86190881cb96"  # tests/fixtures/proc/1001
    reads = [OnePod(uid, ("ml", "vllm-0", "vllm"))]
    pods: Refreshed[PodNames] = Refreshed(lambda: reads[-1], 10.0, fake_nvml.clock)
    watch = observer(fake_nvml, source, pod_names=pods)
    named = []
    for _ in range(2):
        fake_nvml.advance(1.0)
        watch.observe()
        occupancy = watch.covering(0, fake_nvml.clock())
        assert occupancy is not None
        named.append(occupancy.present[1001])
    assert named[0] == pod_container("ml", "vllm-0", "vllm") and named[1] is named[0]
    reads.append(OnePod(uid, ("ml", "vllm-0-renamed", "vllm")))
    fake_nvml.advance(10.0)  # the pod list is read again
    watch.observe()
    occupancy = watch.covering(0, fake_nvml.clock())
    assert occupancy is not None
    assert occupancy.present[1001] == pod_container("ml", "vllm-0-renamed", "vllm")
