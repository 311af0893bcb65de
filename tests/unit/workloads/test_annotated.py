"""The scrapers of annotated pods (`agent.app.annotated`): which servers of a real API
server's PodList (tests/fixtures/kubernetes) are scraped, and why the others are not; and
`AnnotatedScrapers` kept in step with the pod list and the kubelet's allocations, scraping a
real HTTP server on loopback that serves a real llama-server's captures."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fake_pynvml import FakeNvml
from kube_node import GPUS, NODE, PODS, UUIDS, Latest, allocated
from kube_node import api_server as kube_api_server
from podresources_server import Behaviour, Devices, PodSpec, serve
from prometheus_client import generate_latest
from scripted import FIXTURES, exposed_samples

from agent.app.annotated import (
    MAX_TARGETS,
    AnnotatedScrapers,
    AnnotatedStatus,
    describe,
    plan,
    source_name,
)
from agent.app.daemon import CoverageObserver, cancel, start_scrapers, trace_receiver
from agent.app.node import Node
from agent.config import load
from agent.devices.host import EstimatedHostSource
from agent.devices.nvml import NvmlGpuSource
from agent.intake.otlp.coverage import Coverage
from agent.intake.otlp.sources import PodGpus
from agent.intake.scrapers import WindowFigures
from agent.timeline import EnergyPoint, Timeline
from agent.workloads.kubernetes import TRACE, NodePods, ScrapeTarget, parse_pod_list
from agent.workloads.podresources import ContainerRef, DeviceHolders
from exporters.window_metrics import WindowMetrics

# Annotated pods of the capture (its README lists their annotations).
VLLM = ("kube-system", "coredns-7f5998f4c-5fblt")
"""vllm, port `metrics` (9153), interval 30, trace vllm-chat."""
SGLANG = ("kube-system", "coredns-7f5998f4c-6bb5v")
"""sglang, port 8080."""
TRITON = ("kube-system", "aws-node-48cfw")
"""triton over https at /v2/metrics."""
VLLM_UID = "7461d1f1-76f1-446c-9d4b-ed86a5fbc765"
BAD = {("kube-system", "kube-proxy-g6lc7"), ("stress-test", "stress2")}

LLAMA = [(FIXTURES / "metrics" / f"llamacpp_b11434_{when}.txt").read_text()
         for when in ("idle", "busy")]
"""Two scrapes of one real llama-server: idle, then after three chat completions."""
MODEL = "tiny"


def document() -> dict[str, Any]:
    loaded = json.loads(PODS.read_bytes())
    assert isinstance(loaded, dict)
    return loaded


def item(doc: dict[str, Any], pod: tuple[str, str]) -> dict[str, Any]:
    (found,) = [i for i in doc["items"]
                if (i["metadata"]["namespace"], i["metadata"]["name"]) == pod]
    assert isinstance(found, dict)
    return found


def listed(doc: dict[str, Any] | None = None) -> NodePods:
    return parse_pod_list(json.dumps(document() if doc is None else doc).encode(), NODE)


def pod_gpus(allocations: dict[str, DeviceHolders] | None, pods: NodePods | None = None
             ) -> PodGpus:
    return PodGpus(GPUS, Latest(pods), Latest(allocations))


def key(target: ScrapeTarget) -> tuple[str, str]:
    return target.namespace, target.pod


# --- plan ----------------------------------------------------------------------------------

def test_the_annotated_pods_with_gpus_are_scraped_the_others_said_why() -> None:
    pods = listed()
    status = plan(pods, pod_gpus(allocated((UUIDS[2], VLLM), (UUIDS[0], VLLM),
                                           (UUIDS[1], SGLANG))),
                  traces={"vllm-chat"})
    assert status.listed
    assert [(key(s.target), s.source, s.gpus, s.trace_source, s.untraced)
            for s in status.scraped] == [
        (VLLM, "scrape:vllm:kube-system/coredns-7f5998f4c-5fblt", (0, 2), "trace:vllm-chat", ""),
        (SGLANG, "scrape:sglang:kube-system/coredns-7f5998f4c-6bb5v", (1,), None, ""),
    ]
    (vllm, sglang) = (s.target for s in status.scraped)
    assert (vllm.kind, vllm.url, vllm.interval, vllm.pod_uid) == (
        "vllm", "http://172.26.64.96:9153/metrics", 30.0, VLLM_UID)
    assert (sglang.url, sglang.interval) == ("http://172.26.71.90:8080/metrics", 15.0)
    # The triton server holds no GPU: its windows' energy could not be measured.
    (unscraped,) = status.unscraped
    assert key(unscraped.target) == TRITON
    assert unscraped.reason == ("pod kube-system/aws-node-48cfw holds no GPU: the kubelet "
                                "allocated no nvidia.com/gpu to its containers")
    # The pods with wrong annotations: each wrong key, from the pod list.
    assert {(bad.namespace, bad.pod) for bad in status.bad} == BAD
    assert status.bad == pods.scrapes().bad and len(status.bad) == 4


def test_a_pod_of_mig_instances_or_of_another_nodes_gpus_is_not_scraped() -> None:
    mig = "MIG-9f1c2d3e-4b5a-5c6d-8e7f-0a1b2c3d4e5f"
    held = {mig: DeviceHolders(mig, "nvidia.com/mig-1g.10gb", (ContainerRef(*VLLM, "c"),)),
            **allocated(("GPU-ffffffff-0000-4000-8000-000000000000", SGLANG))}
    status = plan(listed(), pod_gpus(held))
    assert status.scraped == ()
    reasons = {key(u.target): u.reason for u in status.unscraped}
    assert f"holds {mig}, none of them a GPU of this node" in reasons[VLLM]
    assert "none of them a GPU of this node" in reasons[SGLANG]
    assert "holds no GPU" in reasons[TRITON]


def test_without_allocations_or_a_pod_list_nothing_is_scraped_and_it_says_why() -> None:
    assert plan(None, pod_gpus(allocated((UUIDS[0], VLLM)))) == AnnotatedStatus(listed=False)
    assert describe(AnnotatedStatus(listed=False))[1] == (
        "  none known: the pod list has not been read")
    not_yet = plan(listed(), pod_gpus(None))
    assert not_yet.scraped == () and len(not_yet.unscraped) == 3
    assert all("allocations have not been read" in u.reason for u in not_yet.unscraped)
    not_read = plan(listed(), PodGpus(GPUS, Latest(None), None))
    assert all("allocations are not read on this node" in u.reason
               for u in not_read.unscraped)
    assert len(not_read.unscraped) == 3


def test_at_most_max_targets_are_scraped_and_those_scraped_keep_their_place() -> None:
    gpus = pod_gpus(allocated((UUIDS[0], VLLM), (UUIDS[1], SGLANG), (UUIDS[2], TRITON)))
    first = plan(listed(), gpus, max_targets=2)
    assert [key(s.target) for s in first.scraped] == [TRITON, VLLM]  # the pods' order
    (past,) = first.unscraped
    assert key(past.target) == SGLANG
    assert past.reason == (f"pod {SGLANG[0]}/{SGLANG[1]}: 2 annotated servers are scraped "
                           "per node at most")
    # Once scraped, a server keeps its place over one listed before it.
    kept = plan(listed(), gpus, max_targets=2, keep={SGLANG, VLLM})
    assert [key(s.target) for s in kept.scraped] == [VLLM, SGLANG]
    assert [key(u.target) for u in kept.unscraped] == [TRITON]
    # The default bound is well above these three.
    assert MAX_TARGETS >= 3
    assert len(plan(listed(), gpus).scraped) == 3


def test_a_trace_that_names_no_trace_table_is_scraped_without_the_spans() -> None:
    gpus = pod_gpus(allocated((UUIDS[0], VLLM)))
    (untraced,) = plan(listed(), gpus, traces={"other"}).scraped
    assert untraced.trace_source is None
    assert untraced.untraced == ("jouleprobe.io/trace 'vllm-chat' names no [[trace]] table; "
                                 "its windows are not compared with spans")
    (none,) = plan(listed(), gpus).scraped  # no [[trace]] table at all
    assert none.trace_source is None and "names no [[trace]] table" in none.untraced
    (traced,) = plan(listed(), gpus, traces={"other", "vllm-chat"}).scraped
    assert (traced.trace_source, traced.untraced) == ("trace:vllm-chat", "")
    lines = describe(plan(listed(), gpus))
    assert lines[1] == ("  kube-system/coredns-7f5998f4c-5fblt: vllm at "
                        "http://172.26.64.96:9153/metrics every 30 s on GPU(s) 0")
    assert lines[2].startswith("    note: jouleprobe.io/trace 'vllm-chat' names no")
    assert "  not scraped: pod kube-system/aws-node-48cfw holds no GPU" in "\n".join(lines)
    assert ("  not scraped: pod stress-test/stress2: jouleprobe.io/port: not set, and the pod "
            "declares no TCP container port: set jouleprobe.io/port") in lines


# --- AnnotatedScrapers against a real server -----------------------------------------------

class Server:
    """/metrics pages of a llama-server on loopback: for each path, the idle capture on its
    first scrape, the busy one after; every request is kept."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.port = 0

    async def page(self, request: web.Request) -> web.Response:
        seen = sum(path == request.path for path in self.hits)
        self.hits.append(request.path)
        return web.Response(text=LLAMA[min(seen, 1)])


