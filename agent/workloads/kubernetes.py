"""The pods on this node, from the Kubernetes API server.

One list call, `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>&resourceVersion=0`,
made from a worker thread every half minute or so, names the pods whose UIDs and container
ids the processes' cgroups give (`cgroups.PodContainer`), and finds the inference servers
annotated for scraping. The API server is asked rather than the kubelet's `/pods`, which
would need the `nodes/proxy` permission (that lets one run commands in every pod of the
node); listing pods needs only `get`/`list` on `pods`. `resourceVersion=0` lets the API
server answer from its watch cache, which indexes pods by node, instead of reading every pod
of the cluster from etcd to filter them: a DaemonSet asks once per node, so this matters.

Inside a pod everything comes from the service account and the downward API
(`ApiServer.from_environment`): the server from `KUBERNETES_SERVICE_HOST` and
`KUBERNETES_SERVICE_PORT`, the bearer token from
`/var/run/secrets/kubernetes.io/serviceaccount/token` (read again on every call: the kubelet
rotates it), the server's CA from `ca.crt` beside it, and the node from `NODE_NAME` (set
from `spec.nodeName`). The answer is bounded: at most `MAX_RESPONSE_BYTES` of body and
`MAX_PODS` pods, read within the timeout.

Container ids are the runtime's, without its prefix (`containerd://<64 hex>`, `cri-o://`,
`docker://`), from `status.containerStatuses`, `initContainerStatuses` and
`ephemeralContainerStatuses`; a container that has not started has none. A static pod runs
under the kubelet's own UID (its config hash, 32 hex digits, in its cgroup), which its
mirror pod in the API carries as the `kubernetes.io/config.mirror` annotation: both name it.

A pod annotated `jouleprobe.io/scrape: <kind>` (one of `agent.config.SCRAPE_KINDS`) is an
inference server to scrape, at `<scheme>://<pod IP>:<port><path>`:

| annotation | value | default |
| --- | --- | --- |
| `jouleprobe.io/scrape` | vllm, sglang, tgi, triton or llamacpp | (required) |
| `jouleprobe.io/port` | a number, or a declared container port's name | first declared TCP port |
| `jouleprobe.io/path` | the metrics path, from `/` | `/metrics` |
| `jouleprobe.io/scheme` | http or https | http |
| `jouleprobe.io/interval` | seconds between two scrapes, 1 to 3600 | that of a `[[scrape]]` table |
| `jouleprobe.io/trace` | the `[[trace]]` service of the same server | none |

Only Running pods with an IP are looked at. A pod whose annotations are wrong (an unknown
kind or key, a bad value, no port to use) is not scraped: each wrong key gives a
`BadAnnotation` saying why, for the operator, never an exception.

Every failure to list is one `KubernetesError`, whose `reason` names it and whose message
says what an operator can do about it.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import math
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from agent.config import SCRAPE_KINDS, ScrapeKind, ScrapeTable
from agent.workloads.cgroups import PodContainer, Runtime

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE = SERVICE_ACCOUNT / "token"
CA_FILE = SERVICE_ACCOUNT / "ca.crt"
PODS_PATH = "/api/v1/pods"
MAX_RESPONSE_BYTES = 32 * 2**20
"""A node's pod list is well under 1 MiB per 100 pods, managedFields included."""
MAX_PODS = 1024
"""Above any node's pod limit (kubelet's default is 110; cloud providers allow up to 250+)."""
MAX_TOKEN_BYTES = 64 * 2**10
MAX_ERROR_BODY = 64 * 2**10
"""Read of an error answer's body, for the message of its `Status`."""
_CHUNK = 64 * 2**10

ANNOTATION_PREFIX = "jouleprobe.io/"
SCRAPE = ANNOTATION_PREFIX + "scrape"
PORT = ANNOTATION_PREFIX + "port"
PATH = ANNOTATION_PREFIX + "path"
SCHEME = ANNOTATION_PREFIX + "scheme"
INTERVAL = ANNOTATION_PREFIX + "interval"
TRACE = ANNOTATION_PREFIX + "trace"
ANNOTATIONS = (SCRAPE, PORT, PATH, SCHEME, INTERVAL, TRACE)
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
"""On a static pod's mirror: the UID the kubelet runs the pod under."""
DEFAULT_PATH = "/metrics"


