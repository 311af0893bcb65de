"""vLLM's request spans, made with the real OpenTelemetry SDK: what the simulated server
exports for `jouleprobe demo`, and the shape the OTLP receiver's tests send.

As vLLM 0.34.0 makes them (vllm/v1/engine/output_processor.py `do_tracing`, through
vllm/tracing/otel.py): one `llm_request` span per finished request, kind SERVER, scope
`vllm.tracing.otel`, started at the request's arrival (wall-clock ns, `time.time()`) and
ended when vLLM traces it; latencies in seconds since arrival; sampling options only where
they are not 0 (a greedy request has no temperature); no model name (the V0 engine, vLLM
0.10 and earlier, set `gen_ai.response.model`). A request its client aborted has no span.
The resource carries `vllm.process_id`, and the service name of OTEL_SERVICE_NAME.
"""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

NS = 1_000_000_000


def vllm_span(provider: TracerProvider, request_id: str, arrival: float, *, queue: float,
              ttft: float, e2e: float, prompt: int, completion: int) -> None:
    """One finished request's span: arrival in wall-clock seconds, the rest in seconds
    since arrival (`queue`: time waiting to be scheduled)."""
    tracer = provider.get_tracer("vllm.tracing.otel")
    span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=int(arrival * NS))
    span.set_attributes({
        "gen_ai.usage.prompt_tokens": prompt,
        "gen_ai.usage.completion_tokens": completion,
        "gen_ai.request.id": request_id,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.request.max_tokens": 256,
        "gen_ai.request.n": 1,
        "gen_ai.latency.time_in_queue": queue,
        "gen_ai.latency.time_to_first_token": ttft,
        "gen_ai.latency.e2e": e2e,
        "gen_ai.latency.time_in_model_prefill": ttft - queue,
        "gen_ai.latency.time_in_model_decode": e2e - ttft,
        "gen_ai.latency.time_in_model_inference": e2e - queue,
    })
    span.end(end_time=int((arrival + e2e + 0.001) * NS))  # vLLM ends it when it traces
