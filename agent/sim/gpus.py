"""Simulated GPUs for demos and tests: behave like NVML, never pretend to be hardware.

Every simulated board says so (`GpuInfo.simulated`, a name ending in " (simulated)"), and
one exists only when asked for (`--simulate 2xH100`): it is never a fallback for missing
hardware.

What makes the simulation worth testing against is that it reproduces the NVML behaviour
that decides accuracy (DESIGN §3), not just plausible numbers:

- the energy counter is an integer number of millijoules that advances by the integral of
  the board's power, but only every `counter_period_s`, so a short window can read 0 J;
- the power sensor publishes a sample every 100 ms that covers only the last 25 ms of its
  period (Yang, Adámek, Armour, SC'24), so a power reading can miss a burst entirely;
- the true energy (`true_energy_j`) stays available as ground truth for tests and the
  accuracy benchmark;
- with simulated processes (`agent.sim.processes`), the boards list them and sample their
  SM utilisation as NVML does (`processes`, `process_utilization`), for the workload view.
"""

from __future__ import annotations

import math
import re
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from agent.devices.base import (
    GpuInfo,
    GpuProcesses,
    GpuReading,
    PowerField,
    ProcessSample,
    ProcessUtilization,
)
from agent.sim.processes import SimProcess, SimulatedProcesses

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuModel:
    """The figures of one board model that the simulation needs."""

    key: str
    """What a spec calls it: "H100" in "2xH100"."""
    nvml_name: str
    """What nvmlDeviceGetName returns on the real board."""
    idle_w: float
    tdp_w: float
    """Default power limit (nvmlDeviceGetEnforcedPowerLimit), the board's TDP."""
    memory_mib: int
    """Total memory as nvmlDeviceGetMemoryInfo reports it (slightly under the nominal size)."""
    max_sm_clock_mhz: int


# Sources. TDP, memory and boost clock: NVIDIA's product datasheets for each board (H100 and
# H200 Tensor Core GPU, A100 80GB, L40S, L4, HGX/DGX B200 specifications); memory totals are
# the MiB figure that nvidia-smi prints for the board. Idle: NVIDIA publishes no idle figure.
# These are round values within the nvidia-smi readings operators publicly report for a board
# in P0 with nothing running (H100 SXM ~70 W, A100 SXM ~55 W, and so on); holding a CUDA
# context raises idle by a further 26-66 W ("The Model Parking Tax", arXiv:2605.23918), which
# is one more reason the agent measures idle instead of trusting a table like this one.
MODELS: dict[str, GpuModel] = {
    model.key: model
    for model in (
        # H100 SXM5 80GB HBM3: 700 W TDP, 1980 MHz max SM clock.
        GpuModel("H100", "NVIDIA H100 80GB HBM3", 70.0, 700.0, 81559, 1980),
        # H200 SXM 141GB HBM3e: 700 W TDP (same Hopper die and clocks as H100 SXM).
        GpuModel("H200", "NVIDIA H200", 75.0, 700.0, 143771, 1980),
        # A100 SXM4 80GB HBM2e: 400 W TDP, 1410 MHz max SM clock.
        GpuModel("A100", "NVIDIA A100-SXM4-80GB", 55.0, 400.0, 81920, 1410),
        # L40S 48GB GDDR6: 350 W TDP, 2520 MHz max SM clock.
        GpuModel("L40S", "NVIDIA L40S", 35.0, 350.0, 46068, 2520),
        # L4 24GB GDDR6: 72 W TDP, 2040 MHz max SM clock.
        GpuModel("L4", "NVIDIA L4", 16.0, 72.0, 23034, 2040),
        # B200 180GB HBM3e (HGX B200): 1000 W per GPU, 1965 MHz max SM clock.
        GpuModel("B200", "NVIDIA B200", 140.0, 1000.0, 183359, 1965),
    )
}

_SPEC_PART = re.compile(r"^(?:(\d+)\s*[xX]\s*)?([A-Za-z0-9]+)$")


def parse_spec(spec: str) -> tuple[GpuModel, ...]:
    """The boards of a spec such as "2xH100", "H100" (one) or "2xH100,1xL40S", in order.

    Model names are case-insensitive. Raises ValueError naming the bad part and the known
    models.
    """
    known = ", ".join(MODELS)
    models: list[GpuModel] = []
    for raw in spec.split(","):
        part = raw.strip()
        match = _SPEC_PART.match(part)
        if match is None:
            raise ValueError(
                f"bad simulated GPU spec part {part!r} in {spec!r}: expected COUNTxMODEL "
                f"such as 2xH100 (known models: {known})"
            )
        count_text, name = match.groups()
        count = int(count_text) if count_text is not None else 1
        model = MODELS.get(name.upper())
        if model is None:
            raise ValueError(
                f"unknown simulated GPU model {name!r} in {spec!r} (known models: {known})"
            )
        if count < 1:
            raise ValueError(f"simulated GPU count must be at least 1 in {part!r} of {spec!r}")
        models.extend([model] * count)
    return tuple(models)


