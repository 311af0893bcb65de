"""OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`, the protocol
vLLM's and SGLang's exporters use by default (port 4317).

The same `TraceReceiver` as OTLP/HTTP takes the exports. Answers, as the specification
has exporters read them: OK with `partial_success`; UNAUTHENTICATED without the token
where one is set; RESOURCE_EXHAUSTED, gRPC's own answer, for a message past
`max_body_bytes` and beyond `max_concurrent` exports at once (so that what gRPC buffers
stays bounded: at most that many messages of that size); UNAVAILABLE, which exporters
retry with backoff, while the receiver cannot take an export whole (attribution at
capacity, a source's GPUs still being found). OpenTelemetry's Python exporter (vLLM's,
SGLang's) retries RESOURCE_EXHAUSTED too, until its timeout; the specification has other
exporters retry it only with RetryInfo, which gRPC's own answer lacks: the collector's
sending queue keeps such an export. Each export is handled whole on the event loop, once
gRPC has received it.
"""

from __future__ import annotations

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)

from agent.intake.access import bearer_matches
from agent.intake.otlp.receiver import TraceReceiver

_Context = grpc.aio.ServicerContext[ExportTraceServiceRequest, ExportTraceServiceResponse]


class _TraceService(TraceServiceServicer):
    def __init__(self, receiver: TraceReceiver, token: str | None) -> None:
        self.receiver = receiver
        self.token = token

    async def Export(self, request: ExportTraceServiceRequest,
                     context: _Context) -> ExportTraceServiceResponse:
        stats = self.receiver.stats
        if self.token is not None and not bearer_matches(
                str(dict(context.invocation_metadata() or ()).get("authorization", "")),
                self.token):
            stats.exports["grpc", "UNAUTHENTICATED"] += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "a valid bearer token is required")
        retry, response = self.receiver.take(request)
        if retry is not None:
            stats.exports["grpc", "UNAVAILABLE"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{retry}; retry")
        stats.exports["grpc", "OK"] += 1
        return response


async def start_grpc(receiver: TraceReceiver, listen: str, *, token: str | None,
                     max_body_bytes: int, max_concurrent: int) -> grpc.aio.Server:
    """A started gRPC server on `listen` (HOST:PORT) into `receiver`; `stop()` it."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_body_bytes)],
                             maximum_concurrent_rpcs=max_concurrent)
    add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated code
        _TraceService(receiver, token), server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen} for OTLP/gRPC")
    await server.start()
    return server
