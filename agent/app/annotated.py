"""The scrapers of annotated pods: on Kubernetes, one config for every node (issue 16).

A pod annotated `jouleprobe.io/scrape: <kind>` (`agent.workloads.kubernetes` lists the
annotations) is scraped as a `[[scrape]]` table would be, with no table: every `PERIOD_S`
the node's latest pod list and the kubelet's latest allocations, both read by the workload
observer's thread (only their last good value is looked at here, so this never waits for
the API server or the kubelet), give the targets. Each target is one `WindowScraper` task,
named `scrape:<kind>:<namespace>/<pod>` (`source_name`), so that two servers of one kind on
a node stay apart in the window metrics and records; a table's is `scrape:<kind>`.

A target's GPUs are those the kubelet allocated to its pod's containers, asked again for
every window (`PodGpus.of_pod`), so a re-allocation is followed without a restart. A target
whose url, kind, interval or trace service changes, or whose pod is replaced (a new UID),
is scraped anew from a fresh baseline; one whose pod is gone, or holds no GPU any more, is
stopped.

Not scraped, and said why (in `status()`, for `jouleprobe doctor`, and once in the log):
a pod whose annotations are wrong (`BadAnnotation`), a pod that holds no GPU this node
measures (its windows' energy could not be measured), and the targets past `MAX_TARGETS`
(those already scraped keep their place). A target whose `jouleprobe.io/trace` names a
`[[trace]]` table has its windows compared with that service's spans, as a table's `trace`
does; one that names no table is scraped without the comparison, and says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.devices.base import GpuInfo
from agent.intake.discovery import GpuResolutionError
from agent.intake.otlp.coverage import Coverage
from agent.intake.otlp.sources import Latest, PodGpus
from agent.intake.scrapers import WindowScraper, WindowSink
from agent.intake.scrapers.scraper import ScrapeObserver
from agent.timeline import Timeline
from agent.workloads.kubernetes import TRACE, BadAnnotation, NodePods, ScrapeTarget
from agent.workloads.podresources import DeviceHolders

log = logging.getLogger(__name__)

PERIOD_S = 10.0
"""How often the targets are compared with the latest pod list and allocations."""
MAX_TARGETS = 64
"""Annotated servers scraped per node at most: a bound on tasks, connections and series."""

Covering = Callable[[ScrapeObserver, Coverage, str], ScrapeObserver]
"""Wraps a scraper's observer so that its windows also go to the trace coverage
(`agent.app.daemon.CoverageObserver`): (metrics, coverage, trace source) → observer."""

_Key = tuple[str, str]
"""(namespace, pod)."""


def source_name(target: ScrapeTarget) -> str:
    """The windows' `source` of an annotated pod's server: its kind and its pod."""
    return f"scrape:{target.kind}:{target.namespace}/{target.pod}"


@dataclass(frozen=True, slots=True)
class Scraped:
    """An annotated server that is scraped."""

    target: ScrapeTarget
    source: str
    gpus: tuple[int, ...]
    """The GPUs its pod held when the targets were last compared."""
    trace_source: str | None
    """`trace:SERVICE` whose spans its windows are compared with; None for none."""
    untraced: str = ""
    """Why its `jouleprobe.io/trace` is not compared; "" where it is, or names none."""


@dataclass(frozen=True, slots=True)
class Unscraped:
    """An annotated server with right annotations that is not scraped, and why."""

    target: ScrapeTarget
    reason: str


@dataclass(frozen=True, slots=True)
class AnnotatedStatus:
    """The annotated pods of the node, as the targets were last compared."""

    listed: bool
    """Whether a pod list has been read; nothing is scraped before."""
    scraped: tuple[Scraped, ...] = ()
    unscraped: tuple[Unscraped, ...] = ()
    bad: tuple[BadAnnotation, ...] = ()


def plan(pods: NodePods | None, gpus: PodGpus, *, traces: Collection[str] = (),
         max_targets: int = MAX_TARGETS, keep: Collection[_Key] = ()) -> AnnotatedStatus:
    """Which annotated servers of `pods` to scrape, and why the others are not. `traces`:
    the `[[trace]]` services; `keep`: the (namespace, pod) already scraped, which keep their
    place within `max_targets`."""
    if pods is None:
        return AnnotatedStatus(listed=False)
    scrapes = pods.scrapes()
    unscraped: list[Unscraped] = []
    held: list[tuple[ScrapeTarget, tuple[int, ...]]] = []
    for target in scrapes.targets:
        try:
            held.append((target, gpus.of_pod(target.namespace, target.pod)))
        except GpuResolutionError as exc:
            unscraped.append(Unscraped(target, str(exc)))
    held.sort(key=lambda found: _key(found[0]) not in keep)  # stable: the pods' order else
    scraped: list[Scraped] = []
    naming = Counter(target.trace for target, _ in held[:max_targets] if target.trace)
    for target, indices in held:
        if len(scraped) == max_targets:
            unscraped.append(Unscraped(target, (
                f"pod {target.namespace}/{target.pod}: {max_targets} annotated servers are "
                "scraped per node at most")))
            continue
        scraped.append(Scraped(target, source_name(target), indices,
                               *_traced(target, traces, naming[target.trace])))
    return AnnotatedStatus(True, tuple(scraped), tuple(unscraped), scrapes.bad)


def _traced(target: ScrapeTarget, traces: Collection[str], naming: int
            ) -> tuple[str | None, str]:
    """The trace source that a target's windows are compared with, or why none. Replicas of
    one server naming one `[[trace]]` service are compared with none: the service's spans
    are those of every replica, so each replica's coverage would count them all."""
    if not target.trace:
        return None, ""
    if target.trace not in traces:
        return None, (f"{TRACE} {target.trace!r} names no [[trace]] table; its windows are "
                      "not compared with spans")
    if naming > 1:
        return None, (f"{naming} pods of this node name {TRACE} {target.trace!r}; the "
                      "service's spans cannot be told apart by pod, so no pod's windows are "
                      "compared with them")
    return f"trace:{target.trace}", ""


