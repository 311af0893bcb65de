"""The proxy against bad input: property-based tests of client bodies and upstream streams,
and requests that are too large, too slow, or abandoned.

Servers run once per module on an event loop in a background thread (`test_proxy.Servers`)
and serve every example: the fake upstream, a scripted upstream that answers whatever an
example dictates, and a proxy per test in front of them, into an engine that remembers
what the proxy told it. Cases per run (max_examples, deadline=None): 1,000 client bodies,
each sent directly and through the proxy, and 1,200 upstream answers: 2,200.

The properties:
- a client body, however malformed, gets through the proxy exactly the answer the upstream
  gives it directly (status and bytes: so never a 5xx of the proxy's own making), and the
  request is recorded: ok for a 2xx, failed otherwise, the body's model when it has a
  usable one, the tokens of the answer;
- an upstream stream, however broken, reaches the client byte for byte, less the usage
  event that the proxy asked for, or a prefix of that when the upstream breaks off; the
  request is ok or failed accordingly, with the tokens the stream carried, and the proxy
  holds at most `MAX_EVENT_BYTES` of an incomplete event;
- no exception escapes the proxy, and every request the engine accepted becomes final.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import itertools
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from scripted import ScriptedGpuSource, Servers, wait_until

from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.devices.base import GpuInfo
from agent.intake import proxy as proxy_module
from agent.intake.proxy import (
    PROXY_STATS,
    REQUEST_ID_HEADER,
    RUNNER_OPTIONS,
    ProxyStats,
    proxy_app,
)
from agent.intake.proxy import openai as proxy_openai
from agent.intake.proxy.openai import EventStream
from agent.intake.validate import MAX_MODEL_LENGTH
from agent.requests import Request, RequestEnergy
from agent.sampler import Sampler
from agent.sim.upstream import fake_upstream_app
from agent.timeline import EnergyPoint, Timeline
from exporters.prometheus import NodeCollector, build_registry
from exporters.proxy_metrics import ProxyMetrics
from exporters.request_metrics import RequestMetrics

FAST = {"instant": math.inf, "llama": 4000.0}
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MESSAGES = [{"role": "user", "content": "How many joules?"}]
PARSE_LIMIT = 4096
"""MAX_PARSE_BYTES while the client bodies are fuzzed: some bodies are larger."""
EVENT_LIMIT = 4096
"""MAX_EVENT_BYTES while the upstream streams are fuzzed: some events are larger."""
SPAN_S = 600
"""Seconds of timeline ahead of the module's start: enough for every request in it."""

# --- servers, shared by the module ---------------------------------------------------------


class RecordingEngine(AttributionEngine):
    """An engine that also keeps, by request id, what the proxy told it."""

    def __init__(self) -> None:
        now = time.monotonic()
        line = Timeline(max_points=SPAN_S + 20)
        for i in range(SPAN_S + 11):
            line.append(EnergyPoint(now - 10 + i, 100.0 * i))
        self.horizon = now + SPAN_S
        super().__init__({0: line}, policy="tokens", settle_s=0.0, max_age_s=1e6,
                         max_pending=1_000_000)
        self.added: dict[str, Request] = {}
        self.ended: dict[str, dict[str, Any]] = {}

    def add(self, request: Request) -> None:
        super().add(request)
        self.added[request.id] = request

    def end(self, request_id: str, end: float, **fields: Any) -> bool:
        self.ended[request_id] = fields
        return super().end(request_id, end, **fields)

    def drain(self) -> list[RequestEnergy]:
        """Every request final: what a closed period leaves."""
        return self.advance(self.horizon)


@dataclass(frozen=True)
class Script:
    """What the scripted upstream answers to one request."""

    pieces: tuple[bytes, ...]
    """Written one by one, the event loop running between two."""
    status: int = 200
    content_type: str = "text/event-stream"
    cut: bool = False
    """Break the connection after the last piece instead of ending the answer."""
    headers: tuple[tuple[str, str], ...] = ()


SCRIPT_HEADER = "X-Script"


class ScriptedUpstream:
    """An upstream that answers each request with the `Script` named by its X-Script header."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.authorization: str | None = None
        """The Authorization header of the latest request."""

    def add(self, script: Script) -> dict[str, str]:
        """Registers `script`; returns the header that makes a request get it."""
        key = uuid.uuid4().hex
        self.scripts[key] = script
        return {SCRIPT_HEADER: key}

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.StreamResponse:
            await request.read()
            self.authorization = request.headers.get("Authorization")
            script = self.scripts.pop(request.headers[SCRIPT_HEADER])
            response = web.StreamResponse(status=script.status,
                                          headers={"Content-Type": script.content_type,
                                                   **dict(script.headers)})
            await response.prepare(request)
            for piece in script.pieces:
                await response.write(piece)
                await asyncio.sleep(0)
            if script.cut:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


class ProxyErrors(logging.Handler):
    """Keeps every record logged with a traceback that passes through the proxy's modules."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if "intake/proxy/" in text:
            self.records.append(text)


