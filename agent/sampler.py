"""The sampler: reads every energy source on a fixed period and keeps per-GPU timelines.

One APScheduler job ticks every `interval_s` and wakes one reader thread, which reads every
GPU, then the host (`Sampler.start` says why one thread and how a hung read is left behind:
it delays the other GPUs by at most one tick, once). Each read becomes an `EnergyPoint` through the
GPU's `EnergyAccumulator`, which is where counter resets, implausible jumps and power
integration are handled, once for every kind of source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from apscheduler.executors.debug import DebugExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from agent.devices.base import GpuInfo, GpuReading, GpuSource, HostReading, HostSource
from agent.numeric import CumulativeHistogram
from agent.timeline import EnergyPoint, Timeline

log = logging.getLogger(__name__)

SAMPLE_DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
"""Upper bounds (seconds) of the read-duration histogram; +Inf is implied."""

TELEMETRY_PERIOD_S = 1.0
"""How often the slow-moving GPU fields are read; energy and power are read every tick."""

FALLBACK_MAX_POWER_W = 3000.0
"""Ceiling on plausible board power where the power limit is unknown."""


class EnergyAccumulator:
    """Turns one GPU's raw readings into measured cumulative energy.

    - counter: the difference of two counter reads is exact, however far apart they are,
      so a failed read only lengthens the next interval. A counter that goes backwards
      has been reset (driver reload, GPU reset): that interval is a gap, never negative
      energy. A forward jump implying more than twice the power limit is a gap too.
    - power integration: trapezoids between power readings; an interval longer than
      `max_integration_gap_s` is a gap, because nothing is known about power inside it.
    """

    def __init__(self, info: GpuInfo, max_integration_gap_s: float) -> None:
        self.info = info
        self.max_integration_gap_s = max_integration_gap_s
        self._last_time: float | None = None
        self._last_raw_j: float | None = None
        self._last_power_w: float | None = None
        self._energy_j = 0.0
        self.power_limit_w: float | None = None
        """The latest power limit read (they come with the slow fields, about once a second)."""

    def update(self, reading: GpuReading) -> EnergyPoint | None:
        """The point this reading adds to the timeline, or None if it measured no energy."""
        if reading.power_limit_w:
            self.power_limit_w = reading.power_limit_w
        if self.info.energy_source == "counter":
            return self._from_counter(reading)
        return self._from_power(reading)

    def _plausible(self, joules: float, seconds: float) -> bool:
        ceiling = 2 * self.power_limit_w if self.power_limit_w else FALLBACK_MAX_POWER_W
        return joules <= ceiling * seconds

    def _from_counter(self, reading: GpuReading) -> EnergyPoint | None:
        raw = reading.energy_j
        if raw is None:
            return None
        gap = False
        if self._last_raw_j is not None and self._last_time is not None:
            delta = raw - self._last_raw_j
            if delta < 0 or not self._plausible(delta, reading.time - self._last_time):
                gap = True
            else:
                self._energy_j += delta
        self._last_raw_j, self._last_time = raw, reading.time
        return EnergyPoint(reading.time, self._energy_j, reading.power_w, gap)

    def _from_power(self, reading: GpuReading) -> EnergyPoint | None:
        power = reading.power_w
        if power is None:
            return None
        gap = False
        if self._last_time is not None and self._last_power_w is not None:
            seconds = reading.time - self._last_time
            if seconds > self.max_integration_gap_s:
                gap = True
            else:
                self._energy_j += (self._last_power_w + power) / 2 * seconds
        self._last_power_w, self._last_time = power, reading.time
        return EnergyPoint(reading.time, self._energy_j, power, gap)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bucket_counts: tuple[int, ...]
    """Cumulative counts, one per bound in SAMPLE_DURATION_BUCKETS, then +Inf."""
    sum: float


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    info: GpuInfo
    reading: GpuReading | None
    """The latest reading, successful or not."""
    telemetry: GpuReading | None
    """The latest reading that asked for the slow-moving fields too (about once a second)."""
    energy_j: float
    """Measured cumulative energy since the agent started."""
    power_w: float | None
    samples_total: int
    gaps_total: int
    skipped_total: int
    """Scheduled reads skipped because the previous read of this GPU was still running."""
    errors: dict[tuple[str, str], int]
    """Failed calls by (call, kind) since start."""
    last_energy_time: float | None
    """Monotonic time of the latest reading that measured energy."""
    durations: HistogramSnapshot


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    reading: HostReading | None
    errors_total: int


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """Everything the exporters show, taken at one instant under one lock."""

    time: float
    gpus: tuple[GpuSnapshot, ...]
    host: HostSnapshot | None


@dataclass(slots=True)
class _GpuState:
    info: GpuInfo
    accumulator: EnergyAccumulator
    timeline: Timeline
    reading: GpuReading | None = None
    telemetry: GpuReading | None = None
    energy_j: float = 0.0
    power_w: float | None = None
    samples_total: int = 0
    gaps_total: int = 0
    skipped_total: int = 0
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    last_energy_time: float | None = None
    durations: CumulativeHistogram = field(
        default_factory=lambda: CumulativeHistogram(SAMPLE_DURATION_BUCKETS)
    )


class Sampler:
    """Reads each GPU (and the host) every `interval_s` seconds into bounded timelines."""

    def __init__(
        self,
        gpu_source: GpuSource,
        host_source: HostSource | None = None,
        *,
        interval_s: float = 0.1,
        timeline_seconds: float = 600.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("sample interval must be positive")
        self.gpu_source = gpu_source
        self.host_source = host_source
        self.interval_s = interval_s
        self._clock = clock
        """Measures how long a read took; the reading's own time comes from the source."""
        max_points = max(2, int(timeline_seconds / interval_s) + 1)
        self._telemetry_every = max(1, round(TELEMETRY_PERIOD_S / interval_s))
        max_gap = max(3 * interval_s, 0.5)
        self._gpus: dict[int, _GpuState] = {
            info.index: _GpuState(info, EnergyAccumulator(info, max_gap), Timeline(max_points))
            for info in gpu_source.gpus()
        }
        self.host_timeline = Timeline(max_points)
        """Host energy since the first host reading, for attribution of host energy."""
        self._host_origin_j: float | None = None
        self._host_reading: HostReading | None = None
        self._host_errors = 0
        self._lock = threading.Lock()
        self._scheduler: BackgroundScheduler | None = None
        self._reader: _Reader | None = None
        self._stuck: set[int] = set()
        """GPUs whose read hangs, each left to its own stuck reader thread."""

    @property
    def timelines(self) -> dict[int, Timeline]:
        return {index: state.timeline for index, state in self._gpus.items()}

    def power_limit_w(self, index: int) -> float | None:
        """GPU `index`'s power limit as last read; None until read."""
        return self._gpus[index].accumulator.power_limit_w

    def gpus(self) -> list[GpuInfo]:
        return [state.info for state in self._gpus.values()]

    def sample_gpu(self, index: int) -> None:
        """Read one GPU once and record the result. Never raises for a device fault."""
        state = self._gpus[index]
        telemetry = state.samples_total % self._telemetry_every == 0
        started = self._clock()
        try:
            reading = self.gpu_source.read(index, telemetry=telemetry)
        except Exception as exc:  # a source must not raise, but one bug must not stop sampling
            log.exception("reading GPU %d failed unexpectedly", index)
            reading = GpuReading(time=time.monotonic(), errors=(("read", type(exc).__name__),))
        elapsed = self._clock() - started
        point = state.accumulator.update(reading)
        if point is not None:
            state.timeline.append(point)
        with self._lock:
            state.reading = reading
            if telemetry:
                state.telemetry = reading
            state.samples_total += 1
            state.errors.update(reading.errors)
            if reading.power_w is not None:
                state.power_w = reading.power_w
            if point is not None:
                state.energy_j = point.energy_j
                state.last_energy_time = point.time
                state.gaps_total += point.gap
            state.durations.observe(elapsed)

    def sample_host(self) -> None:
        if self.host_source is None:
            return
        try:
            reading = self.host_source.read()
        except OSError:
            with self._lock:
                self._host_errors += 1
            return
        if self._host_origin_j is None:
            self._host_origin_j = reading.energy_j
        latest = self.host_timeline.latest()
        if latest is None or reading.time > latest.time:
            self.host_timeline.append(
                EnergyPoint(reading.time, reading.energy_j - self._host_origin_j, reading.power_w)
            )
        with self._lock:
            self._host_reading = reading

    def sample_all(self) -> None:
        """One read of every source, in turn: for tests and benchmarks."""
        for index in self._gpus:
            self.sample_gpu(index)
        self.sample_host()

    def snapshot(self) -> NodeSnapshot:
        with self._lock:
            gpus = tuple(
                GpuSnapshot(
                    info=s.info,
                    reading=s.reading,
                    telemetry=s.telemetry,
                    energy_j=s.energy_j,
                    power_w=s.power_w,
                    samples_total=s.samples_total,
                    gaps_total=s.gaps_total,
                    skipped_total=s.skipped_total,
                    errors=dict(s.errors),
                    last_energy_time=s.last_energy_time,
                    durations=HistogramSnapshot(s.durations.cumulative(), s.durations.sum),
                )
                for s in self._gpus.values()
            )
            host = (
                HostSnapshot(self._host_reading, self._host_errors)
                if self.host_source is not None
                else None
            )
        return NodeSnapshot(time.monotonic(), gpus, host)

    def start(self) -> None:
        """One APScheduler job ticks every `interval_s` and wakes the reader thread, which
        reads every GPU in turn, then the host. The tick only signals, so it runs in the
        scheduler's own thread (DebugExecutor).

        Why one reader rather than one thread per GPU: waking eight threads at 10 Hz cost
        more CPU than the reads themselves (bench/sampler.py). A GPU whose read hangs is
        handed its stuck thread at the next tick, and a new reader carries on with the
        others: a hang delays the other GPUs by at most one tick, once, and is then skipped
        (counted in `skipped_total`) until its call returns."""
        if self._scheduler is not None:
            return
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # not a line per tick
        self._reader = _Reader(self)
        scheduler = BackgroundScheduler(
            executors={"default": DebugExecutor()},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )
        scheduler.add_job(
            self._tick, "interval", seconds=self.interval_s, id="tick", next_run_time=_now()
        )
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    def _tick(self) -> None:
        reader = self._reader
        if reader is None:
            return
        with self._lock:
            hung = reader.abandon_if_hung(self.interval_s)
            if hung is not None:
                self._stuck.add(hung)
        if hung is not None:  # leave the stuck call its thread; read the others on a new one
            reader = self._reader = _Reader(self)
        if not reader.wake():
            self._count_skips(self._gpus)
            return
        self._count_skips(self._stuck)

    def _count_skips(self, indices: Iterable[int]) -> None:
        with self._lock:
            for index in indices:
                self._gpus[index].skipped_total += 1

    def _read_round(self, reader: _Reader) -> None:
        """Runs on the reader thread: every GPU not stuck in an earlier read, then the host."""
        for index in self._gpus:
            if index in self._stuck:
                continue
            if not reader.reading(index):
                break
            self.sample_gpu(index)
        if reader.reading(None):
            self.sample_host()
        elif reader.stuck_on is not None:  # the read that hung has returned: it is done
            with self._lock:
                self._stuck.discard(reader.stuck_on)


