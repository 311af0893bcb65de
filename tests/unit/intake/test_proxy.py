"""The OpenAI-compatible proxy, between the official `openai` client and the fake upstream,
over real HTTP on 127.0.0.1, into a real AttributionEngine on a filled timeline.

The servers run on an event loop in a background thread, so that the synchronous `openai`
client and `http.client` can talk to them from the test's thread.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import itertools
import json
import logging
import socket
import time
import zlib
from collections.abc import Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scripted import Servers, wait_until

from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.intake.proxy import (
    PROXY_STATS,
    REQUEST_ID_HEADER,
    RUNNER_OPTIONS,
    ProxyStats,
    proxy_app,
)
from agent.intake.proxy import openai as proxy_openai
from agent.intake.proxy.openai import EventStream, Measurement
from agent.requests import RequestEnergy, Sampling
from agent.sim.upstream import count_tokens, fake_upstream_app

API_KEY = "sk-test-4f1d9c0e7b2a-never-logged"
PROMPT = "What does one request cost, in joules?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
CHAT_PROMPT_TOKENS = 1 + (1 + count_tokens("Be brief.")) + (1 + count_tokens(PROMPT))
FAST = {"llama": 2000.0, "instant": float("inf")}


def start_proxy(servers: Servers, engine: AttributionEngine, upstream: str, *,
                gpus: Callable[[], tuple[int, ...]] = lambda: (0,),
                runner: dict[str, Any] | None = None, **table: Any
                ) -> tuple[str, ProxyStats]:
    config = ProxyTable(name="vllm", listen="127.0.0.1:0", upstream=upstream, gpus=(0,),
                        **table)
    app = proxy_app(config, engine, gpus)
    servers.proxies.append(app[PROXY_STATS])
    return servers.serve(app, **{**RUNNER_OPTIONS, **(runner or {})}), app[PROXY_STATS]


def client(base: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=10)


def raw(base: str, method: str, path: str, body: Any = None,
        headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    answer = (response.status, response.headers, response.read())
    connection.close()
    return answer


def finals(servers: Servers, engine: AttributionEngine) -> list[RequestEnergy]:
    """The final figures of every request, once the proxies have ended them all (a client
    has its last byte a moment before the proxy ends the request)."""
    wait_until(lambda: all(s.running == 0 for s in servers.proxies), "the proxies to end")
    return sorted(engine.advance(time.monotonic() + 2_000), key=lambda e: e.request.start)


# --- the openai client sees the same answers -----------------------------------------------


def test_openai_client_gets_the_upstream_answers_and_each_request_is_measured(
        servers: Servers, engine: AttributionEngine) -> None:
    upstream = servers.serve(fake_upstream_app(models=FAST, api_key=API_KEY))
    proxied, stats = start_proxy(servers, engine, upstream)
    answers = []
    for base in (upstream, proxied):
        c = client(base)
        answers.append([
            c.chat.completions.create(model="llama", messages=MESSAGES),
            list(c.chat.completions.create(model="llama", messages=MESSAGES, stream=True)),
            c.completions.create(model="llama", prompt=PROMPT, max_tokens=5, temperature=0.7,
                                 n=1),
            list(c.completions.create(model="llama", prompt=PROMPT, max_tokens=5, stream=True)),
            c.embeddings.create(model="llama", input=[PROMPT, "watts"]),  # base64 on the wire
            c.embeddings.create(model="llama", input="watts", encoding_format="float"),
        ])
    direct, through = answers
    assert through == direct
    chat, chat_stream, completion = direct[0], direct[1], direct[2]
    assert chat_stream[-1].usage is None  # nobody asked for usage: the client sees none
    assert all(chunk.choices for chunk in chat_stream)

    records = finals(servers, engine)
    assert stats.measured == len(records) == 6
    assert [r.request.status for r in records] == ["ok"] * 6
    assert {(r.request.source, r.request.model, r.request.gpus) for r in records} == {
        ("proxy:vllm", "llama", (0,))}
    tokens = [(r.request.prompt_tokens, r.request.completion_tokens) for r in records]
    usage = chat.usage
    assert usage is not None and usage.prompt_tokens == CHAT_PROMPT_TOKENS
    assert tokens[0] == (usage.prompt_tokens, usage.completion_tokens)
    # The first stream that did not ask for usage passes untouched, to learn whether this
    # upstream reports counts unasked (it does not): its completion tokens are the content
    # chunks counted, marked as an estimate.
    assert tokens[1] == (None, len([c for c in chat_stream if c.choices[0].delta.content]))
    assert [r.request.tokens_estimated for r in records] == [False, True, False, True,
                                                             False, False]
    assert completion.usage is not None
    assert tokens[2:4] == [(count_tokens(PROMPT), 5), (None, 5)]
    assert tokens[4:] == [(count_tokens(PROMPT) + 1, 0), (1, 0)]
    # The generation parameters of the request body are recorded (never its text).
    assert [r.request.sampling for r in records[:4]] == [
        None, None, Sampling(max_tokens=5, temperature=0.7, n=1), Sampling(max_tokens=5)]
    for record in records:
        request = record.request
        assert request.end is not None and request.start < request.end
        streamed = record in (records[1], records[3])
        assert (request.first_token is not None) == streamed
        if streamed:
            assert request.start < request.first_token <= request.end  # type: ignore[operator]
        assert record.gpu_j > 0


def test_a_stream_passes_byte_for_byte_with_usage_asked_or_not(
        servers: Servers, engine: AttributionEngine) -> None:
    upstream = servers.serve(fake_upstream_app(models=FAST))
    proxied, _ = start_proxy(servers, engine, upstream)
    bodies = [
        {"model": "llama", "messages": MESSAGES, "stream": True},
        {"model": "llama", "messages": MESSAGES, "stream": True,
         "stream_options": {"include_usage": False}},
        {"model": "llama", "messages": MESSAGES, "stream": True,
         "stream_options": {"include_usage": True}},
        {"model": "llama", "prompt": PROMPT, "stream": True},
        {"model": "llama", "prompt": PROMPT, "stream": True},
    ]
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, _, direct = raw(upstream, "POST", path, body)
        status_p, headers_p, through = raw(proxied, "POST", path, body)
        assert (status_p, through) == (status, direct)
        assert headers_p["Content-Type"] == "text/event-stream; charset=utf-8"
        assert headers_p[REQUEST_ID_HEADER]
        asked = body.get("stream_options", {}).get("include_usage", False)
        assert (b'"choices":[],"usage":' in through) == asked
        assert through.endswith(b"data: [DONE]\n\n")
    records = finals(servers, engine)
    assert len(records) == 5
    assert all(r.request.completion_tokens for r in records)
    assert all(r.request.first_token is not None for r in records)
    # The first unasked stream of each endpoint passes untouched, to learn that this
    # upstream does not report counts unasked; later ones are asked for usage.
    assert [(r.request.prompt_tokens is None, r.request.tokens_estimated)
            for r in records] == [(True, True), (False, False), (False, False), (True, True),
                                  (False, False)]


def _stream(events: list[bytes], separators: list[bytes]) -> tuple[bytes, bytes]:
    """A stream of `events` and what the client must get when the usage event is dropped."""
    whole = kept = b""
    for event, separator in zip(events, separators, strict=True):
        block = event.replace(b"\n", separator) + separator * 2
        whole += block
        if b'"choices":[],"usage"' not in event:
            kept += block
    return whole, kept


USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}'
EVENTS = [
    b": keep-alive comment",
    b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"Jou"}}]}',
    b'event: message\ndata: {"id":"x","choices":[{"index":0,"delta":{"content":"les"}},\n'
    b'data: {"index":1,"delta":{"content":"!"}}]}',
    b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    USAGE_EVENT,
    b"data: [DONE]",
]


_CRLF = [b"\r\n"] * len(EVENTS)
_BETWEEN_CR_AND_LF = _stream(EVENTS, _CRLF)[0].index(USAGE_EVENT) + len(USAGE_EVENT) + 3
"""A cut inside the blank line that ends the usage event: `...\r\n\r` | `\n`."""


@settings(max_examples=150, deadline=None)
@example(separators=_CRLF, cuts=[_BETWEEN_CR_AND_LF], rewrites=True)
@given(
    separators=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=len(EVENTS),
                        max_size=len(EVENTS)),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12),
    rewrites=st.booleans(),
)
def test_sse_events_are_read_and_the_usage_event_dropped_however_the_bytes_are_cut(
        separators: list[bytes], cuts: list[int], rewrites: bool) -> None:
    whole, kept = _stream(EVENTS, separators)
    measurement = Measurement("r", 0.0)
    ticks = iter(range(1, 1_000))
    events = EventStream(rewrites, measurement, lambda: float(next(ticks)))
    bounds = sorted({0, len(whole), *(min(c, len(whole)) for c in cuts)})
    sent = [events.feed(whole[a:b]) for a, b in itertools.pairwise(bounds)]
    sent.append(events.finish())
    assert b"".join(sent) == (kept if rewrites else whole)
    assert measurement.counts() == (7, 3, False)
    assert measurement.completion_chunks == 3  # "Jou", then "les" and "!" in one chunk
    assert measurement.first_token is not None


# --- what the engine records ---------------------------------------------------------------


@pytest.mark.parametrize("cancel_handler", [True, False])
def test_a_client_that_disconnects_mid_stream_ends_its_request_cancelled(
        servers: Servers, engine: AttributionEngine, caplog: pytest.LogCaptureFixture,
        cancel_handler: bool) -> None:
    """With or without handler cancellation: without, the proxy learns of the disconnect
    when its next write fails."""
    ended: list[int] = []
    upstream = servers.serve(fake_upstream_app(models={"slow": 20.0}, on_end=ended.append),
                             handler_cancellation=True)
    proxied, stats = start_proxy(servers, engine, upstream,
                                 runner={"handler_cancellation": cancel_handler})
    body = json.dumps({"model": "slow", "prompt": PROMPT, "stream": True}).encode()
    host, port = proxied.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b'"text":"') < 3:  # the empty first chunk, then two tokens
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the stream"
            received += chunk
    wait_until(lambda: stats.cancelled == 1, "the request to be cancelled")
    wait_until(lambda: ended == [1], "the upstream to see the client go")
    (record,) = finals(servers, engine)
    request = record.request
    assert request.status == "cancelled"
    assert request.prompt_tokens is None  # usage never came
    assert request.completion_tokens is not None and request.completion_tokens >= 2
    assert request.first_token is not None and request.end is not None
    assert request.start < request.first_token <= request.end
    assert (stats.upstream_unreachable, stats.failed) == (0, 0)
    assert "Error handling request" not in caplog.text


def cut_off_app() -> web.Application:
    """Sends two events of a stream, then breaks the connection."""
    async def cut_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"text":"Jou"}]}\n\n'
                             b'data: {"choices":[{"index":0,"text":"les"}]}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", cut_off)
    return app


def test_an_upstream_that_breaks_mid_stream_cuts_the_client_off_and_the_request_failed(
        servers: Servers, engine: AttributionEngine) -> None:
    upstream = servers.serve(cut_off_app())
    proxied, stats = start_proxy(servers, engine, upstream)
    with pytest.raises(http.client.IncompleteRead) as cut:
        raw(proxied, "POST", "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert b'"text":"les"' in cut.value.partial  # what came before the break was relayed
    (record,) = finals(servers, engine)
    assert (record.request.status, record.request.completion_tokens) == ("failed", 2)
    assert stats.upstream_unreachable == 1


def test_an_unreachable_upstream_answers_502_and_the_request_failed(
        servers: Servers, engine: AttributionEngine) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    proxied, stats = start_proxy(servers, engine, f"http://127.0.0.1:{port}")
    status, headers, body = raw(proxied, "POST", "/v1/chat/completions",
                                {"model": "llama", "messages": MESSAGES})
    assert status == 502
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["type"] == "upstream_unreachable"
    assert headers[REQUEST_ID_HEADER]
    status, _, _ = raw(proxied, "GET", "/v1/models")
    assert status == 502
    (record,) = finals(servers, engine)
    assert (record.request.id, record.request.status) == (headers[REQUEST_ID_HEADER], "failed")
    assert (stats.upstream_unreachable, stats.failed) == (2, 1)


def test_a_slow_upstream_answers_504_and_the_request_failed(
        servers: Servers, engine: AttributionEngine) -> None:
    upstream = servers.serve(fake_upstream_app(models={"slow": 5.0}), handler_cancellation=True)
    proxied, stats = start_proxy(servers, engine, upstream, timeout=0.2)
    status, _, body = raw(proxied, "POST", "/v1/completions",
                          {"model": "slow", "prompt": PROMPT, "max_tokens": 10})
    assert status == 504
    assert json.loads(body)["error"]["type"] == "upstream_timeout"
    (record,) = finals(servers, engine)
    assert record.request.status == "failed"
    assert stats.upstream_timeouts == 1


def test_an_upstream_error_passes_through_and_the_request_failed(
        servers: Servers, engine: AttributionEngine) -> None:
    upstream = servers.serve(fake_upstream_app(models=FAST))
    proxied, _ = start_proxy(servers, engine, upstream, model="served-name")
    body = {"model": "no-such-model", "messages": MESSAGES}
    direct = raw(upstream, "POST", "/v1/chat/completions", body)
    through = raw(proxied, "POST", "/v1/chat/completions", body)
    assert (through[0], through[2]) == (direct[0], direct[2]) == (404, direct[2])
    assert json.loads(through[2])["error"]["code"] == "model_not_found"
    (record,) = finals(servers, engine)
    assert (record.request.status, record.request.model) == ("failed", "served-name")
    assert record.request.prompt_tokens is None


def test_a_request_the_engine_refuses_is_proxied_all_the_same(
        servers: Servers, engine: AttributionEngine, caplog: pytest.LogCaptureFixture) -> None:
    upstream = servers.serve(fake_upstream_app(models=FAST))
    unknown_gpu, stats = start_proxy(servers, engine, upstream, gpus=lambda: (7,))

    def broken_discovery() -> tuple[int, ...]:
        raise RuntimeError("psutil: access denied")

    no_gpus, stats2 = start_proxy(servers, engine, upstream, gpus=broken_discovery)
    for base in (unknown_gpu, no_gpus):
        answer = client(base).chat.completions.create(model="llama", messages=MESSAGES)
        assert answer.choices[0].message.content
    assert (stats.refused, stats2.refused) == (1, 1)
    assert finals(servers, engine) == []
    assert "refused a request" in caplog.text
    assert engine.totals().unknown_gpu_requests == 1


# --- pass-through --------------------------------------------------------------------------


def echo_app() -> web.Application:
    """Answers with what it received; sets headers of every kind on its answer."""
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen = {"method": request.method, "path": request.raw_path,
                "headers": dict(request.headers), "length": len(body),
                "crc": zlib.crc32(body)}
        headers = [("X-Upstream", "echo"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                   ("Connection", "X-Private"), ("X-Private", "hop"), ("Keep-Alive", "5")]
        status = int(request.query.get("status", "200"))
        response = web.Response(status=status, body=json.dumps(seen).encode(),
                                content_type="application/json")
        for name, value in headers:
            response.headers.add(name, value)
        return response

    async def gzipped(request: web.Request) -> web.Response:
        seen = {"accept_encoding": request.headers.get("Accept-Encoding"),
                "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}
        return web.Response(body=gzip.compress(json.dumps(seen).encode()),
                            headers={"Content-Encoding": "gzip",
                                     "Content-Type": "application/json"})

    app = web.Application(client_max_size=2**20)
    app.router.add_post("/gz/v1/chat/completions", gzipped)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def test_other_requests_pass_through_untouched(
        servers: Servers, engine: AttributionEngine) -> None:
    fake = servers.serve(fake_upstream_app(models=FAST, api_key=API_KEY))
    proxied, _ = start_proxy(servers, engine, fake)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for method, path, headers in [("GET", "/v1/models", auth), ("GET", "/health", {}),
                                  ("GET", "/v1/models", {}), ("GET", "/nowhere?x=1", {}),
                                  ("DELETE", "/v1/models", auth)]:
        status, direct_headers, body = raw(fake, method, path, headers=headers)
        status_p, proxied_headers, body_p = raw(proxied, method, path, headers=headers)
        assert (status_p, body_p) == (status, body), path
        for name in ("Content-Type", "Content-Length", "Server"):
            assert proxied_headers[name] == direct_headers[name], (path, name)
        assert REQUEST_ID_HEADER not in proxied_headers
    assert finals(servers, engine) == []

    echo = servers.serve(echo_app())
    proxied, _ = start_proxy(servers, engine, echo)
    status, headers, body = raw(proxied, "PUT", "/a%2Fb/c?q=%20&status=418", b"x" * 1000,
                                {**auth, "X-Client": "1", "Connection": "keep-alive, X-Drop",
                                 "X-Drop": "hop", "TE": "trailers"})
    seen = json.loads(body)
    assert status == 418
    assert (seen["method"], seen["path"], seen["length"]) == ("PUT", "/a%2Fb/c?q=%20&status=418",
                                                              1000)
    assert seen["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert seen["headers"]["X-Client"] == "1"
    assert {"X-Drop", "TE", "User-Agent", "Accept"}.isdisjoint(seen["headers"])
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers["X-Upstream"] == "echo"
    assert "X-Private" not in headers and "Keep-Alive" not in headers


def test_a_compressed_answer_passes_as_is_and_its_usage_is_read(
        servers: Servers, engine: AttributionEngine) -> None:
    echo = servers.serve(echo_app())
    proxied, _ = start_proxy(servers, engine, echo + "/gz")
    status, headers, body = raw(proxied, "POST", "/v1/chat/completions",
                                {"model": "llama", "messages": MESSAGES},
                                {"Accept-Encoding": "br, gzip;q=0.9, zstd"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    seen = json.loads(gzip.decompress(body))
    assert seen["accept_encoding"] == "gzip;q=0.9"  # only codings the proxy can read
    (record,) = finals(servers, engine)
    assert (record.request.prompt_tokens, record.request.completion_tokens) == (11, 4)


def test_a_body_too_large_to_parse_passes_through_unparsed(
        servers: Servers, engine: AttributionEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_openai, "MAX_PARSE_BYTES", 1024)
    echo = servers.serve(echo_app())
    proxied, _ = start_proxy(servers, engine, echo)
    body = json.dumps({"model": "llama", "prompt": "x" * 5000, "stream": True}).encode()
    status, _, answer = raw(proxied, "POST", "/v1/completions", body)
    seen = json.loads(answer)
    assert (status, seen["length"], seen["crc"]) == (200, len(body), zlib.crc32(body))
    (record,) = finals(servers, engine)
    assert (record.request.model, record.request.status) == ("unknown", "ok")


def test_credentials_and_prompts_are_never_logged(
        servers: Servers, engine: AttributionEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = servers.serve(fake_upstream_app(models=FAST, api_key=API_KEY))
    proxied, _ = start_proxy(servers, engine, upstream)
    answer = client(proxied).chat.completions.create(model="llama", messages=MESSAGES)
    list(client(proxied).chat.completions.create(model="llama", messages=MESSAGES, stream=True))
    with pytest.raises(openai.AuthenticationError):
        client(proxied, key="sk-wrong-key").models.list()
    assert [r.request.status for r in finals(servers, engine)] == ["ok", "ok"]
    assert "request body" in caplog.text  # the proxy did log, at debug level
    content = answer.choices[0].message.content
    assert content
    for secret in (API_KEY, "sk-wrong-key", PROMPT, content):
        assert secret not in caplog.text


# --- the fake upstream ---------------------------------------------------------------------


def test_the_fake_upstream_is_deterministic_consistent_and_reports_each_request(
        servers: Servers) -> None:
    events: list[tuple[str, int]] = []
    fake = fake_upstream_app(
        models=FAST, on_start=lambda key, model: events.append((f"start {model}", key)),
        on_first_token=lambda key: events.append(("first token", key)),
        on_end=lambda key: events.append(("end", key)))
    c = client(servers.serve(fake))
    whole = c.chat.completions.create(model="llama", messages=MESSAGES)
    chunks = list(c.chat.completions.create(model="llama", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    *tokens, finish, usage_only = chunks
    assert usage_only.choices == [] and usage_only.usage == whole.usage
    assert "".join(chunk.choices[0].delta.content or "" for chunk in tokens) == (
        whole.choices[0].message.content)
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason == "stop"
    assert {chunk.id for chunk in chunks} == {whole.id}
    assert c.chat.completions.create(model="llama", messages=MESSAGES) == whole
    short = c.completions.create(model="llama", prompt=PROMPT, max_tokens=2)
    assert short.usage is not None and short.usage.completion_tokens == 2
    assert short.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert events == [(kind, key) for key in (1, 2, 3, 4)
                      for kind in ("start llama", "first token", "end")]


def test_the_generation_parameters_of_a_request_body_are_read_and_bad_ones_left_out() -> None:
    from agent.intake.proxy.openai import request_sampling

    assert request_sampling({"max_tokens": 64, "temperature": 0, "top_p": 0.9, "n": 2}) == (
        Sampling(max_tokens=64, temperature=0.0, top_p=0.9, n=2))
    # The newer name wins; values the server would refuse are not recorded.
    assert request_sampling({"max_completion_tokens": 9, "max_tokens": 64,
                             "temperature": "hot", "top_p": 3, "n": 0}) == (
        Sampling(max_tokens=9))
    # Ollama's native API keeps them in its options.
    assert request_sampling({"options": {"num_predict": 32, "temperature": 1.2}}) == (
        Sampling(max_tokens=32, temperature=1.2))
    assert request_sampling({"messages": []}) is None and request_sampling(None) is None
