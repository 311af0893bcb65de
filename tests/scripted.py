"""Small test doubles and helpers shared by the test modules."""

from __future__ import annotations

import os
import shutil
import socket
from collections import deque

import pytest

from agent.sources.base import GpuInfo, GpuReading, HostReading


class ScriptedGpuSource:
    """A GpuSource that answers each read with the next reading queued for that GPU."""

    def __init__(self, infos: list[GpuInfo]) -> None:
        self._infos = infos
        self.queued: dict[int, deque[GpuReading]] = {info.index: deque() for info in infos}

    def gpus(self) -> list[GpuInfo]:
        return list(self._infos)

    def read(self, index: int) -> GpuReading:
        return self.queued[index].popleft()

    def close(self) -> None:
        pass


class ScriptedHostSource:
    """A HostSource that answers each read with the next queued reading."""

    source = "rapl"

    def __init__(self) -> None:
        self.queued: deque[HostReading] = deque()

    def read(self) -> HostReading:
        return self.queued.popleft()


def require_binary(binary: str) -> str:
    """The binary's path; skip where it is missing, except under CI where that fails."""
    path = shutil.which(binary)
    if path is None:
        reason = f"{binary} is not installed (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
