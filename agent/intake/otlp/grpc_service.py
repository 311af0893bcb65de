"""OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`, the protocol
vLLM's and SGLang's exporters use by default (port 4317).

The same `TraceReceiver` as OTLP/HTTP takes the exports. Answers, as the specification
has exporters read them: OK with `partial_success`; UNAUTHENTICATED without the token
where one is set; RESOURCE_EXHAUSTED for a message past `max_body_bytes` (gRPC's own
check, never retried); UNAVAILABLE, which exporters retry with backoff, while
`max_concurrent` exports are being handled or attribution is at capacity.
"""

from __future__ import annotations

import hmac

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)

from agent.intake.otlp.receiver import DEFAULT_MAX_CONCURRENT, TraceReceiver
from agent.intake.validate import BusyLimit

_Context = grpc.aio.ServicerContext[ExportTraceServiceRequest, ExportTraceServiceResponse]


class _TraceService(TraceServiceServicer):
    def __init__(self, receiver: TraceReceiver, token: str | None, max_concurrent: int) -> None:
        self.receiver = receiver
        self.token = token
        self.limit = BusyLimit(max_concurrent)

    async def Export(self, request: ExportTraceServiceRequest,
                     context: _Context) -> ExportTraceServiceResponse:
        stats = self.receiver.stats
        if self.token is not None and not _authorized(context, self.token):
            stats.exports["grpc", "UNAUTHENTICATED"] += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "a valid bearer token is required")
        if self.limit.full:
            stats.exports["grpc", "UNAVAILABLE"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "too many exports are being handled; retry")
        with self.limit.slot():
            room, rejected, reason = self.receiver.take(request)
        if not room:
            stats.exports["grpc", "UNAVAILABLE"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{self.receiver.retry_reason}; retry")
        stats.exports["grpc", "OK"] += 1
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = reason
        return response


def _authorized(context: _Context, token: str) -> bool:
    metadata = dict(context.invocation_metadata() or ())
    scheme, _, credentials = str(metadata.get("authorization", "")).partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8", "replace"), token.encode())


async def start_grpc(receiver: TraceReceiver, listen: str, *, token: str | None,
                     max_body_bytes: int, max_concurrent: int = DEFAULT_MAX_CONCURRENT
                     ) -> grpc.aio.Server:
    """A started gRPC server on `listen` (HOST:PORT) into `receiver`; `stop()` it."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_body_bytes)])
    add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated code
        _TraceService(receiver, token, max_concurrent), server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen} for OTLP/gRPC")
    await server.start()
    return server
