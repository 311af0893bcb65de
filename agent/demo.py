"""`jouleprobe demo`: the whole pipeline on simulated GPUs under a synthetic inference load.

Nothing here is a shortcut around the agent: the simulated boards are read by the real
sampler at 10 Hz, requests reach the real ingest API over loopback HTTP through the
`Tracker` client, the real engine attributes the energy, the records go to a real SQLite
file, and the closing check reads the agent's own `/metrics` over HTTP. Only the GPUs and
the requests are simulated: the boards' power follows the requests that run on them
(`RequestLoad`), and every output says SIMULATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load
from agent.daemon import attribute_periodically, build_apps, start_site
from agent.intake.client import Tracker
from agent.node import Node
from agent.report import run_report
from agent.sources.host import EstimatedHostSource
from agent.sources.simload import RequestLoad, TraceRequest, synthetic_trace
from agent.sources.simulated import SimulatedGpuSource, parse_spec

IDLE_LEAD_S = 3.0
"""Seconds of idle before the load, from which the engine learns each GPU's idle power."""
CONCURRENCY_PHASES = (2, 8, 4)
"""Clients per GPU in each third of the load: concurrency that varies."""


TAIL_S = 5.0
"""Requests that would run on more than this past the end of the load are left out of the
trace, so that the long tail of generation lengths does not stretch the demo."""


def build_trace(gpu_count: int, seconds: float) -> list[TraceRequest]:
    """Phases of different concurrency, back to back, with ids unique across phases."""
    trace: list[TraceRequest] = []
    phase_s = seconds / len(CONCURRENCY_PHASES)
    for phase, concurrency in enumerate(CONCURRENCY_PHASES):
        part = synthetic_trace(gpu_count, concurrency=concurrency, duration_s=phase_s,
                               start=phase * phase_s, completion_median=120.0, seed=phase)
        trace += [replace(r, id=f"{r.id}-p{phase}") for r in part if r.end <= seconds + TAIL_S]
    return sorted(trace, key=lambda r: r.start)


async def play(request: TraceRequest, t0: float, load: RequestLoad, tracker: Tracker) -> None:
    """One request in real time: the board draws its power, the tracker reports it."""
    await asyncio.sleep(max(0.0, t0 + request.start - time.monotonic()))
    with tracker.request(model=request.model, gpus=[request.gpu],
                         request_id=request.id) as tracked:
        load.begin(request.id, request.gpu, request.model, time.monotonic())
        await asyncio.sleep(request.first_token - request.start)
        load.first_token(request.id, time.monotonic())
        tracked.first_token()
        await asyncio.sleep(request.end - request.first_token)
        load.finish(request.id, time.monotonic())
        tracked.tokens(prompt=request.prompt_tokens, completion=request.completion_tokens)


def progress(done: int, total: int, elapsed: float, seconds: float) -> None:
    width = 30
    filled = int(width * min(elapsed / seconds, 1.0))
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {elapsed:5.1f}/{seconds:.0f} s"
                     f"  requests finished {done}/{total}   ")
    sys.stderr.flush()


