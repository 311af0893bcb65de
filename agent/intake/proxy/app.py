"""The proxy's aiohttp app: which requests are measured, how each is reported to the
attribution engine, and how many are handled at once.

Bounds. At most `max_concurrent` requests are handled at once; any further one is answered
503 with Retry-After at once, unread and unmeasured, instead of waiting: without a bound,
aiohttp takes every connection's request, each holding its buffers. A measured request body
is not kept parsed while the upstream answers.

An engine that refuses a request (capacity, unknown GPU, no GPU set yet) costs the client
nothing: the request is proxied all the same, and the refusal counted and logged (one
warning a minute at most, as for upstream errors). `gpus()` and the engine's calls run on
the event loop, once per request each: they must be quick (cache a discovered GPU set).

Run the app with `RUNNER_OPTIONS`: request bodies must not be decompressed by the server
(they pass through as received), and a client that disconnects should cancel its handler,
so that the upstream stops generating for nobody at once (without it, the proxy learns of
the disconnect at its next write to the client, and a non-streaming request runs to its
end upstream; the request is "cancelled" either way).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from agent.attribution import CapacityExceeded
from agent.config import ProxyTable
from agent.intake.proxy.measurement import Measurement
from agent.intake.proxy.ollama import NATIVE_SUFFIXES, NDJSON, LineStream
from agent.intake.proxy.openai import (
    BodyCopy,
    EventStream,
    decodable,
    read_request,
    request_model,
    request_sampling,
    wants_no_usage,
    with_usage,
)
from agent.intake.proxy.relay import (
    POOL_SIZE,
    Upstream,
    UpstreamError,
    abort,
    backward_headers,
    default_session,
    forward_headers,
    relay,
    relayed,
)
from agent.intake.validate import BusyLimit
from agent.requests import Request, RequestStatus, Sampling

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Jouleprobe-Request-Id"
OPENAI_SUFFIXES = ("/chat/completions", "/completions", "/embeddings")
MEASURED_SUFFIXES = (*OPENAI_SUFFIXES, *NATIVE_SUFFIXES)
DEFAULT_MAX_CONCURRENT = POOL_SIZE
"""Requests handled at once by default: as many as the pool has connections, so that none
waits for one. Far above what one server batches (vLLM: 256 sequences by default); what
the proxy holds per request (a body of at most `MAX_PARSE_BYTES`, one SSE event, socket
buffers) times this bounds its memory."""
WARNING_INTERVAL_S = 60.0
"""One warning per kind (refusal, upstream error) at most this often: an upstream that is
down, or an engine at capacity, affects every request, and one line says so."""

RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False, "handler_cancellation": True}
"""Keyword arguments for the `web.AppRunner` that serves `proxy_app`."""


class RequestSink(Protocol):
    """Where the proxy reports its requests: the `AttributionEngine` itself, or, in a proxy
    worker process, the channel to the agent that holds it (`channel.ChannelSink`)."""

    def add(self, request: Request) -> None:
        """Takes a request that has started; raises ValueError or CapacityExceeded where it
        cannot (the request is then proxied unmeasured)."""

    def end(self, request_id: str, end: float, *, first_token: float | None = None,
            prompt_tokens: int | None = None, completion_tokens: int | None = None,
            status: RequestStatus = "ok", scheduled: float | None = None,
            tokens_estimated: bool = False) -> bool:
        """Ends a request taken before; False where it was no longer expected."""


@dataclass(slots=True)
class ProxyStats:
    """Counts since the proxy started, and what it has learnt of its upstream, for the
    agent's own health metrics."""

    measured: int = 0
    """Requests timed (those refused by the engine included)."""
    refused: int = 0
    """Measured requests that the engine did not accept (they were proxied all the same)."""
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    busy: int = 0
    """Answered 503 without being forwarded or measured: `max_concurrent` were running."""
    upstream_unreachable: int = 0
    """Answered 502: the upstream could not be reached or broke the connection."""
    upstream_timeouts: int = 0
    """Answered 504 (or cut off mid-answer): no byte from the upstream for `timeout` s."""
    unmatched_ends: int = 0
    """Ends that the engine no longer expected (the request outlived `max_age`)."""
    worker_restarts: int = 0
    """Times a worker process of the proxy died and was started again."""
    counts_unasked: dict[str, bool] = field(default_factory=dict)
    """Per endpoint (`MEASURED_SUFFIXES`), whether the upstream's streams report token
    counts (`usage`, or llama.cpp's `timings`) without being asked: learnt from the first
    stream there that did not ask and ran to its end. Until that is known, and where they
    do, such streams pass untouched; where they do not, the proxy asks for
    `include_usage` and takes out what asking added (`EventStream`)."""

    @property
    def running(self) -> int:
        """Measured requests not yet ended."""
        return self.measured - self.ok - self.failed - self.cancelled


