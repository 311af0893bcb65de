"""Host energy: RAPL through a fake powercap tree, and the stated estimate."""

from __future__ import annotations

import logging
import os
import stat
from collections import namedtuple
from pathlib import Path

import pytest

from agent.devices import host
from agent.devices.base import SourceUnavailable
from agent.devices.host import (
    CpuUtilization,
    EstimatedHostSource,
    RaplHostSource,
    open_host_source,
    probe_rapl,
    read_sysfs,
)

RANGE_UJ = 262_143_328_850


class FakeClock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def zone(root: Path, zone_id: str, name: str, energy_uj: int = 0) -> Path:
    path = root / zone_id
    path.mkdir()
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{RANGE_UJ}\n")
    return path


def set_energy(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """Two packages, DRAM and core subzones of package 0, a psys zone, laid out as the
    class directory /sys/class/powercap lists them (every zone at the top level)."""
    (tmp_path / "intel-rapl").mkdir()  # the control type, not a zone
    return {
        "root": tmp_path,
        "package-0": zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000),
        "core": zone(tmp_path, "intel-rapl:0:0", "core", 500_000),
        "dram": zone(tmp_path, "intel-rapl:0:1", "dram", 2_000_000),
        "package-1": zone(tmp_path, "intel-rapl:1", "package-1", 3_000_000),
        "psys": zone(tmp_path, "intel-rapl:2", "psys", 9_000_000),
    }


def unprivileged_reader(path: Path) -> str:
    """Reads like a non-root user would: a file with no read bit for group or others
    refuses, even when the tests run as root (where chmod does not block reads)."""
    if not path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise PermissionError(13, "Permission denied", str(path))
    return read_sysfs(path)


# --- RAPL ---------------------------------------------------------------------------------


def test_rapl_reads_packages_and_dram_but_not_core_or_psys(powercap: dict[str, Path]) -> None:
    clock = FakeClock()
    source = RaplHostSource(powercap["root"], clock=clock)
    assert source.source == "rapl"
    assert source.domains == ("package-0", "package-1", "package-0/dram")
    first = source.read()
    assert (first.energy_j, first.power_w, first.source, first.time) == (0.0, None, "rapl", 50.0)
    assert first.domains == source.domains
    set_energy(powercap["package-0"], 1_000_000 + 30_000_000)
    set_energy(powercap["package-1"], 3_000_000 + 20_000_000)
    set_energy(powercap["dram"], 2_000_000 + 10_000_000)
    set_energy(powercap["core"], 500_000 + 25_000_000)
    set_energy(powercap["psys"], 9_000_000 + 99_000_000)
    clock.now = 52.0
    second = source.read()
    assert second.energy_j == pytest.approx(60.0)
    assert second.power_w == pytest.approx(30.0)
    assert second.time == 52.0


def test_rapl_power_is_from_the_last_two_reads(powercap: dict[str, Path]) -> None:
    clock = FakeClock()
    source = RaplHostSource(powercap["root"], clock=clock)
    source.read()
    set_energy(powercap["package-0"], 1_000_000 + 100_000_000)
    clock.now = 60.0
    assert source.read().power_w == pytest.approx(10.0)
    set_energy(powercap["package-0"], 1_000_000 + 150_000_000)
    clock.now = 60.5
    reading = source.read()
    assert reading.power_w == pytest.approx(100.0)
    assert reading.energy_j == pytest.approx(150.0)


def test_rapl_counter_wrap_around_never_goes_backwards(powercap: dict[str, Path]) -> None:
    clock = FakeClock()
    set_energy(powercap["package-0"], RANGE_UJ - 4_000_000)
    source = RaplHostSource(powercap["root"], clock=clock)
    source.read()
    set_energy(powercap["package-0"], 6_000_000)  # wrapped: 4 J to the top, then 6 J
    clock.now = 51.0
    wrapped = source.read()
    assert wrapped.energy_j == pytest.approx(10.0)
    set_energy(powercap["package-0"], 7_000_000)
    clock.now = 52.0
    after = source.read()
    assert after.energy_j == pytest.approx(11.0)
    assert after.power_w == pytest.approx(1.0)


def test_a_failed_rapl_read_changes_nothing(powercap: dict[str, Path]) -> None:
    fail = {"now": False}

    def flaky(path: Path) -> str:
        if fail["now"] and path.name == "energy_uj" and path.parent.name == "intel-rapl:0:1":
            raise OSError(5, "Input/output error")
        return read_sysfs(path)

    clock = FakeClock()
    source = RaplHostSource(powercap["root"], reader=flaky, clock=clock)
    source.read()
    set_energy(powercap["package-0"], 1_000_000 + 5_000_000)
    fail["now"] = True
    with pytest.raises(OSError):
        source.read()
    fail["now"] = False
    clock.now = 55.0
    assert source.read().energy_j == pytest.approx(5.0)