def _scrape_table_interval() -> float:
    (interval,) = (f.default for f in dataclasses.fields(ScrapeTable) if f.name == "interval")
    assert isinstance(interval, float), interval
    return interval


DEFAULT_INTERVAL = _scrape_table_interval()
"""A `[[scrape]]` table's own default, so that both ways of naming a server scrape alike."""
MIN_INTERVAL, MAX_INTERVAL = 1.0, 3600.0
MAX_TRACE_CHARS = 256
MAX_PATH_CHARS = 1024

_RUNTIMES: dict[str, Runtime] = {"containerd": "containerd", "cri-o": "cri-o", "docker": "docker"}

Reason = Literal[
    "not_in_cluster", "no_node_name", "no_token", "unauthorized", "forbidden", "unavailable",
    "timeout", "bad_response", "too_large",
]
ContainerKind = Literal["container", "init", "ephemeral"]


class KubernetesError(Exception):
    """The pods of this node could not be listed; `reason` says why, the message what to do.

    `not_in_cluster`: no KUBERNETES_SERVICE_HOST/PORT (not in a pod); `no_node_name`: no
    NODE_NAME; `no_token`: the service account's token or CA is not mounted, or unreadable;
    `unauthorized` (401): the token is not accepted; `forbidden` (403): RBAC lets the account
    not list pods; `unavailable`: no connection, TLS refused, 429 or 5xx; `timeout`; `bad_response`:
    an answer that is not a PodList of this node; `too_large`: more than the bounds allow.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class ApiServer:
    """Where and how to ask the API server for this node's pods."""

    url: str
    """`https://<host>:<port>` (or `http://` for a local double), no path."""
    node: str
    """The node's name, as the pods' `spec.nodeName` has it."""
    token_file: Path = TOKEN_FILE
    ca_file: Path | None = CA_FILE
    """The CA the server's certificate is checked against; None: the system's CAs."""

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, service_account: Path = SERVICE_ACCOUNT
    ) -> ApiServer:
        """The settings a pod finds in its environment and service-account mount; raises
        KubernetesError naming what is missing."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip()
        if not host or not port:
            missing = " and ".join(name for name, value in (
                ("KUBERNETES_SERVICE_HOST", host), ("KUBERNETES_SERVICE_PORT", port)) if not value)
            raise KubernetesError("not_in_cluster", (
                f"{missing} not set: the agent is not running in a Kubernetes pod (the kubelet "
                "sets both in every container), so it cannot list the node's pods"
            ))
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise KubernetesError("not_in_cluster", (
                f"KUBERNETES_SERVICE_PORT={port!r} is not a port number"
            ))
        node = env.get("NODE_NAME", "").strip()
        if not node:
            raise KubernetesError("no_node_name", (
                "NODE_NAME not set: give the agent's container the env NODE_NAME from the "
                "downward API (valueFrom: fieldRef: fieldPath: spec.nodeName), as "
                "deploy/kubernetes/daemonset.yaml does"
            ))
        token_file, ca_file = service_account / "token", service_account / "ca.crt"
        for path, what in ((token_file, "token"), (ca_file, "CA certificate")):
            if not path.is_file():
                raise KubernetesError("no_token", (
                    f"no service-account {what} at {path}: set automountServiceAccountToken: "
                    "true on the agent's pod (the pod list needs the token)"
                ))
        return cls(f"https://{_url_host(host)}:{int(port)}", node, token_file, ca_file)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A port a container declares (`spec.containers[].ports[]`)."""

    port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class KubeContainer:
    """One container of a pod, as the API server lists it."""

    name: str
    kind: ContainerKind
    container_id: str | None
    """The runtime's id without its `<runtime>://` prefix; None before it has started."""
    runtime: Runtime | None
    """From the id's prefix; None where it names no runtime the cgroup reader knows."""
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod on this node, with what naming and scraping need."""

    uid: str
    namespace: str
    name: str
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown."""
    pod_ip: str
    """`status.podIP`; "" before the pod has one."""
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    containers: tuple[KubeContainer, ...] = ()
    """Containers, then init containers, then ephemeral containers, each in spec order."""

    @property
    def ports(self) -> tuple[ContainerPort, ...]:
        """The ports its (non-init) containers declare, in order."""
        return tuple(port for container in self.containers if container.kind == "container"
                     for port in container.ports)


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """An annotated inference server to scrape."""

    namespace: str
    pod: str
    pod_uid: str
    kind: ScrapeKind
    url: str
    interval: float
    trace: str = ""
    """The `[[trace]]` service of the same server; "" for none."""


