"""GPU energy and telemetry through NVML (the `pynvml` module of nvidia-ml-py).

What each board can report is probed once, at open: the hardware energy counter
(Volta and newer) is preferred; power is read from the explicit instant or average field
where the driver has them, because `nvmlDeviceGetPowerUsage` is a one-second average on
Ampere and newer. MIG boards are read as the one physical board they are: power exists
only per board, so MIG instances are never enumerated. Grace Hopper boards that report
module power (CPU + GPU) are detected and labelled.

Every NVML call can fail at any time (a GPU falls off the bus, the driver times out). A
failed call leaves one field of one reading empty and is reported as `(call, kind)`;
`read()` never raises. A call that answers NotSupported is not made again for that GPU:
support does not appear later, and skipping it keeps each sample cheap. How each NVML error
is named and handled is written once, in `NVML_ERRORS`, keyed on its return code.

Per-process readings (`processes`, `process_utilization`) go through the same table: NVML's
compute and graphics processes on a board, and its per-process SM utilisation samples, which
say how the board's work divides among processes that share it (time-slicing, MPS).

`pynvml` is imported when a source is opened, not when this module is imported, so that
a node without nvidia-ml-py gets an actionable message and tests can substitute a fake.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

from agent.devices.base import (
    EnergySource,
    GpuInfo,
    GpuProcesses,
    GpuReading,
    PowerField,
    ProcessSample,
    ProcessUtilization,
    SourceUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

FI_DEV_POWER_AVERAGE = 185
FI_DEV_POWER_INSTANT = 186
"""NVML field ids, fixed by the NVML ABI (also `pynvml.NVML_FI_DEV_POWER_*`)."""
POWER_SCOPE_MODULE = 1
"""`NVML_POWER_SCOPE_MODULE`: power of the whole module (Grace Hopper: CPU + GPU)."""
MODULE_POWER_NAMES = ("GH200", "GB200")
"""Board names of Grace Hopper / Grace Blackwell modules, which report module power."""

PROBE_ATTEMPTS = 3
"""Tries of one capability probe before a transient error settles it as unusable."""


@dataclass(frozen=True, slots=True)
class ErrorMeaning:
    """What a failed call means to this source: how it is named and what is done about it."""

    kind: str
    """Its name in readings, logs and the `kind` label: pynvml's error class name less
    `NVMLError_` ("GpuIsLost"); for an exception that is not an NVML error, its class name."""
    final: bool = False
    """Retrying cannot succeed: a capability probe takes this answer at once."""
    unsupported: bool = False
    """The board does not support the call: it is not made again for that GPU."""
    open_failure: str | None = None
    """What to tell the operator when nvmlInit fails with it."""
    unexpected: bool = False
    """Not an NVML error at all (a bug here or in pynvml): logged with its traceback."""

    def __str__(self) -> str:
        return self.kind


NVML_ERRORS: dict[int, ErrorMeaning] = {
    1: ErrorMeaning("Uninitialized"),
    2: ErrorMeaning("InvalidArgument"),
    3: ErrorMeaning("NotSupported", final=True, unsupported=True),
    4: ErrorMeaning("NoPermission", final=True, open_failure=(
        "no permission to use NVML: give the agent's user access to /dev/nvidiactl and "
        "/dev/nvidia* (usually through the group that owns them)"
    )),
    5: ErrorMeaning("AlreadyInitialized"),
    6: ErrorMeaning("NotFound"),
    7: ErrorMeaning("InsufficientSize"),
    8: ErrorMeaning("InsufficientPower"),
    9: ErrorMeaning("DriverNotLoaded", open_failure=(
        "the NVIDIA kernel driver is not loaded: check `nvidia-smi` and `lsmod | grep nvidia`"
    )),
    10: ErrorMeaning("Timeout"),
    11: ErrorMeaning("IrqIssue"),
    12: ErrorMeaning("LibraryNotFound", open_failure=(
        "NVML library libnvidia-ml.so.1 not found: no NVIDIA driver is installed on this node, "
        "or it is not visible here (in a container, run with the NVIDIA Container Toolkit)"
    )),
    13: ErrorMeaning("FunctionNotFound", final=True),
    14: ErrorMeaning("CorruptedInforom"),
    15: ErrorMeaning("GpuIsLost"),
    16: ErrorMeaning("ResetRequired"),
    17: ErrorMeaning("OperatingSystem"),
    18: ErrorMeaning("LibRmVersionMismatch", open_failure=(
        "the NVML library and the loaded NVIDIA kernel driver differ in version (driver "
        "upgraded without a reboot?): reboot or reload the nvidia kernel modules"
    )),
    19: ErrorMeaning("InUse"),
    20: ErrorMeaning("Memory"),
    21: ErrorMeaning("NoData"),
    22: ErrorMeaning("VgpuEccNotSupported"),
    23: ErrorMeaning("InsufficientResources"),
    24: ErrorMeaning("FreqNotSupported"),
    25: ErrorMeaning("ArgumentVersionMismatch"),
    26: ErrorMeaning("Deprecated"),
    27: ErrorMeaning("NotReady"),
    28: ErrorMeaning("GpuNotFound"),
    29: ErrorMeaning("InvalidState"),
    30: ErrorMeaning("ResetTypeNotSupported"),
    999: ErrorMeaning("Unknown"),
}
"""Every NVML error, by its return code (`NVMLError.value`: nvml.h's `nvmlReturn_t`, fixed
by the NVML ABI, also `pynvml.NVML_ERROR_*`). The one place an NVML error is given its name
and its handling."""

NO_GPU = "NVML found no GPU on this node"


@dataclass(frozen=True, slots=True)
class NvmlGpuReport:
    """What one GPU can report through NVML, and why not where it cannot."""

    index: int
    uuid: str | None
    name: str | None
    energy_counter: bool
    instant_field: bool
    average_field: bool
    power_usage: bool
    mig_enabled: bool
    module_power: bool
    power_limit_w: float | None
    reasons: tuple[str, ...] = ()
    """One line per missing capability or failed probe."""

    @property
    def energy_source(self) -> EnergySource:
        return "counter" if self.energy_counter else "power_integration"

    @property
    def power_field(self) -> PowerField:
        if self.instant_field:
            return "instant"
        if self.average_field:
            return "average"
        if self.power_usage:
            return "power_usage"
        return "none"


@dataclass(frozen=True, slots=True)
class NvmlReport:
    """What `jouleprobe doctor` shows about NVML on this node."""

    available: bool
    reason: str | None = None
    """Why NVML cannot be used, when it cannot."""
    driver_version: str | None = None
    nvml_version: str | None = None
    gpus: tuple[NvmlGpuReport, ...] = ()


@dataclass(slots=True)
class _GpuState:
    """Per-GPU state. Only the GPU's own calls touch it, so calls on different GPUs share
    nothing mutable. The energy reads and the process queries of one GPU may run on two
    threads: they only add to the two sets, which is atomic, and a race can at worst log
    one failure twice."""

    info: GpuInfo
    handle: Any
    read_power_mw: Callable[[Any], int] | None
    unsupported: set[str] = field(default_factory=set)
    """Calls that answered NotSupported: never made again."""
    logged: set[tuple[str, str]] = field(default_factory=set)
    """(call, kind) already logged once, so a failing GPU does not flood the log."""


class NvmlGpuSource:
    """The physical GPUs of this node, read through NVML. Build it with `open()`."""

    def __init__(
        self, nvml: ModuleType, gpus: dict[int, _GpuState], clock: Callable[[], float]
    ) -> None:
        self._nvml = nvml
        self._gpus = gpus
        self._clock = clock
        self._closed = False

    @classmethod
    def open(
        cls,
        *,
        clock: Callable[[], float] = time.monotonic,
        nvml_module: ModuleType | None = None,
    ) -> NvmlGpuSource:
        """Initialise NVML and probe every GPU; raises SourceUnavailable saying why not.

        `clock` stamps each reading; it must be `time.monotonic` in production (tests pass
        the fake NVML's clock). `nvml_module` defaults to `import pynvml`.
        """
        nvml = nvml_module if nvml_module is not None else _import_nvml()
        _init(nvml)
        try:
            states: dict[int, _GpuState] = {}
            for handle, report in _probe_gpus(nvml):
                if handle is None or report.uuid is None:
                    log.warning("GPU %d cannot be read and is left out: %s",
                                report.index, "; ".join(report.reasons))
                    continue
                states[report.index] = _state(nvml, handle, report)
            if not states:
                raise SourceUnavailable("NVML lists GPUs but none could be identified")
        except BaseException:
            _shutdown(nvml)
            raise
        return cls(nvml, states, clock)

    def gpus(self) -> list[GpuInfo]:
        return [state.info for state in self._gpus.values()]

    def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
        """One reading of GPU `index`; a field is None where its call failed. Each call,
        unit conversion included, fails alone, so this never raises."""
        gpu = self._gpus[index]
        nvml = self._nvml
        errors: list[tuple[str, str]] = []

        def call(name: str, read: Callable[[Any], T]) -> T | None:
            return self._call(gpu, errors, name, read)

        when: float | None = None
        energy_j = None
        if gpu.info.energy_source == "counter" and "energy" not in gpu.unsupported:
            energy_j = call("energy", lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000)
            when = self._clock()
        read_power_mw = gpu.read_power_mw
        power_w = call("power", lambda h: read_power_mw(h) / 1000) if read_power_mw else None
        if when is None:
            when = self._clock()
        if not telemetry:
            return GpuReading(time=when, energy_j=energy_j, power_w=power_w, errors=tuple(errors))
        limit_w = call("power_limit", lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
        utilization = call(
            "utilization", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100
        )
        memory = call("memory", lambda h: _used_total(nvml.nvmlDeviceGetMemoryInfo(h)))
        temperature_c = call(
            "temperature",
            lambda h: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        )
        sm_clock_hz = call(
            "clock", lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6
        )
        return GpuReading(
            time=when,
            energy_j=energy_j,
            power_w=power_w,
            power_limit_w=limit_w,
            utilization=utilization,
            memory_used_bytes=memory[0] if memory is not None else None,
            memory_total_bytes=memory[1] if memory is not None else None,
            temperature_c=temperature_c,
            sm_clock_hz=sm_clock_hz,
            errors=tuple(errors),
        )

    def processes(self, index: int) -> GpuProcesses:
        """The compute and graphics processes on GPU `index`; each list fails alone, so this
        never raises. Any thread may call it (`ProcessSource`)."""
        gpu = self._gpus[index]
        nvml = self._nvml
        errors: list[tuple[str, str]] = []

        def pids(name: str, listed: Callable[[Any], Iterable[Any]]) -> frozenset[int] | None:
            return self._call(gpu, errors, name,
                              lambda h: frozenset(int(p.pid) for p in listed(h)))

        compute = pids("compute_processes", nvml.nvmlDeviceGetComputeRunningProcesses)
        graphics = pids("graphics_processes", nvml.nvmlDeviceGetGraphicsRunningProcesses)
        return GpuProcesses(compute, graphics, tuple(errors))

    def process_utilization(self, index: int, since_us: int) -> ProcessUtilization:
        """NVML's per-process utilisation samples of GPU `index` stamped after `since_us`
        (`nvmlDeviceGetProcessUtilization`; 0: all the driver keeps). NotFound is NVML's
        answer for no new sample, so it reads as none, not as an error. Never raises; any
        thread may call it (`ProcessSource`)."""
        gpu = self._gpus[index]
        nvml = self._nvml
        errors: list[tuple[str, str]] = []

        def samples(handle: Any) -> tuple[ProcessSample, ...]:
            try:
                raw = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
            except nvml.NVMLError as exc:
                if exc.value == nvml.NVML_ERROR_NOT_FOUND:
                    return ()
                raise
            return tuple(ProcessSample(int(s.pid), int(s.timeStamp), int(s.smUtil),
                                       int(s.memUtil), int(s.encUtil), int(s.decUtil))
                         for s in raw)

        read = self._call(gpu, errors, "process_utilization", samples)
        last = max((sample.time_us for sample in read or ()), default=since_us)
        return ProcessUtilization(read, max(last, since_us), tuple(errors))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _shutdown(self._nvml)

    def _call(
        self,
        gpu: _GpuState,
        errors: list[tuple[str, str]],
        name: str,
        read: Callable[[Any], T],
    ) -> T | None:
        if name in gpu.unsupported:
            return None
        try:
            return read(gpu.handle)
        except Exception as exc:
            error = _meaning(self._nvml, exc)
            if error.unsupported:
                gpu.unsupported.add(name)
            errors.append((name, error.kind))
            if (name, error.kind) not in gpu.logged:
                gpu.logged.add((name, error.kind))
                log.warning("GPU %d: NVML %s read failed: %s (%s)%s", gpu.info.index, name,
                            error, exc, ", which is not an NVML error" if error.unexpected else "",
                            exc_info=error.unexpected)
            return None


def probe(nvml_module: ModuleType | None = None) -> NvmlReport:
    """What NVML on this node can measure, GPU by GPU, and why not where it cannot."""
    try:
        nvml = nvml_module if nvml_module is not None else _import_nvml()
        _init(nvml)
    except SourceUnavailable as exc:
        return NvmlReport(available=False, reason=str(exc))
    try:
        driver, _ = _attempt(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        version, _ = _attempt(nvml, lambda: _text(nvml.nvmlSystemGetNVMLVersion()))
        try:
            gpus = tuple(report for _, report in _probe_gpus(nvml))
        except SourceUnavailable as exc:
            return NvmlReport(False, str(exc), driver, version)
        return NvmlReport(True, None, driver, version, gpus)
    finally:
        _shutdown(nvml)


@dataclass(frozen=True, slots=True)
class ComputeProcesses:
    """The compute processes NVML lists on some GPUs (physical boards; MIG instances are not
    looked at)."""

    pids: dict[int, frozenset[int]]
    """PIDs by GPU index, for each GPU whose processes NVML listed."""
    failures: dict[int, str]
    """Error kind by GPU index, for each GPU whose processes NVML could not list."""


def compute_processes(
    indices: Iterable[int], nvml_module: ModuleType | None = None
) -> ComputeProcesses:
    """The PIDs that NVML lists as compute processes on each GPU of `indices`, for telling
    which GPUs a server holds; raises SourceUnavailable, saying why, where NVML cannot start.
    """
    nvml = nvml_module if nvml_module is not None else _import_nvml()
    try:
        nvml.nvmlInit()
    except Exception as exc:
        raise SourceUnavailable(f"{_meaning(nvml, exc)}: {exc}") from exc
    try:
        pids: dict[int, frozenset[int]] = {}
        failures: dict[int, str] = {}
        for index in indices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                failures[index] = _meaning(nvml, exc).kind
                continue
            pids[index] = frozenset(process.pid for process in processes)
        return ComputeProcesses(pids, failures)
    finally:
        _shutdown(nvml)


def _import_nvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise SourceUnavailable(
            "the pynvml module is missing: install nvidia-ml-py (pip install nvidia-ml-py)"
        ) from exc


def _init(nvml: ModuleType) -> None:
    try:
        nvml.nvmlInit()
    except Exception as exc:
        error = _meaning(nvml, exc)
        raise SourceUnavailable(
            error.open_failure or f"NVML initialisation failed ({error}): {exc}"
        ) from exc


def _shutdown(nvml: ModuleType) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:  # nothing more to release; say so and carry on
        log.debug("nvmlShutdown failed: %s", _meaning(nvml, exc))


def _probe_gpus(nvml: ModuleType) -> list[tuple[Any | None, NvmlGpuReport]]:
    count, error = _attempt(nvml, nvml.nvmlDeviceGetCount)
    if count is None:
        raise SourceUnavailable(f"NVML could not count the GPUs ({error})")
    if count == 0:
        raise SourceUnavailable(NO_GPU)
    return [_probe_gpu(nvml, index) for index in range(count)]


def _probe_gpu(nvml: ModuleType, index: int) -> tuple[Any | None, NvmlGpuReport]:
    """A physical board's identity and capabilities. nvmlDeviceGetCount counts boards
    only, and MIG instances are deliberately never looked at."""
    reasons: list[str] = []

    def capability(what: str, read: Callable[[], object]) -> bool:
        value, error = _attempt(nvml, read)
        if error is not None:
            reasons.append(f"{what}: {error}")
        return value is not None

    handle, error = _attempt(nvml, lambda: nvml.nvmlDeviceGetHandleByIndex(index))
    if handle is None:
        return None, NvmlGpuReport(index, None, None, False, False, False, False, False, False,
                                   None, (f"no device handle: {error}",))
    uuid, error = _attempt(nvml, lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
    if uuid is None:
        reasons.append(f"UUID unreadable: {error}")
    name, error = _attempt(nvml, lambda: _text(nvml.nvmlDeviceGetName(handle)))
    if name is None:
        reasons.append(f"name unreadable: {error}")

    counter = capability(
        "energy counter (nvmlDeviceGetTotalEnergyConsumption; energy is integrated from "
        "power samples instead)",
        lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
    )
    instant = capability("power field POWER_INSTANT",
                         lambda: _field_mw(nvml, handle, FI_DEV_POWER_INSTANT))
    average = capability("power field POWER_AVERAGE",
                         lambda: _field_mw(nvml, handle, FI_DEV_POWER_AVERAGE))
    power_usage = capability("nvmlDeviceGetPowerUsage",
                             lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    if not (counter or instant or average or power_usage):
        reasons.append("no energy or power reading: this GPU's energy cannot be measured")

    mig_mode, error = _attempt(nvml, lambda: nvml.nvmlDeviceGetMigMode(handle))
    if mig_mode is None and not (error and error.unsupported):  # a board without MIG
        reasons.append(f"MIG mode unreadable: {error}")
    mig_enabled = mig_mode is not None and mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE

    module_power = _reports_module_power(nvml, handle, name)
    limit_mw, error = _attempt(nvml, lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    if limit_mw is None:
        reasons.append(f"power limit: {error}")

    report = NvmlGpuReport(
        index=index, uuid=uuid, name=name, energy_counter=counter, instant_field=instant,
        average_field=average, power_usage=power_usage, mig_enabled=mig_enabled,
        module_power=module_power,
        power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
        reasons=tuple(reasons),
    )
    return handle, report


def _reports_module_power(nvml: ModuleType, handle: Any, name: str | None) -> bool:
    """Grace Hopper / Grace Blackwell: known by name, or by a power field that answers
    at module scope (drivers that know power scopes answer NotSupported elsewhere)."""
    if name is not None and any(model in name for model in MODULE_POWER_NAMES):
        return True
    for field_id in (FI_DEV_POWER_INSTANT, FI_DEV_POWER_AVERAGE):
        scoped = (field_id, POWER_SCOPE_MODULE)
        if _attempt(nvml, partial(_field_mw, nvml, handle, scoped))[0] is not None:
            return True
    return False


def _state(nvml: ModuleType, handle: Any, report: NvmlGpuReport) -> _GpuState:
    assert report.uuid is not None
    readers: dict[PowerField, Callable[[Any], int]] = {
        "instant": lambda h: _field_mw(nvml, h, FI_DEV_POWER_INSTANT),
        "average": lambda h: _field_mw(nvml, h, FI_DEV_POWER_AVERAGE),
        "power_usage": nvml.nvmlDeviceGetPowerUsage,
    }
    info = GpuInfo(
        index=report.index,
        uuid=report.uuid,
        name=report.name or "unknown",
        energy_source=report.energy_source,
        power_field=report.power_field,
        mig_enabled=report.mig_enabled,
        module_power=report.module_power,
    )
    return _GpuState(info, handle, readers.get(report.power_field))


def _field_mw(nvml: ModuleType, handle: Any, field_id: int | tuple[int, int]) -> int:
    """One power field in milliwatts. `field_id` may be (field id, scope id). A field has
    its own return code even when the call succeeds; it is raised like a call's."""
    value = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
    if value.nvmlReturn != nvml.NVML_SUCCESS:
        raise nvml.NVMLError(value.nvmlReturn)
    return int(value.value.uiVal)


def _used_total(memory: Any) -> tuple[int, int]:
    return int(memory.used), int(memory.total)


def _attempt(nvml: ModuleType, read: Callable[[], T]) -> tuple[T | None, ErrorMeaning | None]:
    """(value, None), or (None, the error) after PROBE_ATTEMPTS tries; a final answer
    such as NotSupported is not retried."""
    error = None
    for _ in range(PROBE_ATTEMPTS):
        try:
            return read(), None
        except Exception as exc:
            error = _meaning(nvml, exc)
            if error.final:
                break
    return None, error


def _meaning(nvml: ModuleType, exc: BaseException) -> ErrorMeaning:
    """An NVML error's meaning by its return code; another exception is named by its class."""
    if isinstance(exc, nvml.NVMLError):
        code = exc.value
        known = NVML_ERRORS.get(code)
        if known is not None:
            return known
        # A code newer than the table: pynvml's own name for it, else its number.
        name = type(exc).__name__.removeprefix("NVMLError_")
        return ErrorMeaning(name if name != "NVMLError" else f"NVMLError{code}")
    return ErrorMeaning(type(exc).__name__, unexpected=True)


def _text(value: str | bytes) -> str:
    """Names and versions are bytes in nvidia-ml-py before 11.515, str since."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
