"""The one small interface that every energy source offers the sampler.

A GPU source describes its devices once (`GpuInfo`) and then answers `read(index)` with one
`GpuReading`: what the device reported at that moment, each field `None` where that one
call failed or is unsupported. Sources report *raw* facts (the hardware counter as read,
or no counter at all); turning them into a monotonic energy series, handling counter
resets and integrating power where no counter exists, is the sampler's job, so that it
is done one way for every kind of source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

EnergySource = Literal["counter", "power_integration"]
"""How a GPU's energy is obtained: the hardware counter, or power integrated over time."""

PowerField = Literal["instant", "average", "power_usage", "none"]
"""Which NVML power reading is used: NVML_FI_DEV_POWER_INSTANT (186),
NVML_FI_DEV_POWER_AVERAGE (185), nvmlDeviceGetPowerUsage (a 1 s average on
Ampere/Ada/Hopper), or nothing readable."""


class SourceUnavailable(Exception):
    """The source cannot be opened at all on this node (no driver, no library, no GPU).

    The message says why, in words an operator can act on.
    """


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What a GPU is and how it will be measured; fixed for the life of a source."""

    index: int
    uuid: str
    name: str
    energy_source: EnergySource
    power_field: PowerField
    simulated: bool = False
    mig_enabled: bool = False
    module_power: bool = False
    """True where the board reports module power (Grace Hopper: CPU + GPU together)."""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One read of one GPU. `time` is `time.monotonic()` taken at the read.

    `energy_j` is the hardware counter as read (joules since driver load), `None` when the
    counter is unsupported or the call failed. `errors` names the calls that failed and
    how, as `(call, kind)` pairs such as `("energy", "GpuIsLost")`.
    """

    time: float
    energy_j: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization: float | None = None
    """GPU utilisation as a ratio in [0, 1]."""
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    sm_clock_hz: float | None = None
    errors: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class GpuSource(Protocol):
    """A set of GPUs that can be read one at a time, from any thread."""

    def gpus(self) -> list[GpuInfo]: ...

    def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
        """Energy and power always; with `telemetry`, also the slow-moving fields (power
        limit, utilisation, memory, temperature, clock), which the sampler asks for about
        once a second rather than at every energy read."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One of NVML's per-process utilisation samples (`nvmlProcessUtilizationSample_t`)."""

    pid: int
    time_us: int
    """When the driver took it: NVML's CPU timestamp, µs on the wall clock."""
    sm_util: int
    """SM (3D/compute) utilisation over the driver's sample period, percent."""
    mem_util: int
    enc_util: int
    dec_util: int


@dataclass(frozen=True, slots=True)
class ProcessUtilization:
    """Per-process samples of one GPU since a timestamp."""

    samples: tuple[ProcessSample, ...] | None
    """The samples stamped after `since_us`, () where there are none; None where the call
    failed or the board does not support it (MIG mode, pre-Maxwell)."""
    last_seen_us: int
    """The newest sample's stamp (else the `since_us` asked for): the next call's `since_us`."""
    errors: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class GpuProcesses:
    """The processes NVML lists on one GPU; a list is None where its call failed."""

    compute: frozenset[int] | None
    graphics: frozenset[int] | None
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def pids(self) -> frozenset[int]:
        """Every PID listed, compute or graphics."""
        return (self.compute or frozenset()) | (self.graphics or frozenset())


@runtime_checkable
class ProcessSource(Protocol):
    """The processes on each GPU and their utilisation (what the workload view reads).

    Safe to call from a thread other than the one reading energy: NVML is thread-safe,
    and a slow process query then never delays an energy read."""

    def processes(self, index: int) -> GpuProcesses: ...

    def process_utilization(self, index: int, since_us: int) -> ProcessUtilization: ...


HostEnergySource = Literal["rapl", "estimated"]


@dataclass(frozen=True, slots=True)
class HostReading:
    """Host CPU + DRAM energy. `energy_j` is cumulative and never goes backwards (RAPL
    wrap-around is handled by the source); `source` says whether it was measured."""

    time: float
    energy_j: float
    power_w: float | None
    source: HostEnergySource
    domains: tuple[str, ...] = ()


class HostSource(Protocol):
    """Host (CPU package + DRAM) energy."""

    source: HostEnergySource

    def read(self) -> HostReading: ...
