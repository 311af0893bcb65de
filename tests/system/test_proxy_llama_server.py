"""The proxy in front of a real llama.cpp `llama-server` (issue 14): with the official
`openai` client, a client gets through the proxy the bytes it gets directly, and the agent
records the server's own counts and timings.

Both answers come from the same deterministic run (temperature 0, a fixed seed, no prompt
cache, so that the second run is not told its prompt was cached); what differs between two
runs of the server, whoever asks, is masked: the completion id, the creation time, and the
durations in `timings`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scripted import (
    Servers,
    free_port,
    http_get,
    require_module,
    start_agent,
    stop_process,
    wait_for,
    wait_until,
)

from agent.attribution import AttributionEngine
from agent.config import ProxyTable
from agent.intake.proxy import PROXY_STATS, REQUEST_ID_HEADER, RUNNER_OPTIONS, proxy_app
from agent.intake.proxy.openai import EventStream, Measurement
from agent.timeline import EnergyPoint, Timeline

MESSAGES = [{"role": "user", "content": "what does a query cost?"}]
SAME_RUN = {"temperature": 0, "seed": 1, "extra_body": {"cache_prompt": False}}
_VOLATILE = re.compile(
    rb'("id":"(?:chatcmpl|cmpl)-)[A-Za-z0-9]+"|("created":)\d+'
    rb'|("(?:prompt|predicted)_(?:ms|per_token_ms|per_second)":)[-+.0-9eE]+')


def masked(body: bytes) -> bytes:
    """`body` with what differs from one run of the server to the next replaced by `*`."""
    return _VOLATILE.sub(lambda m: (m[1] or m[2] or m[3]) + b"*", body)


@dataclass(frozen=True)
class Agent:
    proxy: str
    api: str


@pytest.fixture(scope="module")
def agent(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """`jouleprobe run` on a simulated GPU with a proxy in front of the llama-server."""
    folder = tmp_path_factory.mktemp("agent")
    proxy = f"127.0.0.1:{free_port()}"
    config = folder / "jouleprobe.toml"
    config.write_text(
        f'[records]\npath = "{folder / "records.db"}"\n[ingest]\nlisten = "127.0.0.1:0"\n'
        "[attribution]\nsettle = 0.2\n"
        f'[[proxy]]\nname = "llama"\nlisten = "{proxy}"\nupstream = "{llama_server}"\n'
        "gpus = [0]\n")
    address = f"127.0.0.1:{free_port()}"
    log = folder / "agent.log"
    process = start_agent(["--config", str(config), "--simulate", "1xH100", "--listen",
                           address], log)
    try:
        wait_for("the proxy", lambda: http_get(f"http://{proxy}/health")[0] == 200, process,
                 log, timeout_s=30)
        yield Agent(f"http://{proxy}", f"http://{address}")
    finally:
        stop_process(process)


def client(base: str) -> Any:
    openai = require_module("openai")
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)


def answer(base: str, endpoint: str, stream: bool, **options: Any) -> tuple[bytes, str | None]:
    """The raw body of one answer through the `openai` client, and the proxy's request id."""
    api = client(base)
    create = (api.chat.completions if endpoint == "chat" else api.completions)
    arguments: dict[str, Any] = {"model": "tiny", "max_tokens": 6, **SAME_RUN, **options}
    if endpoint == "chat":
        arguments["messages"] = MESSAGES
    else:
        arguments["prompt"] = MESSAGES[0]["content"]
    if stream:
        with create.with_streaming_response.create(stream=True, **arguments) as response:
            return b"".join(response.iter_bytes()), response.headers.get(REQUEST_ID_HEADER)
    response = create.with_raw_response.create(**arguments)
    return response.http_response.read(), response.headers.get(REQUEST_ID_HEADER)


def record(agent: Agent, request_id: str) -> dict[str, Any]:
    url = f"{agent.api}/api/v1/requests/{request_id}"
    wait_until(lambda: http_get(url)[0] == 200, "the record", timeout_s=30)
    return dict(json.loads(http_get(url)[1]))


