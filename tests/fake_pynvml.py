"""A scripted stand-in for the `pynvml` module (nvidia-ml-py), for tests without a GPU.

`FakeNvml` is the controller a test scripts; `FakeNvml.module` is the module object that
goes into `sys.modules["pynvml"]` (the `fake_nvml` fixture in conftest.py does this).

Fidelity: the fake reuses the real module's error classes (`NVMLError_GpuIsLost`, ...),
constants and ctypes structs, so the code under test sees the same types, codes and
field layouts as on a GPU node. Importing the real `pynvml` does not load
libnvidia-ml, so this works anywhere. Only the functions scripted here exist on the fake
module; calling any other raises AttributeError rather than silently reaching the real
library, and `unknown_functions()` checks that every scripted name exists in the real one.

Time: the fake has its own clock, `FakeNvml.clock` (a `ManualClock` that moves only when a
test calls `advance()`, unless another clock such as `time.monotonic` is passed in). The
NVML source takes its reading time from a clock it is given (`NvmlGpuSource.open(clock=...)`),
so a test passes `fake.clock` and every counter value and timestamp is deterministic.
Trace times are seconds since the fake was created (`clock() - epoch`).

Processes: each GPU's compute and graphics process lists are scripted from a trace time on
(`set_processes(..., at=)`), so that they change as the clock moves; per-process utilisation
samples (`add_process_samples`) become visible to `nvmlDeviceGetProcessUtilization` once the
clock reaches them, stamped in µs of the fake's clock (the real ones are wall-clock µs).

Energy: each GPU's power follows a trace (a function of time, or (t, watts) steps); its
counter is the integer millijoules of that trace's integral, advanced only at multiples of
`counter_period_s` like the real counter, and zeroed by `reset_counter()`.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import pynvml as _real

PowerFunction = Callable[[float], float]
TraceSpec = float | PowerFunction | Sequence[tuple[float, float]]
"""Constant watts, a function of trace time, or (start time, watts) steps."""

MIG_FUNCTIONS = frozenset({
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
})
"""Instance-level calls: the source under test must never make them."""


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        with self._lock:
            self._now += seconds
            return self._now


class PowerTrace:
    """Board power over trace time, and its exact (steps) or numerical (function) integral."""

    def __init__(self, spec: TraceSpec) -> None:
        self._steps: list[tuple[float, float]] | None = None
        self._function: PowerFunction | None = None
        if isinstance(spec, int | float):
            self._steps = [(0.0, float(spec))]
        elif callable(spec):
            self._function = spec
        else:
            steps = sorted((float(t), float(w)) for t, w in spec)
            if not steps:
                raise ValueError("a power trace needs at least one step")
            if steps[0][0] > 0.0:
                steps.insert(0, (0.0, steps[0][1]))
            self._steps = steps

    def power(self, t: float) -> float:
        if self._function is not None:
            return self._function(t)
        assert self._steps is not None
        watts = self._steps[0][1]
        for start, step_watts in self._steps:
            if start > t:
                break
            watts = step_watts
        return watts

    def energy(self, t0: float, t1: float) -> float:
        """Joules between trace times t0 and t1 (t0 <= t1)."""
        if t1 <= t0:
            return 0.0
        if self._function is not None:
            # Composite Simpson with ~1 ms panels: exact for the smooth traces tests use.
            n = max(2, math.ceil((t1 - t0) / 0.001))
            n += n % 2
            h = (t1 - t0) / n
            total = self._function(t0) + self._function(t1)
            total += sum((4 if k % 2 else 2) * self._function(t0 + k * h) for k in range(1, n))
            return total * h / 3
        assert self._steps is not None
        joules = 0.0
        bounds = [*self._steps[1:], (math.inf, 0.0)]
        for (start, watts), (end, _) in zip(self._steps, bounds, strict=True):
            lo, hi = max(start, t0), min(end, t1)
            if hi > lo:
                joules += watts * (hi - lo)
        return joules


@dataclass
class FakeGpu:
    """One scripted board. Capability flags say which NVML calls it supports."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    idle_w: float = 70.0
    limit_w: float = 700.0
    trace: PowerTrace | None = None
    """Board power; defaults to a constant `idle_w`."""
    counter: bool = True
    """nvmlDeviceGetTotalEnergyConsumption supported (Volta and newer)."""
    instant_field: bool = True
    average_field: bool = True
    power_usage: bool = True
    mig: bool = False
    module_power_w: float | None = None
    """Grace Hopper: extra CPU/module power, readable with scopeId NVML_POWER_SCOPE_MODULE."""
    unsupported: frozenset[str] = frozenset()
    """Further pynvml function names that raise NotSupported on this board."""
    field_errors: dict[int, str] = field(default_factory=dict)
    """Field id -> error kind that nvmlDeviceGetFieldValues returns in that value's
    nvmlReturn while the call itself succeeds."""
    counter_offset_mj: int = 123_456_789
    """Counter value at trace time 0: the driver was loaded long before the test."""
    memory_total: int = 80 * 2**30
    memory_used: int = 2 * 2**30
    utilization_pct: int = 37
    temperature_c: int = 45
    sm_clock_mhz: int = 1980
    processes: list[tuple[float, list[SimpleNamespace]]] = field(default_factory=list)
    """Compute process lists, each from its trace time on (the latest that has begun)."""
    graphics_processes: list[tuple[float, list[SimpleNamespace]]] = field(default_factory=list)
    process_samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(trace time, pid, SM %, memory %) utilisation samples, in time order."""
    lost: bool = False
    reset_at: float | None = None
    """Trace time of the latest counter reset; the counter counts from 0 there."""


class Hang:
    """A call that blocks until `release()`; `entered` is set once a caller is blocked."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def wait(self) -> None:
        self.entered.set()
        self._released.wait()


