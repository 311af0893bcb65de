"""Which workload a process belongs to, read from its cgroup (`/proc/<pid>/cgroup`).

Each line of that file is `hierarchy-id:controllers:path`: cgroup v2 has the one line
`0::<path>`, cgroup v1 one line per hierarchy (`4:memory:<path>`, `1:name=systemd:<path>`),
a hybrid host both. Every path is looked at, and the first that names a workload of the
most specific kind decides, in this order:

1. A container of a Kubernetes pod. The kubelet names a pod's cgroup `pod<UID>` under its
   QoS class (`pkg/kubelet/cm`: `/kubepods/[burstable|besteffort/]pod<uid>` with the
   cgroupfs driver; with the systemd driver `ConvertCgroupNameToSystemd` turns each level
   into a `.slice` that repeats its parents and `-` into `_`:
   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`).
   The container is the cgroup below it, as the runtime names it: `<id>` (containerd or
   docker, cgroupfs), `crio-<id>` (CRI-O, cgroupfs), `cri-containerd-<id>.scope`,
   `crio-<id>.scope` or `docker-<id>.scope` (systemd driver), or containerd's cgroup v1
   systemd form, `.../kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`. A static
   pod's UID is 32 hex digits with no dashes. Paths nested under another container (kind:
   `/system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice/...`) and paths
   relative to the agent's own cgroup namespace (`/../../kubepods-...`) are read the same.
2. A container outside Kubernetes: docker (`/docker/<id>`,
   `/system.slice/docker-<id>.scope`), containerd through nerdctl
   (`/system.slice/nerdctl-<id>.scope`), podman (`/machine.slice/libpod-<id>.scope`,
   rootless under `user@<uid>.service`, `/libpod_parent/libpod-<id>`, quadlet's
   `libpod-payload-<id>`); the innermost one where containers nest.
3. A systemd unit: the innermost `*.service` of the path with no `.scope` below it
   (`/system.slice/slurmd.service`, a delegated subtree `/system.slice/foo.service/worker`).
   A login session or an ad-hoc scope (`session-3.scope`, `run-r1.scope`) is not a unit.
4. Otherwise the process itself, by its command name (`/proc/<pid>/comm`): processes that
   share a command name are one workload, which keeps their number bounded.

Container ids are the runtimes' 64 hex digits (cAdvisor's and Kepler's parsers match the
same forms). Names (namespace, pod, container) are not in the cgroup: they come from the
kubelet, matched on the pod UID and container id.

A PID that exited between NVML listing it and this read, or whose files cannot be read,
gives an `Unresolved` with the reason, never an exception: processes come and go all the
time, and one of them must not stop the others from being resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Runtime = Literal["containerd", "cri-o", "docker", "podman"]


@dataclass(frozen=True, slots=True)
class PodContainer:
    """A container of a Kubernetes pod, as its cgroup names it."""

    pod_uid: str
    """The pod's UID as the API server writes it: dashes, lower-case hex."""
    container_id: str | None
    """The runtime's container id; None for a process in the pod's own cgroup."""
    runtime: Runtime | None
    """Where the path says (None: a bare id, which containerd and docker both write)."""


@dataclass(frozen=True, slots=True)
class Container:
    """A container started outside Kubernetes."""

    container_id: str
    runtime: Runtime | None


@dataclass(frozen=True, slots=True)
class Unit:
    """A systemd service, such as `slurmd.service`."""

    name: str


@dataclass(frozen=True, slots=True)
class Command:
    """A process outside any container or unit, known by its command name."""

    name: str


Workload = PodContainer | Container | Unit | Command

