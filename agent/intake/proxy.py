"""The OpenAI-compatible reverse proxy (DESIGN.md §5 item 1), in front of vLLM, SGLang, TGI,
Triton's OpenAI frontend, llama.cpp or Ollama.

Measured: `POST` to any path ending in `/chat/completions`, `/completions` or `/embeddings`
(`/v1/...` or under another prefix). Each is one `Request` of source `proxy:<name>`, added to
the attribution engine when it starts and ended when it ends:

- start: when its handler starts, i.e. once the request line and headers have arrived, the
  first bytes of the request; end: once the last byte of the response is handed to the
  socket (or the client has gone, or the upstream has failed);
- model: `table.model` when set, else the body's `model` (a non-empty string of at most
  `MAX_MODEL_LENGTH` characters, valid Unicode: it becomes a label value), else "unknown";
- tokens: the response's `usage` (counts up to `MAX_TOKENS`). In a stream, the first token
  is the first chunk whose choices carry content (`delta.content`,
  `delta.reasoning_content`, `delta.tool_calls` or `text`); the proxy asks the upstream for
  `stream_options.include_usage` when the client plainly did not (no `stream_options`, or
  `include_usage: false`), and drops the usage-only chunk (empty `choices`, a `usage`
  object) that this adds, so the client gets what the upstream would have sent it. Other
  `stream_options` are left as they are: servers disagree on what `{}` means (vLLM long
  took it for `include_usage: true`), and a client that asked for usage itself gets every
  chunk untouched;
- status: "ok" for a 2xx answer delivered whole, "failed" for any other upstream status,
  an unreachable upstream (answered 502) or one that timed out (answered 504: no byte for
  `table.timeout` seconds, while connecting, waiting for the answer or between two of its
  chunks; an answer already begun is cut off instead, so that the client cannot take it
  for a whole one), "cancelled" when the client disconnected first. When a stream
  ends without usage (client gone, upstream cut off), the completion tokens recorded are
  the chunks whose choices carried content, summed over choices: one per token on vLLM,
  SGLang and TGI, fewer where a chunk carries several tokens (speculative decoding); the
  prompt tokens stay unknown.

Everything else (other paths and methods, status codes, error bodies, headers including
`Authorization`) passes through untouched, streamed in both directions. Hop-by-hop headers
(RFC 9110 §7.6.1: `Connection` and those it names, `Keep-Alive`, `Proxy-Connection`, `TE`,
`Transfer-Encoding`, `Upgrade`) are not forwarded, nor `Host` (the upstream's is sent) or
`Expect` (this hop has answered it). Measured responses carry `X-Jouleprobe-Request-Id`.
(aiohttp adds `Date` and `Server` to an answer that lacks them, and `Content-Type:
application/octet-stream` to one with a body and no type.)

Content encoding. The client session does not decompress, so bodies pass byte for byte.
To read `usage`, a measured request asks the upstream only for codings the proxy can decode
with the standard library: a stream for `identity` (SSE is rarely compressed, as
compression would hold back tokens; the proxy needs to see, and sometimes drop, events),
a non-streaming answer for the client's own choice among gzip, deflate and identity; a
copy of that body (at most `MAX_PARSE_BYTES`) is decompressed for parsing only.

Bounds. At most `max_concurrent` requests are handled at once; any further one is answered
503 with Retry-After at once, unread and unmeasured, instead of waiting: without a bound,
aiohttp takes every connection's request, each holding its buffers. A measured request
body is parsed only up to `MAX_PARSE_BYTES`, and not kept parsed while the upstream
answers; a larger or compressed one passes through unparsed (model from the table or
"unknown", no usage asked for). A stream is handled chunk by chunk, each passed on as it
arrives and parsed on the side; only while the usage chunk is to be dropped are events
passed on whole, an event's incomplete end waiting for the rest of its bytes. Either way at
most one incomplete event (`MAX_EVENT_BYTES`) is held, and its bytes are scanned once,
however finely the upstream cuts them. Prompts and completions are never logged or stored;
only their sizes are logged, at debug level.

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
import contextlib
import json
import logging
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from agent.attribution import AttributionEngine, CapacityExceeded
from agent.config import ProxyTable
from agent.requests import MAX_TOKENS, Request, RequestStatus

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Jouleprobe-Request-Id"
MEASURED_SUFFIXES = ("/chat/completions", "/completions", "/embeddings")
MAX_PARSE_BYTES = 16 * 2**20
"""Largest request or non-streaming response body parsed; larger ones pass unparsed."""
MAX_EVENT_BYTES = 2**20
"""Largest SSE event parsed; past it, the rest of the stream passes through unparsed."""
MAX_MODEL_LENGTH = 256
"""Longest model name recorded (it becomes a Prometheus label value); else "unknown"."""
UNKNOWN_MODEL = "unknown"
POOL_SIZE = 1024
"""Upstream connections at most: far above 64 concurrent clients, below fd limits."""
DEFAULT_MAX_CONCURRENT = POOL_SIZE
"""Requests handled at once by default: as many as the pool has connections, so that none
waits for one. Far above what one server batches (vLLM: 256 sequences by default); what
the proxy holds per request (a body of at most `MAX_PARSE_BYTES`, one SSE event, socket
buffers) times this bounds its memory."""
BUSY_RETRY_AFTER_S = 1
"""Retry-After of a 503 for too many requests at once."""
KEEPALIVE_S = 4.0
"""Idle upstream connections are closed after this: below uvicorn's 5 s (vLLM, SGLang), so
that the proxy never sends a request on a connection the upstream is closing."""
WARNING_INTERVAL_S = 60.0
"""One warning per kind (refusal, upstream error) at most this often: an upstream that is
down, or an engine at capacity, affects every request, and one line says so."""

RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False, "handler_cancellation": True}
"""Keyword arguments for the `web.AppRunner` that serves `proxy_app`."""

_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Transfer-Encoding", "Upgrade",
))
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "expect"}
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp's client would add; the proxy sends only the client's."""
_DECODABLE = frozenset(("gzip", "x-gzip", "deflate", "identity"))
_EVENT_END = re.compile(rb"(?:\r\n|\r(?=[^\n])|\n)(?:\r\n|\r(?=[^\n])|\n)")
"""The blank line that ends an SSE event, whatever the line endings. A `\r` that ends the
bytes received so far may be the first half of a `\r\n`: it ends a line only once the
next byte is known."""
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DECODER = json.JSONDecoder()


