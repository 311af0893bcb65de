"""The sampler: counter resets, implausible jumps, power integration, and isolation of GPUs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from agent.devices.base import GpuInfo, GpuReading
from agent.sampler import EnergyAccumulator, Sampler
from agent.timeline import EnergyPoint, Timeline

COUNTER = GpuInfo(0, "GPU-0", "test", "counter", "instant")
INTEGRATED = GpuInfo(1, "GPU-1", "test", "power_integration", "power_usage")


def reading(t: float, energy: float | None = None, power: float | None = None,
            limit: float | None = 700.0) -> GpuReading:
    return GpuReading(time=t, energy_j=energy, power_w=power, power_limit_w=limit)


def test_counter_differences_accumulate_from_zero() -> None:
    acc = EnergyAccumulator(COUNTER, max_integration_gap_s=0.5)
    points = [acc.update(reading(t, e)) for t, e in [(1.0, 5000.0), (1.1, 5010.0), (1.2, 5030.0)]]
    assert [p.energy_j for p in points if p] == [0.0, 10.0, 30.0]
    assert not any(p.gap for p in points if p)


def test_counter_reset_is_a_gap_never_negative_energy() -> None:
    acc = EnergyAccumulator(COUNTER, max_integration_gap_s=0.5)
    acc.update(reading(1.0, 5000.0))
    acc.update(reading(1.1, 5010.0))
    reset = acc.update(reading(1.2, 3.0))
    after = acc.update(reading(1.3, 13.0))
    assert reset is not None and reset.gap and reset.energy_j == 10.0
    assert after is not None and not after.gap and after.energy_j == 20.0


def test_implausible_forward_jump_is_a_gap() -> None:
    acc = EnergyAccumulator(COUNTER, max_integration_gap_s=0.5)
    acc.update(reading(1.0, 0.0))
    jump = acc.update(reading(1.1, 1e6))  # 10 MW for 0.1 s on a 700 W board
    assert jump is not None and jump.gap and jump.energy_j == 0.0


def test_failed_counter_read_only_lengthens_the_next_interval() -> None:
    acc = EnergyAccumulator(COUNTER, max_integration_gap_s=0.5)
    acc.update(reading(1.0, 100.0))
    assert acc.update(reading(1.1, None)) is None
    point = acc.update(reading(1.2, 160.0))
    assert point is not None and point.energy_j == 60.0 and not point.gap


def test_power_integration_uses_trapezoids_and_marks_long_holes() -> None:
    acc = EnergyAccumulator(INTEGRATED, max_integration_gap_s=0.5)
    acc.update(reading(0.0, power=100.0))
    point = acc.update(reading(0.2, power=300.0))
    assert point is not None and point.energy_j == pytest.approx(40.0)
    hole = acc.update(reading(2.0, power=300.0))
    assert hole is not None and hole.gap and hole.energy_j == pytest.approx(40.0)


def test_timeline_is_bounded_and_ordered() -> None:
    timeline = Timeline(max_points=3)
    for i in range(5):
        timeline.append(EnergyPoint(float(i), float(i)))
    assert [p.time for p in timeline.after(-1)] == [2.0, 3.0, 4.0]
    assert [p.time for p in timeline.after(3.0)] == [4.0]
    with pytest.raises(ValueError):
        timeline.append(EnergyPoint(4.0, 5.0))
    with pytest.raises(ValueError):
        timeline.append(EnergyPoint(5.0, 1.0))


class ScriptedSource:
    """Two GPUs: each read returns the next scripted reading, or blocks while `hold` is set."""

    def __init__(self, script: dict[int, Callable[[], GpuReading]]) -> None:
        self.script = script

    def gpus(self) -> list[GpuInfo]:
        return [COUNTER, GpuInfo(1, "GPU-1", "test", "counter", "instant")]

    def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
        return self.script[index]()

    def close(self) -> None:
        pass


def counter_reads(watts: float) -> Callable[[], GpuReading]:
    def read() -> GpuReading:
        now = time.monotonic()
        return reading(now, energy=watts * now, power=watts)
    return read


def test_snapshot_counts_samples_errors_and_durations() -> None:
    failing = lambda: GpuReading(time.monotonic(), errors=(("energy", "GpuIsLost"),))  # noqa: E731
    sampler = Sampler(ScriptedSource({0: counter_reads(100.0), 1: failing}), interval_s=0.1)
    for _ in range(3):
        sampler.sample_all()
    gpu0, gpu1 = sampler.snapshot().gpus
    assert gpu0.samples_total == 3 and gpu0.energy_j > 0 and gpu0.last_energy_time is not None
    assert gpu1.errors == {("energy", "GpuIsLost"): 3} and gpu1.last_energy_time is None
    assert gpu0.durations.bucket_counts[-1] == 3


def test_the_power_limit_is_the_last_one_read() -> None:
    """What the attribution engine's prefill-weight learner compares sample power with."""
    limits = iter([None, 700.0, None, 350.0, None])
    source = ScriptedSource({
        0: lambda: reading(time.monotonic(), energy=1.0, limit=next(limits)),
        1: lambda: reading(time.monotonic(), energy=1.0, limit=None),
    })
    sampler = Sampler(source, interval_s=0.1)
    seen = []
    for _ in range(5):
        sampler.sample_all()
        seen.append(sampler.power_limit_w(0))
    assert seen == [None, 700.0, 700.0, 350.0, 350.0]
    assert sampler.power_limit_w(1) is None


def test_a_hanging_gpu_does_not_delay_the_others() -> None:
    release = threading.Event()

    def hang() -> GpuReading:
        release.wait(timeout=30)
        now = time.monotonic()
        return reading(now, energy=10.0 * now)

    sampler = Sampler(ScriptedSource({0: counter_reads(100.0), 1: hang}), interval_s=0.02)
    sampler.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            gpu0, gpu1 = sampler.snapshot().gpus
            if gpu0.samples_total >= 20 and gpu1.skipped_total >= 5:
                break
            time.sleep(0.02)
        assert gpu0.samples_total >= 20, "the healthy GPU stopped being sampled"
        assert gpu1.samples_total == 0 and gpu1.skipped_total >= 5
        release.set()  # the stuck call returns: its reading is kept and the GPU is read again
        while time.monotonic() < deadline and sampler.snapshot().gpus[1].samples_total < 5:
            time.sleep(0.02)
        assert sampler.snapshot().gpus[1].samples_total >= 5
    finally:
        release.set()
        sampler.stop()


def test_slow_fields_are_read_about_once_a_second() -> None:
    asked: list[bool] = []

    class Recording(ScriptedSource):
        def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
            if index == 0:
                asked.append(telemetry)
            return super().read(index)

    sampler = Sampler(Recording({0: counter_reads(100.0), 1: counter_reads(50.0)}),
                      interval_s=0.1)
    for _ in range(25):
        sampler.sample_all()
    assert [i for i, telemetry in enumerate(asked) if telemetry] == [0, 10, 20]
    assert sampler.snapshot().gpus[0].telemetry is not None
