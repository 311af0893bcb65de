"""Throughput of the ingest API, and the CPU cost of attribution at 10 Hz.

Run: python bench/ingest.py [--batches 150] [--singles 6000] [--sampler-seconds 10]

1. Events per second through `POST /api/v1/events` over real HTTP on 127.0.0.1, into a
   real AttributionEngine over 8 timelines: batched, 1000 events per POST (the starts of
   500 requests and their ends; then, for comparison, 1000 one-shot "request" events),
   and one event per POST. The load comes from another process on two keep-alive
   connections (stdlib http.client, bodies encoded before the clock starts), so the
   figure is the agent's side. The engine only takes events here; finalising them is
   part 2.
2. CPU seconds that attribution (add, end and advance, as the daemon calls them) spends
   per simulated second with 200 requests always active on 8 GPUs (two 4-GPU replicas,
   tokens policy, host lane included), timelines filled at 10 Hz and advance() every
   0.5 s, over a simulated minute. Timeline appends are the sampler's cost, not counted
   here; bench/sampler.py measures the scheduled sampler at 10 Hz, and is run (unless
   --sampler-seconds 0) so that the last line's `core_fraction_at_10hz` is the sum of both.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import random
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import steady_timelines

from agent.attribution import AttributionEngine
from agent.devices.base import GpuInfo
from agent.intake.client import EVENTS_PATH
from agent.intake.ingest import ingest_app
from agent.requests import Request
from agent.timeline import EnergyPoint, Timeline

GPUS = 8
HZ = 10
MODEL = "llama-3.1-8b-instruct"
CONNECTIONS = 2

Mode = tuple[int, int, int, bool]
"""Arguments of `_bodies`: requests, events per POST, first request number, whole."""


# --- 1. ingest throughput ----------------------------------------------------------------


def _bodies(requests: int, per_post: int, first: int, whole: bool) -> tuple[list[bytes], int]:
    """POST bodies of `per_post` events reporting `requests` requests, each either as a start
    and an end (a batch holds the starts of its requests, then their ends) or, with
    `whole`, as one "request" event."""
    now = time.monotonic()
    done = {"first_token_time": now + 0.05, "prompt_tokens": 512, "completion_tokens": 128}
    events: list[dict[str, Any]] = []
    step = per_post if whole else max(1, per_post // 2)
    for i in range(first, first + requests, step):
        chunk = range(i, min(i + step, first + requests))
        if whole:
            events += [{"type": "request", "id": f"r{j}", "model": MODEL, "gpus": [j % GPUS],
                        "start": now, "end": now + 0.4, **done} for j in chunk]
            continue
        events += [{"type": "start", "id": f"r{j}", "model": MODEL, "gpus": [j % GPUS],
                    "time": now} for j in chunk]
        events += [{"type": "end", "id": f"r{j}", "time": now + 0.4, **done} for j in chunk]
    bodies = [json.dumps({"events": events[i:i + per_post]}).encode()
              for i in range(0, len(events), per_post)]
    return bodies, len(events)


def _post_all(port: int, bodies: list[bytes], accepted: list[int]) -> None:
    """POSTs `bodies` in turn on one keep-alive connection; appends the accepted count."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    total = 0
    try:
        for body in bodies:
            client.request("POST", EVENTS_PATH, body, headers)
            response = client.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {answer}")
            total += answer["accepted"]
    finally:
        client.close()
    accepted.append(total)


