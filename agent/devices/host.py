"""Host (CPU package + DRAM) energy: RAPL where it is readable, else a stated estimate.

RAPL is read through the Linux powercap framework (`/sys/class/powercap`), which lists
every zone, subzones included, as `intel-rapl:N` (a package) and `intel-rapl:N:M` (a part
of package N). The same driver serves AMD processors (Zen and newer), which have package
zones but no DRAM zone.

Where RAPL cannot be read, `EstimatedHostSource` applies a configured model driven by CPU
utilisation. Its readings say `source="estimated"` so that no output can present them as
measured.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.devices.base import HostEnergySource, HostReading, HostSource, SourceUnavailable

log = logging.getLogger(__name__)

DEFAULT_RAPL_ROOT = "/sys/class/powercap"

FileReader = Callable[[Path], str]
"""Reads one sysfs file; injectable so that tests can play an unprivileged user."""

_PACKAGE_ZONE = re.compile(r"^intel-rapl:(\d+)$")
_SUBZONE = re.compile(r"^intel-rapl:(\d+):(\d+)$")


def read_sysfs(path: Path) -> str:
    return path.read_text(encoding="ascii")


@dataclass(frozen=True, slots=True)
class RaplDomain:
    """One RAPL zone whose energy counts towards the host."""

    name: str
    """"package-0", or "package-0/dram" for the DRAM subzone of package 0."""
    path: Path


@dataclass(frozen=True, slots=True)
class RaplProbe:
    """What `jouleprobe doctor` says about RAPL on this node."""

    root: str
    readable: bool
    domains: tuple[str, ...]
    """The domains found, readable or not."""
    reason: str | None
    """Why RAPL cannot be used, in words an operator can act on; None when it can."""


def find_rapl_domains(root: str | Path, reader: FileReader = read_sysfs) -> list[RaplDomain]:
    """Package zones and their DRAM subzones under `root`, packages first.

    Other subzones are skipped on purpose: "core" (PP0) and "uncore" (PP1) measure parts
    of the package, whose own counter already includes them, so adding them would count
    that energy twice. Top-level zones that are not packages ("psys", the whole platform
    on client parts) overlap the packages in the same way and are skipped too.
    """
    root = Path(root)
    packages: dict[str, str] = {}
    subzones: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if _PACKAGE_ZONE.match(entry.name):
            name = reader(entry / "name").strip()
            if name.startswith("package-"):
                packages[entry.name] = name
        elif match := _SUBZONE.match(entry.name):
            subzones.append((f"intel-rapl:{match.group(1)}", entry))
    domains = [RaplDomain(name, root / zone) for zone, name in packages.items()]
    for parent, path in subzones:
        if parent in packages and reader(path / "name").strip() == "dram":
            domains.append(RaplDomain(f"{packages[parent]}/dram", path))
    return domains


class _DomainCounter:
    """Cumulative joules of one domain from its wrapping microjoule counter."""

    def __init__(self, domain: RaplDomain, reader: FileReader) -> None:
        self.domain = domain
        self._reader = reader
        self._range_uj = int(reader(domain.path / "max_energy_range_uj"))
        self._last_uj: int | None = None
        self.energy_uj = 0

    def read_raw(self) -> int:
        return int(self._reader(self.domain.path / "energy_uj"))

    def advance(self, raw_uj: int) -> None:
        """Add the energy since the last raw value; a smaller value means one wrap-around.

        More than one wrap between two reads cannot be told apart, but it would take tens
        of minutes at full package power (the range is about 262 kJ on Intel servers).
        """
        if self._last_uj is not None:
            delta = raw_uj - self._last_uj
            if delta < 0:
                delta += self._range_uj
            self.energy_uj += delta
        self._last_uj = raw_uj


class RaplHostSource:
    """Measured host energy: the sum of the package and DRAM RAPL domains."""

    source: HostEnergySource = "rapl"

    def __init__(
        self,
        root: str | Path = DEFAULT_RAPL_ROOT,
        *,
        reader: FileReader = read_sysfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises SourceUnavailable, saying why, where no package domain exists."""
        try:
            domains = find_rapl_domains(root, reader)
        except OSError as exc:
            raise SourceUnavailable(f"cannot list RAPL domains under {root}: {exc}") from exc
        if not domains:
            raise SourceUnavailable(f"no RAPL package domain under {root}")
        self._counters = [_DomainCounter(domain, reader) for domain in domains]
        self.domains = tuple(domain.name for domain in domains)
        self._clock = clock
        self._last: HostReading | None = None
        self._lock = threading.Lock()

    def read(self) -> HostReading:
        """Energy since the first read. Raises OSError where a counter cannot be read; the
        state is then left as it was, so the next read covers the interval."""
        with self._lock:
            raws = [counter.read_raw() for counter in self._counters]
            now = self._clock()
            for counter, raw in zip(self._counters, raws, strict=True):
                counter.advance(raw)
            energy_j = sum(counter.energy_uj for counter in self._counters) / 1e6
            power_w = None
            if self._last is not None and now > self._last.time:
                power_w = (energy_j - self._last.energy_j) / (now - self._last.time)
            self._last = HostReading(now, energy_j, power_w, "rapl", self.domains)
            return self._last


