"""The window scraper against a real llama.cpp `llama-server` (tests/llama_server.py) started
with `--metrics`, running a tiny random-weight model: a window's token counts are the
increases of the server's own counters and the sum of its requests' `usage` (issue 14), and
its router mode is scraped per `?model=`."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import llama_server
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted import require_module, start_llama_server, stop_process

from agent.app.doctor import report
from agent.config import AgentSection, Config, ScrapeTable
from agent.intake.scrapers import WindowFigures, WindowScraper
from agent.timeline import Timeline
from exporters.window_metrics import WindowMetrics


@pytest.fixture
def server(llama_server: str) -> str:
    return llama_server


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return str(answer.read().decode())


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        document: dict[str, Any] = json.loads(answer.read())
    return document


def _counter(text: str, name: str) -> float:
    """The value of a llama.cpp counter, read with prometheus_client's parser alone."""
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    (sample,) = family.samples
    return float(sample.value)


def _scraper(url: str) -> WindowScraper:
    """A scraper whose windows settle at once (an empty timeline: no energy, only counts)."""
    return WindowScraper("llamacpp", url, gpus=lambda: (0,), timelines={0: Timeline(max_points=10)},
                         idle_power_w=lambda gpu: None, metrics=WindowMetrics(),
                         max_settle_s=0.0)


def _requests(base: str, n: int, tag: str, **extra: Any) -> list[dict[str, Any]]:
    """`n` chat requests of distinct prompts (the prompt counter leaves out cached tokens,
    and the prompt cache is off for them too), each with its own `max_tokens`."""
    return [_post(f"{base}/v1/chat/completions", {
        "messages": [{"role": "user", "content": f"{tag} query {i}: what does energy cost?"}],
        "max_tokens": 3 + i, "temperature": 0, "cache_prompt": False, **extra,
    })["usage"] for i in range(n)]


def test_a_window_counts_what_the_server_counted(server: str) -> None:
    async def window() -> tuple[WindowFigures, list[dict[str, Any]], str, str]:
        scraper = _scraper(f"{server}/metrics")
        before = _get(f"{server}/metrics")
        assert await scraper.scrape_once() == []  # the baseline
        usages = await asyncio.to_thread(_requests, server, 4, "window")
        after = _get(f"{server}/metrics")
        (figures,) = await scraper.scrape_once()
        await scraper.close()
        return figures, usages, before, after

    figures, usages, before, after = asyncio.run(window())
    served = json.loads(_get(f"{server}/v1/models"))["data"][0]["id"]
    (model,) = figures.models
    assert model == served
    usage = figures.models[model].usage
    prompt = _counter(after, "llamacpp:prompt_tokens") - _counter(before, "llamacpp:prompt_tokens")
    predicted = (_counter(after, "llamacpp:tokens_predicted")
                 - _counter(before, "llamacpp:tokens_predicted"))
    assert usage.prompt_tokens == prompt == sum(u["prompt_tokens"] for u in usages) > 0
    assert usage.completion_tokens == predicted == sum(u["completion_tokens"] for u in usages)
    assert predicted > 0 and usage.requests is None  # llama.cpp counts no requests
    assert figures.weighting == "tokens"


def test_the_doctor_names_the_families_read(server: str) -> None:
    config = Config(agent=AgentSection(simulate="1xH100"),
                    scrape=(ScrapeTable("llamacpp", f"{server}/metrics", (0,)),))
    text, _ = report(config)
    assert f"  scrape llamacpp ({server}/metrics) reads:\n" \
           "    requests: not exported by llamacpp\n" \
           "    prompt_tokens: llamacpp:prompt_tokens_total\n" \
           "    completion_tokens: llamacpp:tokens_predicted_total" in text


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A llama-server in router mode (no `-m`) over a folder of two models: its base URL and
    the id of the one it lists last (not the one a scraper would take from /v1/models)."""
    require_module("gguf")
    folder = tmp_path_factory.mktemp("router")
    models = folder / "models"
    models.mkdir()
    for seed, name in enumerate(("tiny-a", "tiny-b")):
        llama_server.write_model(models / f"{name}.gguf", seed=seed)
    process, base = start_llama_server(folder, "--models-dir", str(models))
    try:
        listing = json.loads(_get(f"{base}/v1/models"))
        assert len(listing["data"]) == 2
        yield base, str(listing["data"][-1]["id"])
    finally:
        stop_process(process)


def test_a_router_without_model_is_a_failed_scrape_saying_why(
    router: tuple[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    base, _ = router

    async def scrape() -> list[WindowFigures]:
        scraper = _scraper(f"{base}/metrics")
        try:
            return await scraper.scrape_once()
        finally:
            await scraper.close()

    with caplog.at_level(logging.WARNING, logger="agent.intake.scrapers.scraper"):
        assert asyncio.run(scrape()) == []
    (failure,) = [r.getMessage() for r in caplog.records if "scrape failed" in r.getMessage()]
    assert "(http_status)" in failure and "model name is missing from the request" in failure
    assert "?model=ID" in failure
    config = Config(agent=AgentSection(simulate="1xH100"),
                    scrape=(ScrapeTable("llamacpp", f"{base}/metrics", (0,)),))
    assert "cannot read its metrics: HTTP 400: " in report(config)[0]
    assert "model name is missing from the request" in report(config)[0]


def test_a_router_is_scraped_per_model(router: tuple[str, str]) -> None:
    base, model = router
    url = f"{base}/metrics?model={model}"

    async def window() -> tuple[WindowFigures, list[dict[str, Any]], str, str]:
        scraper = _scraper(url)
        before = _get(url)  # loads the model (autoload), so the baseline is its counters
        assert await scraper.scrape_once() == []
        usages = await asyncio.to_thread(_requests, base, 2, "router", model=model)
        after = _get(url)
        (figures,) = await scraper.scrape_once()
        await scraper.close()
        return figures, usages, before, after

    figures, usages, before, after = asyncio.run(window())
    assert list(figures.models) == [model]
    usage = figures.models[model].usage
    predicted = (_counter(after, "llamacpp:tokens_predicted")
                 - _counter(before, "llamacpp:tokens_predicted"))
    assert usage.completion_tokens == predicted == sum(u["completion_tokens"] for u in usages)
    assert predicted > 0