@dataclass
class Stack:
    servers: Servers
    fake: str
    scripted: ScriptedUpstream
    scripted_url: str
    errors: ProxyErrors
    proxies: list[ProxyStats] = field(default_factory=list)

    def proxy(self, upstream: str, engine: AttributionEngine, **runner: Any) -> str:
        table = ProxyTable(name="fuzz", listen="127.0.0.1:0", upstream=upstream, gpus=(0,))
        app = proxy_app(table, engine, lambda: (0,))
        self.proxies.append(app[PROXY_STATS])
        return self.servers.serve(app, **{**RUNNER_OPTIONS, **runner})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    servers = Servers()
    scripted = ScriptedUpstream()
    errors = ProxyErrors()
    for name in ("aiohttp.server", "aiohttp.web", "asyncio", proxy_module.__name__):
        logging.getLogger(name).addHandler(errors)
    try:
        yield Stack(servers, servers.serve(fake_upstream_app(models=FAST)), scripted,
                    servers.serve(scripted.app()), errors)
    finally:
        for name in ("aiohttp.server", "aiohttp.web", "asyncio", proxy_module.__name__):
            logging.getLogger(name).removeHandler(errors)
        servers.close()


@pytest.fixture(autouse=True)
def fresh_errors(stack: Stack) -> None:
    """Each test answers for the tracebacks logged while it runs."""
    stack.errors.records.clear()


def settled(stack: Stack, engine: RecordingEngine) -> list[RequestEnergy]:
    """Once every proxy has ended its requests: no traceback through the proxy, and each
    request the engine accepted is final, once."""
    wait_until(lambda: all(s.running == 0 for s in stack.proxies), "the proxies to end")
    assert stack.errors.records == []
    finals = engine.drain()
    assert sorted(e.request.id for e in finals) == sorted(engine.added)
    assert engine.totals().pending_requests == 0
    return finals


# --- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    whole: bool
    """False when the connection broke before the end of the answer."""


def post(base: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        try:
            return Answer(response.status, response.headers, response.read(), True)
        except http.client.IncompleteRead as cut:
            return Answer(response.status, response.headers, cut.partial, False)
    finally:
        connection.close()


def sse_tokens(body: bytes) -> tuple[int, dict[str, Any] | None]:
    """The content-carrying choices of a well-formed stream, and its usage if it has one."""
    chunks, usage = 0, None
    for line in body.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            chunks += bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
    return chunks, usage


# --- 1a. client bodies --------------------------------------------------------------------

ABSENT = object()
HUGE_TEXT = "joule " * 1_000  # past PARSE_LIMIT
DEEP: Any = []
for _ in range(1_500):  # past what json.loads takes (RecursionError)
    DEEP = [DEEP]
ODD = (None, True, False, 0, -1, 1.5, 10**30, math.nan, math.inf, "", "\ud800", "a\x00b",
       "x" * 300, [], {}, [[[]]], {"a": {"b": {}}}, DEEP)
"""Wrong types, extremes, a lone surrogate, a long name, deep nesting."""

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
odd = st.sampled_from(ODD) | json_values


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight says. (`st.one_of` draws its
    branches alike, and merges a branch given twice.)"""
    branches = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(branches) - 1).flatmap(branches.__getitem__)


def sometimes(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `valid`; else absent or a value of the wrong shape."""
    return weighted((5, valid), (1, st.just(ABSENT)), (1, odd))


messages = st.one_of(
    st.just(MESSAGES),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 5]),
                                    "content": text | st.just(HUGE_TEXT)}),
             min_size=1, max_size=3),
)
prompts = st.one_of(text, st.lists(st.integers(0, 50_000), min_size=1, max_size=8))
stream_options = st.sampled_from([
    ABSENT, None, {}, {"include_usage": True}, {"include_usage": False},
    {"include_usage": "yes"}, {"include_usage": 1}, {"include_usage": None}, [], "x", 5,
    {"include_usage": True, "continuous_usage_stats": True},
])


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    fields = {
        "model": sometimes(st.sampled_from(["instant"] * 6 + ["llama", "no-such-model"])),
        "messages": sometimes(messages),
        "prompt": sometimes(prompts),
        "input": sometimes(prompts),
        "stream": st.sampled_from([True, True, False, ABSENT, "true", 1, None, []]),
        "stream_options": stream_options,
        "max_tokens": st.sampled_from([ABSENT] * 6 + [1, 5, 0, -1, "3", 1.5, 10**30]),
    }
    document = {name: draw(value) for name, value in fields.items()}
    document.update(draw(st.dictionaries(text, odd, max_size=2)))
    return {name: value for name, value in document.items() if value is not ABSENT}


