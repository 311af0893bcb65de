"""Shared fixtures. `fake_nvml` puts a scripted `pynvml` in place of the real one;
`llama_server` runs a real llama.cpp server."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import llama_server as llama
import pytest
from fake_pynvml import FakeNvml
from scripted import require_module, start_llama_server, stop_process


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


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real llama-server (tests/llama_server.py) running the tiny model,
    with `--metrics`: one for the whole session."""
    require_module("gguf")
    folder = tmp_path_factory.mktemp("llama")
    process, base = start_llama_server(folder, "-m", str(llama.write_model(folder / "tiny.gguf")))
    try:
        yield base
    finally:
        stop_process(process)


def _real_gpu_reason() -> str | None:
    """None where real NVML answers with at least one GPU; else why the GPU tests skip."""
    from agent.devices.nvml import probe

    report = probe()
    if not report.available:
        return f"no GPU: {report.reason}"
    return None if report.gpus else "no GPU: NVML lists none"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where real NVML sees a GPU (the device machine)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _real_gpu_reason()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
