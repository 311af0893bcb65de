"""The NVML source, exercised through the scripted fake `pynvml` (tests/fake_pynvml.py)."""

from __future__ import annotations

import inspect
import itertools
import math
import re
import sys
import threading

import pynvml as real_pynvml
import pytest
from fake_pynvml import MIG_FUNCTIONS, FakeNvml, PowerTrace

from agent.devices.base import GpuReading, SourceUnavailable
from agent.devices.nvml import NVML_ERRORS, NvmlGpuSource, probe
from agent.sampler import Sampler

ENERGY = "nvmlDeviceGetTotalEnergyConsumption"
FIELDS = "nvmlDeviceGetFieldValues"

CALLS = {
    "energy": ENERGY,
    "power": FIELDS,
    "power_limit": "nvmlDeviceGetEnforcedPowerLimit",
    "utilization": "nvmlDeviceGetUtilizationRates",
    "memory": "nvmlDeviceGetMemoryInfo",
    "temperature": "nvmlDeviceGetTemperature",
    "clock": "nvmlDeviceGetClockInfo",
}
"""The source's call names and the pynvml function behind each (power: the instant field)."""

READING_FIELDS = {
    "energy": ("energy_j",),
    "power": ("power_w",),
    "power_limit": ("power_limit_w",),
    "utilization": ("utilization",),
    "memory": ("memory_used_bytes", "memory_total_bytes"),
    "temperature": ("temperature_c",),
    "clock": ("sm_clock_hz",),
}
"""The source's call names (the `call` label) and the GpuReading fields each one fills."""

ERROR_KINDS = (
    "NotSupported", "GpuIsLost", "Unknown", "Timeout", "NoPermission", "Uninitialized",
    "DriverNotLoaded", "LibraryNotFound",
)


def open_source(fake: FakeNvml) -> NvmlGpuSource:
    return NvmlGpuSource.open(clock=fake.clock)


def values(reading: GpuReading, call: str) -> list[object]:
    return [getattr(reading, name) for name in READING_FIELDS[call]]


# -- the fake itself -----------------------------------------------------------------------


def test_fake_scripts_only_real_pynvml_functions_with_their_signatures(fake_nvml: FakeNvml):
    assert fake_nvml.unknown_functions() == []
    for name, function in vars(fake_nvml.module).items():
        if name.startswith("nvml") and inspect.isroutine(function):
            fake = inspect.signature(function)
            real = inspect.signature(getattr(real_pynvml, name))
            assert list(fake.parameters) == list(real.parameters), name
    assert fake_nvml.module.NVMLError_GpuIsLost is real_pynvml.NVMLError_GpuIsLost


def test_fake_counter_moves_only_every_update_period(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=200.0)
    fake_nvml.advance(0.041)
    first = fake_nvml.counter_mj(0)
    fake_nvml.advance(0.018)  # still inside the same 20 ms period (0.040 .. 0.060)
    assert fake_nvml.counter_mj(0) == first
    fake_nvml.advance(0.002)
    assert fake_nvml.counter_mj(0) == first + 4000  # one period at 200 W


def test_fake_compute_processes(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    fake_nvml.set_processes(0, [(4242, 3 * 2**30), (4343, None)])
    nvml = fake_nvml.module
    nvml.nvmlInit()
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(0))
    assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4242, 3 * 2**30), (4343, None)]


def test_step_trace_integral_is_exact():
    trace = PowerTrace([(0.0, 100.0), (2.0, 300.0)])
    assert trace.energy(1.0, 3.0) == pytest.approx(400.0)
    assert trace.power(1.999) == 100.0
    assert trace.power(2.0) == 300.0


# -- open() --------------------------------------------------------------------------------


def test_open_describes_each_board(fake_nvml: FakeNvml):
    fake_nvml.bytes_strings = True  # older nvidia-ml-py returned bytes
    fake_nvml.add_gpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa")
    fake_nvml.add_gpu(name="NVIDIA A10", uuid="GPU-bbbb", counter=False, instant_field=False)
    source = open_source(fake_nvml)
    first, second = source.gpus()
    assert (first.index, first.uuid, first.name) == (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
    assert (first.energy_source, first.power_field) == ("counter", "instant")
    assert not (first.simulated or first.mig_enabled or first.module_power)
    assert (second.index, second.uuid, second.name) == (1, "GPU-bbbb", "NVIDIA A10")
    assert (second.energy_source, second.power_field) == ("power_integration", "average")


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("LibraryNotFound", "no NVIDIA driver"),
        ("DriverNotLoaded", "kernel driver is not loaded"),
        ("NoPermission", "no permission"),
        ("LibRmVersionMismatch", "reboot"),
        ("Unknown", "NVML initialisation failed (Unknown)"),
    ],
)
def test_open_fails_with_an_actionable_message_when_nvml_cannot_start(
    fake_nvml: FakeNvml, kind: str, words: str
):
    fake_nvml.add_gpu()
    fake_nvml.init_error = kind
    with pytest.raises(SourceUnavailable, match=re.escape(words)):
        open_source(fake_nvml)