def encode(document: Any, ascii_only: bool) -> bytes:
    """JSON text; without `ascii_only`, a lone surrogate is encoded as is (invalid UTF-8)."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


bodies = weighted(
    (6, st.builds(encode, documents(), st.booleans())),
    (1, st.builds(lambda b, n: b[:n], st.builds(encode, documents(), st.just(True)),
                  st.integers(0, 200))),  # truncated JSON
    (1, st.builds(encode, json_values, st.just(True))),  # JSON, but not an object
    (1, st.binary(max_size=200)),
    (1, st.sampled_from([b"", b"{", b"null", b"[" * 3_000 + b"]" * 3_000, b"\xff\xfe{}",
                         b'{"model": "instant", "prompt": "x"}' * 2])),
)


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def expected_model(document: dict[str, Any] | None) -> str:
    """The model to record: the body's, where a Prometheus label can hold it."""
    model = None if document is None else document.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_LENGTH:
        return "unknown"
    try:
        model.encode()
    except UnicodeEncodeError:
        return "unknown"
    return model


def usage_asked(sent: dict[str, Any] | None, parsed: dict[str, Any] | None,
                learnt: bool | None) -> bool:
    """Whether a stream carries usage: asked for by the client (`sent`, the body) with
    `include_usage: true`, or by the proxy where the body it could read (`parsed`) plainly
    did not ask and it has learnt that the upstream reports no counts unasked."""
    def options(document: dict[str, Any] | None) -> Any:
        if document is None or document.get("stream") is not True:
            return ABSENT
        return document.get("stream_options")

    client, proxy = options(sent), options(parsed)
    return (isinstance(client, dict) and client.get("include_usage") is True) or (
        learnt is False and (proxy is None or (
            isinstance(proxy, dict) and proxy.get("include_usage") is False)))


@pytest.fixture
def parse_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_openai, "MAX_PARSE_BYTES", PARSE_LIMIT)


@pytest.mark.usefixtures("parse_limit")
def test_whatever_a_client_sends_it_gets_the_upstreams_answer_and_is_recorded(
        stack: Stack) -> None:
    engine = RecordingEngine()
    proxied = stack.proxy(stack.fake, engine)
    stats = stack.proxies[-1]

    @settings(max_examples=1_000, deadline=None)
    @example(body=encode({"model": "\ud800", "prompt": "x"}, True), path=PATHS[1],
             gzipped=False)
    @example(body=encode({"model": "instant", "prompt": "x", "stream": True,
                          "x": "\ud800"}, True), path=PATHS[1], gzipped=False)
    @example(body=encode({"model": "instant", "messages": MESSAGES, "stream": True,
                          "stream_options": {}}, True), path=PATHS[0], gzipped=False)
    @given(body=bodies, path=st.sampled_from(PATHS),
           gzipped=st.sampled_from([False] * 4 + [True]))
    def case(body: bytes, path: str, gzipped: bool) -> None:
        headers = {"Content-Type": "application/json"}
        sent = json_object(body)
        parsed = sent if len(body) <= PARSE_LIMIT and not gzipped else None
        if gzipped:
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        direct = post(stack.fake, path, body, headers)
        learnt = stats.counts_unasked.get(path.removeprefix("/v1"))
        through = post(proxied, path, body, headers)
        assert (through.status, through.body) == (direct.status, direct.body)
        assert through.whole and through.headers["Content-Type"] == direct.headers[
            "Content-Type"]

        request_id = through.headers[REQUEST_ID_HEADER]
        assert request_id
        wait_until(lambda: request_id in engine.ended, "the request to end")
        ended = engine.ended[request_id]
        assert engine.added[request_id].model == expected_model(parsed)
        assert ended["status"] == ("ok" if 200 <= through.status < 300 else "failed")
        tokens = ended["prompt_tokens"], ended["completion_tokens"]
        if through.status != 200:
            assert tokens == (None, None)
        elif through.headers["Content-Type"].startswith("application/json"):
            usage = json.loads(through.body)["usage"]
            assert tokens == (usage["prompt_tokens"], usage.get("completion_tokens", 0))
        else:
            chunks, usage = sse_tokens(through.body)
            assert ended["first_token"] is not None and tokens[1] == chunks
            asked = usage_asked(sent, parsed, learnt)
            assert (tokens[0] is not None) == asked and ended["tokens_estimated"] is not asked
            if usage is not None:
                assert tokens == (usage["prompt_tokens"], usage["completion_tokens"])

    case()
    settled(stack, engine)


# --- 1b. upstream streams -----------------------------------------------------------------