@dataclass(frozen=True, slots=True, order=True)
class BadAnnotation:
    """Why an annotated pod is not scraped: one wrong annotation."""

    namespace: str
    pod: str
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Scrapes:
    """The annotated pods of a node: those to scrape, and why the others are not."""

    targets: tuple[ScrapeTarget, ...]
    bad: tuple[BadAnnotation, ...]


@dataclass(frozen=True, slots=True)
class NodePods:
    """The pods of one node, at one list."""

    node: str
    pods: tuple[Pod, ...]
    """Sorted by namespace and name."""
    resource_version: str = ""
    _by_uid: dict[str, Pod] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_uid: dict[str, Pod] = {}
        for pod in self.pods:
            mirror = pod.annotations.get(MIRROR_ANNOTATION, "")
            if mirror:
                by_uid.setdefault(mirror.lower(), pod)
            by_uid[pod.uid.lower()] = pod
        object.__setattr__(self, "_by_uid", by_uid)

    def pod(self, uid: str) -> Pod | None:
        """The pod with this UID (or, for a static pod, the UID the kubelet runs it under)."""
        return self._by_uid.get(uid.lower())

    def name_of(self, pod_container: PodContainer) -> tuple[str, str, str] | None:
        """(namespace, pod, container) of a container its cgroup names; container "" for a
        process in the pod's own cgroup. None where the pod, or its container id, is unknown
        (a pod or a restart newer than this list, a sandbox's pause process)."""
        pod = self.pod(pod_container.pod_uid)
        if pod is None:
            return None
        if pod_container.container_id is None:
            return pod.namespace, pod.name, ""
        wanted = pod_container.container_id.lower()
        for container in pod.containers:
            if container.container_id is not None and container.container_id.lower() == wanted:
                return pod.namespace, pod.name, container.name
        return None

    def scrapes(self) -> Scrapes:
        """The annotated Running pods with an IP: a target for each, or why not."""
        targets: list[ScrapeTarget] = []
        bad: list[BadAnnotation] = []
        for pod in self.pods:
            found = scrape_target(pod)
            if isinstance(found, ScrapeTarget):
                targets.append(found)
            elif found is not None:
                bad.extend(found)
        return Scrapes(tuple(targets), tuple(bad))


def list_node_pods(
    server: ApiServer, *, timeout_s: float = 10.0, max_bytes: int = MAX_RESPONSE_BYTES,
    max_pods: int = MAX_PODS,
) -> NodePods:
    """The pods of `server.node`, from one list call (blocking, within `timeout_s` in all);
    raises KubernetesError, saying why, where they cannot be listed."""
    token = _read_token(server.token_file)
    body = _get(server, token, timeout_s, max_bytes)
    return parse_pod_list(body, server.node, max_pods=max_pods)


def list_url(server: ApiServer) -> str:
    """The list call's URL: this node's pods, from the API server's watch cache."""
    query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={server.node}",
                                    "resourceVersion": "0"})
    return f"{server.url.rstrip('/')}{PODS_PATH}?{query}"


