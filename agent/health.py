"""Is every GPU being measured? The answer behind `/healthz`.

A GPU is healthy while its latest energy reading is recent. When it is not, the reason
says for how long and why, from the errors of its latest read, so that the operator who
sees a failing probe learns what to look at (a lost GPU, a hung driver call, ...) without
reading logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.devices.base import GpuReading
from agent.sampler import GpuSnapshot, NodeSnapshot


@dataclass(frozen=True, slots=True)
class GpuHealth:
    ok: bool
    uuid: str
    age_s: float | None
    """Seconds since the latest reading that measured energy; None if there never was one."""
    reason: str | None = None
    """Why the GPU is unhealthy; None when it is healthy."""


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    """True when every GPU is healthy."""
    gpus: dict[str, GpuHealth]
    """By GPU index, as a string (the `gpu` label of the metrics)."""


def assess(snapshot: NodeSnapshot, stale_after_s: float) -> Health:
    """Each GPU is healthy when its latest energy reading is younger than `stale_after_s`."""
    gpus = {
        str(gpu.info.index): _assess_gpu(gpu, snapshot.time, stale_after_s)
        for gpu in snapshot.gpus
    }
    return Health(all(gpu.ok for gpu in gpus.values()), gpus)


def _assess_gpu(gpu: GpuSnapshot, now: float, stale_after_s: float) -> GpuHealth:
    uuid = gpu.info.uuid
    if gpu.last_energy_time is None:
        return GpuHealth(False, uuid, None, "no energy reading yet" + _latest_read(gpu))
    age = now - gpu.last_energy_time
    if age < stale_after_s:
        return GpuHealth(True, uuid, age)
    return GpuHealth(False, uuid, age, f"no energy reading for {age:.1f} s" + _latest_read(gpu))


def _latest_read(gpu: GpuSnapshot) -> str:
    """What the latest read says about the missing energy, as a clause to append."""
    reading: GpuReading | None = gpu.reading
    if reading is None:
        return "; no read has completed"
    if reading.errors:
        return "; last read failed: " + ", ".join(f"{call} {kind}" for call, kind in reading.errors)
    if reading.time == gpu.last_energy_time:
        return "; no read has completed since"
    # A call that answered NotSupported once is not made again (agent.devices.nvml), so
    # later reads fail silently: name it, or the operator is left with no cause at all.
    needed = "energy" if gpu.info.energy_source == "counter" else "power"
    if (needed, "NotSupported") in gpu.errors:
        return f"; no longer read after NotSupported: {needed}"
    return "; last read returned no energy value"
