"""Which GPUs a request source runs on: configured, or discovered for `gpus = "auto"`.

Discovery follows the server from the port it listens on to the GPUs it holds:

1. the port (of the proxy's upstream URL or the scrape URL) → the PIDs listening on it
   (`psutil.net_connections`);
2. → their process trees (the listener and its descendants: vLLM's API server spawns its
   engine core and workers, SGLang its schedulers, Ollama its runners). Where no process
   of that tree holds a GPU, the listener's parent's tree is tried once, unless the parent
   is an init, a shell or a container shim: TGI's router listens while the model shards
   are its siblings, children of text-generation-launcher;
3. → the GPUs on which NVML lists one of those PIDs as a compute process
   (`nvmlDeviceGetComputeRunningProcesses` on each physical board; MIG instances are not
   looked at).

What can go wrong, and is said in plain words (`describe()`, and the error of `current()`):
nothing listens on the port; the socket belongs to a process the agent may not see (not
root, another user's process); the server has no GPU context yet (still loading); and,
in containers, PID namespaces: NVML reports host PIDs while psutil sees the container's,
so no PID matches. That last case is recognised when NVML lists processes of which none
is visible to psutil, and the remedy is to run the agent with the host's PID namespace
(Kubernetes `hostPID: true`, Docker `--pid=host`) or to configure the GPUs explicitly.

Resolution runs in a background thread every `refresh_s`, so `current()` returns at once
with the latest known set; only while nothing has been resolved yet does it wait, at most
`wait_s`. A set once found is kept while a later refresh fails (a server restarting is
still on its GPUs); `describe()` says both.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import urlsplit

import psutil

from agent.config import GpuSpec
from agent.devices.base import GpuInfo, SourceUnavailable
from agent.devices.nvml import compute_processes

NOT_A_SERVER_PARENT = frozenset({
    "systemd", "init", "containerd-shim", "containerd-shim-runc-v2", "conmon", "tini",
    "dumb-init", "docker-init", "bash", "sh", "zsh", "fish", "dash", "sshd", "tmux: server",
    "screen", "supervisord", "runsv", "s6-supervise",
})
"""Parents whose other children are not the server's: never searched for GPU processes."""

HOST_PID_HINT = ("run the agent in the host's PID namespace (Kubernetes hostPID: true, "
                 "Docker --pid=host) or give an explicit list of GPUs")


class GpuResolutionError(ValueError):
    """The GPUs of a source with `gpus = "auto"` are not known (yet); the message says why."""