def parse_pod_list(body: bytes, node: str, *, max_pods: int = MAX_PODS) -> NodePods:
    """A PodList's JSON, every pod on `node`; raises KubernetesError where it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, too deep
        raise KubernetesError("bad_response", f"the pod list is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("kind") != "PodList":
        kind = document.get("kind") if isinstance(document, dict) else type(document).__name__
        raise KubernetesError("bad_response", f"the answer is not a PodList (kind {kind!r})")
    items = document.get("items")
    if items is None:
        items = []  # an empty list is serialised as "items": null by some servers
    if not isinstance(items, list):
        raise KubernetesError("bad_response", "the PodList's items are not a list")
    if len(items) > max_pods:
        raise KubernetesError("too_large", (
            f"the API server listed {len(items)} pods on node {node}, more than {max_pods}"
        ))
    pods: list[Pod] = []
    for index, item in enumerate(items):
        try:
            pod, pod_node = _pod(item)
        except _Malformed as exc:
            raise KubernetesError("bad_response", f"pod {index} of the list: {exc}") from None
        if pod_node != node:
            raise KubernetesError("bad_response", (
                f"the API server listed pod {pod.namespace}/{pod.name} of node {pod_node!r} "
                f"for node {node!r}: does something between the agent and the API server drop "
                "the fieldSelector?"
            ))
        pods.append(pod)
    metadata = document.get("metadata")
    version = metadata.get("resourceVersion", "") if isinstance(metadata, dict) else ""
    return NodePods(node, tuple(sorted(pods, key=lambda p: (p.namespace, p.name, p.uid))),
                    version if isinstance(version, str) else "")


_Wrong = Callable[[str, str], None]
"""Records a bad annotation: (key, reason)."""


def scrape_target(pod: Pod) -> ScrapeTarget | list[BadAnnotation] | None:
    """The pod's scrape target; its bad annotations instead, where any is wrong; None where
    it has no `jouleprobe.io/` annotation, is not Running or has no IP."""
    ours = {key: value for key, value in pod.annotations.items()
            if key.startswith(ANNOTATION_PREFIX)}
    if not ours or pod.phase != "Running" or not pod.pod_ip:
        return None
    try:
        address = ipaddress.ip_address(pod.pod_ip)
    except ValueError:
        return None  # not an IP the API server would write: no pod to reach
    bad: list[BadAnnotation] = []

    def wrong(key: str, reason: str) -> None:
        bad.append(BadAnnotation(pod.namespace, pod.name, key, reason))

    for key in sorted(ours.keys() - set(ANNOTATIONS)):
        wrong(key, f"unknown annotation (known: {', '.join(ANNOTATIONS)})")
    kind = ours.get(SCRAPE, "").strip()
    if SCRAPE not in ours:
        wrong(SCRAPE, f"missing: the pod has {', '.join(sorted(ours))} but no {SCRAPE}")
    elif kind not in SCRAPE_KINDS:
        wrong(SCRAPE, f"{kind!r} is not a kind of server: {', '.join(SCRAPE_KINDS)}")
    port = _port(pod, ours.get(PORT), wrong)
    path = ours.get(PATH, DEFAULT_PATH).strip()
    if not path.startswith("/") or len(path) > MAX_PATH_CHARS or not _plain(path):
        wrong(PATH, f"{_shown(path)} is not a URL path: it starts with /, with no spaces, "
              f"at most {MAX_PATH_CHARS} characters")
    scheme = ours.get(SCHEME, "http").strip()
    if scheme not in ("http", "https"):
        wrong(SCHEME, f"{_shown(scheme)} is neither http nor https")
    interval = _interval(ours.get(INTERVAL), wrong)
    trace = ours.get(TRACE, "").strip()
    if TRACE in ours and (not trace or len(trace) > MAX_TRACE_CHARS or not trace.isprintable()):
        wrong(TRACE, f"{_shown(trace)} is not a service name: 1 to {MAX_TRACE_CHARS} "
              "printable characters")
    if bad:
        return bad
    host = f"[{address}]" if address.version == 6 else str(address)
    return ScrapeTarget(pod.namespace, pod.name, pod.uid, cast(ScrapeKind, kind),
                        f"{scheme}://{host}:{port}{path}", interval, trace)


def _port(pod: Pod, value: str | None, wrong: _Wrong) -> int:
    declared = pod.ports
    if value is None:
        tcp = [port.port for port in declared if port.protocol == "TCP"]
        if not tcp:
            wrong(PORT, f"not set, and the pod declares no TCP container port: set {PORT}")
            return 0
        return tcp[0]
    value = value.strip()
    if value.isdigit() and value.isascii():
        number = int(value)
        if 0 < number < 65536:
            return number
        wrong(PORT, f"{number} is not a port number (1 to 65535)")
        return 0
    named = [port.port for port in declared if port.name and port.name == value]
    if not named:
        names = ", ".join(sorted({port.name for port in declared if port.name})) or "none"
        wrong(PORT, f"{_shown(value)} is neither a port number nor the name of a declared "
              f"container port (declared: {names})")
        return 0
    return named[0]


def _interval(value: str | None, wrong: _Wrong) -> float:
    if value is None:
        return DEFAULT_INTERVAL
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:  # NaN too
        wrong(INTERVAL, f"{_shown(value)} is not a number of seconds from {MIN_INTERVAL:g} to "
              f"{MAX_INTERVAL:g}")
        return DEFAULT_INTERVAL
    return seconds


def _plain(text: str) -> bool:
    return text.isprintable() and not any(char.isspace() for char in text)


def _shown(value: str, limit: int = 64) -> str:
    """A value in a message: quoted, and cut where it is long."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