def _load(port: int, mode: Mode, conn: Connection) -> None:
    """The load generator (its own process): POSTs the bodies on CONNECTIONS keep-alive
    connections at once, as several server workers would, so that the agent never waits
    for the next body while the previous answer travels."""
    bodies, count = _bodies(*mode)
    share = -(-len(bodies) // CONNECTIONS // 2) * 2  # even: a start and its end stay together
    accepted: list[int] = []
    threads = [threading.Thread(target=_post_all, args=(port, bodies[i:i + share], accepted))
               for i in range(0, len(bodies), share)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    conn.send((count, sum(accepted), elapsed))


async def _run_load(port: int, mode: Mode) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_load, args=(port, mode, sender))
    process.start()
    try:
        while not receiver.poll():  # the server runs on this loop meanwhile
            if not process.is_alive():
                raise RuntimeError(f"the load generator exited with {process.exitcode}")
            await asyncio.sleep(0.05)
        count, accepted, elapsed = receiver.recv()
    finally:
        await asyncio.to_thread(process.join, 30)
    if accepted != count:
        raise RuntimeError(f"{count - accepted} of {count} events were not accepted")
    return count, elapsed


async def ingest_throughput(modes: dict[str, Mode]) -> dict[str, tuple[int, float]]:
    """(events, seconds) of each mode, in turn, through one server and engine."""
    now = time.monotonic()
    engine = AttributionEngine(steady_timelines(now - 1.0, 120.0, GPUS, HZ), max_pending=1_000_000)
    infos = [GpuInfo(i, f"GPU-{i:08x}-0000-0000-0000-000000000000", "bench", "counter",
                     "instant") for i in range(GPUS)]
    app = ingest_app(engine, infos, token=None, max_body_bytes=1 << 20)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return {name: await _run_load(port, mode) for name, mode in modes.items()}
    finally:
        await runner.cleanup()


# --- 2. attribution cost at 10 Hz --------------------------------------------------------


def attribution_cost(seconds: float, active: int, seed: int = 1) -> dict[str, float]:
    """CPU seconds of the engine's calls over `seconds` of simulated serving."""
    rng = random.Random(seed)
    t0 = 1_000.0
    ticks = round(seconds * HZ)
    gpu_lines = {gpu: Timeline(max_points=ticks + 2) for gpu in range(GPUS)}
    host_line = Timeline(max_points=ticks + 2)
    engine = AttributionEngine(gpu_lines, host_line, policy="tokens", pue=1.2,
                               max_age_s=300.0, settle_s=2.0)
    replicas = [(0, 1, 2, 3), (4, 5, 6, 7)]
    energy = [0.0] * GPUS
    host_energy = 0.0
    running: list[tuple[float, Request]] = []  # (end time, request)
    serial = 0
    cpu = advances = finished = 0
    cpu_advance = 0.0

    def new_request(start: float) -> tuple[float, Request]:
        nonlocal serial
        serial += 1
        duration = rng.uniform(2.0, 20.0)
        request = Request(f"q{serial}", MODEL, "bench", replicas[serial % 2], start)
        return start + duration, request

    for tick in range(ticks + 1):
        now = t0 + tick / HZ
        for gpu in range(GPUS):
            energy[gpu] += rng.uniform(250.0, 450.0) / HZ
            gpu_lines[gpu].append(EnergyPoint(now, energy[gpu]))
        host_energy += rng.uniform(150.0, 250.0) / HZ
        host_line.append(EnergyPoint(now, host_energy))

        ending = [item for item in running if item[0] <= now]
        running = [item for item in running if item[0] > now]
        starting = [new_request(now) for _ in range(active - len(running))]
        details = [(end, request, rng.uniform(0.05, 0.5), rng.randint(100, 2000),
                    rng.randint(50, 500)) for end, request in ending]

        began = time.process_time()
        for end, request, ttft, prompt, completion in details:
            engine.end(request.id, end, first_token=request.start + ttft,
                       prompt_tokens=prompt, completion_tokens=completion)
        for _, request in starting:
            engine.add(request)
        mid = time.process_time()
        if tick % (HZ // 2) == 0:  # every 0.5 s, as the daemon calls it
            finished += len(engine.advance(now))
            advances += 1
        done = time.process_time()
        cpu += done - began
        cpu_advance += done - mid
        running += starting

    totals = engine.totals()
    return {
        "cpu_s": cpu, "cpu_advance_s": cpu_advance, "seconds": seconds, "ticks": ticks,
        "advances": advances, "finished": finished, "requests": serial,
        "pending": totals.pending_requests,
        "measured_j": sum(g.measured_j for g in totals.gpus.values()),
        "attributed_j": sum(g.gpu_dynamic_j + g.gpu_static_j for g in totals.gpus.values()),
    }


def sampler_fraction(seconds: float) -> float | None:
    """`core_fraction_at_10hz` of bench/sampler.py (8 GPUs, fake pynvml)."""
    script = Path(__file__).resolve().parent / "sampler.py"
    result = subprocess.run(
        [sys.executable, str(script), "--gpus", str(GPUS), "--rounds", "500",
         "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["core_fraction_at_10hz"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150, help="POSTs of 1000 events")
    parser.add_argument("--singles", type=int, default=6000, help="POSTs of one event")
    parser.add_argument("--active", type=int, default=200, help="requests always active")
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--sampler-seconds", type=float, default=10.0,
                        help="seconds of bench/sampler.py to add in (0: leave it out)")
    args = parser.parse_args()

    modes: dict[str, Mode] = {
        "batched": (args.batches * 500, 1000, 0, False),
        "batched_whole": (args.batches * 1000, 1000, 10_000_000, True),
        "single": (args.singles // 2, 1, 20_000_000, False),
    }
    ingest = asyncio.run(ingest_throughput(modes))
    rates = {name: events / seconds for name, (events, seconds) in ingest.items()}
    labels = {
        "batched": "batched, 1000 events per POST (start + end per request)",
        "batched_whole": "batched, 1000 events per POST (one request event each)",
        "single": "one event per POST (keep-alive)",
    }
    print(f"ingest API over HTTP on 127.0.0.1, {CONNECTIONS} connections from another "
          f"process, into a real engine ({GPUS} GPUs):")
    for name, (events, seconds) in ingest.items():
        print(f"  {labels[name] + ':':<58}{rates[name]:>10,.0f} events/s "
              f"({events:,} in {seconds:.2f} s)")

    cost = attribution_cost(args.seconds, args.active)
    attribution = cost["cpu_s"] / cost["seconds"]
    print(f"attribution, {args.active} active requests on {GPUS} GPUs (2 × TP4, tokens policy, "
          f"host lane), timelines at {HZ} Hz, advance() every 0.5 s, "
          f"{cost['seconds']:.0f} simulated s:")
    print(f"  {cost['requests']:,} requests, {cost['finished']:,} final, "
          f"{cost['advances']} advance() calls")
    print(f"  CPU: {cost['cpu_s'] * 1e3:.1f} ms ({cost['cpu_advance_s'] * 1e3:.1f} ms in "
          f"advance), {cost['cpu_s'] / cost['ticks'] * 1e6:.0f} µs per sampling round of "
          f"{GPUS} GPUs")
    print(f"  core fraction: {attribution * 100:.3f} % of one core")
    print(f"  energy attributed / measured on the GPUs: "
          f"{cost['attributed_j'] / cost['measured_j'] * 100:.1f} % "
          f"(the rest belongs to requests still pending at the end)")

    sampler = sampler_fraction(args.sampler_seconds) if args.sampler_seconds > 0 else None
    if sampler is None:
        total = attribution
        print("core fraction at 10 Hz: attribution only (bench/sampler.py not run)")
    else:
        total = sampler + attribution
        print(f"scheduled sampler (bench/sampler.py, {GPUS} GPUs, fake pynvml): "
              f"{sampler * 100:.3f} % of one core")
        print(f"sampler + attribution at 10 Hz: {total * 100:.3f} % of one core "
              f"(target ≤ 1 %)")
    print(f"targets: ≥ 100,000 events/s batched: "
          f"{'met' if rates['batched'] >= 100_000 else 'NOT met'}; ≤ 1 % of a core: "
          f"{'met' if total <= 0.01 else 'NOT met'}")
    print(json.dumps({
        "events_per_s_batched": round(rates["batched"]),
        "events_per_s_single": round(rates["single"]),
        "events_per_s_batched_request_events": round(rates["batched_whole"]),
        "core_fraction_at_10hz": total,
        "core_fraction_attribution": attribution,
        "core_fraction_sampler": sampler,
    }))


if __name__ == "__main__":
    main()