class CpuUtilization:
    """System-wide busy fraction of the CPUs since the previous call, from psutil.

    This is the computation behind `psutil.cpu_percent(interval=None)`, done on our own
    reference point: cpu_percent keeps one reference per calling thread, and the sampler
    reads the host from a thread pool, so its intervals would not be ours.
    """

    def __init__(self) -> None:
        self._last = self._busy_and_total()

    def __call__(self) -> float:
        busy, total = self._busy_and_total()
        last_busy, last_total = self._last
        self._last = (busy, total)
        if total <= last_total:
            return 0.0
        return min(1.0, max(0.0, (busy - last_busy) / (total - last_total)))

    @staticmethod
    def _busy_and_total() -> tuple[float, float]:
        times = psutil.cpu_times()
        total = sum(times)
        # Linux counts guest time inside user and nice as well, as psutil itself corrects.
        total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        return total - idle, total


class EstimatedHostSource:
    """A stated model, not a measurement: power = idle + (max - idle) × CPU utilisation.

    Utilisation is the average over each interval between two reads, so integrating the
    model over that interval is exact for the model (though not, of course, for the host).
    Energy counts from the source's creation.
    """

    source: HostEnergySource = "estimated"

    def __init__(
        self,
        idle_w: float,
        max_w: float,
        *,
        utilization: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_w < 0 or max_w < idle_w:
            raise ValueError("host power model needs 0 <= idle watts <= max watts")
        self.idle_w = idle_w
        self.max_w = max_w
        self._utilization = utilization if utilization is not None else CpuUtilization()
        self._clock = clock
        self._last_time = clock()
        self._energy_j = 0.0
        self._lock = threading.Lock()

    def read(self) -> HostReading:
        with self._lock:
            now = self._clock()
            power = self.idle_w + (self.max_w - self.idle_w) * self._utilization()
            self._energy_j += power * max(0.0, now - self._last_time)
            self._last_time = now
            return HostReading(now, self._energy_j, power, "estimated")


def probe_rapl(root: str | Path = DEFAULT_RAPL_ROOT, reader: FileReader = read_sysfs) -> RaplProbe:
    """Whether host energy can be measured through RAPL here, and if not, why."""
    root_text = str(root)
    path = Path(root)
    if not path.is_dir():
        return RaplProbe(
            root_text, False, (),
            f"{root} does not exist: the kernel has no powercap support, or this container "
            f"does not mount the host's /sys",
        )
    if not any(_PACKAGE_ZONE.match(entry.name) for entry in path.iterdir()):
        return RaplProbe(
            root_text, False, (),
            f"no intel-rapl zone under {root}: this is not an Intel or AMD host with the "
            f"intel_rapl_msr driver loaded (try `modprobe intel_rapl_msr`), or a VM or "
            f"container that hides RAPL",
        )
    try:
        domains = find_rapl_domains(path, reader)
    except OSError as exc:
        return RaplProbe(root_text, False, (), f"cannot read RAPL zone names under {root}: {exc}")
    names = tuple(domain.name for domain in domains)
    if not domains:
        return RaplProbe(root_text, False, names, f"no RAPL package domain under {root}")
    for domain in domains:
        for file in ("max_energy_range_uj", "energy_uj"):
            reason = _unreadable_reason(domain.path / file, reader)
            if reason is not None:
                return RaplProbe(root_text, False, names, reason)
    return RaplProbe(root_text, True, names, None)


def _unreadable_reason(path: Path, reader: FileReader) -> str | None:
    try:
        int(reader(path))
    except PermissionError:
        return (
            f"{path} is readable only by root (since Linux 5.10, CVE-2020-8694): run the "
            f"agent as root, or give its group read access to the energy_uj files with a "
            f"udev rule or a systemd-tmpfiles entry"
        )
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    except ValueError:
        return f"{path} does not hold an integer"
    return None


def open_host_source(
    rapl_root: str | Path,
    idle_w: float,
    max_w: float,
    *,
    reader: FileReader = read_sysfs,
) -> HostSource:
    """RAPL where it is readable; otherwise the estimate, with a warning that says why."""
    probe = probe_rapl(rapl_root, reader)
    if probe.readable:
        try:
            return RaplHostSource(rapl_root, reader=reader)
        except (SourceUnavailable, OSError, ValueError) as exc:
            reason = str(exc)
    else:
        reason = probe.reason or "RAPL is not readable"
    log.warning(
        "host energy is ESTIMATED (idle %.0f W + (max %.0f W - idle) x CPU utilisation), "
        "not measured: %s", idle_w, max_w, reason,
    )
    return EstimatedHostSource(idle_w, max_w)