async def serving(test: Callable[[Server], Awaitable[None]]) -> None:
    server = Server()
    app = web.Application()
    app.router.add_get("/{page}/metrics", server.page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        await test(server)
    finally:
        await runner.cleanup()


def annotated(port: int, page: str, *, uid: str = VLLM_UID, trace: str = "vllm-chat",
              doc: dict[str, Any] | None = None) -> NodePods:
    """The capture, its vllm pod a llama-server at 127.0.0.1:`port`/`page`/metrics,
    scraped every second."""
    return listed(annotated_list(port, page, uid=uid, trace=trace, doc=doc))


def annotated_list(port: int, page: str, *, uid: str = VLLM_UID, trace: str = "vllm-chat",
                   doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(document() if doc is None else doc)
    pod = item(doc, VLLM)
    pod["metadata"]["uid"] = uid
    pod["status"]["podIP"] = "127.0.0.1"
    pod["metadata"]["annotations"].update({
        "jouleprobe.io/scrape": "llamacpp", "jouleprobe.io/port": str(port),
        "jouleprobe.io/path": f"/{page}/metrics?model={MODEL}", "jouleprobe.io/interval": "1",
    })
    if trace:
        pod["metadata"]["annotations"]["jouleprobe.io/trace"] = trace
    else:
        del pod["metadata"]["annotations"]["jouleprobe.io/trace"]
    return doc


def without(pod: tuple[str, str]) -> dict[str, Any]:
    doc = document()
    doc["items"] = [i for i in doc["items"] if i is not item(doc, pod)]
    return doc


class Sink:
    """A `WindowSink` that keeps what it is given."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, WindowFigures, str | None]] = []

    def submit_windows(self, source: str, figures: Sequence[WindowFigures],
                       trace_source: str | None = None) -> None:
        self.submitted.extend((source, one, trace_source) for one in figures)


def steady(watts: float) -> Timeline:
    """A GPU at `watts`, sampled every 0.1 s from 10 s before now to long after the test:
    every window settles at the scrape that closes it."""
    start = time.monotonic() - 10.0
    line = Timeline(max_points=20_000)
    for i in range(12_000):
        line.append(EnergyPoint(start + i / 10, watts * i / 10))
    return line


def scraping(names: Callable[[], set[str]]) -> set[str]:
    return {name for name in names() if name.startswith("scrape:")}


def running_tasks() -> set[str]:
    return scraping(lambda: {task.get_name() for task in asyncio.all_tasks()
                             if not task.done()})


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Waits on the event loop (the scrapers run on it) until `condition` holds."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


SOURCE = "scrape:llamacpp:kube-system/coredns-7f5998f4c-5fblt"


@pytest.fixture
def told(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    with caplog.at_level(logging.INFO, logger="agent.app.annotated"):
        yield lambda: [record.getMessage() for record in caplog.records
                       if record.name == "agent.app.annotated"]


def test_an_annotated_server_is_scraped_restarted_and_stopped_with_its_pod(
        told: Callable[[], list[str]]) -> None:
    metrics, sink = WindowMetrics(), Sink()
    coverage = Coverage({"trace:vllm-chat": 0.0})
    retired: list[str] = []

    async def test(server: Server) -> None:
        pods: Latest[NodePods] = Latest(None)
        allocations = Latest(allocated((UUIDS[1], VLLM)))
        scrapers = AnnotatedScrapers(
            pods, allocations, GPUS, timelines={i: steady(200.0) for i in range(3)},
            idle_power_w=lambda gpu: 50.0, metrics=metrics, store=sink,
            traces={"vllm-chat"}, coverage=coverage, covering=CoverageObserver,
            retire=retired.append)
        # No pod list read yet: nothing scraped.
        assert await scrapers.refresh() == AnnotatedStatus(listed=False)
        assert running_tasks() == set()

        pods.value = annotated(server.port, "a")
        status = await scrapers.refresh()
        (scraped,) = status.scraped
        assert (scraped.source, scraped.gpus, scraped.trace_source) == (
            SOURCE, (1,), "trace:vllm-chat")
        assert scraped.target.url == f"http://127.0.0.1:{server.port}/a/metrics?model={MODEL}"
        assert scrapers.status() is status
        assert running_tasks() == {SOURCE}
        # Its first scrape is the baseline; the next (a second later) closes a window on the
        # GPU its pod holds, named after the pod, into the store and the coverage.
        await until(lambda: len(sink.submitted) >= 1, "a window")
        source, window, trace_source = sink.submitted[0]
        assert (source, trace_source, window.gpus) == (SOURCE, "trace:vllm-chat", (1,))
        assert window.models[MODEL].usage.completion_tokens == 28
        assert window.measured_j > 0
        coverage.settle(math.inf)  # every window handed to it compared, the last kept
        compared = coverage.latest["trace:vllm-chat"]
        assert (compared.start, compared.end) in {(w.start, w.end) for _, w, _ in sink.submitted}
        assert set(server.hits[:2]) == {"/a/metrics"}

        # Nothing changed: the same scraper goes on.
        await scrapers.refresh()
        assert running_tasks() == {SOURCE}
        assert not any("scraping stopped" in line for line in told())

        # A new path: scraped anew from a fresh baseline, at the new url only.
        pods.value = annotated(server.port, "b")
        await scrapers.refresh()
        assert running_tasks() == {SOURCE}
        await until(lambda: "/b/metrics" in server.hits, "a scrape of the new url")
        assert any(line == f"{SOURCE}: scraping stopped: its annotations changed; scraped "
                   f"anew as llamacpp at http://127.0.0.1:{server.port}/b/metrics?model="
                   f"{MODEL} every 1 s, spans of vllm-chat" for line in told())
        a_hits = server.hits.count("/a/metrics")
        await until(lambda: server.hits.count("/b/metrics") >= 2, "the new url's window")
        assert server.hits.count("/a/metrics") == a_hits, "the old scraper was stopped"

        # The pod replaced by one of the same name (a StatefulSet's): scraped anew too.
        replaced = "0b7d3f1e-2222-4333-8444-555555555555"
        pods.value = annotated(server.port, "b", uid=replaced)
        await scrapers.refresh()
        assert f"{SOURCE}: scraping stopped: its pod was replaced (UID {replaced}); scraped " \
               "anew" in told()
        assert running_tasks() == {SOURCE}
        assert retired == [], "scraped anew under the same source: its series go on"

        # Its GPU re-allocated to another pod: it holds none, and is stopped, saying why.
        allocations.value = allocated((UUIDS[1], ("stress-test", "stress2")))
        status = await scrapers.refresh()
        assert status.scraped == () and running_tasks() == set()
        assert (f"{SOURCE}: scraping stopped: pod kube-system/coredns-7f5998f4c-5fblt holds no "
                "GPU: the kubelet allocated no nvidia.com/gpu to its containers") in told()
        assert retired == [SOURCE]

        # Back on a GPU (another: it is asked for every window), then the pod gone: stopped.
        allocations.value = allocated((UUIDS[0], VLLM))
        (scraped,) = (await scrapers.refresh()).scraped
        assert scraped.gpus == (0,) and running_tasks() == {SOURCE}
        pods.value = listed(without(VLLM))
        status = await scrapers.refresh()
        assert status.scraped == ()
        assert running_tasks() == set()
        assert f"{SOURCE}: scraping stopped: its pod is gone, or no longer annotated " \
               "rightly" in told()
        assert retired == [SOURCE, SOURCE]

    asyncio.run(serving(test))


def test_a_scraper_that_ends_by_a_fault_is_started_again_and_run_stops_all(
        told: Callable[[], list[str]]) -> None:
    class Faulty(WindowMetrics):
        """Window metrics whose first `scraped` raises: the scraper's task ends by it."""

        faults = 1

        def scraped(self, source: str) -> None:
            if self.faults:
                self.faults -= 1
                raise RuntimeError("a bug")
            super().scraped(source)

    metrics = Faulty()

    async def test(server: Server) -> None:
        pods = Latest(annotated(server.port, "a", trace=""))
        scrapers = AnnotatedScrapers(
            pods, Latest(allocated((UUIDS[0], VLLM))), GPUS,
            timelines={0: steady(100.0)}, idle_power_w=lambda gpu: None, metrics=metrics)
        await scrapers.refresh()
        assert running_tasks() == {SOURCE}
        await until(lambda: running_tasks() == set(), "the faulty scraper's end")
        assert server.hits == []
        await scrapers.refresh()
        assert f"{SOURCE}: its scraper ended" in told()
        assert f"{SOURCE}: scraping stopped: its scraper ended; started again" in told()
        await until(lambda: server.hits == ["/a/metrics"], "the restarted scraper's scrape")
        assert running_tasks() == {SOURCE}

        # `run`, cancelled, stops every scraper before it returns.
        before = scrapers.status()
        runner = asyncio.create_task(scrapers.run(period_s=3600.0))
        await until(lambda: scrapers.status() is not before, "run's first comparison")
        assert running_tasks() == {SOURCE}
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert running_tasks() == set()
        assert told()[-1] == f"{SOURCE}: scraping stopped: the agent stops"

    asyncio.run(serving(test))


def test_each_reason_not_to_scrape_is_logged_once_while_it_holds(
        told: Callable[[], list[str]]) -> None:
    async def test() -> None:
        pods = Latest(listed())
        allocations = Latest(allocated((UUIDS[0], TRITON)))
        scrapers = AnnotatedScrapers(pods, allocations, GPUS, timelines={},
                                     idle_power_w=lambda gpu: None, metrics=WindowMetrics(),
                                     max_targets=0)
        for _ in range(3):
            await scrapers.refresh()
        said = [line for line in told() if line.startswith("annotated pod not scraped")]
        assert len(said) == 3 + 4  # three servers, four bad annotations
        assert len(set(said)) == len(said)
        assert (f"annotated pod not scraped: pod {TRITON[0]}/{TRITON[1]}: 0 annotated servers "
                "are scraped per node at most") in said
        assert running_tasks() == set()
        # A reason that stops holding and comes back is said again.
        pods.value = listed(without(TRITON))
        await scrapers.refresh()
        pods.value = listed()
        await scrapers.refresh()
        again = [line for line in told() if line.startswith("annotated pod not scraped")]
        assert again[len(said):] == [f"annotated pod not scraped: pod {TRITON[0]}/{TRITON[1]}: "
                                     "0 annotated servers are scraped per node at most"]

    asyncio.run(test())


def test_a_coverage_without_a_way_to_hand_it_windows_is_refused() -> None:
    with pytest.raises(ValueError, match="needs `covering`"):
        AnnotatedScrapers(Latest(None), None, GPUS, timelines={},
                          idle_power_w=lambda gpu: None, metrics=WindowMetrics(),
                          coverage=Coverage({}))


def test_the_source_names_the_kind_and_the_pod() -> None:
    (target, *_) = listed().scrapes().targets
    assert source_name(target) == "scrape:triton:kube-system/aws-node-48cfw"
    assert source_name(replace(target, namespace="ml", pod="vllm-0")) == "scrape:triton:ml/vllm-0"


# --- wired by the daemon -------------------------------------------------------------------

@pytest.fixture
def api_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
               ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """An API server double answering the pod list it is given."""
    body = [json.dumps(document()).encode()]

    def answer(doc: dict[str, Any]) -> None:
        body[0] = json.dumps(doc).encode()

    with kube_api_server(monkeypatch, tmp_path, body):
        yield answer


def test_the_daemon_scrapes_annotated_pods_and_finds_the_gpus_of_a_pods_spans(
        tmp_path: Path, api_server: Callable[[dict[str, Any]], None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `Node` reading a pod list (the API server double) and the kubelet's
    allocations (a real pod-resources gRPC server): the daemon's wiring scrapes the
    annotated pod on the GPU the kubelet allocated it, and a [[trace]] source with
    gpus = "auto" finds that GPU from its spans' pod, with no process to look up."""
    fake = FakeNvml(clock=time.time)
    boards = [fake.add_gpu(power) for power in (300.0, 200.0)]
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    config_file = tmp_path / "jouleprobe.toml"
    allocation = [PodSpec(*VLLM, {"coredns": [Devices("nvidia.com/gpu", [boards[1].uuid])]})]

    async def test(server: Server) -> None:
        api_server(annotated_list(server.port, "a"))
        with serve(Behaviour(pods=allocation)) as socket:
            config_file.write_text(
                f'[records]\npath = "{tmp_path / "records.db"}"\n'
                f'[workloads]\npod_resources = "{socket}"\nkubernetes = "on"\n'
                '[[trace]]\nservice = "vllm-chat"\ngpus = "auto"\nsettle = 0.0\n')
            node = Node(load(config_file, environ={}), NvmlGpuSource.open(),
                        EstimatedHostSource(100.0, 400.0))
            try:
                node.start()
                receiver = trace_receiver(node)
                assert receiver is not None and receiver.coverage is not None
                # The pod of the spans' resource first: no process of it is looked for.
                gpus = receiver.sources["vllm-chat"].gpus
                assert gpus({"k8s.pod.uid": VLLM_UID, "process.pid": 2**22 + 1}) == (1,)
                tasks = start_scrapers(node, receiver.coverage)
                assert [task.get_name() for task in tasks] == ["annotated pods"]
                try:
                    await until(lambda: SOURCE in running_tasks(), "the annotated scraper")
                    await until(lambda: server.hits.count("/a/metrics") >= 2, "two scrapes")
                    await until(lambda: windows(node) > 0, "its window in the metrics")
                finally:
                    await cancel(tasks)
                assert running_tasks() == set()
                text = generate_latest(node.registry).decode()
            finally:
                node.drain()
        tokens = {dict(labels)["kind"]: value
                  for (name, labels), value in exposed_samples(text).items()
                  if name == "jouleprobe_window_tokens_total"
                  and dict(labels)["source"] == SOURCE}
        assert tokens == {"prompt": 171, "completion": 28}

    asyncio.run(serving(test))


def windows(node: Node) -> float:
    """The completion tokens of the annotated server's windows, in the node's metrics."""
    samples = exposed_samples(generate_latest(node.registry).decode())
    return sum(value for (name, labels), value in samples.items()
               if name == "jouleprobe_window_tokens_total" and ("source", SOURCE) in labels)


def test_replicas_naming_one_trace_service_are_compared_with_none() -> None:
    """The service's spans are every replica's: compared with each replica's windows, each
    coverage would count them all, so none is compared, and doctor says why."""
    doc = document()
    item(doc, SGLANG)["metadata"]["annotations"][TRACE] = "vllm-chat"
    gpus = pod_gpus(allocated((UUIDS[0], VLLM), (UUIDS[1], SGLANG)))
    both = plan(listed(doc), gpus, traces={"vllm-chat"}).scraped
    assert [s.trace_source for s in both] == [None, None]
    assert all(s.untraced.startswith("2 pods of this node name jouleprobe.io/trace "
                                     "'vllm-chat'") for s in both)
    gpus = pod_gpus(allocated((UUIDS[0], VLLM)))  # the other replica holds no GPU here
    (alone,) = plan(listed(doc), gpus, traces={"vllm-chat"}).scraped
    assert alone.trace_source == "trace:vllm-chat"
