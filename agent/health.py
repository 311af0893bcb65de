"""Is every GPU being measured, and are the records being kept? The answer behind `/healthz`.

A GPU is healthy while its latest energy reading is recent. When it is not, the reason
says for how long and why, from the errors of its latest read, so that the operator who
sees a failing probe learns what to look at (a lost GPU, a hung driver call, ...) without
reading logs.

The record store is healthy while its writer's latest flush committed. When writes fail
(a full disk, a file locked by another process) the GPUs are still measured and exported,
so the node is `degraded`, not `unhealthy`: `status` says which, and /healthz answers 503
for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from agent.devices.base import GpuReading
from agent.sampler import GpuSnapshot, NodeSnapshot

Status = Literal["ok", "degraded", "unhealthy"]


class StoreWrites(Protocol):
    """How the record store's writes are going (`agent.store.StoreStats` tells it)."""

    @property
    def write_errors_since_commit(self) -> int: ...

    @property
    def last_write_error(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class GpuHealth:
    ok: bool
    uuid: str
    age_s: float | None
    """Seconds since the latest reading that measured energy; None if there never was one."""
    reason: str | None = None
    """Why the GPU is unhealthy; None when it is healthy."""


@dataclass(frozen=True, slots=True)
class StoreHealth:
    ok: bool
    reason: str | None = None
    """Why the store is unhealthy; None when it is healthy."""


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    """True when every GPU is healthy."""
    gpus: dict[str, GpuHealth]
    """By GPU index, as a string (the `gpu` label of the metrics)."""
    store: StoreHealth | None = None
    """None: no record store was assessed."""

    @property
    def status(self) -> Status:
        """`unhealthy` when a GPU is, else `degraded` when the store is, else `ok`."""
        if not self.ok:
            return "unhealthy"
        if self.store is not None and not self.store.ok:
            return "degraded"
        return "ok"


def assess(
    snapshot: NodeSnapshot, stale_after_s: float, store: StoreWrites | None = None
) -> Health:
    """Each GPU is healthy when its latest energy reading is younger than `stale_after_s`;
    the store, when given, while no flush has failed since the latest commit."""
    gpus = {
        str(gpu.info.index): _assess_gpu(gpu, snapshot.time, stale_after_s)
        for gpu in snapshot.gpus
    }
    return Health(all(gpu.ok for gpu in gpus.values()), gpus,
                  None if store is None else _assess_store(store))


def _assess_store(store: StoreWrites) -> StoreHealth:
    failed = store.write_errors_since_commit
    if failed == 0:
        return StoreHealth(True)
    return StoreHealth(False, f"{failed} write(s) in a row failed, the latest: "
                              f"{store.last_write_error}")


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
