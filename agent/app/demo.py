"""`jouleprobe demo`: the whole pipeline on simulated GPUs under a synthetic inference load.

Nothing here is a shortcut around the agent: the node is configured as `jouleprobe run`
would be (`demo_config`) and wired by the same functions (`agent.app.daemon`). Each
simulated board serves one model through a small OpenAI-compatible server (`fake_upstream`)
that runs `MAX_BATCH` requests at once and queues the others. One board's server exports
each finished request as vLLM's OTLP span, through the real OpenTelemetry SDK and exporter,
to the agent's real OTLP receiver, with nothing in the data path, and is scraped for its
(imitated) vLLM metrics too, so that its window figures and the spans' coverage of its
requests stand beside its per-request records; the load of the others goes through the
agent's real reverse proxy in front of them, as operators deploy it in front of vLLM: the
proxy times each request, reads its token usage (streaming and not) and reports it to the
real attribution engine; the simulated boards are read by the real sampler at 10 Hz; the
records go to a real SQLite file; and the closing check reads the agent's own `/metrics`
over HTTP. Only the GPUs and the served models are simulated: the boards' power follows the
requests that run on them (`RequestLoad`, driven by the fake server's hooks), and every
output says SIMULATED.

The workload view runs too, as on a Kubernetes node: every board's server is a simulated
pod's process, and beside GPU 0's server a simulated training job (its own pod, SM
utilisation and power, in the board's counter) runs for the whole demo
(`agent.sim.processes`). The agent reads their cgroups from a simulated `/proc` tree
written for the run (`workloads.proc_root`) and their pods' names from the simulation in
place of the API server; the closing lines give each workload's energy from `/metrics`
and check, per GPU, that workloads + unattributed = measured.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from agent.app.daemon import (
    attribute_periodically,
    build_apps,
    cancel,
    start_proxies,
    start_scrapers,
    start_trace_receiver,
    trace_receiver,
)
from agent.app.node import Node
from agent.app.proxies import Proxies
from agent.app.sites import bind, start_site
from agent.config import Config, ProxyTable, ScrapeTable, TraceTable, load
from agent.devices.host import EstimatedHostSource
from agent.intake.otlp.http_service import TRACES_PATH
from agent.report import run_report
from agent.sim.gpus import GpuModel, SimulatedGpuSource, parse_spec
from agent.sim.load import PROFILES, RequestLoad
from agent.sim.processes import Job, SimulatedProcesses
from agent.sim.upstream import fake_upstream_app

IDLE_LEAD_S = 3.0
"""Seconds of idle before the load, from which the engine learns each GPU's idle power."""
CONCURRENCY_PHASES = (2, 8, 4)
"""Clients per GPU in each third of the load: concurrency that varies."""
MODELS = ("small-8b", "large-70b")
"""Board i serves MODELS[i % 2]: one model replica per board, two sizes."""
THINK_S = 0.2
"""Mean pause of a client between two requests (exponential)."""
MAX_BATCH = 4
"""Requests a simulated server runs at once; more wait in its queue (at 8 clients)."""
TRACED = 1
"""The board whose server exports its request spans to the agent instead of a proxy."""
TRAINING = 0
"""The board (behind the proxy) where a training job runs beside the served model."""
TRAINER = ("research", "finetune-7b", "trainer")
"""The training job's pod container: namespace, pod, container."""
TRAINER_SM = 45.0
TRAINER_POWER_FRACTION = 0.25
"""The training job's power while it steps, as a fraction of its board's TDP − idle."""
TRAINER_CYCLE_S, TRAINER_BUSY_S = 6.0, 3.0
"""It steps for 3 s of every 6 and then loads data: in those pauses the server is the only
workload busy on the board, which is when the workload view can tell that it served (the
pauses span whole observer periods of utilisation, `workloads.period`)."""
RELATIVE_TOLERANCE = 1e-9
"""Conservation, requests' and workloads', to the figure of docs/design.md §3."""


def training_job(board: GpuModel) -> Job:
    """The simulated fine-tuning job beside the served model on board `TRAINING`."""
    return Job(TRAINING, *TRAINER, comm="torchrun", sm_util=TRAINER_SM,
               power_w=TRAINER_POWER_FRACTION * (board.tdp_w - board.idle_w),
               cycle_s=TRAINER_CYCLE_S, busy_s=TRAINER_BUSY_S)


def served_model(gpu: int) -> str:
    return MODELS[gpu % len(MODELS)]


