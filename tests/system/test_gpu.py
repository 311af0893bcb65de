"""Against real NVML on a real GPU: skipped on machines without one (see conftest.py).

These run on the GPU machine (`pytest -m gpu`); the figures of issue 9 come from
bench/ and go into docs/gpu-validation.md.
"""

from __future__ import annotations

import time

import pytest

from agent.devices.nvml import NvmlGpuSource, probe
from agent.sampler import Sampler

pytestmark = pytest.mark.gpu


def test_every_gpu_is_described_and_readable() -> None:
    report = probe()
    assert report.available and report.gpus
    source = NvmlGpuSource.open()
    try:
        for info in source.gpus():
            reading = source.read(info.index)
            assert reading.power_w is not None and reading.power_w > 0
            if info.energy_source == "counter":
                assert reading.energy_j is not None and reading.energy_j > 0
    finally:
        source.close()


def test_the_sampler_measures_energy_that_agrees_with_power() -> None:
    source = NvmlGpuSource.open()
    sampler = Sampler(source, interval_s=0.1)
    try:
        sampler.start()
        time.sleep(5.0)
        snapshot = sampler.snapshot()
    finally:
        sampler.stop()
        source.close()
    for gpu in snapshot.gpus:
        assert gpu.samples_total >= 30 and gpu.gaps_total == 0
        points = sampler.timelines[gpu.info.index].after(-1.0)
        seconds = points[-1].time - points[0].time
        mean_power = (points[-1].energy_j - points[0].energy_j) / seconds
        powers = [p.power_w for p in points if p.power_w is not None]
        # An idle or steady board: energy over time within 25 % of the mean power reading.
        assert mean_power == pytest.approx(sum(powers) / len(powers), rel=0.25)
