"""Accelerated soak: a million requests through the agent's request path, memory watched.

Run: python bench/soak.py [--requests 1000000] [--rate 1000] [--report-every 100000]

What runs is what `jouleprobe run` runs for each request, minus the sockets: batches of
ingest events (JSON bodies, as a server would POST them) go through the ingest API's own
intake function into a real AttributionEngine (tokens policy, learned prefill weight and
idle baseline, host lane) over GPU and host timelines; every 0.5 simulated seconds the
engine is advanced as the daemon does, and the final requests go to a real RecordStore
(SQLite, its writer thread) and to the request metrics, which are rendered as Prometheus
text every 10 simulated seconds, as a scrape would. The config is the agent's default
(settle 2 s, max_age 300 s, max_pending 10,000, 600 s of timeline at 10 Hz).

Simulated time runs as fast as the CPU allows: each step appends one 100 ms sample per
GPU and posts the events of that step. Half the requests are reported as a start event
then an end event, half as one "request" event when they end; each lasts 0.1-2 s on one
GPU or a pair, with a first token and token counts.

Every --report-every requests, a line: requests so far, simulated seconds, requests/s,
RSS, requests pending in the engine, records queued/written/dropped. The last line is one
JSON object with the final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.attribution import AttributionEngine
from agent.config import AttributionSection, load
from agent.devices.base import GpuInfo
from agent.intake.ingest import _Intake
from agent.sampler import NodeSnapshot
from agent.store import RecordStore
from agent.timeline import EnergyPoint, Timeline
from exporters.request_metrics import RequestMetrics

HZ = 10
STEP_S = 1.0 / HZ
ADVANCE_EVERY = 5
"""Steps between two advance() calls: every 0.5 s, as the daemon's attribution period."""
SCRAPE_EVERY = 100
"""Steps between two renders of the metrics: every 10 simulated seconds."""
MODELS = ("llama-3.1-8b-instruct", "qwen2.5-32b", "mistral-7b")
IDLE_W, PER_REQUEST_W, MAX_W = 70.0, 15.0, 700.0
HOST_IDLE_W, HOST_PER_REQUEST_W = 150.0, 0.5