UnresolvedReason = Literal["vanished", "no_permission", "unreadable"]


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Why the workload of a PID is not known."""

    pid: int
    reason: UnresolvedReason
    """`vanished`: the process has exited (or lives in another PID namespace);
    `no_permission`: its files are not readable by the agent; `unreadable`: another error."""
    detail: str


_UID = (r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
        r"|[0-9a-f]{32}")
_POD = re.compile(rf"(?:.+-)?pod(?P<uid>{_UID})(?:\.slice)?")
"""A pod's cgroup: `pod<uid>` (cgroupfs) or `<parents>-pod<uid>.slice` (systemd)."""
_ID = r"[0-9a-f]{64}"
_SCOPE = re.compile(rf"(?P<prefix>cri-containerd|crio|docker|libpod|nerdctl)-(?P<id>{_ID})\.scope")
_CGROUPFS = re.compile(rf"(?:(?P<prefix>crio|libpod|libpod-payload)-)?(?P<id>{_ID})")
_COLON = re.compile(rf"(?P<slice>[^:]+\.slice):(?P<prefix>cri-containerd):(?P<id>{_ID})")
"""containerd's systemd cgroup path as cgroup v1 shows it: `slice:cri-containerd:id`."""

_RUNTIMES: dict[str, Runtime] = {
    "cri-containerd": "containerd",
    "nerdctl": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "libpod": "podman",
    "libpod-payload": "podman",
}
"""A container cgroup's prefix, or the parent of a bare id (`/docker/<id>`), to its runtime."""


def workload_of(pid: int, proc_root: str | Path = "/proc") -> Workload | Unresolved:
    """The workload that process `pid` belongs to, from `<proc_root>/<pid>/cgroup` (and
    `comm` where the cgroup names no container or unit)."""
    folder = Path(proc_root) / str(pid)
    try:
        found = workload_from_cgroup((folder / "cgroup").read_text(errors="replace"))
        if found is not None:
            return found
        return Command((folder / "comm").read_text(errors="replace").rstrip("\n"))
    except OSError as exc:
        return _unresolved(pid, exc)


def workload_from_cgroup(text: str) -> Workload | None:
    """The pod container, container or unit that a `/proc/<pid>/cgroup` text names; None
    where it names none of them (the process is then known by its command)."""
    paths = [_components(line.split(":", 2)[2]) for line in text.splitlines()
             if line.count(":") >= 2]
    for find in (_pod_container, _container, _unit):
        for components in paths:
            found = find(components)
            if found is not None:
                return found
    return None


def _components(path: str) -> list[str]:
    """A path's cgroup names, with the `slice:prefix:id` form split into the slice and an
    equivalent `prefix-id.scope`, so that one set of patterns reads both."""
    components: list[str] = []
    for name in path.split("/"):
        if name in ("", ".", ".."):
            continue
        colon = _COLON.fullmatch(name)
        if colon is None:
            components.append(name)
        else:
            components += [colon["slice"], f"{colon['prefix']}-{colon['id']}.scope"]
    return components


def _pod_container(components: list[str]) -> PodContainer | None:
    for at in range(len(components) - 1, -1, -1):
        pod = _POD.fullmatch(components[at])
        if pod is None:
            continue
        uid = pod["uid"].replace("_", "-")
        for parent, name in zip(components[at:], components[at + 1:], strict=False):
            container = _container_id(name, parent)
            if container is not None:
                return PodContainer(uid, *container)
        return PodContainer(uid, None, None)
    return None


def _container(components: list[str]) -> Container | None:
    for at in range(len(components) - 1, -1, -1):
        found = _container_id(components[at], components[at - 1] if at else "")
        if found is not None:
            return Container(*found)
    return None


def _container_id(name: str, parent: str) -> tuple[str, Runtime | None] | None:
    match = _SCOPE.fullmatch(name) or _CGROUPFS.fullmatch(name)
    if match is None:
        return None
    return match["id"], _RUNTIMES.get(match["prefix"] or parent)


def _unit(components: list[str]) -> Unit | None:
    for name in reversed(components):
        if name.endswith(".scope"):
            return None
        if name.endswith(".service") and len(name) > len(".service"):
            return Unit(name)
    return None


def _unresolved(pid: int, exc: OSError) -> Unresolved:
    reason: UnresolvedReason
    if isinstance(exc, FileNotFoundError | ProcessLookupError):
        reason = "vanished"
    elif isinstance(exc, PermissionError):
        reason = "no_permission"
    else:
        reason = "unreadable"
    return Unresolved(pid, reason, f"{type(exc).__name__}: {exc.strerror or exc}")
