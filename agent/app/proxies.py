"""The `[[proxy]]` tables, served: each in `workers` processes of its own, started and
kept running here, reporting to the agent over the local channel
(`agent.intake.proxy.channel`), or with `workers = 0` inside the agent's process.

A worker that dies is started again (after 1 s, doubling up to `MAX_RESTART_DELAY_S` while
it keeps dying young), counted in `jouleprobe_proxy_worker_restarts_total`. On stop, the
workers are sent SIGTERM and given the time to finish the requests in flight and send
their last events (`worker.SHUTDOWN_S`), then killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable

from aiohttp import web

from agent.app.node import Node
from agent.app.sites import start_site
from agent.config import ProxyTable
from agent.intake.discovery import GpuResolver, local_port
from agent.intake.proxy import PROXY_STATS, ProxyStats, proxy_app
from agent.intake.proxy import RUNNER_OPTIONS as PROXY_RUNNER_OPTIONS
from agent.intake.proxy.channel import ProxyChannel, channel_app, private_socket_path
from agent.intake.proxy.worker import SHUTDOWN_S

log = logging.getLogger(__name__)

MAX_RESTART_DELAY_S = 30.0
HEALTHY_RUN_S = 60.0
"""A worker that ran this long before it died is restarted after the shortest delay."""
STOP_GRACE_S = SHUTDOWN_S + 5.0


def resolver(node: Node, table: ProxyTable) -> GpuResolver:
    """The GPUs serving the proxy's upstream: as configured, or discovered for "auto" in
    the background. Its `current()` is called on the event loop, so it never waits for
    discovery: until the first discovery succeeds it raises, and that request is counted
    as refused rather than guessed."""
    port = local_port(table.upstream) if table.gpus == "auto" else None
    return GpuResolver(table.gpus, node.sampler.gpus(), port, wait_s=0.0)


class Workers:
    """A proxy's worker processes, on one listening socket."""

    def __init__(self, table: ProxyTable, sock: socket.socket, socket_path: str,
                 channel: ProxyChannel, log_level: str) -> None:
        self.table = table
        self.sock = sock
        self.channel = channel
        fields = {f.name: getattr(table, f.name) for f in dataclasses.fields(table)}
        self._spec = json.dumps({"table": fields, "socket": socket_path,
                                 "fd": sock.fileno(), "log_level": log_level})
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._tasks = [asyncio.create_task(self._keep(slot)) for slot in range(table.workers)]

    async def _keep(self, slot: int) -> None:
        delay = 1.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.intake.proxy.worker", self._spec,
                pass_fds=(self.sock.fileno(),))
            self._processes[slot] = process
            started = loop.time()
            code = await process.wait()
            self.channel.retire(str(process.pid))
            if self._stopping.is_set():
                return
            self.channel.stats.worker_restarts += 1
            delay = 1.0 if loop.time() - started >= HEALTHY_RUN_S else min(
                2 * delay, MAX_RESTART_DELAY_S)
            log.warning("proxy %s: worker %d (pid %d) exited with %s; starting it again in "
                        "%.0f s", self.table.name, slot, process.pid, code, delay)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """SIGTERM to every worker; those still running after `STOP_GRACE_S` are killed."""
        self._stopping.set()
        running = [p for p in self._processes.values() if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        waiting = asyncio.gather(*(p.wait() for p in running))
        try:
            await asyncio.wait_for(asyncio.shield(waiting), STOP_GRACE_S)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    log.warning("proxy %s: worker pid %d killed after %.0f s",
                                self.table.name, process.pid, STOP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await waiting
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sock.close()


class Proxies:
    """Every `[[proxy]]` table of the node, served; `urls` in the tables' order."""

    def __init__(self) -> None:
        self.stats: dict[str, ProxyStats] = {}
        self.urls: list[str] = []
        self._workers: list[Workers] = []
        self._runners: list[web.AppRunner] = []
        self._directory: str | None = None

    async def start(self, node: Node, bind: Callable[[str], socket.socket]) -> None:
        """Serves every table; what started is stopped by `stop` whatever fails next."""
        tables = node.config.proxy
        channels: dict[str, ProxyChannel] = {}
        if any(table.workers for table in tables):
            self._directory = tempfile.mkdtemp(prefix="jouleprobe-")
            socket_path = private_socket_path(self._directory)
            channels = {table.name: ProxyChannel(table.name, node.engine, node.sampler.gpus(),
                                                 resolver(node, table).current)
                        for table in tables if table.workers}
            runner = web.AppRunner(channel_app(channels), access_log=None)
            await runner.setup()
            await web.UnixSite(runner, socket_path).start()
            self._runners.append(runner)
        for table in tables:
            sock = bind(table.listen)
            host, port = sock.getsockname()[:2]
            self.urls.append(f"http://{host}:{port}")
            what = f"proxy {table.name} -> {table.upstream}"
            if table.workers:
                channel = channels[table.name]
                self.stats[table.name] = channel.stats
                self._workers.append(Workers(table, sock, socket_path, channel,
                                             node.config.agent.log_level))
                log.info("serving %s on http://%s:%d in %d worker process(es)", what, host,
                         port, table.workers)
            else:
                app = proxy_app(table, node.engine, resolver(node, table).current,
                                max_concurrent=table.max_concurrent)
                self.stats[table.name] = app[PROXY_STATS]
                self._runners.append(await start_site(app, sock, what, **PROXY_RUNNER_OPTIONS))

    async def stop(self) -> None:
        """The workers first (their last events need the channel), then the listeners."""
        for workers in self._workers:
            await workers.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
