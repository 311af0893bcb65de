"""The simulated upstream's /metrics: vLLM's exposition, imitated, and counted as vLLM counts.

Each test checks the scraped counters against what the responses themselves reported
(their `usage` and `finish_reason`), and reads the same text with the agent's own vLLM
parser (`agent.intake.scrapers.kinds.read_counts`), as the `vllm` scraper of the demo does.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from agent.intake.scrapers.kinds import KINDS, describe, read_counts
from agent.sim.upstream import count_tokens, fake_upstream_app

API_KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
VLLM = KINDS["vllm"]
SLOW = 20.0
"""Tokens per second of the slow model: 50 ms between tokens, time to cut a request."""


class _NoCancelServer(TestServer):
    """A TestServer without handler cancellation (TestServer always turns it on): the
    server learns that a client left only when its next write fails."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


@asynccontextmanager
async def client_of(app: web.Application, *, cancel: bool = True) -> AsyncIterator[TestClient]:
    server = TestServer(app) if cancel else _NoCancelServer(app)
    async with TestClient(server) as client:
        yield client


def chat(model: str, text: str, **options: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **options}


async def scrape(client: TestClient) -> str:
    response = await client.get("/metrics")  # no API key: vLLM's /metrics needs none
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return await response.text()


def value(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels`."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())


def parsed(text: str) -> dict[tuple[str, str], float]:
    """Per (quantity, model), what the agent's vLLM parser reads from `text`."""
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for (quantity, model, _), count in read_counts(VLLM, text, "unnamed").items():
        totals[(quantity, model)] += count
    return dict(totals)


async def streamed(client: TestClient, path: str, body: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The chunks of a streamed answer, and its usage chunk's usage (if any)."""
    response = await client.post(path, json=body, headers=AUTH)
    assert response.status == 200
    chunks = []
    async for line in response.content:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            chunks.append(json.loads(line[6:]))
    usage = [chunk["usage"] for chunk in chunks if "usage" in chunk]
    return [c for c in chunks if c["choices"]], usage[0] if usage else None


def test_the_counters_equal_what_the_responses_reported() -> None:
    """Streamed and not, chat and completions, one cut by max_tokens, on two models."""
    async def go() -> tuple[str, dict[str, dict[str, float]]]:
        expected: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

        def add(model: str, usage: dict[str, Any], reason: str) -> None:
            expected[model]["prompt"] += usage["prompt_tokens"]
            expected[model]["generation"] += usage["completion_tokens"]
            expected[model][reason] += 1

        app = fake_upstream_app(models={"fast": math.inf, "other": math.inf}, api_key=API_KEY)
        async with client_of(app) as client:
            before = await scrape(client)  # every series is listed, at 0, from the start
            for model in ("fast", "other"):
                for reason in ("stop", "length", "abort"):
                    assert value(before, "vllm:request_success_total", model_name=model,
                                 engine="0", finished_reason=reason) == 0
                assert value(before, "vllm:prompt_tokens_total", model_name=model) == 0
            for body in (chat("fast", "How much energy does one token take?"),
                         chat("fast", "And a whole answer?", max_tokens=3),
                         chat("other", "Watts or joules?", max_completion_tokens=50)):
                response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
                document = await response.json()
                add(body["model"], document["usage"], document["choices"][0]["finish_reason"])
            response = await client.post("/v1/completions", headers=AUTH,
                                         json={"model": "other", "prompt": "The board drew"})
            document = await response.json()
            add("other", document["usage"], document["choices"][0]["finish_reason"])
            for body in (chat("fast", "Stream it, please.", stream=True,
                              stream_options={"include_usage": True}),
                         chat("other", "Stream a short one.", stream=True, max_tokens=2,
                              stream_options={"include_usage": True})):
                chunks, usage = await streamed(client, "/v1/chat/completions", body)
                assert usage is not None
                add(body["model"], usage, chunks[-1]["choices"][0]["finish_reason"])
            return await scrape(client), expected

    text, expected = asyncio.run(go())
    assert expected["fast"]["length"] == 1 and expected["other"]["length"] == 1
    for model, counts in expected.items():
        labels = {"model_name": model, "engine": "0"}
        assert value(text, "vllm:prompt_tokens_total", **labels) == counts["prompt"]
        assert value(text, "vllm:generation_tokens_total", **labels) == counts["generation"]
        for reason in ("stop", "length", "abort"):
            assert value(text, "vllm:request_success_total", finished_reason=reason,
                         **labels) == counts[reason]
        assert value(text, "vllm:num_requests_running", **labels) == 0
        assert value(text, "vllm:num_requests_waiting", **labels) == 0
    assert parsed(text) == {
        (quantity, model): counts[key] if key else counts["stop"] + counts["length"]
        for model, counts in expected.items()
        for quantity, key in (("requests", None), ("prompt_tokens", "prompt"),
                              ("completion_tokens", "generation"))
    }
    assert not any("MISSING" in line for line in describe(VLLM, text))


@pytest.mark.parametrize("cancel", [True, False], ids=["handler-cancelled", "write-fails"])
def test_a_stream_cut_off_by_its_client_counts_its_tokens_but_no_success(cancel: bool) -> None:
    """vLLM counts the prompt (prefill done) and the tokens produced before the cut, and
    no request: a cut request never reaches `request_success`, not even as "abort"."""
    body = chat("slow", "Tell me about the energy of a long answer.", stream=True)

    async def whole() -> int:  # the same request, read to its end, on a fresh app
        async with client_of(fake_upstream_app(models={"slow": math.inf})) as client:
            chunks, _ = await streamed(client, "/v1/chat/completions", body)
            return sum(1 for c in chunks if c["choices"][0]["delta"].get("content"))

    async def go() -> tuple[str, int]:
        ended = asyncio.Event()
        app = fake_upstream_app(models={"slow": SLOW}, api_key=API_KEY,
                                on_end=lambda key: ended.set())
        async with client_of(app, cancel=cancel) as client:
            response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
            received = 0
            while received < 2:
                line = await response.content.readline()
                assert line, "the stream ended before the cut"
                if line.startswith(b"data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    received += bool(delta.get("content"))
            response.close()
            await asyncio.wait_for(ended.wait(), 5)
            return await scrape(client), received

    total = asyncio.run(whole())
    text, received = asyncio.run(go())
    labels = {"model_name": "slow", "engine": "0"}
    prompt = 1 + (1 + count_tokens(body["messages"][0]["content"]))  # reply role + message
    assert value(text, "vllm:prompt_tokens_total", **labels) == prompt
    generated = value(text, "vllm:generation_tokens_total", **labels)
    assert received <= generated < total
    assert value(text, "vllm:request_success_total", **labels) == 0  # stop, length, abort
    assert value(text, "vllm:num_requests_running", **labels) == 0
    assert parsed(text) == {("requests", "slow"): 0, ("prompt_tokens", "slow"): prompt,
                            ("completion_tokens", "slow"): generated}


def test_a_scrape_mid_request_sees_the_tokens_produced_so_far_and_the_queue() -> None:
    """Non-streamed answers count their tokens as they are produced, not all at the end;
    with `max_batch=1` the second request waits for the first."""
    async def go() -> tuple[str, str, list[dict[str, Any]]]:
        first = asyncio.Event()
        app = fake_upstream_app(models={"slow": SLOW}, max_batch=1,
                                on_first_token=lambda key: first.set())

        async def ask(text: str) -> dict[str, Any]:
            response = await client.post("/v1/chat/completions",
                                         json=chat("slow", text, max_tokens=8))
            document: dict[str, Any] = await response.json()
            return document

        async with client_of(app) as client:
            answers = [asyncio.create_task(ask(text)) for text in ("one", "two")]
            await asyncio.wait_for(first.wait(), 5)
            await asyncio.sleep(3.5 / SLOW)  # between the 4th and the 5th token
            during = await scrape(client)
            documents = list(await asyncio.gather(*answers))
            return during, await scrape(client), documents

    during, after, documents = asyncio.run(go())
    labels = {"model_name": "slow", "engine": "0"}
    first_usage = documents[0]["usage"]
    assert value(during, "vllm:num_requests_running", **labels) == 1
    assert value(during, "vllm:num_requests_waiting", **labels) == 1
    assert value(during, "vllm:prompt_tokens_total", **labels) == first_usage["prompt_tokens"]
    assert 2 <= value(during, "vllm:generation_tokens_total", **labels) <= 6
    assert value(during, "vllm:request_success_total", **labels) == 0
    for name, key in (("vllm:prompt_tokens_total", "prompt_tokens"),
                      ("vllm:generation_tokens_total", "completion_tokens")):
        assert value(after, name, **labels) == sum(d["usage"][key] for d in documents)
    for reason in ("stop", "length"):
        assert value(after, "vllm:request_success_total", finished_reason=reason, **labels
                     ) == sum(d["choices"][0]["finish_reason"] == reason for d in documents)
    assert value(after, "vllm:num_requests_running", **labels) == 0
    assert value(after, "vllm:num_requests_waiting", **labels) == 0


def test_a_non_streamed_request_cut_off_counts_the_tokens_produced_but_no_success() -> None:
    async def go() -> str:
        ended = asyncio.Event()
        app = fake_upstream_app(models={"slow": SLOW}, on_end=lambda key: ended.set())
        async with client_of(app) as client:  # the handler is cancelled when the client goes
            with pytest.raises(TimeoutError):
                await client.post("/v1/chat/completions", json=chat("slow", "A long one."),
                                  timeout=aiohttp.ClientTimeout(total=3.5 / SLOW))
            await asyncio.wait_for(ended.wait(), 5)
            return await scrape(client)

    text = asyncio.run(go())
    labels = {"model_name": "slow", "engine": "0"}
    assert value(text, "vllm:prompt_tokens_total", **labels) == 1 + 1 + count_tokens(
        "A long one.")
    assert 1 <= value(text, "vllm:generation_tokens_total", **labels) < 8  # of >= 8
    assert value(text, "vllm:request_success_total", **labels) == 0


def test_embeddings_count_as_pooling_requests_and_failures_count_nothing() -> None:
    async def go() -> tuple[str, int]:
        app = fake_upstream_app(models={"fast": math.inf}, api_key=API_KEY)
        async with client_of(app) as client:
            response = await client.post("/v1/embeddings", headers=AUTH, json={
                "model": "fast", "input": ["one joule", "two watts"]})
            prompt: int = (await response.json())["usage"]["prompt_tokens"]
            for path, body, headers in (
                    ("/v1/chat/completions", chat("missing", "hi"), AUTH),  # no such model
                    ("/v1/chat/completions", chat("fast", "hi", max_tokens=0), AUTH),
                    ("/v1/chat/completions", chat("fast", "hi"), {}),  # no API key
                    ("/v1/embeddings", {"model": "fast"}, AUTH)):  # no input
                response = await client.post(path, json=body, headers=headers)
                assert response.status >= 400
            return await scrape(client), prompt

    text, prompt = asyncio.run(go())
    labels = {"model_name": "fast", "engine": "0"}
    assert value(text, "vllm:prompt_tokens_total", **labels) == prompt == 4
    assert value(text, "vllm:generation_tokens_total", **labels) == 0
    assert value(text, "vllm:request_success_total", finished_reason="stop", **labels) == 1
    assert value(text, "vllm:request_success_total", **labels) == 1
    assert parsed(text) == {("requests", "fast"): 1, ("prompt_tokens", "fast"): prompt,
                            ("completion_tokens", "fast"): 0}


def test_each_app_counts_on_its_own() -> None:
    """A registry per app, not prometheus_client's global one."""
    async def go(requests: int) -> str:
        async with client_of(fake_upstream_app(models={"fast": math.inf})) as client:
            for _ in range(requests):
                await client.post("/v1/completions", json={"model": "fast", "prompt": "x"})
            return await scrape(client)

    texts = asyncio.run(go(2)), asyncio.run(go(1))
    assert [value(text, "vllm:request_success_total") for text in texts] == [2, 1]