def conservation(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Per GPU: (attributed + unattributed, energy measured) from a scrape of /metrics."""
    attributed: dict[str, float] = defaultdict(float)
    measured: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            gpu = sample.labels.get("gpu")
            if sample.name in ("jouleprobe_gpu_attributed_energy_joules_total",
                               "jouleprobe_gpu_unattributed_energy_joules_total"):
                attributed[gpu] += sample.value
            elif sample.name == "jouleprobe_gpu_energy_joules_total":
                measured[gpu] = sample.value
    return {gpu: (attributed[gpu], measured[gpu]) for gpu in measured}


async def demo(spec: str, seconds: float, store: Path, queries_per_day: float) -> int:
    config = load(environ={}, overrides={
        "agent.simulate": spec, "agent.listen": "127.0.0.1:0",
        "ingest.listen": "127.0.0.1:0", "records.path": str(store),
        "attribution.settle": 1.0,
    })
    models = parse_spec(spec)
    request_load = RequestLoad(models)
    source = SimulatedGpuSource(models, load=request_load)
    host = EstimatedHostSource(config.host.idle_watts, config.host.max_watts)
    node = Node(config, source, host)
    metrics_app, ingest_app = build_apps(node, token=None)
    trace = build_trace(len(models), seconds)

    print(f"jouleprobe demo: SIMULATED node {spec} ({', '.join(m.nvml_name for m in models)}),")
    print(f"  {len(trace)} synthetic requests over {seconds:.0f} s, models "
          f"{', '.join(sorted({r.model for r in trace}))}, concurrency per GPU "
          f"{' -> '.join(map(str, CONCURRENCY_PHASES))}; host energy ESTIMATED from CPU use")
    node.start()
    attribution = asyncio.create_task(attribute_periodically(node))
    metrics_runner = await start_site(metrics_app, config.agent.listen, "metrics")
    ingest_runner = await start_site(ingest_app, config.ingest.listen, "ingest")
    metrics_url = "http://{}:{}".format(*metrics_runner.addresses[0][:2])
    ingest_url = "http://{}:{}".format(*ingest_runner.addresses[0][:2])
    tracker = Tracker(ingest_url, flush_interval=0.2)
    try:
        print(f"  idle for {IDLE_LEAD_S:.0f} s so the agent learns each GPU's idle power ...")
        await asyncio.sleep(IDLE_LEAD_S)
        t0 = time.monotonic()
        tasks = [asyncio.create_task(play(r, t0, request_load, tracker)) for r in trace]
        while not all(task.done() for task in tasks):
            progress(sum(t.done() for t in tasks), len(tasks), time.monotonic() - t0, seconds)
            await asyncio.sleep(0.25)
        progress(len(tasks), len(tasks), time.monotonic() - t0, seconds)
        sys.stderr.write("\n")
        for task in tasks:
            task.result()
        tracker.close()
        stats = tracker.stats()
        if stats.rejected or stats.dropped:
            print(f"  WARNING: the ingest API refused {stats.rejected} and the tracker dropped "
                  f"{stats.dropped} events")
        await asyncio.sleep(config.attribution.settle + 2 * config.agent.sample_interval)
        attribution.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attribution
        await asyncio.to_thread(node.drain)
        async with aiohttp.ClientSession() as session, \
                session.get(f"{metrics_url}/metrics") as response:
            scraped = await response.text()
    finally:
        tracker.close()
        await ingest_runner.cleanup()
        await metrics_runner.cleanup()
        if not attribution.done():
            attribution.cancel()

    print()
    print("SIMULATED GPUs and requests: the figures below show the pipeline, not real hardware.")
    print(run_report(str(store), None, "table", None), end="")
    print()
    worst = 0.0
    for gpu, (accounted, measured) in sorted(conservation(scraped).items()):
        error = abs(accounted - measured) / measured if measured else 0.0
        worst = max(worst, error)
        print(f"  GPU {gpu}: attributed + unattributed = {accounted:,.1f} J, "
              f"measured {measured:,.1f} J (relative difference {error:.1e}, from /metrics)")
    fleet = _fleet_line(store, queries_per_day, config.site.pue)
    if fleet:
        print(fleet)
    print(f"  records: {store}  (jouleprobe report --store {store}; "
          f"jouleprobe fleet --from-store {store} --queries-per-day 1B)")
    return 0 if worst <= 1e-9 and fleet else 1


def _fleet_line(store: Path, queries_per_day: float, pue: float) -> str | None:
    """The closing fleet figure, by `jouleprobe fleet`'s own code: mean facility Wh/query
    with its bootstrap interval, at `queries_per_day`."""
    from agent.fleet import Span, estimate, format_energy, from_store
    from agent.fleet.inputs import MeasurementError

    try:
        measured = from_store(str(store))
    except MeasurementError:
        return None
    result = estimate({"queries_per_day": Span.exact(queries_per_day)}, measurement=measured)
    per_query, annual = result.wh_per_query, result.annual_energy_wh
    if per_query is None:  # the query mode always gives it
        return None
    return (f"  SIMULATED: at {queries_per_day:,.0f} queries/day, {per_query.central:.3g} "
            f"Wh/query (facility, PUE {pue}; 95 % CI {per_query.low:.3g}…{per_query.high:.3g}) "
            f"is {format_energy(annual.low)} … {format_energy(annual.high)}/yr "
            f"(central {format_energy(annual.central)})")


def run_demo(spec: str, *, seconds: float, store: str, queries_per_day: float) -> int:
    if seconds <= 0:
        raise ValueError("--seconds: expected a number > 0")
    path = Path(store)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return asyncio.run(demo(spec, seconds, path, queries_per_day))