@dataclass
class _Injection:
    error: str | BaseException
    remaining: int | None
    """Calls left to fail; None fails every call."""


class _Handle:
    """An opaque device handle, like the real c_nvmlDevice_t pointer."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class FakeNvml:
    """The controller: script GPUs, failures and time, then hand `module` to the code."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        counter_period_s: float = 0.02,
        driver_version: str = "550.54.15",
        nvml_version: str = "12.550.54.15",
        bytes_strings: bool = False,
    ) -> None:
        self.clock: Callable[[], float] = clock if clock is not None else ManualClock()
        self.epoch = self.clock()
        self.counter_period_s = counter_period_s
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.bytes_strings = bytes_strings
        """Return names and versions as bytes, as nvidia-ml-py before 11.515 did."""
        self.init_error: str | None = None
        """Error kind nvmlInit raises (e.g. "LibraryNotFound", "DriverNotLoaded")."""
        self.gpus: list[FakeGpu] = []
        self.calls: Counter[tuple[str, int | None]] = Counter()
        """Calls made, by (function name, GPU index or None for system calls)."""
        self.initialized = 0
        self._injections: dict[tuple[str, int | None], list[_Injection]] = {}
        self._hangs: dict[tuple[str, int | None], Hang] = {}
        self._lock = threading.Lock()
        self.module = self._build_module()

    # -- scripting -----------------------------------------------------------------------

    def add_gpu(self, trace: TraceSpec | None = None, **spec: Any) -> FakeGpu:
        """Add a board; `spec` sets FakeGpu fields. Returns it for further scripting."""
        gpu = FakeGpu(**spec)
        index = len(self.gpus)
        if not gpu.uuid:
            gpu.uuid = f"GPU-{index:08x}-fake-4000-8000-{index:012x}"
        gpu.trace = PowerTrace(trace if trace is not None else gpu.idle_w)
        self.gpus.append(gpu)
        return gpu

    def advance(self, seconds: float) -> float:
        """Move the fake's ManualClock forward."""
        if not isinstance(self.clock, ManualClock):
            raise TypeError("advance() needs the fake's own ManualClock")
        return self.clock.advance(seconds)

    def now(self) -> float:
        """Current trace time."""
        return self.clock() - self.epoch

    def fail(
        self, call: str, error: str | BaseException, *, gpu: int | None = None,
        times: int | None = 1,
    ) -> None:
        """Make `call` (a pynvml function name) raise for `gpu` (None: any GPU or a system
        call). `error` is an NVML error kind ("GpuIsLost") or any exception instance.
        `times=None` fails every call."""
        self._check_function(call)
        with self._lock:
            self._injections.setdefault((call, gpu), []).append(_Injection(error, times))

    def clear_failures(self) -> None:
        with self._lock:
            self._injections.clear()

    def hang(self, call: str, *, gpu: int | None = None) -> Hang:
        """Make `call` block until the returned Hang is released."""
        self._check_function(call)
        hang = Hang()
        with self._lock:
            self._hangs[(call, gpu)] = hang
        return hang

    def release_all(self) -> None:
        with self._lock:
            hangs = list(self._hangs.values())
            self._hangs.clear()
        for hang in hangs:
            hang.release()

    def reset_counter(self, index: int) -> None:
        """The driver reloaded or the GPU was reset: the counter restarts from ~0."""
        self.gpus[index].reset_at = self.now()

    def lose(self, index: int) -> None:
        """The GPU falls off the bus: every call on it raises GpuIsLost."""
        self.gpus[index].lost = True

    def recover(self, index: int, *, reset_counter: bool = True) -> None:
        """The GPU is back (after a reset, which zeroes its counter unless told otherwise)."""
        self.gpus[index].lost = False
        if reset_counter:
            self.reset_counter(index)

    def set_processes(
        self, index: int, processes: Iterable[tuple[int, int | None]], *,
        graphics: bool = False, at: float | None = None,
    ) -> None:
        """Compute (or graphics) processes on a GPU, as (pid, used GPU memory bytes or None),
        from trace time `at` (default: now) until a later list begins."""
        gpu = self.gpus[index]
        schedule = gpu.graphics_processes if graphics else gpu.processes
        listed = [
            SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF,
                            computeInstanceId=0xFFFFFFFF)
            for pid, used in processes
        ]
        schedule.append((self.now() if at is None else at, listed))

    def add_process_samples(
        self, index: int, samples: Iterable[tuple[float, int, int, int]]
    ) -> None:
        """Per-process utilisation samples, as (trace time, pid, SM %, memory %)."""
        gpu = self.gpus[index]
        gpu.process_samples = sorted([*gpu.process_samples, *samples], key=lambda s: s[0])

    def sample_stamp_us(self, at: float) -> int:
        """The timestamp NVML gives a sample taken at trace time `at`."""
        return round((self.epoch + at) * 1e6)

    # -- what a scripted GPU reports --------------------------------------------------------

    def counter_mj(self, index: int, at: float | None = None) -> int:
        """The counter at trace time `at` (default: now), quantised to its update period."""
        gpu = self.gpus[index]
        assert gpu.trace is not None
        t = self.now() if at is None else at
        # The 1e-9 keeps float noise in clock sums (0.1 + 0.2) from missing a tick.
        updated = math.floor(t / self.counter_period_s + 1e-9) * self.counter_period_s
        if gpu.reset_at is not None:
            start = gpu.reset_at
            offset = 0
        else:
            start, offset = 0.0, gpu.counter_offset_mj
        return offset + int(gpu.trace.energy(start, max(start, updated)) * 1000)

    def power_w(self, index: int, *, average: bool = False, at: float | None = None) -> float:
        """Instant power, or the one-second average (what POWER_AVERAGE and, on Ampere and
        newer, nvmlDeviceGetPowerUsage report)."""
        gpu = self.gpus[index]
        assert gpu.trace is not None
        t = self.now() if at is None else at
        if not average:
            return gpu.trace.power(t)
        if t <= 0.0:
            return gpu.trace.power(0.0)
        window = min(1.0, t)
        return gpu.trace.energy(t - window, t) / window

    def unknown_functions(self) -> list[str]:
        """Scripted functions the real pynvml lacks: should always be empty."""
        return [name for name in self._functions() if not hasattr(_real, name)]

    # -- the module --------------------------------------------------------------------------

    def _check_function(self, name: str) -> None:
        if name not in self._functions():
            raise ValueError(f"the fake pynvml has no function {name!r}")

    def _functions(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in dir(type(self)) if name.startswith("nvml")}

    def _build_module(self) -> ModuleType:
        module = ModuleType("pynvml", "Scripted fake of nvidia-ml-py's pynvml (tests only).")
        for name, value in vars(_real).items():
            if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlFriendlyObject")):
                setattr(module, name, value)
        module.nvmlStructToFriendlyObject = _real.nvmlStructToFriendlyObject
        module.nvmlExceptionClass = _real.nvmlExceptionClass
        for name, function in self._functions().items():
            setattr(module, name, function)
        module.__file__ = __file__
        return module

    def _enter(self, call: str, handle: _Handle | None = None) -> FakeGpu | None:
        """Common to every call: log it, hang or fail as scripted, check the GPU is there."""
        index = handle.index if handle is not None else None
        with self._lock:
            self.calls[(call, index)] += 1
            hang = self._hangs.get((call, index)) or self._hangs.get((call, None))
            error = self._take_injection(call, index)
        if hang is not None:
            hang.wait()
        if error is not None:
            raise _error(error)
        if call != "nvmlInit" and not self.initialized:
            raise _real.NVMLError_Uninitialized()
        if index is None:
            return None
        gpu = self.gpus[index]
        if gpu.lost:
            raise _real.NVMLError_GpuIsLost()
        if call in gpu.unsupported:
            raise _real.NVMLError_NotSupported()
        return gpu

    def _take_injection(self, call: str, index: int | None) -> str | BaseException | None:
        for key in ((call, index), (call, None)):
            for injection in self._injections.get(key, []):
                if injection.remaining is None:
                    return injection.error
                if injection.remaining > 0:
                    injection.remaining -= 1
                    return injection.error
        return None

    def _text(self, value: str) -> str | bytes:
        return value.encode() if self.bytes_strings else value

    # System calls.

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise _error(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._enter("nvmlSystemGetDriverVersion")
        return self._text(self.driver_version)

    def nvmlSystemGetNVMLVersion(self) -> str | bytes:
        self._enter("nvmlSystemGetNVMLVersion")
        return self._text(self.nvml_version)

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not 0 <= index < len(self.gpus):
            self._enter("nvmlDeviceGetHandleByIndex")
            raise _real.NVMLError_InvalidArgument()
        handle = _Handle(index)
        self._enter("nvmlDeviceGetHandleByIndex", handle)
        return handle

    # Identity.

    def nvmlDeviceGetName(self, handle: _Handle) -> str | bytes:
        gpu = self._enter("nvmlDeviceGetName", handle)
        assert gpu is not None
        return self._text(gpu.name)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str | bytes:
        gpu = self._enter("nvmlDeviceGetUUID", handle)
        assert gpu is not None
        return self._text(gpu.uuid)

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        return handle.index

    # Energy and power.

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        assert gpu is not None
        if not gpu.counter:
            raise _real.NVMLError_NotSupported()
        return self.counter_mj(handle.index)

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetPowerUsage", handle)
        assert gpu is not None
        if not gpu.power_usage:
            raise _real.NVMLError_NotSupported()
        return round(self.power_w(handle.index, average=True) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        assert gpu is not None
        return round(gpu.limit_w * 1000)

    def nvmlDeviceGetFieldValues(
        self, handle: _Handle, fieldIds: Sequence[int | tuple[int, int]]
    ) -> ctypes.Array[_real.c_nvmlFieldValue_t]:
        """Like the real call: the call itself may fail, and each value has its own
        nvmlReturn. Only the power fields (185, 186) are scripted."""
        gpu = self._enter("nvmlDeviceGetFieldValues", handle)
        assert gpu is not None
        values = (_real.c_nvmlFieldValue_t * len(fieldIds))()
        for value, requested in zip(values, fieldIds, strict=True):
            field_id, scope = requested if isinstance(requested, tuple) else (requested, 0)
            value.fieldId, value.scopeId = field_id, scope
            value.timestamp = int(self.clock() * 1e6)
            supported = {
                _real.NVML_FI_DEV_POWER_INSTANT: gpu.instant_field,
                _real.NVML_FI_DEV_POWER_AVERAGE: gpu.average_field,
            }.get(field_id, False)
            if scope == _real.NVML_POWER_SCOPE_MODULE and gpu.module_power_w is None:
                supported = False
            if not supported:
                value.nvmlReturn = _real.NVML_ERROR_NOT_SUPPORTED
                continue
            if field_id in gpu.field_errors:
                value.nvmlReturn = _error(gpu.field_errors[field_id]).value
                continue
            watts = self.power_w(
                handle.index, average=field_id == _real.NVML_FI_DEV_POWER_AVERAGE
            )
            if scope == _real.NVML_POWER_SCOPE_MODULE:
                watts += gpu.module_power_w or 0.0
            value.nvmlReturn = _real.NVML_SUCCESS
            value.valueType = _real.NVML_VALUE_TYPE_UNSIGNED_INT
            value.value.uiVal = round(watts * 1000)
        return values

    # Other telemetry.

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> _real.c_nvmlUtilization_t:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        assert gpu is not None
        if gpu.mig:  # as on real boards: utilisation is not reported in MIG mode
            raise _real.NVMLError_NotSupported()
        return _real.c_nvmlUtilization_t(gpu=gpu.utilization_pct, memory=gpu.utilization_pct)

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> _real.c_nvmlMemory_t:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        assert gpu is not None
        return _real.c_nvmlMemory_t(
            total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used, used=gpu.memory_used
        )

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._enter("nvmlDeviceGetTemperature", handle)
        assert gpu is not None
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise _real.NVMLError_InvalidArgument()
        return gpu.temperature_c

    def nvmlDeviceGetClockInfo(self, handle: _Handle, type: int) -> int:
        gpu = self._enter("nvmlDeviceGetClockInfo", handle)
        assert gpu is not None
        if type != _real.NVML_CLOCK_SM:
            raise _real.NVMLError_NotSupported()
        return gpu.sm_clock_mhz

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        assert gpu is not None
        return self._listed(gpu.processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle)
        assert gpu is not None
        return self._listed(gpu.graphics_processes)

    def nvmlDeviceGetProcessUtilization(
        self, handle: _Handle, timeStamp: int
    ) -> list[_real.c_nvmlProcessUtilizationSample_t]:
        """Like the real call: the samples stamped after `timeStamp`, NotFound where there
        are none, NotSupported in MIG mode."""
        gpu = self._enter("nvmlDeviceGetProcessUtilization", handle)
        assert gpu is not None
        if gpu.mig:
            raise _real.NVMLError_NotSupported()
        now = self.now()
        samples = [
            _real.c_nvmlProcessUtilizationSample_t(
                pid=pid, timeStamp=self.sample_stamp_us(at), smUtil=sm, memUtil=mem,
                encUtil=0, decUtil=0)
            for at, pid, sm, mem in gpu.process_samples
            if at <= now and self.sample_stamp_us(at) > timeStamp
        ]
        if not samples:
            raise _real.NVMLError_NotFound()
        return samples

    def _listed(self, schedule: list[tuple[float, list[SimpleNamespace]]]) -> list[SimpleNamespace]:
        """The list that began last, by now (of two that begin together, the later set)."""
        now = self.now()
        current: tuple[float, list[SimpleNamespace]] | None = None
        for begins, listed in schedule:
            if begins <= now and (current is None or begins >= current[0]):
                current = (begins, listed)
        return list(current[1]) if current is not None else []

    # MIG.

    def nvmlDeviceGetMigMode(self, device: _Handle) -> list[int]:
        gpu = self._enter("nvmlDeviceGetMigMode", device)
        assert gpu is not None
        mode = _real.NVML_DEVICE_MIG_ENABLE if gpu.mig else _real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetMaxMigDeviceCount", device)
        assert gpu is not None
        return 7 if gpu.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: _Handle, index: int) -> _Handle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", device)
        raise _real.NVMLError_NotFound()


def _error(error: str | BaseException) -> BaseException:
    """An NVML error instance from its kind ("GpuIsLost"), or the exception itself."""
    if isinstance(error, BaseException):
        return error
    cls = getattr(_real, f"NVMLError_{error}", None)
    if cls is None:
        raise ValueError(f"pynvml has no error kind {error!r}")
    return cls()
