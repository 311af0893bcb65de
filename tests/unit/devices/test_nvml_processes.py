"""Per-process readings of the NVML source (process lists, per-process utilisation samples),
through the scripted fake `pynvml`."""

from __future__ import annotations

import pynvml as real_pynvml
import pytest
from fake_pynvml import FakeNvml

from agent.devices.base import ProcessSample
from agent.devices.nvml import NvmlGpuSource

UTILIZATION = "nvmlDeviceGetProcessUtilization"
COMPUTE = "nvmlDeviceGetComputeRunningProcesses"
GRAPHICS = "nvmlDeviceGetGraphicsRunningProcesses"


def open_source(fake: FakeNvml) -> NvmlGpuSource:
    return NvmlGpuSource.open(clock=fake.clock)


# -- the fake ------------------------------------------------------------------------------


def test_fake_samples_appear_once_the_clock_reaches_them(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.add_process_samples(0, [(0.5, 11, 80, 30), (1.5, 11, 60, 20)])
    nvml = fake_nvml.module
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(real_pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessUtilization(handle, 0)
    fake_nvml.advance(1.0)
    (sample,) = nvml.nvmlDeviceGetProcessUtilization(handle, 0)
    assert isinstance(sample, real_pynvml.c_nvmlProcessUtilizationSample_t)
    assert (sample.pid, sample.smUtil, sample.memUtil) == (11, 80, 30)
    assert sample.timeStamp == fake_nvml.sample_stamp_us(0.5)


def test_fake_process_lists_change_over_time(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(10, None)])
    fake_nvml.set_processes(0, [(10, None), (20, 2**30)], at=2.0)
    fake_nvml.set_processes(0, [(30, None)], graphics=True, at=1.0)
    nvml = fake_nvml.module
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    def listed() -> tuple[list[int], list[int]]:
        return ([p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)],
                [p.pid for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)])

    assert listed() == ([10], [])
    fake_nvml.advance(1.0)
    assert listed() == ([10], [30])
    fake_nvml.advance(1.0)
    assert listed() == ([10, 20], [30])


# -- process_utilization -------------------------------------------------------------------


def test_samples_since_a_timestamp_are_read_in_turn(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.add_process_samples(0, [(0.1, 11, 70, 40), (0.1, 12, 20, 5), (0.3, 11, 90, 50)])
    source = open_source(fake_nvml)
    fake_nvml.advance(0.2)

    first = source.process_utilization(0, 0)
    stamp = fake_nvml.sample_stamp_us(0.1)
    assert first.samples == (ProcessSample(11, stamp, 70, 40, 0, 0),
                             ProcessSample(12, stamp, 20, 5, 0, 0))
    assert first.last_seen_us == stamp
    assert first.errors == ()

    fake_nvml.advance(0.2)
    second = source.process_utilization(0, first.last_seen_us)
    assert [(s.pid, s.sm_util) for s in second.samples or ()] == [(11, 90)]
    assert second.last_seen_us == fake_nvml.sample_stamp_us(0.3)


def test_no_new_sample_is_none_read_not_an_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    reading = source.process_utilization(0, 123)
    assert reading.samples == ()
    assert reading.last_seen_us == 123
    assert reading.errors == ()


@pytest.mark.parametrize("kind", ["GpuIsLost", "Timeout", "NoPermission", "Unknown"])
def test_an_error_degrades_the_reading_and_is_named_by_the_table(
    fake_nvml: FakeNvml, kind: str
) -> None:
    fake_nvml.add_gpu()
    fake_nvml.add_process_samples(0, [(0.0, 11, 70, 40)])
    source = open_source(fake_nvml)
    fake_nvml.fail(UTILIZATION, kind)
    failed = source.process_utilization(0, 0)
    assert failed.samples is None
    assert failed.last_seen_us == 0
    assert failed.errors == (("process_utilization", kind),)
    assert [s.pid for s in source.process_utilization(0, 0).samples or ()] == [11]


def test_mig_mode_is_not_supported_and_not_asked_again(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu(mig=True)
    source = open_source(fake_nvml)
    first = source.process_utilization(0, 0)
    assert (first.samples, first.errors) == (None, (("process_utilization", "NotSupported"),))
    again = source.process_utilization(0, 0)
    assert (again.samples, again.errors) == (None, ())
    assert fake_nvml.calls[(UTILIZATION, 0)] == 1


def test_a_non_nvml_exception_degrades_only_the_reading(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    fake_nvml.fail(UTILIZATION, RuntimeError("bug in a binding"))
    reading = source.process_utilization(0, 0)
    assert (reading.samples, reading.errors) == (None, (("process_utilization", "RuntimeError"),))
    assert source.read(0).energy_j is not None


# -- processes -----------------------------------------------------------------------------


def test_processes_lists_compute_and_graphics_pids(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.add_gpu()
    fake_nvml.set_processes(1, [(4242, 2**30), (4343, None)])
    fake_nvml.set_processes(1, [(4343, None), (5000, None)], graphics=True)
    source = open_source(fake_nvml)
    listed = source.processes(1)
    assert listed.compute == frozenset({4242, 4343})
    assert listed.graphics == frozenset({4343, 5000})
    assert listed.pids == {4242, 4343, 5000}
    assert source.processes(0).pids == frozenset()


def test_one_failed_list_leaves_the_other(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(4242, None)])
    source = open_source(fake_nvml)
    fake_nvml.fail(GRAPHICS, "GpuIsLost")
    listed = source.processes(0)
    assert listed.compute == frozenset({4242})
    assert listed.graphics is None
    assert listed.pids == {4242}
    assert listed.errors == (("graphics_processes", "GpuIsLost"),)


def test_a_lost_gpu_reads_no_process_and_raises_nothing(fake_nvml: FakeNvml) -> None:
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(4242, None)])
    source = open_source(fake_nvml)
    fake_nvml.lose(0)
    listed = source.processes(0)
    assert (listed.compute, listed.graphics) == (None, None)
    assert listed.errors == (("compute_processes", "GpuIsLost"),
                             ("graphics_processes", "GpuIsLost"))
    assert source.process_utilization(0, 0).errors == (("process_utilization", "GpuIsLost"),)
