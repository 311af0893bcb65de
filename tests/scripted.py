"""Small test doubles and helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent.devices.base import GpuInfo, GpuReading, HostReading
from agent.intake.proxy import ProxyStats
from agent.workloads.naming import WorkloadName
from agent.workloads.observer import Occupancy

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
"""Verbatim captures of the servers' output, and other files the tests read."""
"""The repository root: where the agent under test is started from."""


class ScriptedGpuSource:
    """A GpuSource that answers each read with the next reading queued for that GPU."""

    def __init__(self, infos: list[GpuInfo]) -> None:
        self._infos = infos
        self.queued: dict[int, deque[GpuReading]] = {info.index: deque() for info in infos}

    def gpus(self) -> list[GpuInfo]:
        return list(self._infos)

    def read(self, index: int, *, telemetry: bool = True) -> GpuReading:
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


class ConstantLoad:
    """A LoadModel of the simulated GPU source (agent.sim.gpus): a fixed power per board,
    one figure for all, or one per index."""

    def __init__(self, watts: float | Sequence[float]) -> None:
        self._all: float | None = None
        self._each: tuple[float, ...] = ()
        if isinstance(watts, int | float):
            self._all = float(watts)
        else:
            self._each = tuple(float(w) for w in watts)

    def power_w(self, index: int, t: float) -> float:
        return self._all if self._all is not None else self._each[index]


class StepLoad:
    """A LoadModel of the simulated GPU source: `low` watts before `at`, `high` from `at`
    on, on the boards `boards` (all by default); the others at `rest_w`."""

    def __init__(self, low: float, high: float, at: float, *,
                 boards: Sequence[int] | None = None, rest_w: float = 0.0) -> None:
        self.low, self.high, self.at = low, high, at
        self.boards, self.rest_w = boards, rest_w

    def power_w(self, index: int, t: float) -> float:
        if self.boards is not None and index not in self.boards:
            return self.rest_w
        return self.high if t >= self.at else self.low


class FakeClock:
    """A clock the test moves by hand (`clock.now += 0.1`)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedOccupancies:
    """The workload observer's occupancies by hand (`Occupancies` of
    agent.attribution.workloads): each GPU's, from the `time` it is set at on."""

    def __init__(self) -> None:
        self.by_gpu: dict[int, list[Occupancy]] = {}

    def at(self, gpu: int, time: float, *, exclusive: WorkloadName | None = None,
           present: Mapping[int, WorkloadName | None] | None = None,
           weights: Mapping[int, float] | None = None) -> None:
        history = self.by_gpu.setdefault(gpu, [])
        since = history[-1].time if history else 0.0
        history.append(Occupancy(since, time, exclusive, dict(present or {}),
                                 dict(weights or {})))

    def covering(self, index: int, time: float) -> Occupancy | None:
        history = self.by_gpu.get(index, [])
        later = [occupancy for occupancy in history if occupancy.time >= time]
        return later[0] if later else (history[-1] if history else None)


def require_binary(binary: str) -> str:
    """The binary's path; skip where it is missing, except under CI where that fails."""
    path = shutil.which(binary)
    if path is None:
        missing(f"{binary} is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path


def missing(reason: str) -> NoReturn:
    """Skips the test for `reason` (printed), except under CI, where it fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def require_module(name: str) -> ModuleType:
    """The imported module; skip where it is missing, except under CI where that fails
    (`.ci/run` installs the test extras, so a missing one there is a broken install)."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llama_server(folder: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A real llama-server (tests/llama_server.py) with `args` and `--metrics`, its log in
    `folder`, once it answers /health: the process and its base URL. A missing binary is
    `missing`."""
    import llama_server

    binary = llama_server.binary()
    if not binary.is_file():
        missing(f"llama-server is not built: run `python tests/llama_server.py` ({binary})")
    port = free_port()
    with (folder / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(binary), *args, "--host", "127.0.0.1", "--port", str(port), "--metrics",
             "-c", "1024", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/health"), "llama-server answers /health",
                   timeout_s=60)
    except BaseException:
        stop_process(process)
        raise
    return process, base


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def agent_env() -> dict[str, str]:
    """This environment without PYTHONPATH or JOULEPROBE_* settings, which would change
    what the agent under test does."""
    return {
        key: value for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith("JOULEPROBE_")
    }


def start_agent(args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
                ) -> subprocess.Popen[bytes]:
    """`jouleprobe run ARGS` as its own process from the repository root, in `agent_env()`
    plus `env`, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", *args], cwd=ROOT,
            env={**agent_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
        )


class Servers:
    """aiohttp apps served on 127.0.0.1 by an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []
        self.proxies: list[ProxyStats] = []

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def serve(self, app: web.Application, **options: Any) -> str:
        async def start() -> int:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, **options)
            await runner.setup()
            self._runners.append(runner)
            site = web.SockSite(runner, socket.create_server(("127.0.0.1", 0)))
            await site.start()
            return site._sock.getsockname()[1]  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{self.call(start())}"

    def close(self) -> None:
        async def stop() -> None:
            for runner in reversed(self._runners):
                await runner.cleanup()
        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


@contextlib.contextmanager
def serve_app(app: web.Application) -> Iterator[str]:
    """Serves the aiohttp `app` on 127.0.0.1 from an event loop on a thread of its own;
    yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serves `handler` (a plain http.server handler) on 127.0.0.1 from a thread; yields its
    base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


Series = tuple[str, frozenset[tuple[str, str]]]
"""A sample's name and labels, as `exposed_samples` keys them."""


def series(name: str, /, **labels: str) -> Series:
    return name, frozenset(labels.items())


def exposed_samples(text: str) -> dict[Series, float]:
    """Every sample of a Prometheus text exposition (what a scrape of /metrics reads), parsed
    by prometheus_client's own parser, keyed by `series`."""
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(condition: Callable[[], bool], what: str = "the condition",
               timeout_s: float = 10.0) -> None:
    """Polls `condition` every 10 ms; fails the test naming `what` when it still does not hold
    after `timeout_s`, which only bounds a failing test: it is never a measurement."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes],
             log: Path, timeout_s: float) -> None:
    """`wait_until` for a process: fails with its log if it exits or time runs out, and
    takes an OSError from `ready` as "not listening yet"."""
    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return ready()
        except OSError:
            return False
    try:
        wait_until(up, what, timeout_s)
    except pytest.fail.Exception:
        if proc.poll() is not None:
            raise
        pytest.fail(f"{what} not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def prometheus_server(config: Path, workdir: Path) -> Iterator[str]:
    """A real Prometheus on a free loopback port with `config`; yields its base URL once it
    is ready and stops it afterwards. Skips (fails under CI) where it is not installed."""
    binary = require_binary("prometheus")
    address = f"127.0.0.1:{free_port()}"
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={address}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        ready = f"http://{address}/-/ready"
        wait_for("prometheus", lambda: http_get(ready)[0] == 200, proc, log, timeout_s=30)
        yield f"http://{address}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """File reads and socket connects made as nobody while inside: root reads any file and
    connects to any socket whatever their mode, so a permission test needs another user."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