class _Registry:
    """The request metrics as the agent's /metrics renders them."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Any:
        yield from self._metrics.families(NodeSnapshot(time.monotonic(), (), None))


class Soak:
    def __init__(self, gpus: int, rate: float, store_path: str, seed: int) -> None:
        config = load(environ={})
        attribution: AttributionSection = config.attribution
        self.rng = random.Random(seed)
        self.gpus = gpus
        self.per_step = rate / HZ
        self.now = 1_000.0
        points = round(config.agent.timeline_seconds * HZ) + 1
        self.timelines = {gpu: Timeline(points) for gpu in range(gpus)}
        self.host = Timeline(points)
        self.energy = [0.0] * gpus
        self.host_energy = 0.0
        for line in (*self.timelines.values(), self.host):
            line.append(EnergyPoint(self.now, 0.0))
        self.engine = AttributionEngine(
            self.timelines, self.host, policy="tokens", prefill_weight="auto",
            pue=config.site.pue, settle_s=attribution.settle, max_age_s=attribution.max_age,
            max_pending=attribution.max_pending,
        )
        infos = [GpuInfo(i, f"GPU-{i:08x}-0000-4000-8000-000000000000", "soak", "counter",
                         "instant") for i in range(gpus)]
        self.intake = _Intake(self.engine, infos, lambda: self.now, time.time)
        self.store = RecordStore(store_path, pue=config.site.pue, simulated=True,
                                 flush_interval_s=config.records.flush_interval,
                                 retention_days=None)
        self.metrics = RequestMetrics(self.engine.totals)
        self.registry = CollectorRegistry()
        self.registry.register(_Registry(self.metrics))  # type: ignore[arg-type]
        self.active = [0] * gpus
        self.later: dict[int, list[dict[str, Any]]] = defaultdict(list)
        """Events to post at a later step (ends, one-shot reports), by step."""
        self.leaving: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        """GPU sets of requests that end at a step, for the power model."""
        self.step = 0
        self.started = self.accepted = self.refused = self.finished = 0
        self.events = 0
        self.scrape_bytes = 0

    def _new(self, events: list[dict[str, Any]]) -> None:
        rng = self.rng
        serial = self.started
        self.started += 1
        first = rng.randrange(self.gpus)
        gpus = [first] if rng.random() < 0.7 else [first, (first + 1) % self.gpus]
        start = self.now + rng.uniform(0, STEP_S)
        duration = rng.uniform(0.1, 2.0)
        end = start + duration
        fields = {
            "first_token_time": start + duration * rng.uniform(0.02, 0.3),
            "prompt_tokens": rng.randint(50, 2000), "completion_tokens": rng.randint(10, 500),
        }
        ending = self.step + int(duration * HZ) + 1  # reported once it has ended
        base = {"id": f"q{serial}", "model": MODELS[serial % len(MODELS)], "gpus": gpus}
        if serial % 2:
            events.append({"type": "start", **base, "time": start})
            self.later[ending].append({"type": "end", "id": base["id"], "time": end, **fields})
        else:
            self.later[ending].append({"type": "request", **base, "start": start, "end": end,
                                       **fields})
        for gpu in gpus:
            self.active[gpu] += 1
        self.leaving[ending].append(tuple(gpus))

    def _sample(self) -> None:
        """One 100 ms sample per GPU and of the host, at the power the load draws."""
        self.now += STEP_S
        for gpu, line in self.timelines.items():
            watts = min(MAX_W, IDLE_W + PER_REQUEST_W * self.active[gpu])
            self.energy[gpu] += watts * STEP_S * self.rng.uniform(0.95, 1.05)
            line.append(EnergyPoint(self.now, self.energy[gpu]))
        self.host_energy += (HOST_IDLE_W + HOST_PER_REQUEST_W * sum(self.active)) * STEP_S
        self.host.append(EnergyPoint(self.now, self.host_energy))

    def run_step(self, start_more: bool) -> None:
        self._sample()
        events = self.later.pop(self.step, [])
        for gpus in self.leaving.pop(self.step, []):
            for gpu in gpus:
                self.active[gpu] -= 1
        if start_more:
            count = int(self.per_step) + (self.rng.random() < self.per_step % 1)
            for _ in range(count):
                self._new(events)
        if events:
            self._post(events)
        if self.step % ADVANCE_EVERY == 0:
            self._finish(self.engine.advance(self.now))
        if self.step % SCRAPE_EVERY == 0:
            self.scrape_bytes += len(generate_latest(self.registry))
        self.step += 1

    def _post(self, events: list[dict[str, Any]]) -> None:
        body = json.dumps({"events": events}).encode()
        status, answer = self.intake.take(body)
        self.events += len(events)
        self.accepted += answer["accepted"]
        if status == 429:
            self.refused += len(events) - answer["retry_from"]
        elif status != 200:
            raise RuntimeError(f"the intake refused events: {answer['errors'][:3]}")

    def _finish(self, energies: list[Any]) -> None:
        if energies:
            self.store.submit(energies)
            self.metrics.observe(energies)
            self.finished += len(energies)

    def drain(self) -> None:
        """Let every request end and settle, as a stopping agent does."""
        while self.later or self.engine.totals().pending_requests:
            self.run_step(start_more=False)
        self._finish(self.engine.advance(self.now + self.engine.settle_s))
        self.store.close()


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="new requests per simulated second, node-wide (1000)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--report-every", type=int, default=100_000, metavar="REQUESTS")
    parser.add_argument("--store", metavar="PATH",
                        help="SQLite file for the records (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store_path = args.store or os.path.join(scratch, "soak.db")
        soak = Soak(args.gpus, args.rate, store_path, args.seed)
        rss_start = peak = rss_mb()
        print(f"soak: {args.requests:,} requests at {args.rate:g}/simulated s on {args.gpus} "
              f"GPUs; RSS at start {rss_start:.1f} MB")
        print(f"{'requests':>10} {'sim s':>8} {'wall s':>7} {'req/s':>8} {'RSS MB':>7} "
              f"{'pending':>8} {'queued':>7} {'written':>9} {'dropped':>8}")
        began = time.perf_counter()
        next_report = args.report_every

        def report() -> None:
            nonlocal peak
            rss = rss_mb()
            peak = max(peak, rss)
            elapsed = time.perf_counter() - began
            stats = soak.store.stats()
            print(f"{soak.started:>10,} {soak.now - 1_000.0:>8.0f} {elapsed:>7.1f} "
                  f"{soak.started / elapsed:>8,.0f} {rss:>7.1f} "
                  f"{soak.engine.totals().pending_requests:>8,} {stats.pending:>7,} "
                  f"{stats.written_total:>9,} {stats.dropped_total:>8,}", flush=True)

        while soak.started < args.requests:
            soak.run_step(start_more=True)
            if soak.step % SCRAPE_EVERY == 0:
                peak = max(peak, rss_mb())
            if soak.started >= next_report:
                report()
                next_report += args.report_every
        soak.drain()
        elapsed = time.perf_counter() - began
        report()
        stats = soak.store.stats()
        totals = soak.engine.totals()
        rss_end = rss_mb()
        peak = max(peak, rss_end)
        print(f"done: {soak.started:,} requests ({soak.events:,} events) in {elapsed:.1f} s, "
              f"{soak.now - 1_000.0:,.0f} simulated s ({(soak.now - 1_000.0) / elapsed:.0f}x "
              f"real time); {soak.accepted:,} events accepted, {soak.refused:,} refused (429); "
              f"{soak.finished:,} final, {totals.late_requests:,} late, "
              f"{totals.expired_requests:,} expired; {stats.written_total:,} records written, "
              f"{stats.dropped_total:,} dropped; {soak.scrape_bytes / 2**20:.1f} MB of "
              f"metrics rendered; RSS start {rss_start:.1f} / peak {peak:.1f} / end "
              f"{rss_end:.1f} MB")
        print(json.dumps({
            "requests": soak.started,
            "events": soak.events,
            "requests_per_s": round(soak.started / elapsed),
            "simulated_s": round(soak.now - 1_000.0, 1),
            "rss_mb_start": round(rss_start, 1),
            "rss_mb_peak": round(peak, 1),
            "rss_mb_end": round(rss_end, 1),
            "records_written": stats.written_total,
            "records_dropped": stats.dropped_total,
            "events_refused": soak.refused,
            "requests_final": soak.finished,
            "requests_late": totals.late_requests,
            "requests_expired": totals.expired_requests,
        }))


if __name__ == "__main__":
    main()
