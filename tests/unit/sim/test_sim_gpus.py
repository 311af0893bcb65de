"""The simulated GPU source: spec parsing, NVML-like counter and sensor, ground truth."""

from __future__ import annotations

import math
import threading
import uuid

import pytest
from scripted import ConstantLoad, FakeClock, StepLoad

from agent.sampler import Sampler
from agent.sim.gpus import (
    MODELS,
    SimulatedGpuSource,
    WaveformLoad,
    parse_spec,
)

T0 = 1000.0
PERIOD = SimulatedGpuSource.COUNTER_PERIOD_S






def counter_mj(source: SimulatedGpuSource, index: int = 0) -> int:
    """The counter as read, in integer millijoules (and checked to be one)."""
    energy = source.read(index).energy_j
    assert energy is not None
    millijoules = round(energy * 1000)
    assert math.isclose(energy * 1000, millijoules, abs_tol=1e-3)
    return millijoules


def last_tick(t: float) -> float:
    return T0 + math.floor((t - T0) / PERIOD + 1e-9) * PERIOD


# --- spec parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        ("2xH100", ["H100", "H100"]),
        ("8xA100", ["A100"] * 8),
        ("H100", ["H100"]),
        ("2xH100,1xL40S", ["H100", "H100", "L40S"]),
        (" 1x l4 , b200 ", ["L4", "B200"]),
        ("1XH200", ["H200"]),
    ],
)
def test_parse_spec(spec: str, keys: list[str]) -> None:
    assert [model.key for model in parse_spec(spec)] == keys


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("2xH100,3xV100", "V100"),
        ("2xfoo", "foo"),
        ("", "''"),
        ("2xH100,,1xL4", "''"),
        ("0xH100", "0xH100"),
        ("2-H100", "2-H100"),
    ],
)
def test_parse_spec_rejects_with_a_clear_message(spec: str, named: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_spec(spec)
    message = str(raised.value)
    assert named in message
    if "count" not in message:
        assert all(key in message for key in MODELS)


def test_model_table_is_plausible() -> None:
    for key in ("H100", "H200", "A100", "L40S", "L4", "B200"):
        model = MODELS[key]
        assert 0 < model.idle_w < 0.25 * model.tdp_w
    assert (MODELS["H100"].tdp_w, MODELS["A100"].tdp_w, MODELS["B200"].tdp_w) == (700, 400, 1000)


# --- labels -------------------------------------------------------------------------------


def test_every_gpu_is_labelled_simulated_with_a_stable_uuid() -> None:
    infos = SimulatedGpuSource("2xH100,1xL40S", ConstantLoad(100.0)).gpus()
    again = SimulatedGpuSource("2xH100,1xL40S", ConstantLoad(100.0)).gpus()
    assert [info.index for info in infos] == [0, 1, 2]
    assert all(info.simulated for info in infos)
    assert infos[0].name == "NVIDIA H100 80GB HBM3 (simulated)"
    assert infos[2].name == "NVIDIA L40S (simulated)"
    assert {info.energy_source for info in infos} == {"counter"}
    assert {info.power_field for info in infos} == {"instant"}
    assert infos[0].uuid == "GPU-5a1e0000-0000-4000-8000-000000000000"
    assert len({info.uuid for info in infos}) == 3
    assert [info.uuid for info in infos] == [info.uuid for info in again]
    for info in infos:
        uuid.UUID(info.uuid.removeprefix("GPU-"))


def test_default_load_is_the_waveform() -> None:
    assert isinstance(SimulatedGpuSource("H100").load, WaveformLoad)


# --- energy counter -----------------------------------------------------------------------


def test_counter_is_integer_millijoules_updated_once_per_period() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("H100", ConstantLoad(333.3333), clock=clock)
    origin = counter_mj(source)
    clock.now = T0 + 0.6 * PERIOD
    assert counter_mj(source) == origin, "a window shorter than the period reads 0 J"
    clock.now = T0 + PERIOD
    assert counter_mj(source) - origin == math.floor(333.3333 * PERIOD * 1000)
    clock.now = T0 + 1.9 * PERIOD
    assert counter_mj(source) - origin == math.floor(333.3333 * PERIOD * 1000)
    clock.now = T0 + 2 * PERIOD
    assert counter_mj(source) - origin == math.floor(333.3333 * 2 * PERIOD * 1000)


def test_counter_starts_where_a_driver_loaded_long_ago_left_it() -> None:
    source = SimulatedGpuSource("2xH100", ConstantLoad(100.0), clock=FakeClock(T0))
    assert source.read(0).energy_j != source.read(1).energy_j
    assert all((source.read(i).energy_j or 0) > 1e6 for i in range(2))


def test_counter_period_is_configurable() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("H100", ConstantLoad(200.0), clock=clock, counter_period_s=0.1)
    origin = counter_mj(source)
    clock.now = T0 + 0.09
    assert counter_mj(source) == origin
    clock.now = T0 + 0.1
    assert counter_mj(source) - origin == 20_000


def test_counter_over_a_window_matches_the_true_energy() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("2xA100", WaveformLoad(parse_spec("2xA100"), 6.0), clock=clock)
    peak_w = 0.8 * MODELS["A100"].tdp_w
    origins = [counter_mj(source, i) for i in range(2)]
    for step in range(1, 300):
        clock.now = T0 + step * 0.037
        for index in range(2):
            measured_j = (counter_mj(source, index) - origins[index]) / 1000
            # as of the last counter update, the only error is the 1 mJ quantisation
            at_tick = source.true_energy_j(index, last_tick(clock.now))
            assert at_tick - 0.001 - 1e-9 <= measured_j <= at_tick + 2e-9
            # as of the read, the counter also lags by at most one period of power
            at_read = source.true_energy_j(index, clock.now)
            assert at_read - 0.001 - peak_w * PERIOD <= measured_j <= at_read + 1e-9


def test_true_energy_is_the_integral_and_the_same_whenever_asked() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("H100", ConstantLoad(250.0), clock=clock)
    assert source.true_energy_j(0, T0 + 3.25) == pytest.approx(250.0 * 3.25, rel=1e-12)
    load = WaveformLoad(parse_spec("H100"), 5.0)
    forward = SimulatedGpuSource("H100", load, clock=FakeClock(T0))
    past = SimulatedGpuSource("H100", load, clock=FakeClock(T0))
    past.true_energy_j(0, T0 + 9.0)  # moves its running sum past the times asked below
    for t in (T0 + 2.5004, T0 + 5.0, T0 + 7.77):
        assert past.true_energy_j(0, t) == pytest.approx(forward.true_energy_j(0, t), rel=1e-12)


# --- power and the other fields -----------------------------------------------------------


def test_power_follows_the_load_through_a_sensor_sampled_every_100_ms() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("H100", StepLoad(70.0, 560.0, at=T0 + 1.03), clock=clock)
    clock.now = T0 + 1.05
    before = source.read(0)
    assert before.power_w == pytest.approx(70.0)
    assert before.utilization == 0.0
    clock.now = T0 + 1.1  # the sample published at 1.1 s covers 1.075-1.1 s
    after = source.read(0)
    assert after.power_w == pytest.approx(560.0)
    assert after.utilization == 1.0
    assert (after.temperature_c or 0) > (before.temperature_c or 0)
    assert (after.sm_clock_hz or 0) > (before.sm_clock_hz or 0)
    assert after.power_limit_w == 700.0
    assert after.memory_total_bytes == 81559 * 1024 * 1024
    assert 0 < (after.memory_used_bytes or 0) < after.memory_total_bytes


class BurstLoad:
    """100 W, except 400 W over [start, start + 0.01)."""

    def __init__(self, start: float) -> None:
        self.start = start

    def power_w(self, index: int, t: float) -> float:
        return 400.0 if self.start <= t < self.start + 0.01 else 100.0


def test_a_burst_between_sensor_windows_is_missed_by_power_but_not_by_the_counter() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("H100", BurstLoad(T0 + 0.02), clock=clock)
    origin = counter_mj(source)
    clock.now = T0 + 0.1
    reading = source.read(0)
    assert reading.power_w == pytest.approx(100.0)
    assert (reading.energy_j or 0) * 1000 - origin == pytest.approx(100.0 * 100 + 300.0 * 10)


def test_average_power_field_is_the_mean_of_the_last_second_of_samples() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource(
        "H100", StepLoad(100.0, 600.0, at=T0 + 2.0), clock=clock, power_field="average"
    )
    assert source.gpus()[0].power_field == "average"
    clock.now = T0 + 2.5  # samples at 1.6 .. 2.5 s: five before the step, five after
    assert source.read(0).power_w == pytest.approx(350.0)
    clock.now = T0 + 3.1
    assert source.read(0).power_w == pytest.approx(600.0)


def test_waveform_stays_between_idle_and_80_percent_of_tdp_and_moves() -> None:
    models = parse_spec("H100,L4")
    load = WaveformLoad(models, period_s=20.0)
    for index, model in enumerate(models):
        powers = [load.power_w(index, k * 0.01) for k in range(2000)]
        assert min(powers) == pytest.approx(model.idle_w)
        assert max(powers) <= 0.8 * model.tdp_w + 1e-9
        assert max(powers) > 0.75 * model.tdp_w
    assert load.power_w(0, 13.37) == WaveformLoad(models, period_s=20.0).power_w(0, 13.37)
    assert [load.power_w(0, t) for t in (5.0, 8.0)] != [load.power_w(1, t) for t in (5.0, 8.0)]


def test_concurrent_reads_integrate_each_gpu_once() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("4xH100", ConstantLoad([100.0, 200.0, 300.0, 400.0]), clock=clock)
    origins = [counter_mj(source, i) for i in range(4)]
    clock.now = T0 + 2.0
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def reader(index: int) -> None:
        for _ in range(20):
            value = counter_mj(source, index)
            with lock:
                results.append((index, value))

    threads = [threading.Thread(target=reader, args=(i % 4,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 160
    for index, value in results:
        assert value - origins[index] == pytest.approx((index + 1) * 100.0 * 2.0 * 1000, abs=1)


# --- through the sampler ------------------------------------------------------------------


def test_sampler_timeline_matches_the_integral_of_a_constant_load() -> None:
    clock = FakeClock(T0)
    source = SimulatedGpuSource("2xH100", ConstantLoad([250.0, 420.0]), clock=clock)
    sampler = Sampler(source, interval_s=0.1, clock=clock)
    for step in range(101):
        clock.now = T0 + step * 0.1
        sampler.sample_all()
    for index, watts in enumerate((250.0, 420.0)):
        timeline = sampler.timelines[index]
        latest = timeline.latest()
        assert latest is not None
        assert len(timeline) == 101
        assert latest.energy_j == pytest.approx(watts * 10.0, abs=0.002)
        assert latest.power_w == pytest.approx(watts)
        assert not any(point.gap for point in timeline.after(T0 - 1))
    snapshot = sampler.snapshot()
    assert all(gpu.info.simulated for gpu in snapshot.gpus)
    assert snapshot.gpus[1].energy_j == pytest.approx(4200.0, abs=0.002)