SEPARATORS = (b"\n", b"\r\n", b"\r")
line_bytes = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"\r", b"_").replace(b"\n", b"_"))
"""A line of arbitrary bytes: anything but a line ending."""


@dataclass(frozen=True)
class Event:
    lines: tuple[bytes, ...]
    separator: bytes
    chunk: Any = None
    """The JSON object of the event's data, when it holds one."""
    tokens: int = 0
    """Choices that carry a token, when the proxy parses the event."""
    error: bool = False
    """An `event: error` field."""
    done: bool = False
    """`data: [DONE]`."""

    def block(self, terminated: bool = True) -> bytes:
        text = self.separator.join(self.lines)
        return text + self.separator * 2 if terminated else text


def data_event(chunk: Any, separator: bytes, *, split: bool = False, **known: Any) -> Event:
    text = json.dumps(chunk).encode()
    parsed = chunk if isinstance(chunk, dict) else None
    if split:  # one JSON document over two data lines, the second without the usual space
        half = text.index(b", ") + 1
        return Event((b"data: " + text[:half], b"data:" + text[half:]), separator, parsed,
                     **known)
    return Event((b"data: " + text,), separator, parsed, **known)


contents = st.text(max_size=12) | st.just("x" * 6_000)
counts = st.sampled_from([0, 3, 7, 2**53, 2**53 + 1, -1, 10**400, 1.5, "7", True, None])
usages = st.one_of(
    st.fixed_dictionaries({"prompt_tokens": counts, "completion_tokens": counts}),
    st.just({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),  # Ollama's
    st.sampled_from([None, 5, "x", [], {}]),
)
milliseconds = st.sampled_from([0, 0.5, 12.25, 3e4, -1.0, math.inf, "5", True, None])
timings = st.fixed_dictionaries(
    {"prompt_n": counts, "prompt_ms": milliseconds, "predicted_n": counts,
     "predicted_ms": milliseconds},
    optional={"cache_n": counts},
) | st.sampled_from([None, [], 5])


@st.composite
def events(draw: st.DrawFn) -> Event:
    separator = draw(st.sampled_from(SEPARATORS))
    kind = draw(st.sampled_from(["content", "content", "content", "text", "empty", "usage",
                                 "usage", "finish", "error", "bad json", "not an object",
                                 "other field", "garbage", "huge line"]))
    if kind in ("content", "text", "finish"):
        values = draw(st.lists(contents, min_size=1, max_size=3))
        choices: list[dict[str, Any]] = [
            {"index": i, "delta": {"content": v}} if kind != "text" else {"index": i, "text": v}
            for i, v in enumerate(values)]
        chunk: dict[str, Any] = {"id": "x", "choices": choices}
        if kind == "finish":
            choices[-1]["finish_reason"] = draw(st.sampled_from(["stop", "length"]))
            if draw(st.booleans()):
                chunk["timings"] = draw(timings)
        if draw(st.booleans()):
            chunk["usage"] = draw(usages)
        return data_event(chunk, separator, split=draw(st.booleans()),
                          tokens=sum(1 for v in values if v))
    if kind == "empty":
        choice = draw(st.sampled_from([{"index": 0, "delta": {}}, {"index": 0, "text": ""},
                                       {"index": 0}, 5, None]))
        return data_event({"id": "x", "choices": [choice]}, separator)
    if kind == "usage":
        chunk = {"id": "x", "choices": [], "usage": draw(usages)}
        if draw(st.booleans()):
            chunk["timings"] = draw(timings)
        return data_event(chunk, separator, split=draw(st.booleans()))
    if kind == "error":
        error = {"error": {"code": 500, "message": "boom", "type": "server_error"}}
        if draw(st.booleans()):
            return data_event(error, separator)
        return Event((b"event: error", b"data: " + json.dumps(error).encode()), separator,
                     error, error=True)
    if kind == "bad json":
        whole = b'{"id":"x","choices":[{"index":0,"delta":{"content":"y"}}]}'
        return Event((b"data: " + whole[:draw(st.integers(0, len(whole) - 1))],), separator)
    if kind == "not an object":
        data = draw(st.sampled_from([b"[1]", b'"x"', b"5", b"null", b"[DONE]", b""]))
        return Event((b"data: " + data,), separator, done=data == b"[DONE]")
    if kind == "other field":
        return Event((draw(st.sampled_from([b": keep-alive", b"event: ping", b"id: 7",
                                            b"retry: 1000", b"data", b":"])),), separator)
    if kind == "garbage":
        return Event(tuple(draw(st.lists(line_bytes, min_size=1, max_size=3))), separator)
    size = draw(st.integers(EVENT_LIMIT - 64, 3 * EVENT_LIMIT))
    return Event((b"data: " + b"z" * size,), separator)


@dataclass(frozen=True)
class Outcome:
    """What the client gets and what the request is recorded with, when the proxy parses
    the stream up to a given event."""

    body: bytes
    tokens: tuple[int | None, int | None, bool]
    """(prompt, completion, estimated)."""
    timed: bool
    """The stream gave the server's own durations (so the record has `scheduled`)."""
    error: bool
    done: bool
    reported: bool
    """The server's own counts were in the stream."""


@dataclass(frozen=True)
class Stream:
    events: tuple[Event, ...]
    terminated: bool
    """False: the last event lacks its blank line (the stream is truncated)."""

    def blocks(self) -> list[bytes]:
        last = len(self.events) - 1
        return [e.block(self.terminated or i < last) for i, e in enumerate(self.events)]

    def outcomes(self, rewrites: bool) -> list[Outcome]:
        """One outcome per point where the proxy may stop parsing (an event over the
        limit), and one where it parses everything."""
        blocks = self.blocks()
        stops = [i for i, b in enumerate(blocks) if len(b) > EVENT_LIMIT]
        return [self._outcome(blocks, stop, rewrites) for stop in [*stops, len(blocks)]]

    def _outcome(self, blocks: list[bytes], stop: int, rewrites: bool) -> Outcome:
        """The reference: the stream taken whole, event by event, as `EventStream`
        documents it."""
        sent: list[bytes] = []
        held: tuple[Event, dict[str, Any]] | None = None  # a finishing chunk, as it will go

        def release() -> None:
            nonlocal held
            if held is not None:
                sent.append(_render(*held))
                held = None

        usage: tuple[int | None, int | None] | None = None
        counted: tuple[int, int] | None = None  # the latest valid of each, from timings
        timed = False
        chunks = 0
        error = done = False
        for i, (event, block) in enumerate(zip(self.events[:stop], blocks, strict=False)):
            complete = self.terminated or i < len(blocks) - 1
            chunk = event.chunk
            error = error or event.error or (chunk is not None and "error" in chunk)
            done = done or event.done
            chunks += event.tokens
            choices = None if chunk is None else chunk.get("choices")
            finishing = _finishes(choices)
            done = done or finishing
            if chunk is not None:
                if not isinstance(choices, list) or not choices or finishing:
                    usage = _usage(chunk.get("usage"), usage)
                timing = chunk.get("timings")
                counted = _timings_counts(timing) or counted
                timed = timed or (isinstance(timing, dict) and all(
                    type(timing.get(k)) in (int, float) and 0 <= timing[k] < 1e18
                    for k in ("prompt_ms", "predicted_ms")))
            if not rewrites or chunk is None or not complete:
                release()
                sent.append(block)
                continue
            if choices == [] and isinstance(chunk.get("usage"), dict):  # dropped
                if held is not None:
                    extra = {k: v for k, v in chunk.items()
                             if k != "usage" and k not in held[1]}
                    held = (held[0], {**held[1], **extra})
                    release()
                continue
            release()
            edited = dict(chunk)
            if isinstance(choices, list) and choices and isinstance(chunk.get("usage"), dict):
                del edited["usage"]
            if finishing:
                held = (event, edited)
            else:
                sent.append(_render(event, edited))
        release()
        sent.extend(blocks[stop:])
        if usage is not None:
            tokens: tuple[int | None, int | None, bool] = (*usage, False)
        elif counted is not None:
            tokens = (*counted, False)
        else:
            tokens = (None, chunks or None, bool(chunks))
        return Outcome(b"".join(sent), tokens, timed, error, done,
                       usage is not None or counted is not None)


def _render(event: Event, chunk: dict[str, Any]) -> bytes:
    """The event with its chunk edited to `chunk` (members removed, or added at the end
    compactly joined), where the proxy can edit it: one data line."""
    if chunk == event.chunk and list(chunk) == list(event.chunk):
        return event.block()
    if len(event.lines) != 1:
        return event.block()  # not edited: not the one-data-line form
    kept = {k: v for k, v in chunk.items() if k in event.chunk}
    text = json.dumps(kept)
    extra = [json.dumps({k: v})[1:-1] for k, v in chunk.items() if k not in event.chunk]
    if extra:
        text = text[:-1] + ("," if kept else "") + ",".join(extra) + "}"
    return b"data: " + text.encode() + event.separator * 2


def _finishes(choices: Any) -> bool:
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**53


def _usage(value: Any, before: tuple[int | None, int | None] | None
           ) -> tuple[int | None, int | None] | None:
    """(prompt, completion) from a final usage object; `before` where it has no counts."""
    if not isinstance(value, dict):
        return before
    p, c = value.get("prompt_tokens"), value.get("completion_tokens")
    if _count(p):
        return p, c if _count(c) else 0
    return (None, c) if _count(c) else before


def _timings_counts(timing: Any) -> tuple[int, int] | None:
    """(prompt_n + cache_n, predicted_n) from llama.cpp's timings, where they are counts."""
    if not isinstance(timing, dict):
        return None
    prompt, cached, predicted = (timing.get(k) for k in ("prompt_n", "cache_n", "predicted_n"))
    cached = 0 if cached is None else cached
    if not all(_count(n) for n in (prompt, cached, predicted)) or not _count(prompt + cached):
        return None
    return prompt + cached, predicted


streams = st.builds(Stream, st.lists(events(), max_size=8).map(tuple), st.booleans())
ASKS = {
    "proxy asks for usage": {"stream": True},
    "client asks for usage": {"stream": True, "stream_options": {"include_usage": True}},
    "no stream asked": {"stream": False},
}
LEARNT = {"not yet learnt": None, "reported unasked": True, "not reported unasked": False}
"""What the proxy has learnt of the upstream's streams before the request."""
ENDPOINT = "/chat/completions"


@pytest.fixture
def event_limit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """MAX_EVENT_BYTES made small; the list holds the most the proxy held of an event."""
    monkeypatch.setattr(proxy_openai, "MAX_EVENT_BYTES", EVENT_LIMIT)
    held = [0]
    feed = EventStream.feed

    def watched(self: EventStream, chunk: bytes) -> bytes:
        sent = feed(self, chunk)
        held[0] = max(held[0], len(self._tail))
        return sent

    monkeypatch.setattr(EventStream, "feed", watched)
    return held


def test_whatever_an_upstream_streams_reaches_the_client_and_is_recorded(
        stack: Stack, event_limit: list[int]) -> None:
    engine = RecordingEngine()
    proxied = stack.proxy(stack.scripted_url, engine)
    stats = stack.proxies[-1]
    multiline_tail = Stream((data_event({"choices": [{"index": 0, "text": "a"}]}, b"\n",
                                        split=True, tokens=1),), terminated=False)
    huge_usage = {"prompt_tokens": 10**400, "completion_tokens": 3}
    huge_count = Stream((data_event({"choices": [], "usage": huge_usage}, b"\n"),),
                        terminated=True)
    usage = {"prompt_tokens": 7, "completion_tokens": 0}
    usage_last_cr = Stream((data_event({"choices": [], "usage": usage}, b"\r"),),
                           terminated=True)  # complete only once the stream has ended
    finish = {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    llama_asked = Stream((  # the timings move to the usage chunk when usage is asked for
        data_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}, b"\n",
                   tokens=1),
        data_event(finish, b"\n"),
        data_event({"id": "x", "choices": [], "usage": usage,
                    "timings": {"prompt_n": 7, "prompt_ms": 1.5, "predicted_n": 1,
                                "predicted_ms": 2.0}}, b"\n"),
        Event((b"data: [DONE]",), b"\n", done=True)), terminated=True)
    common = {"cuts": [], "status": 200, "content_type": "text/event-stream", "cut": False}

    @settings(max_examples=1_200, deadline=None)
    @example(stream=multiline_tail, ask="proxy asks for usage", learnt="not reported unasked",
             **common)
    @example(stream=huge_count, ask="client asks for usage", learnt="not yet learnt", **common)
    @example(stream=usage_last_cr, ask="proxy asks for usage", learnt="not reported unasked",
             **common)
    @example(stream=llama_asked, ask="proxy asks for usage", learnt="not reported unasked",
             **common)
    @given(stream=streams, ask=st.sampled_from(sorted(ASKS)), learnt=st.sampled_from(
               sorted(LEARNT)),
           cuts=st.lists(st.integers(0, 4 * EVENT_LIMIT), max_size=6),
           status=st.sampled_from([200, 200, 200, 200, 500]),
           content_type=st.sampled_from(["text/event-stream", "text/event-stream; charset=utf-8",
                                         "application/json"]),
           cut=st.booleans())
    def case(stream: Stream, ask: str, learnt: str, cuts: list[int], status: int,
             content_type: str, cut: bool) -> None:
        whole = b"".join(stream.blocks())
        bounds = sorted({0, len(whole), *(min(c, len(whole)) for c in cuts)})
        pieces = tuple(whole[a:b] for a, b in itertools.pairwise(bounds))
        headers = stack.scripted.add(Script(pieces, status, content_type, cut))
        body = json.dumps({"model": "m", "messages": MESSAGES, **ASKS[ask]}).encode()
        unreachable = stats.upstream_unreachable
        stats.counts_unasked.pop(ENDPOINT, None)
        if LEARNT[learnt] is not None:
            stats.counts_unasked[ENDPOINT] = LEARNT[learnt]
        answer = post(proxied, PATHS[0], body, {**headers, "Content-Type": "application/json"})

        request_id = answer.headers[REQUEST_ID_HEADER]
        assert request_id
        wait_until(lambda: request_id in engine.ended, "the request to end")
        ended = engine.ended[request_id]
        assert answer.status == status
        sse = status == 200 and content_type.startswith("text/event-stream")
        unasked = ask == "proxy asks for usage"
        outcomes = stream.outcomes(rewrites=sse and unasked and LEARNT[learnt] is False)
        if not sse:
            outcomes = [Outcome(whole, (None, None, False), False, False, False, False)]
        recorded = ((ended["prompt_tokens"], ended["completion_tokens"],
                     ended["tokens_estimated"]), ended["scheduled"] is not None)
        if cut:
            assert not answer.whole
            assert any(o.body.startswith(answer.body) for o in outcomes)
            assert ended["status"] == "failed"
            assert stats.upstream_unreachable == unreachable + 1
            return
        assert answer.whole

        def explains(outcome: Outcome) -> bool:
            """`outcome` is what the client and the record show: the bytes, the counts,
            the status, and what the proxy learnt."""
            ok = status == 200 and not outcome.error
            learns = LEARNT[learnt] is None and unasked and sse and ok and outcome.done
            return ((outcome.body, (outcome.tokens, outcome.timed)) == (answer.body, recorded)
                    and ended["status"] == ("ok" if ok else "failed")
                    and stats.counts_unasked.get(ENDPOINT) == (
                        outcome.reported if learns else LEARNT[learnt]))

        assert any(map(explains, outcomes)), (answer.body, recorded, ended["status"],
                                              stats.counts_unasked, outcomes)
        assert event_limit[0] <= EVENT_LIMIT

    case()
    settled(stack, engine)


