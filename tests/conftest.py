"""Shared fixtures. `fake_nvml` puts a scripted `pynvml` in place of the real one."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from fake_pynvml import FakeNvml


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    """A fake NVML with no GPU yet, installed as `sys.modules["pynvml"]` for the test.

    Script it (`add_gpu`, `fail`, `advance`, ...) and open the source with
    `NvmlGpuSource.open(clock=fake_nvml.clock)`. Hung calls are released at teardown.
    """
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    yield fake
    fake.release_all()