class _Malformed(ValueError):
    pass


def _pod(item: object) -> tuple[Pod, str]:
    """A PodList item, and its node."""
    item = _mapping(item, "the pod")
    metadata = _mapping(item.get("metadata"), "metadata")
    spec = _mapping(item.get("spec", {}), "spec")
    status = _mapping(item.get("status", {}), "status")
    uid, namespace, name = (_string(metadata, key, required=True)
                            for key in ("uid", "namespace", "name"))
    containers: list[KubeContainer] = []
    for kind, spec_key, status_key in _CONTAINER_LISTS:
        containers.extend(_containers(kind, _list(spec, spec_key), _list(status, status_key)))
    pod = Pod(uid, namespace, name, _string(status, "phase"), _string(status, "podIP"),
              _strings(metadata, "annotations"), _strings(metadata, "labels"),
              tuple(containers))
    return pod, _string(spec, "nodeName")


_CONTAINER_LISTS: tuple[tuple[ContainerKind, str, str], ...] = (
    ("container", "containers", "containerStatuses"),
    ("init", "initContainers", "initContainerStatuses"),
    ("ephemeral", "ephemeralContainers", "ephemeralContainerStatuses"),
)


def _containers(kind: ContainerKind, specs: list[Any], statuses: list[Any]
                ) -> list[KubeContainer]:
    ids: dict[str, str] = {}
    for status in statuses:
        status = _mapping(status, "a container status")
        ids[_string(status, "name", required=True)] = _string(status, "containerID")
    found: list[KubeContainer] = []
    for spec in specs:
        spec = _mapping(spec, "a container")
        name = _string(spec, "name", required=True)
        ports = tuple(_container_port(port) for port in _list(spec, "ports"))
        found.append(_container(name, kind, ids.pop(name, ""), ports))
    # A status whose container the spec does not list (never seen): keep its id all the same.
    found.extend(_container(name, kind, cid, ()) for name, cid in ids.items())
    return found


def _container(name: str, kind: ContainerKind, cid: str, ports: tuple[ContainerPort, ...]
               ) -> KubeContainer:
    prefix, separator, bare = cid.partition("://")
    if not separator:
        prefix, bare = "", cid
    return KubeContainer(name, kind, bare or None, _RUNTIMES.get(prefix), ports)


def _container_port(port: object) -> ContainerPort:
    port = _mapping(port, "a container port")
    number = port.get("containerPort")
    if isinstance(number, bool) or not isinstance(number, int):
        raise _Malformed(f"containerPort {number!r} is not a number")
    return ContainerPort(number, _string(port, "name"), _string(port, "protocol") or "TCP")


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not an object")
    return value