def upstream_for(gpu: int, load: RequestLoad, traces: TracerProvider | None = None
                 ) -> web.Application:
    """The fake server of board `gpu`: its hooks make the board draw each request's power
    (once it leaves the server's queue: `MAX_BATCH` run at once); with `traces`, it exports
    each finished request's span as vLLM does."""
    model = served_model(gpu)
    profile = PROFILES[model]

    def start(key: int, name: str) -> None:
        load.begin(f"{gpu}-{key}", gpu, model, time.monotonic())

    def first_token(key: int) -> None:
        load.first_token(f"{gpu}-{key}", time.monotonic())

    def end(key: int) -> None:
        load.finish(f"{gpu}-{key}", time.monotonic())

    return fake_upstream_app(
        models={model: profile.decode_tokens_per_s},
        prefill_speedup=profile.prefill_tokens_per_s / profile.decode_tokens_per_s,
        on_start=start, on_first_token=first_token, on_end=end, max_batch=MAX_BATCH,
        traces=traces,
    )


async def client(session: aiohttp.ClientSession, url: str, model: str, until: float,
                 rng: random.Random, done: list[int]) -> None:
    """One closed-loop user: a chat request (streamed or not), a pause, the next one."""
    while time.monotonic() < until:
        words = max(4, int(rng.lognormvariate(5.0, 0.8)))  # prompts of ~150 words, long tail
        body = {
            "model": model,
            "messages": [{"role": "user", "content": " ".join(["joule"] * words)}],
            "max_tokens": rng.randint(8, 32),
            "stream": rng.random() < 0.5,
        }
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            await response.read()
            response.raise_for_status()
        done.append(1)
        await asyncio.sleep(rng.expovariate(1 / THINK_S))


def progress(done: int, elapsed: float, seconds: float) -> None:
    """A progress bar on a terminal; nothing where stderr is a file or a pipe."""
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * min(elapsed / seconds, 1.0))
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {elapsed:5.1f}/{seconds:.0f} s"
                     f"  requests finished {done}   ")
    sys.stderr.flush()


async def run_load(entries: list[str], seconds: float) -> int:
    """Phases of `CONCURRENCY_PHASES` clients per GPU, back to back; returns the requests."""
    done: list[int] = []
    rng = random.Random(0)
    t0 = time.monotonic()
    phase_s = seconds / len(CONCURRENCY_PHASES)
    async with aiohttp.ClientSession() as session:
        for phase, concurrency in enumerate(CONCURRENCY_PHASES):
            until = t0 + (phase + 1) * phase_s
            clients = [
                asyncio.create_task(client(session, url, served_model(gpu), until,
                                           random.Random(rng.random()), done))
                for gpu, url in enumerate(entries) for _ in range(concurrency)
            ]
            while not all(task.done() for task in clients):
                progress(len(done), time.monotonic() - t0, seconds)
                await asyncio.sleep(0.25)
            for task in clients:
                task.result()
    progress(len(done), time.monotonic() - t0, seconds)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"  {len(done)} requests in {time.monotonic() - t0:.1f} s")
    return len(done)


