"""Throughput, CPU and memory of the OTLP trace receiver.

Run: python bench/otlp.py [--batches 200] [--spans-per-batch 512]

The agent's side runs in this process, on one event loop (one core): the OTLP/HTTP
receiver (`otlp_app` over a `TraceReceiver`) into a real AttributionEngine over 8 GPU
timelines at 10 Hz. Another process sends `--batches` exports of `--spans-per-batch`
vLLM-shaped `llm_request` spans each (tests/otel_spans.py: the attributes vLLM sets,
latencies in seconds, arrival in wall-clock ns), HTTP/protobuf, on two keep-alive
connections, bodies encoded before the clock starts, so the figures are the receiver's.

Printed:
1. spans received per second (each parsed, mapped and added to the engine) and the
   receiver's CPU per 1,000 requests;
2. the resident memory that the pending requests add, with every span received and none
   yet attributed (200 × 512 = 102,400 by default);
3. the CPU that attributing them all takes (`advance`), and spans per second received and
   attributed, end to end, on one core.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import multiprocessing
import random
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import steady_timelines

from agent.attribution import AttributionEngine
from agent.intake.otlp import RUNNER_OPTIONS, TraceReceiver, TraceSource, fixed, otlp_app
from agent.intake.otlp.http_service import TRACES_PATH

GPUS = 8
HZ = 10
HISTORY_S = 120.0
CONNECTIONS = 2
SERVICES = [f"vllm-{i}" for i in range(GPUS)]


def _attribute(key: str, value: object) -> KeyValue:
    pair = KeyValue(key=key)
    if isinstance(value, str):
        pair.value.string_value = value
    elif isinstance(value, int):
        pair.value.int_value = value
    else:
        pair.value.double_value = float(value)  # type: ignore[arg-type]
    return pair


def _bodies(batches: int, per_batch: int, seed: int = 1) -> list[bytes]:
    """Exports of vLLM-shaped spans, one service (one GPU) per batch in turn, requests of
    0.5–20 s that arrived in the last 100 s."""
    rng = random.Random(seed)
    now = time.time()
    bodies = []
    serial = 0
    for batch in range(batches):
        export = ExportTraceServiceRequest()
        resource_spans = export.resource_spans.add()
        resource_spans.resource.attributes.append(
            _attribute("service.name", SERVICES[batch % GPUS]))
        resource_spans.resource.attributes.append(_attribute("vllm.process_id", "4242"))
        scope = resource_spans.scope_spans.add()
        scope.scope.name = "vllm.tracing.otel"
        for _ in range(per_batch):
            serial += 1
            e2e = rng.uniform(0.5, 20.0)
            queue = rng.uniform(0.0, 0.2) * e2e
            ttft = queue + rng.uniform(0.02, 0.5) * (e2e - queue)
            arrival = now - 100.0 + rng.uniform(0.0, 75.0)
            span = scope.spans.add(
                trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="llm_request",
                kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=int(arrival * 1e9),
                end_time_unix_nano=int((arrival + e2e + 0.001) * 1e9))
            span.attributes.extend(_attribute(k, v) for k, v in (
                ("gen_ai.usage.prompt_tokens", rng.randint(16, 4096)),
                ("gen_ai.usage.completion_tokens", rng.randint(1, 1024)),
                ("gen_ai.request.id", f"cmpl-{serial:012x}-0"),
                ("gen_ai.request.top_p", 0.95),
                ("gen_ai.request.max_tokens", 1024),
                ("gen_ai.request.n", 1),
                ("gen_ai.latency.time_in_queue", queue),
                ("gen_ai.latency.time_to_first_token", ttft),
                ("gen_ai.latency.e2e", e2e),
                ("gen_ai.latency.time_in_model_prefill", ttft - queue),
                ("gen_ai.latency.time_in_model_decode", e2e - ttft),
                ("gen_ai.latency.time_in_model_inference", e2e - queue),
            ))
        bodies.append(export.SerializeToString())
    return bodies


def _post_all(port: int, bodies: list[bytes], rejected: list[int]) -> None:
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/x-protobuf"}
    total = 0
    try:
        for body in bodies:
            client.request("POST", TRACES_PATH, body, headers)
            response = client.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
            total += ExportTraceServiceResponse.FromString(answer).partial_success.rejected_spans
    finally:
        client.close()
    rejected.append(total)


def _load(port: int, batches: int, per_batch: int, conn: Connection) -> None:
    """The exporter side (its own process): the bodies on CONNECTIONS connections at once."""
    bodies = _bodies(batches, per_batch)
    share = -(-len(bodies) // CONNECTIONS)
    rejected: list[int] = []
    threads = [threading.Thread(target=_post_all, args=(port, bodies[i:i + share], rejected))
               for i in range(0, len(bodies), share)]
    conn.send(("ready", sum(map(len, bodies))))
    conn.recv()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.send((time.perf_counter() - started, sum(rejected)))


async def run(batches: int, per_batch: int) -> dict[str, float]:
    now = time.monotonic()
    engine = AttributionEngine(steady_timelines(now - HISTORY_S + 5.0, HISTORY_S, GPUS, HZ),
                               settle_s=0.0, max_age_s=1e6, max_pending=2_000_000)
    receiver = TraceReceiver(engine, [TraceSource(s, fixed((g,)))
                                      for g, s in enumerate(SERVICES)])
    runner = web.AppRunner(otlp_app(receiver, token=None, max_body_bytes=64 << 20),
                           access_log=None, **RUNNER_OPTIONS)
    await runner.setup()
    process = psutil.Process()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        load = context.Process(target=_load, args=(port, batches, per_batch, theirs))
        load.start()
        while not ours.poll():
            await asyncio.sleep(0.05)
        _, body_bytes = ours.recv()
        gc.collect()
        rss_before = process.memory_info().rss
        cpu_before = time.process_time()
        ours.send("go")
        while not ours.poll():
            await asyncio.sleep(0.01)
        elapsed, rejected = ours.recv()
        cpu_receive = time.process_time() - cpu_before
        await asyncio.to_thread(load.join, 30)
    finally:
        await runner.cleanup()
    spans = batches * per_batch
    accepted = sum(n for (outcome, _), n in receiver.stats.spans.items()
                   if outcome == "accepted")
    pending = engine.totals().pending_requests
    gc.collect()
    rss_pending = process.memory_info().rss - rss_before
    cpu_before = time.process_time()
    finals = engine.advance(now + 10.0)
    cpu_attribute = time.process_time() - cpu_before
    if rejected or pending != spans or len(finals) != spans:
        raise RuntimeError(f"{rejected} rejected, {pending} pending, {len(finals)} final "
                           f"of {spans} spans ({accepted} accepted)")
    return {
        "spans": spans, "body_mib": body_bytes / 2**20,
        "receive_s": elapsed, "spans_per_s_received": spans / elapsed,
        "receiver_cpu_s": cpu_receive,
        "receiver_cpu_ms_per_1000_requests": 1000 * cpu_receive / spans * 1000,
        "pending_rss_mib": rss_pending / 2**20,
        "pending_bytes_per_request": rss_pending / spans,
        "attribute_cpu_s": cpu_attribute,
        "attribute_cpu_ms_per_1000_requests": 1000 * cpu_attribute / spans * 1000,
        "spans_per_core_s_received_and_attributed": spans / (cpu_receive + cpu_attribute),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--spans-per-batch", type=int, default=512)
    args = parser.parse_args()
    result = asyncio.run(run(args.batches, args.spans_per_batch))
    print(f"{result['spans']} vLLM-shaped spans in {args.batches} HTTP/protobuf exports of "
          f"{args.spans_per_batch} ({result['body_mib']:.1f} MiB)")
    print(f"1. received: {result['spans_per_s_received']:,.0f} spans/s; receiver CPU "
          f"{result['receiver_cpu_ms_per_1000_requests']:.1f} ms per 1,000 requests")
    print(f"2. pending, none yet attributed: +{result['pending_rss_mib']:.0f} MiB RSS "
          f"({result['pending_bytes_per_request']:,.0f} bytes per request)")
    print(f"3. attributing them all: {result['attribute_cpu_ms_per_1000_requests']:.1f} ms "
          f"CPU per 1,000 requests; received and attributed: "
          f"{result['spans_per_core_s_received_and_attributed']:,.0f} spans per core-second")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