@dataclass(slots=True)
class ProxyStats:
    """Counts since the proxy started, for the agent's own health metrics."""

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

    @property
    def running(self) -> int:
        """Measured requests not yet ended."""
        return self.measured - self.ok - self.failed - self.cancelled


PROXY_STATS = web.AppKey("jouleprobe_proxy_stats", ProxyStats)


class _WholeAnswer(web.StreamResponse):
    """An answer of known length: its headers leave with its first bytes of body, in one
    send instead of two. (A stream's headers leave at once, as the upstream sent them.)"""

    _send_headers_immediately = False


def _relayed(upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]) -> web.StreamResponse:
    kind = _WholeAnswer if hdrs.CONTENT_LENGTH in headers else web.StreamResponse
    return kind(status=upstream.status, reason=upstream.reason, headers=headers)


def default_session() -> aiohttp.ClientSession:
    """One pooled session per proxy: no decompression, no cookie jar (the proxy is shared by
    many clients: a cookie set for one must never reach another), no auto headers."""
    connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=0,
                                     keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )


def proxy_app(
    table: ProxyTable,
    engine: AttributionEngine,
    gpus: Callable[[], tuple[int, ...]],
    *,
    clock: Callable[[], float] = time.monotonic,
    session_factory: Callable[[], aiohttp.ClientSession] = default_session,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
) -> web.Application:
    """A reverse proxy to `table.upstream` that reports each inference request to `engine`
    (an `AttributionEngine`) on the GPUs `gpus()` names when it starts.

    Serve it with `web.AppRunner(app, **RUNNER_OPTIONS)`. Its counters are `app[PROXY_STATS]`.
    `clock` must be the clock of the engine's timelines; `session_factory` is called once,
    on the app's event loop, at startup. Beyond `max_concurrent` requests at once, further
    ones are answered 503 with Retry-After.
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    proxy = _Proxy(table, engine, gpus, clock, max_concurrent)
    app = web.Application()
    app[PROXY_STATS] = proxy.stats

    async def session(app: web.Application) -> AsyncIterator[None]:
        proxy.session = session_factory()
        yield
        await proxy.session.close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


class _Measurement:
    """One measured request while it runs."""

    __slots__ = ("accepted", "completion_chunks", "completion_tokens", "first_token", "id",
                 "prompt_tokens", "start")

    def __init__(self, request_id: str, start: float) -> None:
        self.id = request_id
        self.start = start
        self.accepted = False
        self.first_token: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.completion_chunks = 0

    def take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _count(prompt):
            self.prompt_tokens = prompt
            # Embeddings have no completion tokens; their usage says only prompt and total.
            self.completion_tokens = completion if _count(completion) else 0
        elif _count(completion):
            self.completion_tokens = completion


class _Proxy:
    def __init__(self, table: ProxyTable, engine: AttributionEngine,
                 gpus: Callable[[], tuple[int, ...]], clock: Callable[[], float],
                 max_concurrent: int) -> None:
        self.table = table
        self.engine = engine
        self.gpus = gpus
        self.clock = clock
        self.source = f"proxy:{table.name}"
        self.base = table.upstream.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=table.timeout,
                                             sock_read=table.timeout)
        self.stats = ProxyStats()
        self.session: aiohttp.ClientSession | None = None
        self.max_concurrent = max_concurrent
        self._in_flight = 0
        self._warned: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._in_flight >= self.max_concurrent:
            return self._busy()
        self._in_flight += 1  # the event loop runs one handler at a time: no lock needed
        try:
            if request.method == hdrs.METH_POST and request.path.rstrip("/").endswith(
                    MEASURED_SUFFIXES):
                return await self._measured(request)
            return await self._plain(request)
        finally:
            self._in_flight -= 1

    def _busy(self) -> web.Response:
        self.stats.busy += 1
        message = (f"the jouleprobe proxy is handling {self.max_concurrent} requests already "
                   "(max_concurrent); retry later")
        self._warn("busy", "%s (%d answered 503 so far)", message, self.stats.busy)
        body = {"error": {"message": message, "type": "proxy_busy", "param": None,
                          "code": 503}}
        return web.json_response(body, status=503,
                                 headers={hdrs.RETRY_AFTER: str(BUSY_RETRY_AFTER_S)})

    # --- pass-through --------------------------------------------------------------------

    async def _plain(self, request: web.Request) -> web.StreamResponse:
        body = _relay(b"", request.content) if request.body_exists else None
        try:
            upstream = await self._send(request, _forward_headers(request.headers), body)
        except _UpstreamError as exc:
            self._count_upstream_error(exc)
            return exc.response()
        response = _relayed(upstream, _backward_headers(upstream.headers))
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # before ClientError: aiohttp's write error is both
            pass  # the client has gone; closing the upstream answer below is all there is
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._count_upstream_error(_UpstreamError.of(exc, self.table))
            _abort(request)
        finally:
            upstream.close()
        return response

    # --- measured requests ---------------------------------------------------------------

    async def _measured(self, request: web.Request) -> web.StreamResponse:
        measurement = _Measurement(uuid.uuid4().hex, self.clock())
        self.stats.measured += 1
        status: RequestStatus = "failed"
        try:
            headers, body, strip_usage = await self._outgoing(request, measurement)
            try:
                upstream = await self._send(request, headers, body)
            except _UpstreamError as exc:
                self._count_upstream_error(exc)
                response = exc.response()
                response.headers[REQUEST_ID_HEADER] = measurement.id
                return response
            try:
                response, status = await self._answer(request, upstream, measurement,
                                                      strip_usage)
            finally:
                upstream.close()
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

    async def _outgoing(self, request: web.Request, measurement: _Measurement
                        ) -> tuple[CIMultiDict[str], bytes | AsyncIterator[bytes], bool]:
        """Reads the start of the body and opens the measurement; returns the headers and
        body to send upstream, and whether to drop the usage chunk from the answer.

        The parsed body goes with this call: JSON takes several times its size in Python
        objects, and the upstream may take minutes to answer."""
        prefix, whole = await _read_prefix(request.content, MAX_PARSE_BYTES)
        document = None
        if whole and not request.headers.get(hdrs.CONTENT_ENCODING):
            document = _json_object(prefix)
        model = self.table.model or _model(document)
        self._open(measurement, model)
        log.debug("%s %s: %d-byte request body, model %s", measurement.id, request.path,
                  len(prefix), model)
        headers = _forward_headers(request.headers)
        stream = document is not None and document.get("stream") is True
        strip_usage = stream and _wants_no_usage(document)
        body: bytes | AsyncIterator[bytes] = prefix
        if strip_usage:
            assert document is not None
            body = _with_usage(document)
            headers.popall(hdrs.CONTENT_LENGTH, None)
        elif not whole:
            body = _relay(prefix, request.content)
        if stream:
            headers[hdrs.ACCEPT_ENCODING] = "identity"
        elif hdrs.ACCEPT_ENCODING in headers:
            headers[hdrs.ACCEPT_ENCODING] = _decodable(headers[hdrs.ACCEPT_ENCODING])
        return headers, body, strip_usage

    async def _answer(self, request: web.Request, upstream: aiohttp.ClientResponse,
                      measurement: _Measurement, strip_usage: bool
                      ) -> tuple[web.StreamResponse, RequestStatus]:
        """Relays the upstream's answer, reading its usage; returns it with the request's
        status."""
        headers = _backward_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = measurement.id
        ok = 200 <= upstream.status < 300
        sse = upstream.content_type == "text/event-stream" and ok
        events = _EventStream(strip_usage and sse, measurement, self.clock)
        if events.rewrites:
            headers.popall(hdrs.CONTENT_LENGTH, None)
        response = _relayed(upstream, headers)
        copy = _BodyCopy(upstream.headers.get(hdrs.CONTENT_ENCODING, "")) if (
            ok and not sse) else None
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if sse:
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
            self._count_upstream_error(_UpstreamError.of(exc, self.table))
            _abort(request)
            events.settle()
            return response, "failed"
        if copy is not None:
            measurement.take_usage(copy.usage())
        events.settle()
        return response, "ok" if ok else "failed"

    async def _send(self, request: web.Request, headers: CIMultiDict[str],
                    body: bytes | AsyncIterator[bytes] | None) -> aiohttp.ClientResponse:
        assert self.session is not None, "the proxy app has not been started"
        url = URL(self.base + request.raw_path, encoded=True)
        try:
            return await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
                timeout=self.timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _UpstreamError.of(exc, self.table) from None

    # --- the engine ----------------------------------------------------------------------

    def _open(self, measurement: _Measurement, model: str) -> None:
        try:
            gpus = tuple(self.gpus())
            self.engine.add(Request(measurement.id, model, self.source, gpus, measurement.start))
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

    def _close(self, measurement: _Measurement, status: RequestStatus) -> None:
        if status == "ok":
            self.stats.ok += 1
        elif status == "failed":
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        if not measurement.accepted:
            return
        completion = measurement.completion_tokens
        if completion is None and measurement.completion_chunks:
            completion = measurement.completion_chunks
        try:
            found = self.engine.end(
                measurement.id, self.clock(), first_token=measurement.first_token,
                prompt_tokens=measurement.prompt_tokens, completion_tokens=completion,
                status=status,
            )
        except ValueError as exc:  # a clock that is not monotonic; never the client's fault
            log.warning("proxy %s: request %s not ended: %s", self.table.name, measurement.id,
                        exc)
            return
        if not found:
            self.stats.unmatched_ends += 1

    def _count_upstream_error(self, exc: _UpstreamError) -> None:
        if exc.status == 504:
            self.stats.upstream_timeouts += 1
        else:
            self.stats.upstream_unreachable += 1
        self._warn(f"upstream {exc.status}", "%s (%d unreachable, %d timeouts so far)",
                   exc.message, self.stats.upstream_unreachable, self.stats.upstream_timeouts)


class _UpstreamError(Exception):
    """The upstream could not be reached (502) or did not answer in time (504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @classmethod
    def of(cls, exc: BaseException, table: ProxyTable) -> _UpstreamError:
        if isinstance(exc, TimeoutError):
            return cls(504, f"upstream {table.upstream} sent nothing for {table.timeout:g} s "
                            "(proxy timeout)")
        return cls(502, f"upstream {table.upstream} unreachable: {exc.__class__.__name__}: "
                        f"{exc}")

    def response(self) -> web.Response:
        kind = "upstream_timeout" if self.status == 504 else "upstream_unreachable"
        body = {"error": {"message": self.message, "type": kind, "param": None,
                          "code": self.status}}
        return web.json_response(body, status=self.status)


class _EventStream:
    """Reads a stream of server-sent events as it passes: the first token, the usage, and
    the count of content chunks; with `rewrites`, drops the usage-only event.

    Without `rewrites`, every chunk is returned as received and parsed on the side. With
    it, the complete events of each chunk are returned (minus the usage-only one) and an
    incomplete last event waits for the rest of its bytes.

    An incomplete event is held in a growing buffer, and only the bytes that a chunk adds
    are searched for the event's end: an event that arrives in many small chunks costs its
    length once, not once per chunk (a 1 MiB event in 1 KiB chunks held the event loop
    for seconds when the whole of it was copied and searched again at each chunk).
    """

    __slots__ = ("_clock", "_measurement", "_parsing", "_tail", "rewrites")

    def __init__(self, rewrites: bool, measurement: _Measurement,
                 clock: Callable[[], float]) -> None:
        self.rewrites = rewrites
        self._measurement = measurement
        self._clock = clock
        self._tail = bytearray()
        self._parsing = True

    def feed(self, chunk: bytes) -> bytes:
        """Takes a chunk from the upstream; returns the bytes to send on now."""
        if not self._parsing:
            return chunk
        held = len(self._tail)
        buffer: bytes | bytearray = chunk
        if held:
            self._tail += chunk
            buffer = self._tail
        position = 0
        kept: list[bytes] = []
        # The blank line that ends an event may have begun in the last 3 bytes held
        # ("\r\n\r", waiting to know whether "\n" follows); no earlier held byte can be
        # part of one.
        for match in _EVENT_END.finditer(buffer, max(held - 3, 0)):
            event = bytes(buffer[position:match.end()])
            position = match.end()
            if self._read(event) and self.rewrites:
                kept.append(event)
        if held:
            del self._tail[:position]
        else:
            self._tail += chunk[position:]
        if len(self._tail) > MAX_EVENT_BYTES:
            log.warning("an SSE event exceeds %d bytes: the rest of the stream passes "
                        "through unparsed", MAX_EVENT_BYTES)
            self._parsing = False
            tail = self._take_tail()
            return b"".join(kept) + tail if self.rewrites else chunk
        if not self.rewrites:
            return chunk
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def finish(self) -> bytes:
        """The end of the stream: what is held back, passed on as it is; but a usage-only
        event that only the end shows complete (its blank line a CR, which might have been
        the first half of a CRLF) is dropped like any other."""
        tail = self._take_tail()
        keep = not (tail and self._parsing) or self._read(tail)
        if not self.rewrites or (not keep and tail.endswith((b"\r\r", b"\n\r"))):
            return b""
        return tail

    def settle(self) -> None:
        """Nothing more will come (the stream ended, or was cut off)."""
        self._tail = bytearray()

    def _take_tail(self) -> bytes:
        tail = bytes(self._tail)
        self._tail = bytearray()
        return tail

    def _read(self, event: bytes) -> bool:
        """Reads one event; False for the usage-only event that is to be dropped."""
        data = _event_data(event)
        if data is None or data == b"[DONE]":
            return True
        try:
            chunk = _DECODER.decode(data.decode())  # SSE is UTF-8: json.loads would guess
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return True
        if not isinstance(chunk, dict):
            return True
        measurement = self._measurement
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            measurement.take_usage(usage)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return True
        if not choices:
            return not (self.rewrites and isinstance(usage, dict))
        carrying = sum(1 for choice in choices if _carries_token(choice))
        if carrying:
            measurement.completion_chunks += carrying
            if measurement.first_token is None:
                measurement.first_token = self._clock()
        return True


class _BodyCopy:
    """A bounded copy of a non-streaming answer, decoded for parsing only."""

    __slots__ = ("_encoding", "_parts", "_size")

    def __init__(self, content_encoding: str) -> None:
        self._encoding = content_encoding.strip().lower()
        self._parts: list[bytes] | None = [] if self._encoding in _DECODABLE | {""} else None
        self._size = 0

    def add(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > MAX_PARSE_BYTES:
            self._parts = None  # too large to parse: usage unknown
        else:
            self._parts.append(chunk)

    def usage(self) -> Any:
        if self._parts is None:
            return None
        body = b"".join(self._parts)
        self._parts = None
        try:
            if self._encoding in ("gzip", "x-gzip"):
                body = _inflate(body, zlib.MAX_WBITS | 16)
            elif self._encoding == "deflate":
                try:
                    body = _inflate(body, zlib.MAX_WBITS)
                except zlib.error:  # servers send raw deflate as often as zlib-wrapped
                    body = _inflate(body, -zlib.MAX_WBITS)
        except (zlib.error, _TooLarge):
            return None
        document = _json_object(body)
        return None if document is None else document.get("usage")


class _TooLarge(Exception):
    pass


def _inflate(body: bytes, wbits: int) -> bytes:
    """Decompresses at most `MAX_PARSE_BYTES`, so that a small bomb cannot take the memory."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, MAX_PARSE_BYTES)
    if inflater.unconsumed_tail:
        raise _TooLarge
    return out


# --- helpers ------------------------------------------------------------------------------


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKENS


def _carries_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(
        delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        or delta.get("tool_calls")
    )


def _event_data(event: bytes) -> bytes | None:
    """The `data` of one SSE event (its data lines joined), or None if it has none."""
    if event.startswith(b"data: "):
        data = event[6:].rstrip(b"\r\n")
        if b"\n" not in data and b"\r" not in data:
            return data  # the usual event: one data line
    data = [line[5:].removeprefix(b" ") for line in _LINE_END.split(event)
            if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return document if isinstance(document, dict) else None


def _model(document: dict[str, Any] | None) -> str:
    model = None if document is None else document.get("model")
    if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_LENGTH and _unicode(model):
        return model
    return UNKNOWN_MODEL


def _unicode(text: str) -> bool:
    """False for a string with a lone surrogate: JSON may escape one ("\\ud800"), and no
    UTF-8 text can hold it (a label with one would fail every /metrics render)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _wants_no_usage(document: dict[str, Any]) -> bool:
    """A streaming request that plainly did not ask for usage: no `stream_options`, or
    `include_usage: false`. (What `{}` or a value of another type means depends on the
    server; such a request is passed as it is.)"""
    options = document.get("stream_options")
    return options is None or (
        isinstance(options, dict) and options.get("include_usage") is False)


def _with_usage(document: dict[str, Any]) -> bytes:
    options = document.get("stream_options") or {}
    changed = {**document, "stream_options": {**options, "include_usage": True}}
    text = json.dumps(changed, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON can escape: escape it again
        return json.dumps(changed, separators=(",", ":")).encode()


def _decodable(accept_encoding: str) -> str:
    """The client's Accept-Encoding, restricted to codings `_BodyCopy` can decode."""
    items = [item for item in accept_encoding.split(",") if item.strip()]
    kept = [item for item in items
            if item.split(";", 1)[0].strip().lower() in _DECODABLE]
    if len(kept) == len(items):
        return accept_encoding
    return ",".join(kept).strip() or "identity"


def _forward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return _end_to_end(headers, _NOT_FORWARDED)


def _backward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return _end_to_end(headers, _HOP_BY_HOP)


def _end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    named = {name.strip().lower() for value in headers.getall(hdrs.CONNECTION, ())
             for name in value.split(",")}
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in drop and name.lower() not in named)


async def _read_prefix(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to about `limit` bytes of a body, and whether that is the whole body."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


async def _relay(prefix: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body that is sent upstream as it arrives: `prefix` (already read), then the rest."""
    if prefix:
        yield prefix
    async for chunk in content.iter_any():
        yield chunk


def _abort(request: web.Request) -> None:
    """Cuts the client's connection, so that a truncated answer cannot pass for a whole one."""
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