def conservation(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Per GPU: (attributed + unattributed, energy measured) from a scrape of /metrics."""
    attributed: dict[str, float] = defaultdict(float)
    measured: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            gpu = sample.labels.get("gpu", "")
            if sample.name in ("jouleprobe_gpu_attributed_energy_joules_total",
                               "jouleprobe_gpu_unattributed_energy_joules_total"):
                attributed[gpu] += sample.value
            elif sample.name == "jouleprobe_gpu_energy_joules_total":
                measured[gpu] = sample.value
    return {gpu: (attributed[gpu], measured[gpu]) for gpu in measured}


SCRAPE_INTERVAL_S = 2.0
"""Seconds between two scrapes of the traced server's /metrics (one window)."""
TRACE_SETTLE_S = 4.0
"""What the traced board's intervals wait for its spans: the exporter's batch delay (0.5 s
here, 5 s by default) and the longest request."""


def demo_config(spec: str, store: Path, upstreams: list[str], proc_root: Path) -> Config:
    """The configuration `jouleprobe run` would be given for this node: a proxy in front of
    every board's server but the traced one, whose spans come to the OTLP receiver and
    whose /metrics are scraped too (windows, and the spans' coverage of them); the
    workloads' cgroups read under `proc_root`, with no kubelet or API server to ask."""
    config = load(environ={}, overrides={
        "agent.simulate": spec, "agent.listen": "127.0.0.1:0",
        "ingest.listen": "127.0.0.1:0", "records.path": str(store),
        "otlp.listen": "127.0.0.1:0", "otlp.grpc_listen": "",
        "workloads.proc_root": str(proc_root), "workloads.pod_resources": "",
        "workloads.kubernetes": "off",
    })
    service = f"gpu{TRACED}"
    return replace(
        config,
        proxy=tuple(ProxyTable(name=f"gpu{gpu}", listen="127.0.0.1:0", upstream=url,
                               gpus=(gpu,))
                    for gpu, url in enumerate(upstreams) if gpu != TRACED),
        # vLLM's spans name no model: the trace source does.
        trace=(TraceTable(service=service, gpus=(TRACED,), model=served_model(TRACED),
                          settle=TRACE_SETTLE_S),),
        scrape=(ScrapeTable(kind="vllm", url=f"{upstreams[TRACED]}/metrics", gpus=(TRACED,),
                            interval=SCRAPE_INTERVAL_S, trace=service),),
    )


async def demo(spec: str, seconds: float, store: Path, queries_per_day: float,
               proc: Path) -> int:
    """The demo on `spec`'s boards; `proc`: an empty folder for the simulated /proc."""
    models = parse_spec(spec)
    if len(models) <= TRACED:
        raise ValueError(f"--simulate: the demo needs {TRACED + 1} GPUs at least (one behind "
                         f"the proxy, one traced), got {spec!r}")
    sockets = [bind("127.0.0.1:0") for _ in models]  # the servers' ports, known up front
    trainer = training_job(models[TRAINING])
    processes = SimulatedProcesses.serving([served_model(i) for i in range(len(models))],
                                           [trainer])
    config = demo_config(spec, store, [_address(sock) for sock in sockets],
                         processes.write_proc(proc))
    request_load = RequestLoad(models)
    source = SimulatedGpuSource(models, load=request_load, processes=processes)
    host = EstimatedHostSource(config.host.idle_watts, config.host.max_watts)
    node = Node(config, source, host, pod_names=processes)
    metrics_app, _ = build_apps(node, token=None)
    receiver = trace_receiver(node)
    assert receiver is not None  # the config has a [[trace]] table
    logging.getLogger("agent").setLevel(logging.WARNING)  # the demo prints its own story

    print(f"jouleprobe demo: SIMULATED node {spec} ({', '.join(m.nvml_name for m in models)});")
    print(f"  each GPU serves one model ({', '.join(served_model(i) for i in range(len(models)))}),"
          f" {MAX_BATCH} requests at a time, the rest queued; GPU {TRACED} exports vLLM's")
    print("  request spans to the agent's OTLP receiver (nothing in the data path) and is")
    print("  scraped for its vLLM metrics too; the others are behind the jouleprobe proxy;")
    print(f"  {seconds:.0f} s of chat requests, streamed and not, "
          f"{' -> '.join(map(str, CONCURRENCY_PHASES))} clients per GPU; host energy "
          "ESTIMATED from CPU use;")
    print(f"  every server is a SIMULATED pod, and GPU {TRAINING} also runs a SIMULATED training "
          f"job ({'/'.join(TRAINER)}: {trainer.sm_util:.0f} % SM, +{trainer.power_w:.0f} W, "
          f"{trainer.busy_s:.0f} s of every {trainer.cycle_s:.0f})")
    node.start()
    tasks = [asyncio.create_task(attribute_periodically(node))]
    runners = [await start_site(metrics_app, config.agent.listen, "metrics")]
    proxies = Proxies()
    try:
        otlp, _ = await start_trace_receiver(receiver, config, token=None)
        runners.append(otlp)
        traces = TracerProvider(resource=Resource.create({"service.name": f"gpu{TRACED}"}))
        traces.add_span_processor(BatchSpanProcessor(  # vLLM's exporter, sooner than its 5 s
            OTLPSpanExporter(endpoint=f"{_url(otlp)}{TRACES_PATH}"),
            schedule_delay_millis=500))
        for gpu, sock in enumerate(sockets):
            runners.append(await start_site(
                upstream_for(gpu, request_load, traces if gpu == TRACED else None), sock,
                f"simulated server of GPU {gpu}"))
        await start_proxies(node, proxies)
        tasks += start_scrapers(node, receiver.coverage)
        entries = iter(proxies.urls)
        urls = [_address(sock) if gpu == TRACED else next(entries)
                for gpu, sock in enumerate(sockets)]
        print(f"  idle for {IDLE_LEAD_S:.0f} s so the agent learns each GPU's idle power ...")
        await asyncio.sleep(IDLE_LEAD_S)
        await run_load(urls, seconds)
        await asyncio.to_thread(traces.shutdown)  # the last spans, exported
        await asyncio.sleep(max(node.engine.longest_settle_s, SCRAPE_INTERVAL_S)
                            + 2 * config.agent.sample_interval)
        await cancel(tasks)
        await asyncio.to_thread(node.drain)
        async with aiohttp.ClientSession() as session, \
                session.get(f"{_url(runners[0])}/metrics") as response:
            scraped = await response.text()
    finally:
        await cancel(tasks)
        await proxies.stop()
        for runner in reversed(runners):
            await runner.cleanup()

    print()
    print(run_report(str(store), None, "table", None), end="")
    print()
    print(run_report(str(store), None, "table", None, workloads_by="namespace"), end="")
    print()
    worst = 0.0
    balances = conservation(scraped)
    for name, (accounted, measured) in sorted(balances.items()):
        error = abs(accounted - measured) / measured if measured else 0.0
        worst = max(worst, error)
        print(f"  GPU {name}: attributed + unattributed = {accounted:,.1f} J, "
              f"measured {measured:,.1f} J (relative difference {error:.1e}, from /metrics)")
    figures = workload_figures(scraped)
    workloads_ok = figures is not None and print_workloads(
        figures, {int(gpu): measured for gpu, (_, measured) in balances.items()},
        "/".join(TRAINER))
    if figures is None:
        print(f"  no workload view in /metrics: "
              f"{node.workloads_off or 'its figures are not exported'}")
    for name, ratio in coverage(scraped).items():
        print(f"  {name}: {ratio:.1%} of its requests in its latest compared scrape window "
              "arrived as spans (jouleprobe_otlp_coverage_ratio, from /metrics)")
    fleet = _fleet_line(store, queries_per_day, config.site.pue)
    if fleet:
        print(fleet)
    print(f"  records: {store}  (jouleprobe report --store {store}; "
          f"jouleprobe fleet --from-store {store} --queries-per-day 1B)")
    return 0 if worst <= RELATIVE_TOLERANCE and fleet and workloads_ok else 1


@dataclass(frozen=True, slots=True)
class WorkloadFigures:
    """The workload view's counters, by workload name (the `workload` label) and GPU."""

    energy_j: Mapping[tuple[str, int], float]
    inference: frozenset[str]
    """The workloads seen serving inference."""
    unattributed_j: Mapping[int, float]


def workload_figures(metrics_text: str) -> WorkloadFigures | None:
    """The workload view's counters from a scrape of /metrics; None where it exports none."""
    energy: dict[tuple[str, int], float] = {}
    unattributed: dict[int, float] = {}
    inference: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "jouleprobe_workload_gpu_energy_joules_total":
                energy[(labels["workload"], int(labels["gpu"]))] = sample.value
            elif sample.name == "jouleprobe_workload_unattributed_gpu_energy_joules_total":
                unattributed[int(labels["gpu"])] = sample.value
            elif sample.name == "jouleprobe_workload_info" and labels["inference"] == "true":
                inference.add(labels["workload"])
    if not unattributed:
        return None
    return WorkloadFigures(energy, frozenset(inference), unattributed)


def print_workloads(figures: WorkloadFigures, measured: Mapping[int, float],
                    trainer: str) -> bool:
    """Each workload's energy and share of its GPU, then per GPU workloads + unattributed
    against the energy measured; True where every GPU balances and `trainer` got energy."""
    print("  Workloads (SIMULATED pods; from /metrics):")
    width = max((len(name) for name, _ in figures.energy_j), default=0)
    for (name, gpu), joules in sorted(figures.energy_j.items(),
                                      key=lambda item: (item[0][1], -item[1])):
        total = measured.get(gpu, 0.0)
        share = f"{joules / total:6.1%}" if total else "     -"
        served = "served inference" if name in figures.inference else "no inference seen"
        print(f"    GPU {gpu}  {name:<{width}}  {joules:>10,.1f} J  {share} of the GPU  {served}")
    worst = 0.0
    for gpu, total in sorted(measured.items()):
        owned = math.fsum(j for (_, on), j in figures.energy_j.items() if on == gpu)
        rest = figures.unattributed_j.get(gpu, 0.0)
        error = abs(owned + rest - total) / total if total else 0.0
        worst = max(worst, error)
        print(f"  GPU {gpu}: workloads + unattributed = {owned:,.1f} + {rest:,.1f} = "
              f"{owned + rest:,.1f} J, measured {total:,.1f} J (relative difference "
              f"{error:.1e})")
    trained = sum(j for (name, _), j in figures.energy_j.items() if name == trainer)
    if trained <= 0:
        print(f"  the training job {trainer} got no energy")
    return worst <= RELATIVE_TOLERANCE and trained > 0


def coverage(metrics_text: str) -> dict[str, float]:
    """Per trace source: the share of its server's requests that arrived as spans, in the
    latest scrape window compared, from a scrape of /metrics."""
    return {sample.labels["source"]: sample.value
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples
            if sample.name == "jouleprobe_otlp_coverage_ratio"
            and sample.labels["quantity"] == "requests"}


def _url(runner: web.AppRunner) -> str:
    return "http://{}:{}".format(*runner.addresses[0][:2])


def _address(sock: socket.socket) -> str:
    return "http://{}:{}".format(*sock.getsockname()[:2])


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
    with tempfile.TemporaryDirectory(prefix="jouleprobe-demo-proc-") as proc:
        return asyncio.run(demo(spec, seconds, path, queries_per_day, Path(proc)))