def _list(parent: dict[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{key} is not a list")
    return value


def _string(parent: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = parent.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _Malformed(f"{key} {value!r} is not a string" + (" (required)" if required else ""))
    return value


def _strings(parent: dict[str, Any], key: str) -> dict[str, str]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Malformed(f"{key} are not strings")
    return value


def _url_host(host: str) -> str:
    """A host for a URL: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _read_token(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise KubernetesError("no_token", (
            f"no service-account token at {path}: set automountServiceAccountToken: true on the "
            "agent's pod"
        )) from None
    except OSError as exc:
        raise KubernetesError("no_token", f"cannot read the token {path}: {exc}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or len(raw) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise KubernetesError("no_token", (
            f"the token at {path} is empty or not a bearer token: is the service account's "
            "volume the kubelet's projected token?"
        ))
    return token


def _get(server: ApiServer, token: str, timeout_s: float, max_bytes: int) -> bytes:
    """The body of a 200 answer to the list call; raises KubernetesError otherwise."""
    url = list_url(server)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KubernetesError("not_in_cluster", f"{server.url!r} is not an http(s) URL")
    deadline = time.monotonic() + timeout_s
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        try:
            context = ssl.create_default_context(
                cafile=str(server.ca_file) if server.ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise KubernetesError("no_token", (
                f"cannot load the service-account CA {server.ca_file}: {exc}"
            )) from None
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout_s, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    target = f"{parts.path}?{parts.query}"
    try:
        connection.request("GET", target, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json",
            "Accept-Encoding": "identity", "User-Agent": "jouleprobe",
        })
        response = connection.getresponse()
        if response.status != http.HTTPStatus.OK:
            detail = _status_message(_read(connection, response, url, MAX_ERROR_BODY,
                                           deadline, truncate=True))
            raise _status_error(url, response.status, response.reason, detail)
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _too_large(url, max_bytes)
        body = _read(connection, response, url, max_bytes, deadline)
    except TimeoutError:
        raise KubernetesError("timeout", (
            f"the API server did not answer GET {url} within {timeout_s:g} s"
        )) from None
    except ssl.SSLCertVerificationError as exc:
        raise KubernetesError("unavailable", (
            f"the API server's certificate is not signed by {server.ca_file} or does not name "
            f"{parts.hostname}: {exc.verify_message}"
        )) from None
    except (OSError, http.client.HTTPException) as exc:
        raise KubernetesError("unavailable", (
            f"GET {url} failed: {type(exc).__name__}: {exc}"
        )) from None
    finally:
        connection.close()
    return body


def _read(connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
          url: str, limit: int, deadline: float, *, truncate: bool = False) -> bytes:
    """At most `limit` bytes of the body, by `deadline`; too_large past it (or the first
    `limit` bytes, with `truncate`)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if connection.sock is not None:
            connection.sock.settimeout(left)
        chunk = response.read1(min(_CHUNK, limit + 1 - size))  # one recv: the deadline holds
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                return b"".join(chunks)[:limit]
            raise _too_large(url, limit)


def _too_large(url: str, limit: int) -> KubernetesError:
    return KubernetesError("too_large", (
        f"the pod list from {url} is larger than {limit} bytes"
    ))


def _status_message(body: bytes) -> str:
    """The `message` of a Kubernetes `Status` answer, else the start of the body."""
    try:
        status = json.loads(body)
    except (ValueError, RecursionError):
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])[:500]
    return body[:200].decode("utf-8", "replace")


def _status_error(url: str, status: int, phrase: str, detail: str) -> KubernetesError:
    said = f"{status} {phrase}" + (f": {detail}" if detail else "")
    if status == http.HTTPStatus.UNAUTHORIZED:
        return KubernetesError("unauthorized", (
            f"the API server did not accept the service-account token ({said}): an expired "
            "token that is not being rotated, or one of another cluster"
        ))
    if status == http.HTTPStatus.FORBIDDEN:
        return KubernetesError("forbidden", (
            f"the agent's service account may not list pods ({said}): apply "
            "deploy/kubernetes/rbac.yaml (a ClusterRole with get and list on pods, bound to it)"
        ))
    if status == http.HTTPStatus.TOO_MANY_REQUESTS or status >= 500:
        return KubernetesError("unavailable", f"GET {url}: the API server answered {said}")
    return KubernetesError("bad_response", f"GET {url}: the API server answered {said}")