# --- 2. too large, too slow, gone -----------------------------------------------------------


def exchange(base: str, data: bytes) -> bytes:
    """Sends raw bytes; returns all the server answers until it closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_headers_beyond_the_limits_get_a_4xx_and_the_proxy_stays_up(stack: Stack) -> None:
    engine = RecordingEngine()
    proxied = stack.proxy(stack.fake, engine)
    stats = stack.proxies[-1]
    body = json.dumps({"model": "instant", "prompt": "x"}).encode()
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    end = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    for oversized in (b"X-Long: " + b"a" * 10_000 + b"\r\n",  # one field past 8190 bytes
                      b"".join(b"X-%d: a\r\n" % i for i in range(1_000))):  # too many
        answer = exchange(proxied, start + oversized + end)
        assert answer.split(b" ", 2)[1] in (b"400", b"431")
    assert stats.measured == 0
    assert exchange(proxied, start + end).startswith(b"HTTP/1.1 200 ")

    # An upstream whose headers the proxy cannot read: a clear 502, the request failed.
    scripted = stack.proxy(stack.scripted_url, engine)
    headers = stack.scripted.add(Script((b"{}",), content_type="application/json",
                                        headers=(("X-Long", "b" * 10_000),)))
    answer = post(scripted, PATHS[1], body, headers)
    assert answer.status == 502
    assert json.loads(answer.body)["error"]["type"] == "upstream_unreachable"
    assert engine.ended[answer.headers[REQUEST_ID_HEADER]]["status"] == "failed"
    settled(stack, engine)


def test_a_client_that_sends_its_body_slowly_is_served(stack: Stack) -> None:
    engine = RecordingEngine()
    proxied = stack.proxy(stack.fake, engine)
    body = json.dumps({"model": "instant", "messages": MESSAGES, "stream": True}).encode()
    host, port = proxied.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 16):
            time.sleep(0.01)
            sock.sendall(body[i:i + 16])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last chunk, then the end
    (record,) = settled(stack, engine)
    assert record.request.status == "ok"
    # The endpoint's first unasked stream passes untouched (the proxy learns from it that
    # this upstream reports no counts unasked): its completion is counted from the chunks.
    assert record.request.completion_tokens and record.request.tokens_estimated


@pytest.mark.parametrize("cancel_handler", [True, False])
def test_clients_that_vanish_mid_body_or_mid_wait_are_recorded_cancelled(
        stack: Stack, cancel_handler: bool) -> None:
    """Mid-stream is test_proxy's; here the client goes while sending its body, and while
    waiting for a non-streaming answer. Either way the proxy stays up. A request whose body
    never arrived whole never reached the upstream: it is counted, not attributed."""
    engine = RecordingEngine()
    ended: list[int] = []
    slow = stack.servers.serve(fake_upstream_app(models={"slow": 20.0}, on_end=ended.append),
                               handler_cancellation=True)
    proxied = stack.proxy(slow, engine, handler_cancellation=cancel_handler)
    stats = stack.proxies[-1]
    host, port = proxied.removeprefix("http://").split(":")
    body = json.dumps({"model": "slow", "prompt": "joules " * 10, "max_tokens": 30}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"

    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head % (len(body) + 100) + body)  # 100 bytes short
        wait_until(lambda: stats.measured == 1, "the proxy to start the request")
    wait_until(lambda: stats.cancelled == 1, "the request to be cancelled")
    assert ended == [] and engine.added == {}

    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head % len(body) + body)
        wait_until(lambda: len(engine.added) == 1, "the upstream to work")
        sock.shutdown(socket.SHUT_RDWR)
    if cancel_handler:  # else the proxy learns of it only when it writes the answer
        wait_until(lambda: ended == [1], "the upstream to see the client go")
    wait_until(lambda: stats.cancelled == 2, "the second request to be cancelled")

    answer = post(proxied, PATHS[1], json.dumps({"model": "slow", "prompt": "x",
                                                "max_tokens": 1}).encode(), {})
    assert answer.status == 200
    records = settled(stack, engine)
    assert [r.request.status for r in records] == ["cancelled", "ok"]


def test_a_client_that_does_not_read_holds_back_the_upstream_not_the_proxys_memory(
        stack: Stack) -> None:
    """The proxy writes no faster than the client reads: what the upstream manages to send
    meanwhile is bounded by the socket buffers on the way, far below what it has to send."""
    engine = RecordingEngine()
    sent = [0]
    total = 512 * 2**20
    piece = b'data: {"choices":[{"index":0,"text":"' + b"j" * 65_000 + b'"}]}\n\n'

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the proxy dropped the connection
            while sent[0] < total:
                await response.write(piece)
                sent[0] += len(piece)
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", flood)
    proxied = stack.proxy(stack.servers.serve(app), engine)
    stats = stack.proxies[-1]
    host, port = proxied.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
        previous = -1
        while previous != sent[0]:  # until the upstream is held back
            previous = sent[0]
            time.sleep(0.2)
        assert 0 < sent[0] < total // 8
    wait_until(lambda: stats.cancelled == 1, "the request to be cancelled")
    settled(stack, engine)


# --- 4. what the proxy keeps: no prompt, no completion, no credential ----------------------

MARKERS = {"auth": "sk-AUTH-MARKER-5e1f", "prompt": "PROMPT-MARKER-93ab",
           "completion": "COMPLETION-MARKER-c07d"}


def test_no_prompt_completion_or_credential_in_logs_metrics_or_records(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """Beyond test_proxy's check of the logs: a stream's completion, the records and the
    node's /metrics, with markers the upstream really sends back."""
    caplog.set_level(logging.DEBUG)
    engine = RecordingEngine()
    proxied = stack.proxy(stack.scripted_url, engine)
    stats = stack.proxies[-1]
    completion = MARKERS["completion"]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    whole = json.dumps({"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": completion}}], "usage": usage}).encode()
    chunks = [{"id": "x", "choices": [{"index": 0, "delta": {"content": completion}}]},
              {"id": "x", "choices": [], "usage": usage}]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    auth = {"Authorization": f"Bearer {MARKERS['auth']}", "Content-Type": "application/json"}
    prompt = [{"role": "user", "content": MARKERS["prompt"]}]
    for script, stream_asked in ((Script((whole,), content_type="application/json"), False),
                                 (Script((stream + b"data: [DONE]\n\n",)), True)):
        body = json.dumps({"model": "m", "messages": prompt, "stream": stream_asked}).encode()
        answer = post(proxied, PATHS[0], body, {**auth, **stack.scripted.add(script)})
        assert answer.status == 200 and completion.encode() in answer.body
    assert stack.scripted.authorization == auth["Authorization"]  # passed on, as it must be
    records = settled(stack, engine)
    assert [(r.request.status, r.request.completion_tokens) for r in records] == [("ok", 2)] * 2
    assert "request body" in caplog.text  # the proxy did log, at debug level

    request_metrics = RequestMetrics(engine.totals)
    request_metrics.observe(records)
    sampler = Sampler(ScriptedGpuSource([GpuInfo(0, "GPU-aaaa", "H100", "counter", "instant")]),
                      interval_s=0.1)
    collector = NodeCollector(sampler.snapshot, pue=1.1, version="0")
    collector.add(request_metrics.families)
    collector.add(ProxyMetrics({"fuzz": stats}).families)
    exposition = generate_latest(build_registry(collector)).decode()
    assert "jouleprobe_proxy_requests_total" in exposition
    kept = [caplog.text, exposition, *map(repr, records), repr(stats)]
    for marker in MARKERS.values():
        assert not any(marker in text for text in kept), marker