def test_open_without_pynvml_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(SourceUnavailable, match="install nvidia-ml-py"):
        NvmlGpuSource.open()


def test_open_without_gpu_fails_and_shuts_nvml_down(fake_nvml: FakeNvml):
    with pytest.raises(SourceUnavailable, match="NVML found no GPU"):
        open_source(fake_nvml)
    assert fake_nvml.initialized == 0


def test_open_fails_when_the_gpus_cannot_be_counted(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    fake_nvml.fail("nvmlDeviceGetCount", "Unknown", times=None)
    with pytest.raises(SourceUnavailable, match=r"could not count the GPUs \(Unknown\)"):
        open_source(fake_nvml)
    assert fake_nvml.initialized == 0


def test_a_board_that_cannot_be_identified_is_left_out(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(uuid="GPU-gone")
    fake_nvml.add_gpu(uuid="GPU-here")
    fake_nvml.fail("nvmlDeviceGetUUID", "GpuIsLost", gpu=0, times=None)
    assert [g.uuid for g in open_source(fake_nvml).gpus()] == ["GPU-here"]


def test_open_fails_when_no_board_can_be_identified(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    fake_nvml.lose(0)
    with pytest.raises(SourceUnavailable, match="none could be identified"):
        open_source(fake_nvml)
    assert fake_nvml.initialized == 0


def test_a_transient_error_while_probing_is_retried(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    fake_nvml.fail(ENERGY, "Unknown", gpu=0, times=2)
    assert open_source(fake_nvml).gpus()[0].energy_source == "counter"


def test_not_supported_while_probing_is_not_retried(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(counter=False)
    source = open_source(fake_nvml)
    source.read(0)
    assert source.gpus()[0].energy_source == "power_integration"
    assert fake_nvml.calls[(ENERGY, 0)] == 1


def test_close_shuts_nvml_down_once(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    assert fake_nvml.initialized == 1
    source.close()
    source.close()
    assert fake_nvml.initialized == 0
    assert fake_nvml.calls[("nvmlShutdown", None)] == 1


# -- read() --------------------------------------------------------------------------------


def test_read_reports_every_field_in_base_units(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=250.0, limit_w=700.0, utilization_pct=37, memory_used=5 * 2**30,
                      memory_total=80 * 2**30, temperature_c=51, sm_clock_mhz=1980)
    source = open_source(fake_nvml)
    fake_nvml.advance(10.0)
    reading = source.read(0)
    assert reading.time == fake_nvml.clock()
    assert reading.energy_j == fake_nvml.counter_mj(0) / 1000
    assert reading.energy_j == pytest.approx(123_456.789 + 2500.0)
    assert reading.power_w == 250.0
    assert reading.power_limit_w == 700.0
    assert reading.utilization == pytest.approx(0.37)
    assert (reading.memory_used_bytes, reading.memory_total_bytes) == (5 * 2**30, 80 * 2**30)
    assert reading.temperature_c == 51.0
    assert reading.sm_clock_hz == 1.98e9
    assert reading.errors == ()


@pytest.mark.parametrize(("counter", "taken_after", "taken_before"), [
    (True, ENERGY, FIELDS),
    (False, FIELDS, "nvmlDeviceGetEnforcedPowerLimit"),
])
def test_reading_time_is_taken_right_after_the_energy_call(
    fake_nvml: FakeNvml, counter: bool, taken_after: str, taken_before: str
):
    fake_nvml.add_gpu(counter=counter)
    stamps: list[tuple[int, int]] = []

    def clock() -> float:
        stamps.append((fake_nvml.calls[(taken_after, 0)], fake_nvml.calls[(taken_before, 0)]))
        return fake_nvml.clock()

    source = NvmlGpuSource.open(clock=clock)
    before = (fake_nvml.calls[(taken_after, 0)], fake_nvml.calls[(taken_before, 0)])
    source.read(0)
    assert stamps == [(before[0] + 1, before[1])]


def test_counter_absent_reads_no_energy_and_power_only(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=180.0, counter=False)
    reading = open_source(fake_nvml).read(0)
    assert reading.energy_j is None
    assert reading.power_w == 180.0
    assert reading.errors == ()


@pytest.mark.parametrize(
    ("instant", "average", "power_usage", "field", "watts"),
    [
        (True, True, True, "instant", 300.0),
        (False, True, True, "average", 200.0),
        (False, False, True, "power_usage", 200.0),
        (False, False, False, "none", None),
    ],
)
def test_power_comes_from_the_best_field_the_board_has(
    fake_nvml: FakeNvml, instant: bool, average: bool, power_usage: bool, field: str,
    watts: float | None,
):
    fake_nvml.add_gpu(trace=[(0.0, 100.0), (5.0, 300.0)], instant_field=instant,
                      average_field=average, power_usage=power_usage)
    source = open_source(fake_nvml)
    fake_nvml.advance(5.5)  # instant: 300 W; one-second average: (100 + 300) / 2
    reading = source.read(0)
    assert source.gpus()[0].power_field == field
    assert reading.power_w == watts
    assert reading.energy_j is not None
    assert reading.errors == ()


def test_a_field_that_fails_while_probing_is_not_chosen(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(field_errors={real_pynvml.NVML_FI_DEV_POWER_INSTANT: "Unknown"})
    assert open_source(fake_nvml).gpus()[0].power_field == "average"


def test_a_field_error_inside_a_successful_call_degrades_power(fake_nvml: FakeNvml):
    gpu = fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    gpu.field_errors[real_pynvml.NVML_FI_DEV_POWER_INSTANT] = "Timeout"
    reading = source.read(0)
    assert reading.power_w is None
    assert reading.energy_j is not None
    assert reading.errors == (("power", "Timeout"),)


@pytest.mark.parametrize("kind", ERROR_KINDS)
@pytest.mark.parametrize("call", list(CALLS))
def test_an_error_degrades_only_its_own_field(fake_nvml: FakeNvml, call: str, kind: str):
    fake_nvml.add_gpu()
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    fake_nvml.advance(1.0)
    fake_nvml.fail(CALLS[call], kind, gpu=0)
    calls_before = fake_nvml.calls[(CALLS[call], 0)]

    reading = source.read(0)
    assert reading.errors == ((call, kind),)
    assert values(reading, call) == [None] * len(READING_FIELDS[call])
    for other in CALLS.keys() - {call}:
        assert None not in values(reading, other), other
    assert source.read(1).errors == ()

    fake_nvml.advance(1.0)
    again = source.read(0)
    assert again.errors == ()
    if kind == "NotSupported":  # never asked again, and counted only the once
        assert values(again, call) == [None] * len(READING_FIELDS[call])
        assert fake_nvml.calls[(CALLS[call], 0)] == calls_before + 1
    else:
        assert None not in values(again, call)
        assert fake_nvml.calls[(CALLS[call], 0)] == calls_before + 2


def test_not_supported_is_counted_once_by_the_sampler(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    sampler = Sampler(open_source(fake_nvml))
    fake_nvml.fail("nvmlDeviceGetTemperature", "NotSupported", gpu=0)
    for _ in range(5):
        fake_nvml.advance(0.1)
        sampler.sample_all()
    assert sampler.snapshot().gpus[0].errors == {("temperature", "NotSupported"): 1}


def test_a_non_nvml_exception_degrades_only_its_field(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    fake_nvml.fail("nvmlDeviceGetUtilizationRates", RuntimeError("driver bug"), gpu=0)
    reading = source.read(0)
    assert reading.utilization is None
    assert reading.errors == (("utilization", "RuntimeError"),)
    assert reading.energy_j is not None


def test_every_nvml_error_is_named_as_pynvml_names_it() -> None:
    codes = {value for name, value in vars(real_pynvml).items() if name.startswith("NVML_ERROR_")}
    assert set(NVML_ERRORS) <= codes
    # Codes that a later nvidia-ml-py adds are named by pynvml's class for them (next test).
    for code, error in NVML_ERRORS.items():
        assert error.kind == real_pynvml.nvmlExceptionClass(code).__name__.removeprefix(
            "NVMLError_"), code


def test_an_nvml_error_code_unknown_to_the_agent_is_named_by_its_code(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    fake_nvml.fail("nvmlDeviceGetTemperature", real_pynvml.NVMLError(77), gpu=0)
    assert source.read(0).errors == (("temperature", "NVMLError77"),)


def test_a_code_missing_from_the_table_takes_pynvmls_name(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = real_pynvml.NVML_ERROR_TIMEOUT
    monkeypatch.delitem(NVML_ERRORS, code)  # as if a newer nvidia-ml-py had added it
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    fake_nvml.fail("nvmlDeviceGetTemperature", real_pynvml.NVMLError(code), gpu=0)
    assert source.read(0).errors == (("temperature", "Timeout"),)


def test_a_gpu_off_the_bus_reads_empty_then_comes_back_without_negative_energy(
    fake_nvml: FakeNvml,
):
    fake_nvml.add_gpu(trace=300.0)
    fake_nvml.add_gpu(trace=100.0)
    sampler = Sampler(open_source(fake_nvml), interval_s=0.1)
    for _ in range(10):
        fake_nvml.advance(0.1)
        sampler.sample_all()
    before = sampler.snapshot().gpus[0].energy_j

    fake_nvml.lose(0)
    fake_nvml.advance(0.1)
    sampler.sample_all()
    lost, other = sampler.snapshot().gpus
    assert lost.reading is not None
    assert lost.reading.errors == tuple((call, "GpuIsLost") for call in CALLS)
    assert lost.energy_j == before
    assert other.reading is not None and other.reading.errors == ()

    fake_nvml.recover(0)  # after a GPU reset: the counter restarts near zero
    for _ in range(10):
        fake_nvml.advance(0.1)
        sampler.sample_all()
    back = sampler.snapshot().gpus[0]
    assert back.reading is not None and back.reading.errors == ()
    assert back.gaps_total == 1
    # 9 intervals before; the one spanning the loss and reset is unknown; 9 after.
    assert back.energy_j == pytest.approx(18 * 30.0, abs=0.01)


def test_counter_reset_is_a_gap_never_negative_energy(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=200.0)
    source = open_source(fake_nvml)
    sampler = Sampler(source, interval_s=0.1)
    for step in range(20):
        if step == 10:
            fake_nvml.reset_counter(0)
        fake_nvml.advance(0.1)
        sampler.sample_all()
    raw = [point.energy_j for point in sampler.timelines[0].after(-math.inf)]
    assert all(b >= a for a, b in itertools.pairwise(raw))
    gaps = [point.gap for point in sampler.timelines[0].after(-math.inf)]
    assert gaps.count(True) == 1
    snapshot = sampler.snapshot().gpus[0]
    assert snapshot.gaps_total == 1
    assert snapshot.energy_j == pytest.approx(18 * 20.0, abs=0.01)  # 19 intervals, 1 gap


def test_a_hung_call_blocks_only_its_own_gpu(fake_nvml: FakeNvml):
    fake_nvml.add_gpu()
    fake_nvml.add_gpu()
    source = open_source(fake_nvml)
    hang = fake_nvml.hang(ENERGY, gpu=0)
    result: list[GpuReading] = []
    reader = threading.Thread(target=lambda: result.append(source.read(0)), daemon=True)
    reader.start()
    assert hang.entered.wait(timeout=10)

    assert source.read(1).errors == ()  # GPU 0 is still stuck inside NVML
    assert result == []

    hang.release()
    reader.join(timeout=10)
    assert len(result) == 1 and result[0].energy_j is not None


# -- MIG and Grace Hopper ------------------------------------------------------------------


def test_a_mig_board_is_read_as_one_board(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=400.0, mig=True)
    source = open_source(fake_nvml)
    fake_nvml.advance(1.0)
    reading = source.read(0)
    [info] = source.gpus()
    assert info.mig_enabled
    assert info.energy_source == "counter"
    assert reading.power_w == 400.0
    assert reading.utilization is None  # NVML does not report it in MIG mode
    assert reading.errors == (("utilization", "NotSupported"),)
    assert not {name for name, _ in fake_nvml.calls} & MIG_FUNCTIONS


@pytest.mark.parametrize(
    ("name", "module_power_w", "expected"),
    [
        ("NVIDIA GH200 480GB", None, True),
        ("NVIDIA GB200", None, True),
        ("NVIDIA H100 80GB HBM3", 150.0, True),  # answers at module scope
        ("NVIDIA H100 80GB HBM3", None, False),
    ],
)
def test_module_power_boards_are_detected(
    fake_nvml: FakeNvml, name: str, module_power_w: float | None, expected: bool
):
    fake_nvml.add_gpu(trace=300.0, name=name, module_power_w=module_power_w)
    source = open_source(fake_nvml)
    assert source.gpus()[0].module_power is expected
    assert source.read(0).power_w == 300.0  # the GPU's own power, not the module's


# -- the Sampler over a scripted trace --------------------------------------------------------


def smooth_trace(t: float) -> float:
    return 350.0 + 250.0 * math.sin(2 * math.pi * t / 3.0)


@pytest.mark.parametrize("trace", [
    [(0.0, 90.0), (1.3, 600.0), (2.77, 250.0), (4.1, 450.0), (6.05, 90.0)],
    smooth_trace,
], ids=["steps", "sine"])
def test_counter_energy_agrees_with_the_trace_integral(fake_nvml: FakeNvml, trace):
    fake_nvml.add_gpu(trace=trace, limit_w=700.0)
    sampler = Sampler(open_source(fake_nvml), interval_s=0.1)
    fake_nvml.advance(0.503)
    start = fake_nvml.now()
    for _ in range(80):
        sampler.sample_all()
        fake_nvml.advance(0.1)
    end = fake_nvml.now() - 0.1
    expected = PowerTrace(trace).energy(start, end)
    # The counter holds whole millijoules and moves every 20 ms: each end of the window
    # is off by at most the energy since the last update (3 ms here) plus 1 mJ.
    tolerance = 2 * (0.003 * 700.0 + 0.001)
    snapshot = sampler.snapshot().gpus[0]
    assert snapshot.gaps_total == 0
    assert abs(snapshot.energy_j - expected) <= tolerance
    assert expected > 2000.0


def test_power_integration_agrees_with_a_smooth_trace_integral(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(trace=smooth_trace, counter=False)
    sampler = Sampler(open_source(fake_nvml), interval_s=0.1)
    start = fake_nvml.now()
    for _ in range(61):
        sampler.sample_all()
        fake_nvml.advance(0.1)
    expected = PowerTrace(smooth_trace).energy(start, start + 6.0)
    snapshot = sampler.snapshot().gpus[0]
    assert snapshot.info.energy_source == "power_integration"
    # Trapezoids of 0.1 s on a 3 s sine: relative error well under 1e-3 (plus mW rounding).
    assert snapshot.energy_j == pytest.approx(expected, rel=1e-3)


# -- probe() (jouleprobe doctor) ---------------------------------------------------------------


def test_probe_reports_driver_and_each_gpu(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", limit_w=700.0)
    fake_nvml.add_gpu(name="NVIDIA GH200 480GB", uuid="GPU-bbbb", counter=False,
                      instant_field=False, mig=True, limit_w=900.0)
    report = probe()
    assert report.available and report.reason is None
    assert (report.driver_version, report.nvml_version) == ("550.54.15", "12.550.54.15")
    full, partial = report.gpus
    assert (full.index, full.uuid, full.name) == (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
    assert full.energy_counter and full.instant_field and full.average_field
    assert full.power_usage and not full.mig_enabled and not full.module_power
    assert full.power_limit_w == 700.0
    assert full.reasons == ()
    assert (full.energy_source, full.power_field) == ("counter", "instant")
    assert not partial.energy_counter and not partial.instant_field
    assert partial.mig_enabled and partial.module_power
    assert (partial.energy_source, partial.power_field) == ("power_integration", "average")
    assert any("energy counter" in r and "NotSupported" in r for r in partial.reasons)
    assert any("POWER_INSTANT: NotSupported" in r for r in partial.reasons)
    assert fake_nvml.initialized == 0


def test_probe_says_why_a_gpu_cannot_be_measured(fake_nvml: FakeNvml):
    fake_nvml.add_gpu(counter=False, instant_field=False, average_field=False,
                      power_usage=False)
    [gpu] = probe().gpus
    assert gpu.power_field == "none"
    assert any("cannot be measured" in r for r in gpu.reasons)


def test_probe_without_nvml_gives_the_reason(fake_nvml: FakeNvml):
    fake_nvml.init_error = "LibraryNotFound"
    report = probe()
    assert not report.available
    assert report.reason is not None and "no NVIDIA driver" in report.reason
    assert report.gpus == ()


def test_probe_without_gpu_gives_the_reason(fake_nvml: FakeNvml):
    report = probe()
    assert not report.available
    assert report.reason == "NVML found no GPU on this node"
    assert report.driver_version == "550.54.15"
    assert fake_nvml.initialized == 0


def test_probe_without_pynvml(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    report = probe()
    assert not report.available
    assert report.reason is not None and "nvidia-ml-py" in report.reason


def test_energy_only_reads_make_only_the_energy_and_power_calls(fake_nvml) -> None:
    fake_nvml.add_gpu(300.0)
    source = NvmlGpuSource.open(clock=fake_nvml.clock)
    fake_nvml.calls.clear()
    reading = source.read(0, telemetry=False)
    made = {function for function, _ in fake_nvml.calls}
    assert reading.energy_j is not None and reading.power_w is not None
    assert reading.temperature_c is None and reading.utilization is None
    assert made == {"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues"}