class _Reader:
    """The thread that reads the sources each time the tick wakes it."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._busy = False
        self._current: tuple[int, float] | None = None
        """(GPU index, monotonic start) of the read in progress."""
        self.abandoned = False
        self.stuck_on: int | None = None
        """The GPU whose hung read this reader was abandoned in."""
        self._thread = threading.Thread(target=self._run, name="jouleprobe-reader", daemon=True)
        self._thread.start()

    def wake(self) -> bool:
        """Ask for one round of reads; False while the previous round is still running."""
        with self._lock:
            if self._busy:
                return False
            self._busy = True
        self._wake.set()
        return True

    def reading(self, index: int | None) -> bool:
        """Marks the start of a read of GPU `index` (None: the host); False, and nothing
        marked, once this reader has been abandoned."""
        with self._lock:
            if self.abandoned:
                return False
            self._current = None if index is None else (index, time.monotonic())
            return True

    def abandon_if_hung(self, after_s: float) -> int | None:
        """If a GPU read has run for longer than `after_s`, abandon this reader to it (it
        finishes that read, then exits without reading anything else) and return the GPU.
        One lock makes the check and the abandoning atomic with `reading`: the GPU named is
        the one whose read this thread is in."""
        with self._lock:
            current = self._current
            if self.abandoned or current is None or time.monotonic() - current[1] <= after_s:
                return None
            self.abandoned = True
            self.stuck_on = current[0]
            return current[0]

    def stop(self) -> None:
        self.abandoned = True
        self._wake.set()
        self._thread.join(timeout=1.0)  # a read hung in the driver cannot be interrupted

    def _run(self) -> None:
        while self._woken():
            try:
                self._sampler._read_round(self)
            finally:
                with self._lock:
                    self._busy = False
                    self._current = None
            if self.abandoned:
                return

    def _woken(self) -> bool:
        """Waits for the next wake; False once this reader has been abandoned."""
        self._wake.wait()
        self._wake.clear()
        return not self.abandoned


def _now() -> datetime:
    """APScheduler wants a timezone-aware wall-clock time for a job's first run."""
    return datetime.now(UTC)