def server_counts(body: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The `usage` (or else counts from `timings`) and the `timings` the server sent."""
    documents = ([json.loads(body)] if not body.startswith(b"data: ") else [
        json.loads(event[6:]) for event in body.split(b"\n\n")
        if event.startswith(b"data: {")])
    usage = next((d["usage"] for d in reversed(documents) if d.get("usage")), None)
    timings = next((d["timings"] for d in reversed(documents) if "timings" in d), None)
    if usage is None and timings is not None:
        usage = {"prompt_tokens": timings["prompt_n"] + timings["cache_n"],
                 "completion_tokens": timings["predicted_n"]}
    assert usage is not None, body
    return usage, timings


CASES = {
    "chat": ("chat", False, {}),
    "chat streamed": ("chat", True, {}),
    "chat streamed, usage asked": ("chat", True, {"stream_options": {"include_usage": True}}),
    "completions": ("completions", False, {}),
    "completions streamed": ("completions", True, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_client_gets_through_the_proxy_what_the_server_sends_and_its_counts_are_recorded(
        llama_server: str, agent: Agent, case: str) -> None:
    endpoint, stream, options = CASES[case]
    direct, _ = answer(llama_server, endpoint, stream, **options)
    proxied, request_id = answer(agent.proxy, endpoint, stream, **options)
    assert masked(proxied) == masked(direct)
    assert request_id

    usage, timings = server_counts(direct)
    stored = record(agent, request_id)
    assert stored["status"] == "ok" and stored["model"] == "tiny"
    assert (stored["prompt_tokens"], stored["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert stored["tokens_estimated"] is False
    # Where the answer gave the server's durations, the record starts when the server did.
    assert (stored["scheduled"] is not None) == (timings is not None)
    if stored["scheduled"] is not None:
        assert stored["start"] <= stored["scheduled"] <= stored["end"]


def test_a_client_that_goes_mid_stream_is_recorded_cancelled(agent: Agent) -> None:
    api = client(agent.proxy)
    with api.chat.completions.with_streaming_response.create(
            model="tiny", messages=MESSAGES, max_tokens=900, stream=True, **SAME_RUN
    ) as response:
        request_id = response.headers[REQUEST_ID_HEADER]
        next(response.iter_bytes())
    stored = record(agent, request_id)
    assert stored["status"] == "cancelled"


def test_the_proxy_learns_that_llama_cpp_reports_its_counts_unasked(agent: Agent) -> None:
    """llama.cpp puts `timings` (chat) or `usage` (completions) on an unasked stream's last
    chunk: the proxy never needs to ask it for usage, and says so."""
    for endpoint in ("chat", "completions"):
        answer(agent.proxy, endpoint, True)
    metrics = http_get(f"{agent.api}/metrics")[1].decode()
    for endpoint in ("/chat/completions", "/completions"):
        assert (f'jouleprobe_proxy_asks_for_usage{{endpoint="{endpoint}",proxy="llama"}} 0.0'
                in metrics), metrics


# --- where the proxy asks for usage itself -----------------------------------------------


def test_asked_usage_is_taken_out_to_leave_the_servers_unasked_stream(
        llama_server: str) -> None:
    """An upstream whose streams carry no counts unasked makes the proxy ask. Here it is
    made to ask llama.cpp's chat endpoint (as if it had learnt that its streams carry none,
    as builds without `timings` do), which then moves `timings` from the finish chunk onto
    the usage chunk: the client must still get the stream it gets unasked, byte for byte."""
    engine_line = Timeline(max_points=1_000)
    now = time.monotonic()
    for i in range(600):
        engine_line.append(EnergyPoint(now - 10 + i, 100.0 * i))
    engine = AttributionEngine({0: engine_line}, settle_s=0.0, max_age_s=1e6)
    servers = Servers()
    try:
        app = proxy_app(ProxyTable(name="asks", listen="127.0.0.1:0", upstream=llama_server,
                                   gpus=(0,)), engine, lambda: (0,))
        stats = app[PROXY_STATS]
        stats.counts_unasked["/chat/completions"] = False
        proxied = servers.serve(app, **RUNNER_OPTIONS)
        for _ in range(2):
            direct, _ = answer(llama_server, "chat", True)
            through, _ = answer(proxied, "chat", True)
            assert masked(through) == masked(direct)
        wait_until(lambda: stats.running == 0, "the proxy to end its requests")
        records = {e.request.id: e.request for e in engine.advance(now + 590)}
        assert len(records) == 2
        assert all(r.prompt_tokens and r.completion_tokens == 6 and not r.tokens_estimated
                   and r.scheduled is not None for r in records.values())
    finally:
        servers.close()


def test_the_finish_chunk_gets_back_the_timings_that_asking_moved(llama_server: str) -> None:
    """The same, one level down: the real asked stream through `EventStream`, in the
    pieces of every size the network might cut it into."""
    unasked, _ = answer(llama_server, "chat", True)
    asked, _ = answer(llama_server, "chat", True, stream_options={"include_usage": True})
    assert masked(asked) != masked(unasked)
    for size in (1, 7, 64, len(asked)):
        measurement = Measurement("x", 0.0)
        events = EventStream(True, measurement, lambda: 1.0)
        sent = b"".join(events.feed(asked[i:i + size]) for i in range(0, len(asked), size))
        assert masked(sent + events.finish()) == masked(unasked), size
        prompt, completion, estimated = measurement.counts()
        assert completion == 6 and prompt and not estimated
