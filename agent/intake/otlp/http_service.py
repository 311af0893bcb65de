"""OTLP/HTTP: `POST /v1/traces` (and `/`, for an exporter configured without the path),
as the OpenTelemetry Protocol specifies it, into a `TraceReceiver`.

Bodies: `application/x-protobuf` or `application/json` (OTLP JSON: lowerCamelCase, hex
ids, integer enums), `Content-Encoding` gzip, deflate or none; at most `max_body_bytes`,
compressed or not (413). The answer is an `ExportTraceServiceResponse` in the request's
encoding, with `partial_success` where request spans could not be used.

Statuses, as the specification has exporters read them: 400 for a body that cannot be
decoded (never retried), 401 without the token where one is set, 413, 415 for another
content type or coding, 503 with Retry-After while `max_concurrent` exports are being
handled, 429 with Retry-After while the receiver cannot take an export whole (the engine
at capacity, a source's GPUs still being found).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from agent.intake.access import refused
from agent.intake.encoding import DECODABLE, TooLarge, decoded
from agent.intake.otlp.receiver import TraceReceiver
from agent.intake.validate import BusyLimit

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DEFAULT_MAX_CONCURRENT = 16
"""Exports handled at once by default."""
RUNNER_OPTIONS: dict[str, bool] = {"auto_decompress": False}
"""Keyword arguments for the `web.AppRunner` that serves `otlp_app`: the receiver decodes
bodies itself, within `max_body_bytes` of output."""


_IDS = ("traceId", "spanId", "parentSpanId")


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP JSON, whose ids are hex where protobuf's JSON mapping has base64."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    for resource_spans in _items(document, "resourceSpans"):
        for scope_spans in _items(resource_spans, "scopeSpans"):
            for span in _items(scope_spans, "spans"):
                for holder in (span, *_items(span, "links")):
                    for key in _IDS:
                        if isinstance(holder.get(key), str):
                            holder[key] = base64.b64encode(bytes.fromhex(holder[key])).decode()
    return json_format.ParseDict(document, ExportTraceServiceRequest(),
                                 ignore_unknown_fields=True)


def _items(holder: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The objects of the list `holder[key]`; the parser refuses what is of another shape."""
    value = holder.get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def otlp_app(receiver: TraceReceiver, *, token: str | None, max_body_bytes: int,
             max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> web.Application:
    """OTLP/HTTP into `receiver`. Serve it with `web.AppRunner(app, **RUNNER_OPTIONS)`."""
    limit = BusyLimit(max_concurrent)

    def answer(status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
        """A refusal; a google.rpc.Status would do, and the message in text says as much."""
        receiver.stats.exports["http", str(status)] += 1
        return web.Response(status=status, text=message, headers=headers)

    def accepted(response: ExportTraceServiceResponse, binary: bool) -> web.Response:
        receiver.stats.exports["http", "200"] += 1
        if binary:
            return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)
        return web.Response(text=json_format.MessageToJson(response, indent=None),
                            content_type=JSON)

    async def traces(request: web.Request) -> web.Response:
        binary = request.content_type == PROTOBUF
        if (refusal := refused(request, token, b"a valid bearer token is required",
                               "text/plain")) is not None:
            receiver.stats.exports["http", "401"] += 1
            return refusal
        if request.content_type not in (PROTOBUF, JSON):
            return answer(415, f"content type {request.content_type!r}: "
                                       f"expected {PROTOBUF} or {JSON}")
        if limit.full:
            return answer(503, f"{max_concurrent} exports are being handled; retry",
                          headers={"Retry-After": "1"})
        with limit.slot():
            encoding = request.headers.get("Content-Encoding", "")
            if encoding.strip().lower() not in DECODABLE:
                return answer(415, f"content coding {encoding!r}: expected gzip, "
                                           "deflate or none")
            try:
                body = decoded(await request.read(), encoding, max_body_bytes)
            except (web.HTTPRequestEntityTooLarge, TooLarge):
                return answer(413, f"larger than {max_body_bytes} bytes "
                                           "(otlp.max_body_bytes): send smaller batches")
            except ValueError as exc:
                return answer(400, str(exc))
            try:
                export = (ExportTraceServiceRequest.FromString(body) if binary
                          else _from_json(body))
            except (DecodeError, json_format.ParseError, ValueError, RecursionError) as exc:
                return answer(400, f"not an OTLP ExportTraceServiceRequest: {exc}")
            retry, response = receiver.take(export)
        if retry is not None:
            return answer(429, f"{retry}; retry",
                          headers={"Retry-After": str(receiver.retry_after_s)})
        return accepted(response, binary)

    app = web.Application(client_max_size=max_body_bytes)
    for path in (TRACES_PATH, "/"):
        app.router.add_post(path, traces)
    return app