class LoadModel(Protocol):
    """The true power of each simulated board over time.

    `power_w(index, t)` must be deterministic: once the source's clock has passed `t`, the
    answer for `t` must never change, since energy up to `t` may already be integrated. It
    is called from any thread.
    """

    def power_w(self, index: int, t: float) -> float: ...


class WaveformLoad:
    """A deterministic, lively load between idle and 80 % of TDP, for demos.

    Each board repeats a cycle of `period_s`: idle, a ramp up, a stretch of bursts (2 s
    pulses between 45 % and 100 % of the range), a ramp down and a quieter plateau, with a
    small ripple on top so that no two samples are identical. Boards are phase-shifted so
    that a multi-GPU dashboard does not show identical lines.
    """

    PEAK_FRACTION_OF_TDP = 0.8

    def __init__(self, models: Sequence[GpuModel], period_s: float = 60.0) -> None:
        if period_s <= 0:
            raise ValueError("waveform period must be positive")
        self._models = tuple(models)
        self.period_s = period_s

    def power_w(self, index: int, t: float) -> float:
        model = self._models[index]
        peak = self.PEAK_FRACTION_OF_TDP * model.tdp_w
        return model.idle_w + (peak - model.idle_w) * self._shape(index, t)

    def _shape(self, index: int, t: float) -> float:
        """Load in [0, 1] at time t (0: idle, 1: the peak)."""
        phase = (t / self.period_s + 0.137 * index) % 1.0
        if phase < 0.15:
            return 0.0
        if phase < 0.35:
            level = (phase - 0.15) / 0.20
        elif phase < 0.65:
            level = 1.0 if t % 2.0 < 1.2 else 0.45
        elif phase < 0.80:
            level = 1.0 - 0.7 * (phase - 0.65) / 0.15
        else:
            level = 0.3
        ripple = 0.03 * math.sin(2 * math.pi * 7.0 * t + index)
        return min(1.0, max(0.0, level + ripple))


