"""The proxy in front of Ollama's native API, replaying answers that Ollama really sent
(tests/fixtures/streams/, each with its provenance): the client gets them unchanged, and
the request is recorded with Ollama's own counts and durations."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp import web
from scripted import FIXTURES, Servers
from test_proxy import finals, raw, start_proxy

from agent.attribution import AttributionEngine
from agent.intake.proxy import REQUEST_ID_HEADER
from agent.intake.proxy import openai as proxy_openai
from agent.intake.proxy.measurement import Measurement
from agent.intake.proxy.ollama import LineStream

STREAMS = FIXTURES / "streams"


def capture(name: str) -> bytes:
    """A capture's bytes: what follows its `# ` provenance lines and the blank line."""
    text = (STREAMS / name).read_bytes()
    return text.split(b"\n\n", 1)[1] if text.startswith(b"# ") else text


def wireshark_chunks(name: str) -> list[bytes]:
    """The HTTP chunks of a capture of TCP payloads (a hex size line, the chunk's bytes),
    each checked against its size: one NDJSON line and its "\\n" per chunk."""
    chunks = []
    for size, data in re.findall(rb"(?m)^([0-9a-f]+)\n(.*\n)?", capture(name).split(
            b"Transfer-Encoding: chunked\n\n", 1)[1]):
        if int(size, 16) == 0:
            break
        assert len(data) == int(size, 16), data  # the capture is whole
        chunks.append(data)
    return chunks


CAPTURES = {
    # name: (the pieces written, one per write; prompt, completion; seconds of work)
    "0.13.5": (capture("ollama_api_chat_ndjson_0.13.5.txt").splitlines(keepends=True),
               (15, 20), (5650132100 + 33848612 + 279354534) / 1e9),
    "0.3.13": (wireshark_chunks("ollama_api_chat_ndjson_0.3.13_wireshark.txt"),
               (70, 127), (13675700 + 69277000 + 8945400000) / 1e9),
}


def ndjson_upstream(pieces: list[bytes]) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    return app


@pytest.mark.parametrize("version", sorted(CAPTURES))
def test_an_ollama_native_stream_passes_unchanged_and_is_recorded_with_its_counts(
        servers: Servers, engine: AttributionEngine, version: str) -> None:
    pieces, counts, _ = CAPTURES[version]
    proxied, stats = start_proxy(servers, engine, servers.serve(ndjson_upstream(pieces)))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}  # streams
    status, headers, answer = raw(proxied, "POST", "/api/chat", body)
    assert (status, answer) == (200, b"".join(pieces))
    assert headers[REQUEST_ID_HEADER]
    (record,) = finals(servers, engine)
    request = record.request
    assert request.status == "ok" and request.model == "m"
    assert (request.prompt_tokens, request.completion_tokens) == counts
    assert not request.tokens_estimated
    assert request.first_token is not None and request.scheduled is not None
    assert stats.counts_unasked == {}  # the proxy asks Ollama's native API for nothing


@pytest.mark.parametrize("version", sorted(CAPTURES))
@pytest.mark.parametrize("size", [1, 13, 1 << 20])
def test_ollamas_durations_place_the_servers_start(version: str, size: int) -> None:
    """The server worked `spent` s (load + prompt evaluation + generation) before the end:
    it began then, not when the request arrived, however the answer is cut."""
    pieces, counts, spent = CAPTURES[version]
    whole = b"".join(pieces)
    measurement = Measurement("r", 0.0)
    lines = LineStream(measurement, lambda: 55.0)
    sent = b"".join(lines.feed(whole[i:i + size]) for i in range(0, len(whole), size))
    assert sent + lines.finish() == whole
    assert measurement.counts() == (*counts, False) and measurement.done
    assert measurement.first_token == 55.0
    assert measurement.scheduled(60.0) == pytest.approx(60.0 - spent)
    assert measurement.scheduled(1.0) == 0.0  # never before the request arrived


def test_an_error_line_after_the_answer_began_fails_the_request() -> None:
    """Ollama's failure once a native stream has begun: one more line, `{"error": ...}`
    (server/routes.go, streamResponse), in the 200 answer."""
    pieces, _, _ = CAPTURES["0.13.5"]
    measurement = Measurement("r", 0.0)
    lines = LineStream(measurement, lambda: 1.0)
    for piece in [*pieces[:2], json.dumps({"error": "model runner crashed"}).encode() + b"\n"]:
        lines.feed(piece)
    lines.finish()
    assert measurement.error and not measurement.done
    assert measurement.counts() == (None, 2, True)  # the two lines of thinking, counted


def test_a_line_past_the_limit_leaves_the_rest_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_openai, "MAX_EVENT_BYTES", 64)
    measurement = Measurement("r", 0.0)
    lines = LineStream(measurement, lambda: 1.0)
    final = CAPTURES["0.13.5"][0][-1]
    assert lines.feed(b'{"response":"' + b"x" * 100) == b'{"response":"' + b"x" * 100
    assert lines.feed(b'"}\n' + final) == b'"}\n' + final
    lines.finish()
    assert measurement.counts() == (None, None, False) and not measurement.done


def test_the_captures_are_what_their_provenance_says() -> None:
    for pieces, _, _ in CAPTURES.values():
        documents = [json.loads(piece) for piece in pieces]
        assert documents[-1]["done"] is True
        assert all(d["done"] is False for d in documents[:-1])