PROXY_STATS = web.AppKey("jouleprobe_proxy_stats", ProxyStats)


def proxy_app(
    table: ProxyTable,
    engine: RequestSink,
    gpus: Callable[[], tuple[int, ...]],
    *,
    clock: Callable[[], float] = time.monotonic,
    session_factory: Callable[[], aiohttp.ClientSession] = default_session,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
) -> web.Application:
    """A reverse proxy to `table.upstream` that reports each inference request to `engine`
    (the `AttributionEngine`, or a worker's channel to it) on the GPUs `gpus()` names when
    it starts.

    Serve it with `web.AppRunner(app, **RUNNER_OPTIONS)`. Its counters are `app[PROXY_STATS]`.
    `clock` must be the clock of the engine's timelines; `session_factory` is called once,
    on the app's event loop, at startup. Beyond `max_concurrent` requests at once, further
    ones are answered 503 with Retry-After.
    """
    proxy = _Proxy(table, engine, gpus, clock, BusyLimit(max_concurrent))
    app = web.Application()
    app[PROXY_STATS] = proxy.stats

    async def session(app: web.Application) -> AsyncIterator[None]:
        proxy.upstream.session = session_factory()
        yield
        await proxy.upstream.session.close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


class _Proxy:
    def __init__(self, table: ProxyTable, engine: RequestSink,
                 gpus: Callable[[], tuple[int, ...]], clock: Callable[[], float],
                 limit: BusyLimit) -> None:
        self.table = table
        self.engine = engine
        self.gpus = gpus
        self.clock = clock
        self.source = f"proxy:{table.name}"
        self.upstream = Upstream(table)
        self.stats = ProxyStats()
        self.limit = limit
        self._warned: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.limit.full:
            return self._busy()
        with self.limit.slot():
            if request.method == hdrs.METH_POST and (endpoint := _endpoint(request.path)):
                return await self._measured(request, endpoint)
            return await self._plain(request)

    def _busy(self) -> web.Response:
        self.stats.busy += 1
        message = (f"the jouleprobe proxy is handling {self.limit.max_concurrent} requests "
                   "already (max_concurrent); retry later")
        self._warn("busy", "%s (%d answered 503 so far)", message, self.stats.busy)
        return self.limit.answer({"error": {"message": message, "type": "proxy_busy",
                                            "param": None, "code": 503}})

    # --- pass-through --------------------------------------------------------------------

    async def _plain(self, request: web.Request) -> web.StreamResponse:
        body = relay(b"", request.content) if request.body_exists else None
        try:
            upstream = await self.upstream.send(request, forward_headers(request.headers), body)
        except UpstreamError as exc:
            self._count_upstream_error(exc)
            return exc.response()
        response = relayed(upstream, backward_headers(upstream.headers))
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # before ClientError: aiohttp's write error is both
            pass  # the client has gone; closing the upstream answer below is all there is
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._count_upstream_error(UpstreamError.of(exc, self.table))
            abort(request)
        finally:
            upstream.close()
        return response

    # --- measured requests ---------------------------------------------------------------

    async def _measured(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        measurement = Measurement(uuid.uuid4().hex, self.clock())
        self.stats.measured += 1
        status: RequestStatus = "failed"
        learning = False
        try:
            headers, body, strip_usage, learning = await self._outgoing(
                request, measurement, endpoint)
            try:
                upstream = await self.upstream.send(request, headers, body)
            except UpstreamError as exc:
                self._count_upstream_error(exc)
                refusal = exc.response()
                refusal.headers[REQUEST_ID_HEADER] = measurement.id
                return refusal
            try:
                response, status = await self._answer(request, upstream, measurement,
                                                      strip_usage)
            finally:
                upstream.close()
            if learning and measurement.done and status == "ok":
                self._learn(endpoint, measurement.reported)
            return response
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ConnectionError:
            # The client went while sending its body. Raising would have aiohttp log a
            # traceback for a plain disconnect; nobody will read this answer.
            status = "cancelled"
            return web.Response(status=499, reason="Client Closed Request")
        finally:
            self._close(measurement, status)

    async def _outgoing(self, request: web.Request, measurement: Measurement, endpoint: str
                        ) -> tuple[CIMultiDict[str], bytes | AsyncIterator[bytes], bool, bool]:
        """Reads the start of the body and opens the measurement; returns the headers and
        body to send upstream, whether the proxy asked for usage (to be taken out of the
        answer), and whether this answer shows if the upstream reports counts unasked.

        The parsed body goes with this call: JSON takes several times its size in Python
        objects, and the upstream may take minutes to answer."""
        prefix, whole, document = await read_request(
            request.content, request.headers.get(hdrs.CONTENT_ENCODING))
        model = self.table.model or request_model(document)
        self._open(measurement, model, request_sampling(document))
        log.debug("%s %s: %d-byte request body, model %s", measurement.id, request.path,
                  len(prefix), model)
        headers = forward_headers(request.headers)
        stream = document is not None and document.get("stream") is True
        unasked = (stream and endpoint in OPENAI_SUFFIXES and document is not None
                   and wants_no_usage(document))
        strip_usage = unasked and self.stats.counts_unasked.get(endpoint) is False
        learning = unasked and endpoint not in self.stats.counts_unasked
        body: bytes | AsyncIterator[bytes] = prefix
        if strip_usage and document is not None:
            body = with_usage(document)
            headers.popall(hdrs.CONTENT_LENGTH, None)
        elif not whole:
            body = relay(prefix, request.content)
        if stream:
            headers[hdrs.ACCEPT_ENCODING] = "identity"
        elif hdrs.ACCEPT_ENCODING in headers:
            headers[hdrs.ACCEPT_ENCODING] = decodable(headers[hdrs.ACCEPT_ENCODING])
        return headers, body, strip_usage, learning

    async def _answer(self, request: web.Request, upstream: aiohttp.ClientResponse,
                      measurement: Measurement, strip_usage: bool
                      ) -> tuple[web.StreamResponse, RequestStatus]:
        """Relays the upstream's answer, reading its usage; returns it with the request's
        status."""
        headers = backward_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = measurement.id
        ok = 200 <= upstream.status < 300
        encoding = upstream.headers.get(hdrs.CONTENT_ENCODING, "")
        sse = upstream.content_type == "text/event-stream" and ok
        lines = upstream.content_type == NDJSON and ok and encoding in ("", "identity")
        events: EventStream | LineStream = (
            LineStream(measurement, self.clock) if lines
            else EventStream(strip_usage and sse, measurement, self.clock))
        if events.rewrites:
            headers.popall(hdrs.CONTENT_LENGTH, None)
        response = relayed(upstream, headers)
        copy = BodyCopy(encoding) if ok and not (sse or lines) else None
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if sse or lines:
                    chunk = events.feed(chunk)
                elif copy is not None:
                    copy.add(chunk)
                if chunk:
                    await response.write(chunk)
            if rest := events.finish():
                await response.write(rest)
            await response.write_eof()
        except ConnectionResetError:
            # The client has gone. This clause comes first: the error aiohttp raises when
            # writing to a closed connection is a ConnectionResetError and a ClientError.
            events.settle()
            return response, "cancelled"
        except asyncio.CancelledError:  # the client has gone (handler_cancellation)
            events.settle()
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._count_upstream_error(UpstreamError.of(exc, self.table))
            await _send_held(response, events)
            abort(request)
            events.settle()
            return response, "failed"
        if copy is not None:
            measurement.take_answer(copy.document())
        events.settle()
        return response, "ok" if ok and not measurement.error else "failed"

    # --- the engine ----------------------------------------------------------------------

    def _open(self, measurement: Measurement, model: str, sampling: Sampling | None) -> None:
        try:
            gpus = tuple(self.gpus())
            self.engine.add(Request(measurement.id, model, self.source, gpus, measurement.start,
                                    sampling=sampling))
        except (CapacityExceeded, ValueError) as exc:
            self._refused(str(exc))
        except Exception as exc:  # the GPU discovery of "auto" may fail in many ways
            self._refused(f"the GPU set is not known: {exc!r}")
        else:
            measurement.accepted = True

    def _refused(self, why: str) -> None:
        self.stats.refused += 1
        self._warn("refused", "the attribution engine refused a request (%s); it is proxied "
                   "but not measured (%d refused so far)", why, self.stats.refused)

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -WARNING_INTERVAL_S) >= WARNING_INTERVAL_S:
            self._warned[kind] = now
            log.warning("proxy %s: " + message, self.table.name, *args)

    def _close(self, measurement: Measurement, status: RequestStatus) -> None:
        if status == "ok":
            self.stats.ok += 1
        elif status == "failed":
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        if not measurement.accepted:
            return
        prompt, completion, estimated = measurement.counts()
        end = self.clock()
        try:
            found = self.engine.end(
                measurement.id, end, first_token=measurement.first_token,
                prompt_tokens=prompt, completion_tokens=completion, status=status,
                scheduled=measurement.scheduled(end), tokens_estimated=estimated,
            )
        except ValueError as exc:  # a clock that is not monotonic; never the client's fault
            log.warning("proxy %s: request %s not ended: %s", self.table.name, measurement.id,
                        exc)
            return
        if not found:
            self.stats.unmatched_ends += 1

    def _learn(self, endpoint: str, reported: bool) -> None:
        self.stats.counts_unasked[endpoint] = reported
        log.info("proxy %s: the upstream's %s streams %s token counts unasked%s",
                 self.table.name, endpoint, "report" if reported else "do not report",
                 "" if reported else "; the proxy asks for include_usage from now on")

    def _count_upstream_error(self, exc: UpstreamError) -> None:
        if exc.status == 504:
            self.stats.upstream_timeouts += 1
        else:
            self.stats.upstream_unreachable += 1
        self._warn(f"upstream {exc.status}", "%s (%d unreachable, %d timeouts so far)",
                   exc.message, self.stats.upstream_unreachable, self.stats.upstream_timeouts)


def _endpoint(path: str) -> str | None:
    """Which of `MEASURED_SUFFIXES` the path ends with, if any."""
    path = path.rstrip("/")
    return next((suffix for suffix in MEASURED_SUFFIXES if path.endswith(suffix)), None)


async def _send_held(response: web.StreamResponse, events: EventStream | LineStream) -> None:
    """Sends what the stream still holds before the connection is cut: the client would
    have had it straight from the upstream."""
    try:
        if rest := events.finish():
            await response.write(rest)
    except (ConnectionError, RuntimeError):
        pass
