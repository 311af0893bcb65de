"""Spans as the inference servers shape them, made with the real OpenTelemetry SDK, for the
OTLP receiver's tests: vLLM's (`agent.sim.traces.vllm_span`, which the demo's simulated
server exports too), SGLang's (0.5.23) and Triton's (server e1db8a60).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from agent.sim.traces import NS, vllm_span

__all__ = ["NS", "sglang_request", "triton_request", "vllm_span"]


def sglang_request(tokenizer: TracerProvider, scheduler: TracerProvider, rid: str,
                   arrival: float, *, queue: float, ttft: float, e2e: float, prompt: int,
                   completion: int, aborted: bool = False) -> None:
    """One request's spans as SGLang 0.5.23 makes them (sglang/srt/tracing/trace.py,
    managers/tokenizer_manager.py `convert_to_span_attrs`): the request span
    `" Req <rid[:8]>"` from the tokenizer process, its scheduler thread span and phases from
    a scheduler process (a provider of its own, as a process is), all INTERNAL, scope
    `sglang server`, with explicit wall-clock times. The scheduler's spans end first."""
    root = tokenizer.get_tracer("sglang server").start_span(
        f" Req {rid[:8]}", kind=SpanKind.INTERNAL, start_time=int(arrival * NS),
        attributes={"rid": rid, "module": "sglang::request"})
    context = trace.set_span_in_context(root)
    tracer = scheduler.get_tracer("sglang server")
    thread = tracer.start_span("Scheduler [TP 0] (host:5d1f0c2a | pid:4242)", context=context,
                               start_time=int((arrival + 0.001) * NS),
                               attributes={"host_id": "5d1f0c2a", "pid": 4242,
                                           "thread_label": "Scheduler", "tp_rank": 0})
    inner = trace.set_span_in_context(thread)
    phases = (("request_process", 0.001, 0.002), ("prefill_waiting", 0.002, queue),
              ("prefill_forward", queue, ttft), ("decode_waiting", ttft, ttft),
              ("decode_forward", ttft, e2e))
    for name, begin, end in phases:
        tracer.start_span(name, context=inner, start_time=int((arrival + begin) * NS)).end(
            end_time=int((arrival + end) * NS))
    thread.end(end_time=int((arrival + e2e) * NS))
    latencies = {"gen_ai.latency.time_to_first_token": ttft, "gen_ai.latency.e2e": e2e,
                 "gen_ai.latency.time_in_model_decode": e2e - ttft}
    if not aborted:
        root.set_attributes({
            "gen_ai.usage.completion_tokens": completion, "gen_ai.usage.prompt_tokens": prompt,
            "gen_ai.usage.cached_tokens": 0, "gen_ai.request.id": rid,
            "gen_ai.request.max_tokens": 256, "gen_ai.request.top_p": 1.0,
            "gen_ai.response.model": "Qwen/Qwen2.5-7B-Instruct",
            "gen_ai.response.finish_reasons": '["stop"]'})
    root.set_attributes(latencies)
    root.end(end_time=int((arrival + e2e) * NS))


def triton_request(provider: TracerProvider, arrival: float, *, queue: float, compute: float,
                   model: str = "simple", request_id: str | None = None,
                   parent_id: int = 0) -> None:
    """One request's spans as Triton makes them (server src/tracer.cc): `InferRequest`,
    under it a span named after the model from REQUEST_START to REQUEST_END with Triton's
    attributes, under that `compute`; all SERVER, scope `triton-server`, times wall-clock ns
    from the steady clock."""
    tracer = provider.get_tracer("triton-server")
    ns = int(arrival * NS)
    root = tracer.start_span("InferRequest", kind=SpanKind.SERVER, start_time=ns)
    root.add_event("HTTP_RECV_START", timestamp=ns)
    root.add_event("HTTP_RECV_END", timestamp=ns + 20_000)
    attributes: dict[str, str | int] = {
        "triton.model_name": model, "triton.model_version": 1, "triton.trace_id": 1,
        "triton.trace_parent_id": parent_id}
    if request_id is not None:
        attributes["triton.request_id"] = request_id
    start = ns + 50_000
    model_span = tracer.start_span(model, context=trace.set_span_in_context(root),
                                   kind=SpanKind.SERVER, start_time=start,
                                   attributes=attributes)
    model_span.add_event("REQUEST_START", timestamp=start)
    model_span.add_event("QUEUE_START", timestamp=start + 10_000)
    computed = start + int(queue * NS)
    done = computed + int(compute * NS)
    step = tracer.start_span("compute", context=trace.set_span_in_context(model_span),
                             kind=SpanKind.SERVER, start_time=computed)
    for event, at in (("COMPUTE_START", computed), ("COMPUTE_INPUT_END", computed + 1_000),
                      ("COMPUTE_OUTPUT_START", done - 1_000), ("COMPUTE_END", done)):
        step.add_event(event, timestamp=at)
    step.end(end_time=done)
    model_span.add_event("REQUEST_END", timestamp=done + 10_000)
    model_span.end(end_time=done + 10_000)
    root.add_event("INFER_RESPONSE_COMPLETE", timestamp=done + 20_000)
    root.end(end_time=done + 40_000)