def test_rapl_source_without_a_package_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="no RAPL package domain"):
        RaplHostSource(tmp_path)


# --- probe --------------------------------------------------------------------------------


def test_probe_readable(powercap: dict[str, Path]) -> None:
    probe = probe_rapl(powercap["root"])
    assert probe.readable
    assert probe.reason is None
    assert probe.domains == ("package-0", "package-1", "package-0/dram")


def test_probe_without_powercap(tmp_path: Path) -> None:
    probe = probe_rapl(tmp_path / "missing")
    assert not probe.readable
    assert probe.reason is not None
    assert "container" in probe.reason


def test_probe_without_rapl_zones(tmp_path: Path) -> None:
    (tmp_path / "dtpm").mkdir()
    probe = probe_rapl(tmp_path)
    assert not probe.readable
    assert probe.reason is not None
    assert "intel-rapl" in probe.reason
    assert "VM" in probe.reason


def test_probe_explains_root_only_energy_files(powercap: dict[str, Path]) -> None:
    (powercap["dram"] / "energy_uj").chmod(0)
    probe = probe_rapl(powercap["root"], reader=unprivileged_reader)
    assert not probe.readable
    assert probe.domains == ("package-0", "package-1", "package-0/dram")
    assert probe.reason is not None
    assert "intel-rapl:0:1/energy_uj" in probe.reason
    assert "CVE-2020-8694" in probe.reason
    assert "root" in probe.reason


@pytest.mark.skipif(
    os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from reading"
)
def test_probe_explains_root_only_energy_files_for_real(powercap: dict[str, Path]) -> None:
    (powercap["package-0"] / "energy_uj").chmod(0)
    probe = probe_rapl(powercap["root"])
    assert not probe.readable
    assert probe.reason is not None
    assert "CVE-2020-8694" in probe.reason


def test_probe_reports_garbage(powercap: dict[str, Path]) -> None:
    (powercap["package-1"] / "energy_uj").write_text("n/a\n")
    probe = probe_rapl(powercap["root"])
    assert not probe.readable
    assert probe.reason is not None
    assert "integer" in probe.reason


# --- estimate and choice ------------------------------------------------------------------


def test_estimated_source_integrates_its_stated_model() -> None:
    utilisations = iter([0.5, 0.0, 1.0])
    clock = FakeClock()
    source = EstimatedHostSource(100.0, 300.0, utilization=lambda: next(utilisations), clock=clock)
    assert source.source == "estimated"
    clock.now = 52.0
    first = source.read()
    assert first.source == "estimated"
    assert first.power_w == pytest.approx(200.0)
    assert first.energy_j == pytest.approx(400.0)
    clock.now = 53.0
    assert source.read().energy_j == pytest.approx(500.0)
    clock.now = 53.5
    last = source.read()
    assert last.power_w == pytest.approx(300.0)
    assert last.energy_j == pytest.approx(650.0)


def test_estimated_source_rejects_an_impossible_model() -> None:
    with pytest.raises(ValueError):
        EstimatedHostSource(300.0, 100.0)


CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_cpu_utilisation_is_busy_time_over_total_since_the_last_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = iter(
        [
            CpuTimes(100, 0, 50, 800, 50, 0, 0, 0, 20, 0),
            # +60 user (+20 of it guest, already inside user), +20 system, +100 idle, +20 iowait
            CpuTimes(160, 0, 70, 900, 70, 0, 0, 0, 40, 0),
        ]
    )
    monkeypatch.setattr(host.psutil, "cpu_times", lambda: next(samples))
    utilisation = CpuUtilization()
    assert utilisation() == pytest.approx(80 / 200)


def test_open_host_source_prefers_rapl(
    powercap: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        source = open_host_source(powercap["root"], 100.0, 400.0)
    assert isinstance(source, RaplHostSource)
    assert not caplog.records


def test_open_host_source_falls_back_to_the_estimate_and_says_why(
    powercap: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    (powercap["package-0"] / "energy_uj").chmod(0)
    with caplog.at_level(logging.WARNING, logger="agent.devices.host"):
        source = open_host_source(powercap["root"], 100.0, 400.0, reader=unprivileged_reader)
    assert isinstance(source, EstimatedHostSource)
    assert source.read().source == "estimated"
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "ESTIMATED" in message
    assert "CVE-2020-8694" in message
