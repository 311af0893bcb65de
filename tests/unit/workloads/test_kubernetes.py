"""The pod list of this node from the API server, against a real HTTP(S) server on
127.0.0.1 that answers with an EKS API server's real PodList (tests/fixtures/kubernetes)
and checks what the client asks: the path, the node's field selector, the bearer token."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from scripted import FIXTURES

from agent.workloads.cgroups import PodContainer, workload_from_cgroup
from agent.workloads.kubernetes import (
    DEFAULT_INTERVAL,
    INTERVAL,
    PATH,
    PORT,
    SCHEME,
    SCRAPE,
    TRACE,
    ApiServer,
    BadAnnotation,
    ContainerPort,
    KubeContainer,
    KubernetesError,
    NodePods,
    Pod,
    ScrapeTarget,
    list_node_pods,
    parse_pod_list,
    scrape_target,
)
from agent.workloads.naming import WorkloadName, of_process

CAPTURE = FIXTURES / "kubernetes" / "eks_node_pods.json"
ANNOTATED = FIXTURES / "kubernetes" / "eks_node_pods_annotated.json"
NODE = "ip-172-26-67-126.ec2.internal"
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.e30.c2lnbmF0dXJl"

AWS_NODE_UID = "8c9cfe2b-0b80-474a-8f70-588118892943"
AWS_NODE_ID = "45e81881c04179fc361f68628d5cac879796c448b8074fa0cc67d4733bd0f657"
AWS_INIT_ID = "7d756795b2155892a5550721bbd2291f060b506748f7eb2d12a8dce466c10665"
COREDNS_UID = "7461d1f1-76f1-446c-9d4b-ed86a5fbc765"
STRESS_UID = "9a83f44d-f904-44a2-b276-15fc4d43593c"
STRESS_ID = "6f33e55dfc4792c5de9332b92ea659945a4ddfb23e80ee014a704bebac925ccc"
STRESS_OLD_ID = "e9281923665674b0eb6826b2cc07f4c914fe3944b20136f984c76f68f6a495b9"


@dataclass
class Behaviour:
    """How the double answers; what it was asked is appended to `requests`."""

    body: bytes = b""
    status: int = 200
    delay_s: float = 0.0
    """Before the status line."""
    chunked: bool = False
    """Chunked transfer (as the API server sends large lists), with no Content-Length."""
    dribble_s: float = 0.0
    """Between two 1 KiB chunks of the body."""
    content_length: int | None = None
    """Announced instead of the body's length."""
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        behaviour = self.server.behaviour
        behaviour.requests.append((self.path, dict(self.headers.items())))
        time.sleep(behaviour.delay_s)
        body = behaviour.body
        try:
            self.send_response(behaviour.status)
            self.send_header("Content-Type", "application/json")
            if behaviour.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                length = behaviour.content_length
                self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            for start in range(0, len(body), 1024):
                piece = body[start:start + 1024]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece)
                                 if behaviour.chunked else piece)
                self.wfile.flush()
                time.sleep(behaviour.dribble_s)
            if behaviour.chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up, as it should

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


