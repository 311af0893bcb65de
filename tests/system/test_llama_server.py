"""A real llama.cpp `llama-server` (tests/llama_server.py) running a tiny random-weight model:
what it sends at the end of a stream, the facts the proxy has to keep (issue 14)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import llama_server
import pytest
from scripted import require_module


@pytest.fixture
def server(llama_server: str) -> str:
    return llama_server


def _chat(base: str, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return bytes(answer.read())


def _stream(base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = _chat(base, {**body, "stream": True}).decode().split("\n\n")
    data = [event.removeprefix("data: ") for event in events if event.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(chunk) for chunk in data[:-1]]


BODY = {"messages": [{"role": "user", "content": "what does a query cost?"}],
        "max_tokens": 6, "temperature": 0, "seed": 1}


def test_an_unasked_stream_ends_with_timings_on_its_finish_chunk(server: str) -> None:
    chunks = _stream(server, BODY)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last
    assert last["timings"]["predicted_n"] == 6
    assert all("timings" not in chunk for chunk in chunks[:-1])


def test_include_usage_moves_the_timings_onto_the_usage_chunk(server: str) -> None:
    """What the proxy must undo when it asks for usage on a client's behalf: the server then
    puts `timings` on the added usage chunk, not on the finish chunk the client would get."""
    chunks = _stream(server, {**BODY, "stream_options": {"include_usage": True}})
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "length" and "timings" not in finish
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == usage["timings"]["predicted_n"] == 6
    assert list(usage)[-2:] == ["usage", "timings"]


def test_usage_counts_equal_the_servers_timings(server: str) -> None:
    document = json.loads(_chat(server, BODY))
    usage, timings = document["usage"], document["timings"]
    assert usage["completion_tokens"] == timings["predicted_n"] == 6
    assert usage["prompt_tokens"] == timings["prompt_n"] + timings["cache_n"]


def test_the_model_file_is_deterministic(tmp_path: Path) -> None:
    require_module("gguf")
    first = llama_server.write_model(tmp_path / "a.gguf").read_bytes()
    assert first == llama_server.write_model(tmp_path / "b.gguf").read_bytes()
