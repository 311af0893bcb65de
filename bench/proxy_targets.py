"""The targets of `bench/proxy.py` that run as programs of their own: `jouleprobe run` with
a `[[proxy]]` table, and nginx as a plain reverse proxy. Each is a process tree whose CPU is
summed over the root and all its descendants (those that have exited and been waited for
included, through each process's `children_*` times), and which `stop()` ends whatever
happens: SIGTERM, then SIGKILL after a grace period, for the root and every descendant
seen."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

START_S = 60.0
"""Seconds a target gets to answer on its port."""
AGENT_STOP_S = 45.0
"""Seconds the agent gets to stop after SIGTERM (its proxy workers wait for requests in
flight, 30 s at most) before SIGKILL."""
NGINX_STOP_S = 10.0
LOG_TAIL = 2000


def free_port() -> int:
    """A port free on 127.0.0.1 now (bound and released: another process could take it
    before it is used, which on this machine does not happen)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
        return port


def answers(port: int, timeout: float = 2.0) -> bool:
    """Whether an HTTP server answers on 127.0.0.1:`port` (any status)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def tree_cpu_s(root: psutil.Process) -> float:
    """User + system CPU seconds of `root` and all its descendants, living or waited for."""
    total = 0.0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


class Spawned:
    """A program started by the bench, serving HTTP on `port`."""

    def __init__(self, what: str, argv: list[str], port: int, log: Path, stop_s: float,
                 cwd: Path, more_logs: tuple[Path, ...] = ()) -> None:
        self.what = what
        self.port = port
        self._logs = (log, *more_logs)
        self._stop_s = stop_s
        self._seen: dict[int, psutil.Process] = {}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=cwd)
        self._root = psutil.Process(self.process.pid)
        try:
            self._wait_until_it_answers()
        except BaseException:
            self.stop()
            raise

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + START_S
        while not answers(self.port):
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"{self.what} exited with {code} before answering on port "
                                   f"{self.port}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not answer on port {self.port} within "
                                   f"{START_S:g} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        tails = []
        for path in self._logs:
            try:
                tails.append(f"--- {path.name}\n{path.read_text(errors='replace')[-LOG_TAIL:]}")
            except OSError as exc:
                tails.append(f"--- {path.name}: {exc.strerror}")
        return "\n".join(tails)

    def processes(self) -> int:
        """How many processes the tree has now."""
        try:
            return 1 + len(self._root.children(recursive=True))
        except psutil.NoSuchProcess:
            return 0

    def cpu_s(self) -> float:
        self._remember()
        return tree_cpu_s(self._root)

    def _remember(self) -> None:
        """Keeps every descendant seen, so that `stop` ends them even once orphaned."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in self._root.children(recursive=True):
                self._seen.setdefault(child.pid, child)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period; then the same for any descendant
        still alive. Returns the root's exit code."""
        self._remember()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self._stop_s)
            except subprocess.TimeoutExpired:
                print(f"  {self.what} did not stop within {self._stop_s:g} s of SIGTERM: "
                      "killed", flush=True)
                self.process.kill()
                self.process.wait()
        # psutil.Process checks its creation time: a pid reused since is not signalled.
        left = [p for p in self._seen.values() if p.is_running()]
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(left, timeout=self._stop_s)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        return self.process.returncode


def jouleprobe_argv() -> list[str]:
    script = Path(sys.executable).with_name("jouleprobe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def start_agent(upstream_port: int, directory: Path, repo: Path) -> Spawned:
    """`jouleprobe run --simulate 1xH100` with one `[[proxy]]` in front of the upstream, its
    listeners on free ports and its records in `directory`."""
    directory.mkdir()
    port = free_port()
    config = directory / "jouleprobe.toml"
    config.write_text(
        "[agent]\n"
        f'listen = "127.0.0.1:{free_port()}"\n'
        "[ingest]\n"
        f'listen = "127.0.0.1:{free_port()}"\n'
        "[records]\n"
        f"path = {json.dumps(str(directory / 'jouleprobe.db'))}\n"
        "\n[[proxy]]\n"
        'name = "bench"\n'
        f'listen = "127.0.0.1:{port}"\n'
        f'upstream = "http://127.0.0.1:{upstream_port}"\n'
        "gpus = [0]\n")
    argv = [*jouleprobe_argv(), "run", "--simulate", "1xH100", "--config", str(config)]
    return Spawned("the agent (jouleprobe run)", argv, port, directory / "agent.log",
                   AGENT_STOP_S, cwd=repo)


def agent_metrics_port(directory: Path) -> int:
    text = (directory / "jouleprobe.toml").read_text()
    match = re.search(r'listen = "127\.0\.0\.1:(\d+)"', text)
    assert match
    return int(match.group(1))


def agent_proxy_counts(directory: Path) -> str:
    """The agent's own count of its proxy's requests, from its /metrics."""
    url = f"http://127.0.0.1:{agent_metrics_port(directory)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    except OSError as exc:
        return f"/metrics unreadable: {exc}"
    lines = [line for line in text.splitlines()
             if line.startswith(("jouleprobe_proxy_requests_total",
                                 "jouleprobe_proxy_requests_refused_total",
                                 "jouleprobe_proxy_worker_restarts_total"))]
    return "; ".join(lines) or "no jouleprobe_proxy_requests_total on /metrics"


def nginx_binary() -> tuple[str, str] | None:
    """nginx's path and version, or None where it is not on PATH (nor in /usr/sbin)."""
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        return None
    shown = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    version = (shown.stderr or shown.stdout).strip().rpartition("/")[2] or "unknown"
    return path, version


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(binary: str, upstream_port: int, directory: Path) -> Spawned:
    """nginx as a plain reverse proxy (one master, one worker), everything in `directory`."""
    directory.mkdir()
    port = free_port()
    # As root the worker would switch to `nobody`; keep it the current user, as for others.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, upstream=upstream_port, port=port,
                                      user=user))
    argv = [binary, "-p", f"{directory}/", "-c", str(conf), "-e", str(directory / "error.log")]
    return Spawned("nginx", argv, port, directory / "nginx.out", NGINX_STOP_S, cwd=directory,
                   more_logs=(directory / "error.log",))