def describe(status: AnnotatedStatus) -> list[str]:
    """The status in plain words, for `jouleprobe doctor`."""
    lines = ["Annotated pods (jouleprobe.io/scrape):"]
    if not status.listed:
        return [*lines, "  none known: the pod list has not been read"]
    if not (status.scraped or status.unscraped or status.bad):
        return [*lines, "  none on this node"]
    for scraped in status.scraped:
        target = scraped.target
        spans = f", with the spans of {scraped.trace_source}" if scraped.trace_source else ""
        lines.append(f"  {target.namespace}/{target.pod}: {target.kind} at {target.url} "
                     f"every {target.interval:g} s on GPU(s) "
                     f"{', '.join(map(str, scraped.gpus))}{spans}")
        if scraped.untraced:
            lines.append(f"    note: {scraped.untraced}")
    lines += [f"  not scraped: {unscraped.reason}" for unscraped in status.unscraped]
    lines += [f"  not scraped: pod {bad.namespace}/{bad.pod}: {bad.key}: {bad.reason}"
              for bad in status.bad]
    return lines


@dataclass(slots=True)
class _Running:
    target: ScrapeTarget
    task: asyncio.Task[None]


class AnnotatedScrapers:
    """One `WindowScraper` task per annotated server of the node, kept in step with the
    pod list and the allocations by `run` (on the event loop)."""

    def __init__(
        self,
        pods: Latest[NodePods],
        allocations: Latest[Mapping[str, DeviceHolders]] | None,
        gpus: Sequence[GpuInfo],
        *,
        timelines: dict[int, Timeline],
        idle_power_w: Callable[[int], float | None],
        metrics: ScrapeObserver,
        store: WindowSink | None = None,
        traces: Collection[str] = (),
        coverage: Coverage | None = None,
        covering: Covering | None = None,
        retire: Callable[[str], None] | None = None,
        max_targets: int = MAX_TARGETS,
    ) -> None:
        """`pods`, `allocations`: the workload observer's readers (None: allocations not
        read). `timelines`, `idle_power_w`, `metrics`, `store`: as for a `[[scrape]]`
        table's scraper. `traces`: the `[[trace]]` services; `coverage`, where the
        receiver keeps one, gets the windows of the servers that name one, through
        `covering`. `retire`: told the source of a server no longer scraped (its pod gone),
        so that its metric series can leave (`WindowMetrics.retire`)."""
        if coverage is not None and covering is None:
            raise ValueError("a coverage needs `covering` to hand it the windows")
        self._pods = pods
        self._gpus = PodGpus(gpus, pods, allocations)
        self._timelines = timelines
        self._idle_power_w = idle_power_w
        self._metrics = metrics
        self._store = store
        self._traces = frozenset(traces)
        self._coverage = coverage
        self._covering = covering
        self._retire = retire
        self._max_targets = max_targets
        self._running: dict[_Key, _Running] = {}
        self._status = AnnotatedStatus(listed=False)
        self._told: set[str] = set()
        """What the log has said is not scraped, while it stays so: each said once."""

    def status(self) -> AnnotatedStatus:
        """As the targets were last compared."""
        return self._status

    async def run(self, period_s: float = PERIOD_S) -> None:
        """Compares the targets every `period_s` until cancelled; then stops every scraper."""
        try:
            while True:
                try:
                    await self.refresh()
                except Exception:  # one bad round must not end the scraping for good
                    log.exception("annotated pods: comparing the scrape targets failed")
                await asyncio.sleep(period_s)
        finally:
            await self._stop([(key, "the agent stops") for key in self._running])

    async def refresh(self) -> AnnotatedStatus:
        """One comparison: scrapers started for new targets, stopped for those gone or
        changed (and restarted where they ended by a fault)."""
        status = plan(self._pods.value, self._gpus, traces=self._traces,
                      max_targets=self._max_targets, keep=self._running.keys())
        wanted = {_key(scraped.target): scraped for scraped in status.scraped}
        why_not = {_key(unscraped.target): unscraped.reason for unscraped in status.unscraped}
        stopping: list[tuple[_Key, str]] = []
        for key, running in self._running.items():
            scraped = wanted.get(key)
            if scraped is None:
                stopping.append((key, why_not.get(key, "its pod is gone, or no longer "
                                                       "annotated rightly")))
            elif scraped.target != running.target:
                stopping.append((key, _changed(running.target, scraped.target)))
            elif running.task.done():
                fault = None if running.task.cancelled() else running.task.exception()
                log.error("%s: its scraper ended", scraped.source, exc_info=fault)
                stopping.append((key, "its scraper ended; started again"))
        gone = [source_name(self._running[key].target) for key, _ in stopping
                if key not in wanted]
        await self._stop(stopping)
        if self._retire is not None:
            for source in gone:
                self._retire(source)
        for key, scraped in wanted.items():
            if key not in self._running:
                self._start(key, scraped)
        self._tell(status)
        self._status = status
        return status

    def _start(self, key: _Key, scraped: Scraped) -> None:
        target = scraped.target
        metrics = self._metrics
        if (scraped.trace_source is not None and self._coverage is not None
                and self._covering is not None
                and scraped.trace_source in self._coverage.settle_s):
            metrics = self._covering(metrics, self._coverage, scraped.trace_source)
        scraper = WindowScraper(
            target.kind, target.url,
            gpus=functools.partial(self._gpus.of_pod, target.namespace, target.pod),
            timelines=self._timelines, idle_power_w=self._idle_power_w, metrics=metrics,
            store=self._store, source=scraped.source, trace_source=scraped.trace_source,
        )
        task = asyncio.create_task(scraper.run(target.interval), name=scraped.source)
        self._running[key] = _Running(target, task)
        log.info("%s: scraping %s every %g s, on GPU(s) %s%s", scraped.source, target.url,
                 target.interval, ", ".join(map(str, scraped.gpus)),
                 f" ({scraped.untraced})" if scraped.untraced else "")

    async def _stop(self, stopping: Sequence[tuple[_Key, str]]) -> None:
        tasks = []
        for key, reason in stopping:
            running = self._running.pop(key)
            log.info("%s: scraping stopped: %s", source_name(running.target), reason)
            running.task.cancel()
            tasks.append(running.task)
        await asyncio.gather(*tasks, return_exceptions=True)  # a faulty one was logged

    def _tell(self, status: AnnotatedStatus) -> None:
        """Logs each reason for not scraping once, while it holds."""
        said = {unscraped.reason for unscraped in status.unscraped}
        said |= {f"pod {bad.namespace}/{bad.pod}: {bad.key}: {bad.reason}"
                 for bad in status.bad}
        for line in sorted(said - self._told):
            log.warning("annotated pod not scraped: %s", line)
        self._told = said


def _key(target: ScrapeTarget) -> _Key:
    return target.namespace, target.pod


def _changed(old: ScrapeTarget, new: ScrapeTarget) -> str:
    if new.pod_uid != old.pod_uid:
        return f"its pod was replaced (UID {new.pod_uid}); scraped anew"
    return (f"its annotations changed; scraped anew as {new.kind} at {new.url} every "
            f"{new.interval:g} s" + (f", spans of {new.trace}" if new.trace else ""))