@contextmanager
def serve(behaviour: Behaviour, *, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """The double's base URL while it runs; `tls` = (certificate, key) makes it HTTPS."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = behaviour
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return path


def api(url: str, token_file: Path, ca_file: Path | None = None, node: str = NODE) -> ApiServer:
    return ApiServer(url, node, token_file, ca_file)


def listed(behaviour: Behaviour, token_file: Path, **kwargs: Any) -> NodePods:
    with serve(behaviour) as url:
        return list_node_pods(api(url, token_file), **kwargs)


def failure(behaviour: Behaviour, token_file: Path, **kwargs: Any) -> KubernetesError:
    with pytest.raises(KubernetesError) as caught:
        listed(behaviour, token_file, **kwargs)
    return caught.value


def capture() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(CAPTURE.read_bytes())
    return document


def annotated_pods() -> NodePods:
    return parse_pod_list(ANNOTATED.read_bytes(), NODE)


def pod_named(pods: NodePods, name: str) -> Pod:
    (pod,) = (pod for pod in pods.pods if pod.name == name)
    return pod


# The list call


def test_it_asks_for_this_nodes_pods_with_the_token_and_reads_the_capture(
    token_file: Path,
) -> None:
    behaviour = Behaviour(body=CAPTURE.read_bytes())
    pods = listed(behaviour, token_file)

    ((target, headers),) = behaviour.requests
    path, _, query = target.partition("?")
    assert path == "/api/v1/pods"
    assert urllib.parse.parse_qs(query) == {"fieldSelector": [f"spec.nodeName={NODE}"],
                                            "resourceVersion": ["0"]}
    assert "fieldSelector=spec.nodeName%3D" in query
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/json"

    assert pods.node == NODE and pods.resource_version == "1171150"
    assert [(pod.namespace, pod.name) for pod in pods.pods] == [
        ("cloudability", "cloudability-metrics-agent-f564d999d-8qwp8"),
        ("kube-system", "aws-node-48cfw"),
        ("kube-system", "coredns-7f5998f4c-5fblt"),
        ("kube-system", "coredns-7f5998f4c-6bb5v"),
        ("kube-system", "kube-proxy-g6lc7"),
        ("stress-test", "stress2"),
    ]
    aws = pods.pod(AWS_NODE_UID)
    assert aws is not None
    assert (aws.phase, aws.pod_ip) == ("Running", "172.26.67.126")
    assert aws.labels == {"app.kubernetes.io/name": "aws-node",
                          "controller-revision-hash": "7fdb5cc6c5", "k8s-app": "aws-node",
                          "pod-template-generation": "2"}
    assert aws.annotations == {"kubernetes.io/psp": "eks.privileged"}
    assert aws.containers == (
        KubeContainer("aws-node", "container", AWS_NODE_ID, "docker",
                      (ContainerPort(61678, "metrics", "TCP"),)),
        KubeContainer("aws-vpc-cni-init", "init", AWS_INIT_ID, "docker"),
    )
    coredns = pods.pod(COREDNS_UID)
    assert coredns is not None and coredns.ports == (
        ContainerPort(53, "dns", "UDP"), ContainerPort(53, "dns-tcp", "TCP"),
        ContainerPort(9153, "metrics", "TCP"))
    # Redacted in the capture itself: kept as written, it names no cgroup's container.
    first = pod_named(pods, "cloudability-metrics-agent-f564d999d-8qwp8")
    assert first.containers[0].container_id == "..."


def test_a_chunked_answer_is_read_whole(token_file: Path) -> None:
    pods = listed(Behaviour(body=CAPTURE.read_bytes(), chunked=True), token_file)
    assert len(pods.pods) == 6


def test_the_token_is_read_again_on_every_call(token_file: Path) -> None:
    behaviour = Behaviour(body=CAPTURE.read_bytes())
    with serve(behaviour) as url:
        server = api(url, token_file)
        list_node_pods(server)
        token_file.write_text("rotated-token\n")  # the kubelet rotates the projected token
        list_node_pods(server)
    assert [headers["Authorization"] for _, headers in behaviour.requests] == [
        f"Bearer {TOKEN}", "Bearer rotated-token"]


def test_container_ids_lose_their_runtimes_prefix() -> None:
    document = capture()
    statuses = document["items"][5]["status"]["containerStatuses"]
    for prefix, runtime in (("containerd://", "containerd"), ("cri-o://", "cri-o"),
                            ("docker://", "docker"), ("", None), ("rkt://", None)):
        statuses[0]["containerID"] = prefix + STRESS_ID
        pod = parse_pod_list(json.dumps(document).encode(), NODE).pod(STRESS_UID)
        assert pod is not None
        assert (pod.containers[0].container_id, pod.containers[0].runtime) == (STRESS_ID, runtime)
    statuses[0]["containerID"] = ""  # not started yet
    pod = parse_pod_list(json.dumps(document).encode(), NODE).pod(STRESS_UID)
    assert pod is not None and pod.containers[0].container_id is None


def test_ephemeral_containers_are_listed_too() -> None:
    document = capture()
    item = document["items"][5]
    item["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox"}]
    item["status"]["ephemeralContainerStatuses"] = [
        {"name": "debugger", "containerID": f"containerd://{STRESS_OLD_ID}"}]
    pod = parse_pod_list(json.dumps(document).encode(), NODE).pod(STRESS_UID)
    assert pod is not None
    assert pod.containers[-1] == KubeContainer("debugger", "ephemeral", STRESS_OLD_ID,
                                               "containerd")


# Naming what the cgroups say


def test_names_by_pod_uid_and_container_id() -> None:
    pods = parse_pod_list(CAPTURE.read_bytes(), NODE)
    assert pods.name_of(PodContainer(AWS_NODE_UID, AWS_NODE_ID, None)) == (
        "kube-system", "aws-node-48cfw", "aws-node")
    assert pods.name_of(PodContainer(AWS_NODE_UID, AWS_INIT_ID, "docker")) == (
        "kube-system", "aws-node-48cfw", "aws-vpc-cni-init")
    assert pods.name_of(PodContainer(STRESS_UID, STRESS_ID, "docker")) == (
        "stress-test", "stress2", "stress2")
    # A process in the pod's own cgroup: the pod, no container.
    assert pods.name_of(PodContainer(AWS_NODE_UID, None, None)) == (
        "kube-system", "aws-node-48cfw", "")
    # The container before its restart, or one of another pod: not named.
    assert pods.name_of(PodContainer(STRESS_UID, STRESS_OLD_ID, "docker")) is None
    assert pods.name_of(PodContainer(AWS_NODE_UID, STRESS_ID, "docker")) is None
    assert pods.name_of(PodContainer("00000000-0000-0000-0000-000000000000", None, None)) is None


def test_a_processs_cgroup_is_named_through_the_pod_list() -> None:
    pods = parse_pod_list(CAPTURE.read_bytes(), NODE)
    slice_ = "kubepods-burstable-pod" + AWS_NODE_UID.replace("-", "_") + ".slice"
    workload = workload_from_cgroup(
        f"0::/kubepods.slice/kubepods-burstable.slice/{slice_}/docker-{AWS_NODE_ID}.scope\n")
    assert isinstance(workload, PodContainer)
    assert of_process(workload, pods) == WorkloadName(
        "kube-system/aws-node-48cfw/aws-node", "pod", "kube-system", "aws-node-48cfw",
        "aws-node")


def test_a_static_pod_is_named_by_the_uid_the_kubelet_runs_it_under() -> None:
    document = capture()
    config_hash = "3ec997b76fb6ed3b78da8e0b5676dac4"
    document["items"][4]["metadata"]["annotations"]["kubernetes.io/config.mirror"] = config_hash
    pods = parse_pod_list(json.dumps(document).encode(), NODE)
    kube_proxy_id = document["items"][4]["status"]["containerStatuses"][0]["containerID"]
    assert pods.name_of(PodContainer(config_hash, kube_proxy_id.removeprefix("docker://"),
                                     None)) == ("kube-system", "kube-proxy-g6lc7", "kube-proxy")


# Annotated servers


def test_the_annotated_pods_give_their_targets_and_whats_wrong() -> None:
    scrapes = annotated_pods().scrapes()
    assert scrapes.targets == (
        ScrapeTarget("kube-system", "aws-node-48cfw", AWS_NODE_UID, "triton",
                     "https://172.26.67.126:61678/v2/metrics", DEFAULT_INTERVAL),
        ScrapeTarget("kube-system", "coredns-7f5998f4c-5fblt", COREDNS_UID, "vllm",
                     "http://172.26.64.96:9153/metrics", 30.0, "vllm-chat"),
        ScrapeTarget("kube-system", "coredns-7f5998f4c-6bb5v",
                     "0683d51f-c7c0-4b14-99a0-2aa59f7f62df", "sglang",
                     "http://172.26.71.90:8080/metrics", DEFAULT_INTERVAL),
    )
    assert DEFAULT_INTERVAL == 15.0
    assert [(bad.pod, bad.key) for bad in scrapes.bad] == [
        ("kube-proxy-g6lc7", SCRAPE), ("kube-proxy-g6lc7", PORT), ("kube-proxy-g6lc7", INTERVAL),
        ("stress2", PORT),
    ]
    assert "'ollama'" in scrapes.bad[0].reason and "vllm" in scrapes.bad[0].reason
    assert "no TCP container port" in scrapes.bad[3].reason


def test_the_capture_without_annotations_has_nothing_to_scrape() -> None:
    scrapes = parse_pod_list(CAPTURE.read_bytes(), NODE).scrapes()
    assert scrapes.targets == () and scrapes.bad == ()


def coredns_with(**annotations: str) -> Pod:
    """The annotated CoreDNS pod (vllm on port `metrics`), its jouleprobe.io/ annotations
    replaced by `annotations` (keys without the prefix)."""
    pod = pod_named(annotated_pods(), "coredns-7f5998f4c-5fblt")
    kept = {key: value for key, value in pod.annotations.items()
            if not key.startswith("jouleprobe.io/")}
    return dataclasses.replace(pod, annotations=kept | {
        f"jouleprobe.io/{key}": value for key, value in annotations.items()})


@pytest.mark.parametrize(("annotations", "url"), [
    ({"scrape": "tgi"}, "http://172.26.64.96:53/metrics"),  # the first TCP port, not UDP's 53
    ({"scrape": "tgi", "port": "dns-tcp"}, "http://172.26.64.96:53/metrics"),
    ({"scrape": "llamacpp", "port": " 8080 ", "path": "/stats/prometheus"},
     "http://172.26.64.96:8080/stats/prometheus"),
    ({"scrape": "triton", "scheme": "https", "port": "8002"}, "https://172.26.64.96:8002/metrics"),
])
def test_good_annotations(annotations: dict[str, str], url: str) -> None:
    target = scrape_target(coredns_with(**annotations))
    assert isinstance(target, ScrapeTarget)
    assert (target.url, target.kind) == (url, annotations["scrape"])
    assert (target.interval, target.trace) == (DEFAULT_INTERVAL, "")


def test_an_interval_and_a_trace_are_taken() -> None:
    target = scrape_target(coredns_with(scrape="vllm", interval="2.5", trace="chat"))
    assert isinstance(target, ScrapeTarget) and (target.interval, target.trace) == (2.5, "chat")


@pytest.mark.parametrize(("key", "value"), [
    (SCRAPE, "ollama"), (SCRAPE, ""), (SCRAPE, "VLLM"),
    (PORT, "0"), (PORT, "65536"), (PORT, "-1"), (PORT, "http"), (PORT, "８０"), (PORT, ""),
    (PATH, "metrics"), (PATH, "/a b"), (PATH, "/" + "x" * 2000), (PATH, "/a\nb"),
    (SCHEME, "ftp"), (SCHEME, "HTTP"),
    (INTERVAL, "0"), (INTERVAL, "0.5"), (INTERVAL, "3601"), (INTERVAL, "nan"), (INTERVAL, "inf"),
    (INTERVAL, "soon"), (INTERVAL, "30s"),
    (TRACE, ""), (TRACE, "x" * 300), (TRACE, "a\tb"),
    ("jouleprobe.io/prot", "8000"),
])
def test_each_bad_annotation_is_reported_and_the_pod_not_scraped(key: str, value: str) -> None:
    annotations = {"scrape": "vllm", "port": "metrics"} | {key.removeprefix("jouleprobe.io/"):
                                                          value}
    found = scrape_target(coredns_with(**annotations))
    assert isinstance(found, list)
    (bad,) = found
    assert (bad.namespace, bad.pod, bad.key) == ("kube-system", "coredns-7f5998f4c-5fblt", key)
    assert bad.reason


def test_annotations_without_a_kind_are_reported() -> None:
    found = scrape_target(coredns_with(port="8000"))
    assert found == [BadAnnotation("kube-system", "coredns-7f5998f4c-5fblt", SCRAPE, (
        f"missing: the pod has {PORT} but no {SCRAPE}"))]


def test_pods_not_running_or_without_an_ip_or_annotations_are_skipped() -> None:
    pod = coredns_with(scrape="vllm", port="bogus")  # bad, were it looked at
    assert scrape_target(dataclasses.replace(pod, phase="Pending")) is None
    assert scrape_target(dataclasses.replace(pod, phase="Succeeded")) is None
    assert scrape_target(dataclasses.replace(pod, pod_ip="")) is None
    assert scrape_target(dataclasses.replace(pod, pod_ip="not-an-ip")) is None
    assert scrape_target(coredns_with()) is None
    assert isinstance(scrape_target(pod), list)


def test_a_pod_with_an_ipv6_address_gets_a_bracketed_url() -> None:
    pod = dataclasses.replace(coredns_with(scrape="vllm", port="metrics"), pod_ip="fd00:10::7")
    target = scrape_target(pod)
    assert isinstance(target, ScrapeTarget) and target.url == "http://[fd00:10::7]:9153/metrics"


# Each failure, with its reason


def test_401_is_unauthorized(token_file: Path) -> None:
    status = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    error = failure(Behaviour(status=401, body=status.encode()), token_file)
    assert error.reason == "unauthorized" and "401" in str(error)


def test_403_is_forbidden_and_says_what_the_api_server_said(token_file: Path) -> None:
    message = ('pods is forbidden: User "system:serviceaccount:jouleprobe:jouleprobe" cannot '
               'list resource "pods" in API group "" at the cluster scope')
    status = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": message, "reason": "Forbidden", "code": 403})
    error = failure(Behaviour(status=403, body=status.encode()), token_file)
    assert error.reason == "forbidden"
    assert message in str(error) and "rbac.yaml" in str(error)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_are_unavailable(token_file: Path, status: int) -> None:
    assert failure(Behaviour(status=status, body=b"etcdserver: request timed out"),
                   token_file).reason == "unavailable"


def test_another_status_is_a_bad_response(token_file: Path) -> None:
    assert failure(Behaviour(status=404, body=b"404 page not found"),
                   token_file).reason == "bad_response"


def test_nothing_listening_is_unavailable(token_file: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(KubernetesError) as caught:
        list_node_pods(api(f"http://127.0.0.1:{port}", token_file), timeout_s=2)
    assert caught.value.reason == "unavailable"


@pytest.mark.parametrize("body", [
    b"<html>502 Bad Gateway</html>", b"", b"\xff\xfe{", b"[" * 100_000,
    b'{"kind": "Status", "apiVersion": "v1"}', b'{"kind": "PodList", "items": {}}',
    b'{"kind": "PodList", "items": [{"metadata": {"name": "x"}}]}',
    b'{"kind": "PodList", "items": [7]}',
])
def test_garbage_is_a_bad_response(token_file: Path, body: bytes) -> None:
    assert failure(Behaviour(body=body), token_file).reason == "bad_response"


def test_pods_of_another_node_are_a_bad_response(token_file: Path) -> None:
    # As where something between the agent and the API server dropped the selector.
    behaviour = Behaviour(body=CAPTURE.read_bytes())
    with serve(behaviour) as url, pytest.raises(KubernetesError) as caught:
        list_node_pods(api(url, token_file, node="ip-10-0-0-1"))
    assert caught.value.reason == "bad_response" and "fieldSelector" in str(caught.value)
    ((target, _),) = behaviour.requests
    assert "fieldSelector=spec.nodeName%3Dip-10-0-0-1&" in target


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_answer_is_too_large(token_file: Path, chunked: bool) -> None:
    error = failure(Behaviour(body=CAPTURE.read_bytes(), chunked=chunked), token_file,
                    max_bytes=10_000)
    assert error.reason == "too_large"


def test_an_announced_oversized_answer_is_refused_before_reading(token_file: Path) -> None:
    error = failure(Behaviour(body=b"{}", content_length=64 * 2**20), token_file)
    assert error.reason == "too_large"


def test_too_many_pods_is_too_large(token_file: Path) -> None:
    error = failure(Behaviour(body=CAPTURE.read_bytes()), token_file, max_pods=5)
    assert error.reason == "too_large" and "6 pods" in str(error)


def test_a_slow_server_is_a_timeout(token_file: Path) -> None:
    started = time.monotonic()
    error = failure(Behaviour(body=CAPTURE.read_bytes(), delay_s=2.0), token_file, timeout_s=0.3)
    assert error.reason == "timeout"
    assert time.monotonic() - started < 1.9


def test_a_dribbling_server_is_a_timeout_within_the_whole_timeout(token_file: Path) -> None:
    # Each chunk comes well within the timeout; the whole body does not.
    started = time.monotonic()
    error = failure(Behaviour(body=CAPTURE.read_bytes(), dribble_s=0.05), token_file,
                    timeout_s=0.5)
    assert error.reason == "timeout"
    assert time.monotonic() - started < 1.5


def test_no_token_file_or_an_empty_one_is_no_token(tmp_path: Path, token_file: Path) -> None:
    behaviour = Behaviour(body=CAPTURE.read_bytes())
    assert failure(behaviour, tmp_path / "absent").reason == "no_token"
    token_file.write_text("\n")
    assert failure(behaviour, token_file).reason == "no_token"
    token_file.write_text("two words")
    assert failure(behaviour, token_file).reason == "no_token"
    assert behaviour.requests == []  # never sent without a token


# From the pod's environment


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(TOKEN)
    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return folder


IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
              "NODE_NAME": NODE}


def test_the_environment_of_a_pod_gives_the_server(service_account: Path) -> None:
    server = ApiServer.from_environment(IN_CLUSTER, service_account=service_account)
    assert server == ApiServer("https://10.96.0.1:443", NODE, service_account / "token",
                               service_account / "ca.crt")
    ipv6 = ApiServer.from_environment(IN_CLUSTER | {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1"},
                                      service_account=service_account)
    assert ipv6.url == "https://[fd00:10:96::1]:443"


@pytest.mark.parametrize(("environ", "reason", "named"), [
    ({"NODE_NAME": NODE}, "not_in_cluster", "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"),
    (IN_CLUSTER | {"KUBERNETES_SERVICE_HOST": ""}, "not_in_cluster", "KUBERNETES_SERVICE_HOST"),
    ({k: v for k, v in IN_CLUSTER.items() if k != "KUBERNETES_SERVICE_PORT"}, "not_in_cluster",
     "KUBERNETES_SERVICE_PORT"),
    (IN_CLUSTER | {"KUBERNETES_SERVICE_PORT": "https"}, "not_in_cluster", "'https'"),
    ({k: v for k, v in IN_CLUSTER.items() if k != "NODE_NAME"}, "no_node_name", "spec.nodeName"),
    (IN_CLUSTER | {"NODE_NAME": " "}, "no_node_name", "NODE_NAME"),
])
def test_what_the_environment_lacks_is_named(
    service_account: Path, environ: dict[str, str], reason: str, named: str,
) -> None:
    with pytest.raises(KubernetesError) as caught:
        ApiServer.from_environment(environ, service_account=service_account)
    assert caught.value.reason == reason and named in str(caught.value)


@pytest.mark.parametrize("missing", ["token", "ca.crt"])
def test_no_service_account_mount_is_no_token(service_account: Path, missing: str) -> None:
    (service_account / missing).unlink()
    with pytest.raises(KubernetesError) as caught:
        ApiServer.from_environment(IN_CLUSTER, service_account=service_account)
    assert caught.value.reason == "no_token"
    assert str(service_account / missing) in str(caught.value)
    assert "automountServiceAccountToken" in str(caught.value)


# Over TLS, checked against the service account's CA


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for the HTTPS double")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_against_the_service_accounts_ca(tmp_path: Path, token_file: Path) -> None:
    cert, key = certificate(tmp_path, "apiserver")
    other, _ = certificate(tmp_path, "other")
    behaviour = Behaviour(body=CAPTURE.read_bytes())
    with serve(behaviour, tls=(cert, key)) as url:
        pods = list_node_pods(api(url, token_file, ca_file=cert))
        assert len(pods.pods) == 6
        with pytest.raises(KubernetesError) as caught:
            list_node_pods(api(url, token_file, ca_file=other))
        assert caught.value.reason == "unavailable" and "certificate" in str(caught.value)
        (tmp_path / "bad.crt").write_text("not a certificate")
        with pytest.raises(KubernetesError) as caught:
            list_node_pods(api(url, token_file, ca_file=tmp_path / "bad.crt"))
        assert caught.value.reason == "no_token"
    assert len(behaviour.requests) == 1  # the token went to the verified server only