class _EnergyIntegral:
    """∫ power dt since `t0`, by the midpoint rule on a fixed grid of `step_s` cells.

    The grid is anchored at `t0`, so the answer for a time does not depend on the order in
    which times were asked for. The running sum only moves forward; a checkpoint every
    `CHECKPOINT_CELLS` cells (8 bytes each) keeps a question about the past cheap.
    """

    CHECKPOINT_CELLS = 1000

    def __init__(self, power: Callable[[float], float], t0: float, step_s: float) -> None:
        self._power = power
        self._t0 = t0
        self._step = step_s
        self._cells = 0
        self._energy_j = 0.0
        self._checkpoints = array("d", [0.0])
        self._lock = threading.Lock()

    def energy_j(self, t: float) -> float:
        if t <= self._t0:
            return 0.0
        cells = int((t - self._t0) / self._step)
        with self._lock:
            if cells >= self._cells:
                self._energy_j = self._advance(self._cells, self._energy_j, cells, record=True)
                self._cells = cells
                energy = self._energy_j
            else:
                start = cells - cells % self.CHECKPOINT_CELLS
                checkpoint = self._checkpoints[start // self.CHECKPOINT_CELLS]
                energy = self._advance(start, checkpoint, cells, record=False)
        edge = self._t0 + cells * self._step
        return energy + self._power((edge + t) / 2) * (t - edge)

    def _advance(self, cell: int, energy: float, until: int, *, record: bool) -> float:
        """Energy at cell `until` from `energy` at `cell`, recording checkpoints if asked."""
        step, t0 = self._step, self._t0
        while cell < until:
            energy += self._power(t0 + (cell + 0.5) * step) * step
            cell += 1
            if record and cell % self.CHECKPOINT_CELLS == 0:
                self._checkpoints.append(energy)
        return energy


class SimulatedGpuSource:
    """Simulated boards that answer like NVML (see the module docstring).

    - Energy: the counter (`energy_source="counter"`) holds integer millijoules, starting
      from an arbitrary per-board value as a real counter counts since driver load, and is
      refreshed every `counter_period_s`: a read returns the value as of the last refresh.
      50 ms is the middle of the 20-100 ms that NVML counters are observed to update at.
    - Power: `power_field="instant"` (NVML_FI_DEV_POWER_INSTANT) is the sensor's latest
      sample; with `power_field="average"` it is the mean of the last ten samples (1 s).
      A sample, published every 100 ms, is the mean power over the last 25 ms before it.
    - Utilisation follows power above idle and reaches 1 at 60 % of the idle-to-TDP range:
      NVML's figure is the share of time a kernel ran, which saturates long before power
      does (`_utilization`). Temperature rises with power. The SM clock is at its maximum
      whenever there is work and at 30 % of it otherwise (no DVFS model). Memory in use is
      a constant 90 %: serving engines reserve their KV cache at start-up (vLLM's default
      gpu_memory_utilization), so it does not follow the load.
    - Processes (with `processes`): `load` is then the power of the board's server, and each
      `Job` beside it adds its own, so the counter holds both (no power cap is modelled:
      the batching curve keeps a server under TDP, a job beside it may pass it). NVML lists
      them all as compute processes. Every `1 / SAMPLES_PER_S` seconds from the start the
      "driver" takes one sample per process, stamped on the wall clock in µs: its SM
      utilisation over the period just ended, the mean of `_utilization` of the server's own
      power (the load's) for the server and of its `sm_util` for a job; memory, encoder and
      decoder utilisation are not modelled (0). The last `RETAINED_SAMPLES` periods are
      kept, as the driver keeps a bounded buffer. Without `processes`, no process is listed.
    """

    COUNTER_PERIOD_S = 0.05
    SENSOR_PERIOD_S = 0.1
    SENSOR_WINDOW_S = 0.025
    AVERAGE_SAMPLES = 10
    INTEGRATION_STEP_S = 0.001
    _TICK_TOLERANCE = 1e-9
    """Fraction of a period forgiven when a clock value meant to land on a tick rounds below."""
    _FLOOR_TOLERANCE_MJ = 1e-6
    """Forgiven when flooring to whole mJ, so that float rounding of an integral that is a
    whole number of mJ (200 W for 0.1 s) does not take it one millijoule below."""
    SAMPLES_PER_S = 6
    """NVML's per-process samples come about every 1/6 s."""
    RETAINED_SAMPLES = 60
    """Periods of samples kept (10 s): what a query from `since_us = 0` gets."""
    SAMPLE_CELLS = 16
    """Instants per sample period at which SM utilisation is averaged."""

    def __init__(
        self,
        spec: str | Sequence[GpuModel],
        load: LoadModel | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        counter_period_s: float = COUNTER_PERIOD_S,
        power_field: PowerField = "instant",
        processes: SimulatedProcesses | None = None,
        wall_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """`clock`: the monotonic clock of every read; `wall_us`: the wall clock, µs, that
        process samples are stamped on (read once, at the start)."""
        if counter_period_s <= 0:
            raise ValueError("counter period must be positive")
        if power_field not in ("instant", "average"):
            raise ValueError("a simulated board reports power_field 'instant' or 'average'")
        self.models = parse_spec(spec) if isinstance(spec, str) else tuple(spec)
        if not self.models:
            raise ValueError("a simulated source needs at least one GPU")
        if processes is not None and processes.gpu_count != len(self.models):
            raise ValueError(f"simulated processes for {processes.gpu_count} GPUs on a source "
                             f"of {len(self.models)}")
        self.load = load if load is not None else WaveformLoad(self.models)
        self._simulated = processes
        self.counter_period_s = counter_period_s
        self._clock = clock
        self._t0 = clock()
        self._wall_t0_us = wall_us()
        self._power_field = power_field
        self._infos = [
            GpuInfo(
                index=index,
                uuid=f"GPU-5a1e{index:04x}-0000-4000-8000-000000000000",
                name=f"{model.nvml_name} (simulated)",
                energy_source="counter",
                power_field=power_field,
                simulated=True,
            )
            for index, model in enumerate(self.models)
        ]
        self._integrals = [
            _EnergyIntegral(partial(self.power_w, index), self._t0, self.INTEGRATION_STEP_S)
            for index in range(len(self.models))
        ]

    def gpus(self) -> list[GpuInfo]:
        return list(self._infos)

    def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
        model = self.models[index]
        now = self._clock()
        tick = self._last_tick(now, self.counter_period_s)
        counter_mj = self._counter_origin_mj(index) + math.floor(
            self._integrals[index].energy_j(tick) * 1000 + self._FLOOR_TOLERANCE_MJ
        )
        sample_time = self._last_tick(now, self.SENSOR_PERIOD_S)
        if self._power_field == "instant":
            power = self._sensor_sample(index, sample_time)
        else:
            power = sum(
                self._sensor_sample(index, sample_time - k * self.SENSOR_PERIOD_S)
                for k in range(self.AVERAGE_SAMPLES)
            ) / self.AVERAGE_SAMPLES
        if not telemetry:
            return GpuReading(time=now, energy_j=counter_mj / 1000, power_w=power)
        utilization = _utilization(model, power)
        return GpuReading(
            time=now,
            energy_j=counter_mj / 1000,
            power_w=power,
            power_limit_w=model.tdp_w,
            utilization=utilization,
            memory_used_bytes=int(0.9 * model.memory_mib) * MIB,
            memory_total_bytes=model.memory_mib * MIB,
            temperature_c=30.0 + 45.0 * _clamp(power / model.tdp_w),
            sm_clock_hz=model.max_sm_clock_mhz * 1e6 * (1.0 if utilization > 0 else 0.3),
        )

    def true_energy_j(self, index: int, t: float) -> float:
        """Ground truth: joules board `index` consumed from the source's start to time `t`."""
        return self._integrals[index].energy_j(t)

    def power_w(self, index: int, t: float) -> float:
        """Board `index`'s true power at time t: the load's, and its jobs'."""
        jobs = self._simulated
        return self.load.power_w(index, t) + (jobs.job_power_w(index, t) if jobs else 0.0)

    def processes(self, index: int) -> GpuProcesses:
        """The board's simulated processes, all listed as compute processes."""
        listed = frozenset(p.pid for p in self._processes_on(index))
        return GpuProcesses(listed, frozenset())

    def process_utilization(self, index: int, since_us: int) -> ProcessUtilization:
        """The retained samples of board `index` stamped after `since_us`, as NVML answers
        (see the class docstring); `last_seen_us` the newest stamp, else `since_us`."""
        on = self._processes_on(index)
        latest = math.floor((self._clock() - self._t0) * self.SAMPLES_PER_S
                            + self._TICK_TOLERANCE)
        # Sample k's stamp is at least since_us only from about this k on.
        after = (since_us - self._wall_t0_us) * self.SAMPLES_PER_S // 1_000_000
        samples = [
            ProcessSample(process.pid, stamp, self._sm_util(index, process, k), 0, 0, 0)
            for k in range(max(1, latest - self.RETAINED_SAMPLES + 1, after), latest + 1)
            if (stamp := self._stamp_us(k)) > since_us
            for process in on
        ]
        last = max((sample.time_us for sample in samples), default=since_us)
        return ProcessUtilization(tuple(samples), max(last, since_us))

    def close(self) -> None:
        """Nothing to release: a simulated board holds no handle."""

    def _last_tick(self, now: float, period: float) -> float:
        """The latest refresh time, on a grid of `period` anchored at the source's start."""
        ticks = math.floor((now - self._t0) / period + self._TICK_TOLERANCE)
        return self._t0 + max(ticks, 0) * period

    def _sensor_sample(self, index: int, at: float) -> float:
        """The power sample published at `at`: mean power over the 25 ms before it."""
        window, step = self.SENSOR_WINDOW_S, self.INTEGRATION_STEP_S
        cells = round(window / step)
        start = at - window
        return sum(self.power_w(index, start + (k + 0.5) * step) for k in range(cells)) / cells

    def _processes_on(self, index: int) -> tuple[SimProcess, ...]:
        if not 0 <= index < len(self.models):
            raise IndexError(f"no simulated GPU {index}")
        return self._simulated.on(index) if self._simulated is not None else ()

    def _stamp_us(self, k: int) -> int:
        """The wall-clock stamp of sample k, taken `k / SAMPLES_PER_S` s after the start."""
        return self._wall_t0_us + k * 1_000_000 // self.SAMPLES_PER_S

    def _sm_util(self, index: int, process: SimProcess, k: int) -> int:
        """A process's SM utilisation, percent, over sample k's period (the 1/6 s before it):
        the server's follows its own power (the load's), a job's is its own."""
        cells, period = self.SAMPLE_CELLS, 1.0 / self.SAMPLES_PER_S
        start = self._t0 + (k - 1) * period
        instants = [start + (c + 0.5) * period / cells for c in range(cells)]
        job, model = process.job, self.models[index]
        if job is None:
            busy = sum(_utilization(model, self.load.power_w(index, t)) for t in instants)
            return round(100 * busy / cells)
        return round(sum(job.sm_at(t) for t in instants) / cells)

    @staticmethod
    def _counter_origin_mj(index: int) -> int:
        """Where board `index`'s counter starts: as if it had used (index + 1) kWh since the
        driver loaded, so that nothing downstream can get away with assuming it starts at 0."""
        return (index + 1) * 3_600_000_000


def _utilization(model: GpuModel, power_w: float) -> float:
    """The share of time a kernel ran at `power_w`: power above idle, saturating at 60 % of
    the idle-to-TDP range (the class docstring of `SimulatedGpuSource` says why)."""
    return _clamp((power_w - model.idle_w) / (0.6 * (model.tdp_w - model.idle_w)))


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))