class StillResolving(GpuResolutionError):
    """The first discovery has not finished: ask again shortly."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """One attempt at discovery: the GPUs found, or why none."""

    gpus: tuple[int, ...]
    detail: str
    """How they were found (PIDs, process names), or why not."""
    at: float
    """time.monotonic() of the attempt."""

    @property
    def ok(self) -> bool:
        return bool(self.gpus)


def local_port(url: str) -> int:
    """The port of `url`, which must be a server on this node (discovery looks up local
    sockets: a remote server's port would match some unrelated local process)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    if port is None:
        raise ValueError(f"{url}: no port")
    if not _is_local(host):
        raise ValueError(f'{url}: gpus = "auto" needs a server on this node, not {host!r}; '
                         "give an explicit list of GPUs")
    return port


def _is_local(host: str) -> bool:
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    return any(
        addr.address.split("%")[0] == str(address)
        for addrs in psutil.net_if_addrs().values() for addr in addrs
    )


class GpuResolver:
    """The GPU indices of one request source, for its whole life in the agent."""

    def __init__(
        self,
        spec: GpuSpec,
        gpus: list[GpuInfo],
        port: int | None,
        nvml_module: ModuleType | None = None,
        refresh_s: float = 30.0,
        *,
        wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        pid: int | None = None,
    ) -> None:
        """"auto" follows the process listening on `port`, or the process `pid` (a trace
        source's, from its spans' resource). Raises ValueError for a configuration that
        can never resolve: unknown GPU indices or UUIDs (all named), or "auto" without a
        port or process, or on simulated GPUs."""
        self.spec = spec
        self.port = port
        self.pid = pid
        self.refresh_s = refresh_s
        self.wait_s = wait_s
        self._gpus = list(gpus)
        self._nvml_module = nvml_module
        self._clock = clock
        self._static: tuple[int, ...] | None = None
        self._last: Resolution | None = None
        self._good: Resolution | None = None
        self._refreshing: threading.Thread | None = None
        self._lock = threading.Lock()
        if spec != "auto":
            self._static = _static_indices(spec, self._gpus)
        elif port is None and pid is None:
            raise ValueError('gpus = "auto" needs the server\'s port (from its URL)')
        elif any(gpu.simulated for gpu in self._gpus):
            raise ValueError('gpus = "auto" cannot be resolved on simulated GPUs: NVML has no '
                             "processes to look at; give an explicit list of GPU indices")

    def current(self) -> tuple[int, ...]:
        """The GPU indices now. For "auto", the latest set found (refreshed in the
        background); raises GpuResolutionError, saying why, while none has been found."""
        if self._static is not None:
            return self._static
        with self._lock:
            stale = self._last is None or self._clock() - self._last.at >= self.refresh_s
            if stale and (self._refreshing is None or not self._refreshing.is_alive()):
                self._refreshing = threading.Thread(
                    target=self._refresh, name=f"jouleprobe-gpus-{self._whose}", daemon=True
                )
                self._refreshing.start()
            thread = self._refreshing
        if self._good is None and thread is not None:
            thread.join(self.wait_s)
        good, last = self._good, self._last
        if good is not None:
            return good.gpus
        if last is None:
            raise StillResolving(f'gpus = "auto" ({self._whose}): still being resolved')
        raise GpuResolutionError(f'gpus = "auto" ({self._whose}): {last.detail}')

    @property
    def resolving(self) -> bool:
        """"auto" has not finished its first discovery yet."""
        return self._static is None and self._last is None

    @property
    def _whose(self) -> str:
        return f"port {self.port}" if self.pid is None else f"PID {self.pid}"

    def describe(self) -> str:
        """One line for `jouleprobe doctor`: the mapping, or plainly why there is none.
        For "auto" this resolves now, in the caller's thread."""
        if self._static is not None:
            named = ", ".join(str(v) for v in self.spec)
            return f"GPUs [{named}] -> {', '.join(map(str, self._static))}"
        resolution = self.resolve()
        if resolution.ok:
            return (f"auto ({self._whose}): GPU {', '.join(map(str, resolution.gpus))} "
                    f"({resolution.detail})")
        return f"auto ({self._whose}): cannot resolve: {resolution.detail}"

    def resolve(self) -> Resolution:
        """One discovery attempt, now. Never raises for what it finds wrong."""
        if self.pid is not None:
            listeners, why = ([self.pid], "") if psutil.pid_exists(self.pid) else (
                [], f"no process {self.pid} on this host (or in this PID namespace: "
                    f"{HOST_PID_HINT})")
        else:
            assert self.port is not None
            listeners, why = _listening_pids(self.port)
        gpus, detail = _discover(listeners, why, self._gpus, self._nvml_module)
        return Resolution(gpus, detail, self._clock())

    def _refresh(self) -> None:
        resolution = self.resolve()
        self._last = resolution
        if resolution.ok:
            self._good = resolution


def _static_indices(spec: Iterable[int | str], gpus: list[GpuInfo]) -> tuple[int, ...]:
    indices = {gpu.index for gpu in gpus}
    by_uuid = {gpu.uuid.lower(): gpu.index for gpu in gpus}
    found: list[int] = []
    unknown: list[str] = []
    for value in spec:
        index = value if isinstance(value, int) else by_uuid.get(value.strip().lower())
        if index is None or index not in indices:
            unknown.append(repr(value))
        elif index not in found:
            found.append(index)
    if unknown:
        known = ", ".join(f"{gpu.index} ({gpu.uuid})" for gpu in gpus) or "none"
        raise ValueError(f"unknown GPU {', '.join(unknown)}: this node measures {known}")
    return tuple(found)


# -- discovery --------------------------------------------------------------------------


def _discover(
    listeners: list[int], why: str, gpus: list[GpuInfo], nvml_module: ModuleType | None
) -> tuple[tuple[int, ...], str]:
    """The GPUs of the processes `listeners` (and their trees); `why` none were found."""
    if not listeners:
        return (), why
    gpu_pids, why = _gpu_processes(gpus, nvml_module)
    if gpu_pids is None:
        return (), why
    found, tree_note = _match(listeners, gpu_pids)
    if found:
        return found, tree_note
    listed = {pid for pids in gpu_pids.values() for pid in pids}
    if listed and not any(psutil.pid_exists(pid) for pid in listed):
        return (), (f"NVML lists GPU processes (PIDs {_pids(listed)}) that this agent cannot "
                    f"see: it runs in another PID namespace than NVML's (a container); "
                    f"{HOST_PID_HINT}")
    if not listed:
        return (), (f"{tree_note}, but NVML lists no compute process on any GPU: the server "
                    "may still be loading, or NVML cannot report processes here")
    return (), f"{tree_note}, and none of them is a compute process on any GPU"


def _listening_pids(port: int) -> tuple[list[int], str]:
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return [], ("listening sockets cannot be read without privileges (psutil "
                    "AccessDenied): run the agent as root or give an explicit list of GPUs")
    listening = [c for c in connections
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    if not listening:
        return [], f"nothing listens on port {port}"
    pids = sorted({c.pid for c in listening if c.pid is not None})
    if not pids:
        return [], (f"port {port} is listening, but its process is not visible to this agent "
                    "(another user's process: run the agent as root, or in the host's PID "
                    "namespace in a container) or give an explicit list of GPUs")
    return pids, ""


def _gpu_processes(
    gpus: list[GpuInfo], nvml_module: ModuleType | None
) -> tuple[dict[int, frozenset[int]] | None, str]:
    """PIDs of compute processes per GPU index, or None and why NVML cannot tell."""
    try:
        listed = compute_processes((gpu.index for gpu in gpus), nvml_module)
    except SourceUnavailable as exc:
        return None, f"NVML unavailable ({exc})"
    if not listed.pids:
        errors = "; ".join(f"GPU {index}: {kind}" for index, kind in listed.failures.items())
        return None, f"NVML could not list processes on any GPU ({errors})"
    return listed.pids, ""


def _match(
    listeners: list[int], gpu_pids: dict[int, frozenset[int]]
) -> tuple[tuple[int, ...], str]:
    """GPUs of the listeners' trees; where none, of their parents' trees."""
    names = ", ".join(f"PID {pid} ({_name(pid)})" for pid in listeners)
    tree = _tree(listeners)
    found = _gpus_of(tree, gpu_pids)
    if found:
        return found, f"{names} and {len(tree) - len(listeners)} descendant(s)"
    parents = _server_parents(listeners)
    if parents:
        wider = _tree(parents)
        found = _gpus_of(wider, gpu_pids)
        if found:
            via = ", ".join(f"PID {pid} ({_name(pid)})" for pid in parents)
            return found, f"{names}, through its parent {via} and its descendants"
    return (), f"{names} and {len(tree) - len(listeners)} descendant(s) hold no GPU"


def _tree(pids: Iterable[int]) -> set[int]:
    tree: set[int] = set()
    for pid in pids:
        tree.add(pid)
        try:
            tree.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return tree


def _server_parents(pids: Iterable[int]) -> list[int]:
    parents = set()
    for pid in pids:
        try:
            parent = psutil.Process(pid).parent()
            if parent is None or parent.pid <= 1 or parent.name() in NOT_A_SERVER_PARENT:
                continue
        except psutil.Error:
            continue
        parents.add(parent.pid)
    return sorted(parents)


def _gpus_of(pids: set[int], gpu_pids: dict[int, frozenset[int]]) -> tuple[int, ...]:
    return tuple(sorted(index for index, on_gpu in gpu_pids.items() if on_gpu & pids))


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _pids(pids: set[int]) -> str:
    shown = sorted(pids)[:5]
    return ", ".join(map(str, shown)) + (", ..." if len(pids) > len(shown) else "")
