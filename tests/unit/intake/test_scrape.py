"""Scrapers of inference servers' /metrics: parsing each server's real exposition, counter
deltas and resets, the window energy split against hand-computed values, and the
`WindowScraper` against a real HTTP server on loopback. Times are scripted: the scraper's
clock and the timelines' points are set by each test."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from scripted import FIXTURES, free_port, require_binary

from agent.config import SCRAPE_KINDS
from agent.intake.scrapers import (
    KINDS,
    CounterDeltas,
    GpuWindowEnergy,
    Usage,
    WindowFigures,
    WindowScraper,
    gpu_window_energy,
    read_counts,
    split_window,
)
from agent.intake.scrapers.kinds import NotServerMetrics, SeriesKey
from agent.timeline import EnergyPoint, Timeline
from exporters.window_metrics import WindowMetrics

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def per_model(counts: dict[SeriesKey, float]) -> dict[tuple[str, str], float]:
    totals: dict[tuple[str, str], float] = {}
    for (quantity, model, _), value in counts.items():
        totals[(model, quantity)] = totals.get((model, quantity), 0.0) + value
    return totals


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [
    ("vllm", {(LLAMA, "requests"): 100, (LLAMA, "prompt_tokens"): 10_000,
              (LLAMA, "completion_tokens"): 50_000}),
    ("sglang", {(LLAMA, "requests"): 83_521, (LLAMA, "prompt_tokens"): 8_128_902,
                (LLAMA, "completion_tokens"): 7_557_572}),
    ("tgi", {("served", "requests"): 120, ("served", "prompt_tokens"): 31_500,
             ("served", "completion_tokens"): 42_000}),
    ("triton", {("ensemble", "requests"): 200, ("tensorrt_llm", "requests"): 200,
                ("resnet50", "requests"): 1000, ("tensorrt_llm", "prompt_tokens"): 60_000,
                ("tensorrt_llm", "completion_tokens"): 40_000}),
    ("llamacpp", {("served", "prompt_tokens"): 5120, ("served", "completion_tokens"): 20_480}),
])
def test_each_servers_fixture_parses(kind: str, expected: dict[tuple[str, str], float]) -> None:
    assert per_model(read_counts(KINDS[kind], fixture(f"{kind}_1.txt"), "served")) == expected


def test_a_family_of_another_declared_type_is_not_read() -> None:
    text = fixture("vllm_1.txt").replace(
        "# TYPE vllm:prompt_tokens_total counter", "# TYPE vllm:prompt_tokens_total gauge")
    quantities = {quantity for quantity, _, _ in read_counts(KINDS["vllm"], text, "m")}
    assert quantities == {"requests", "completion_tokens"}


def test_another_servers_metrics_are_refused() -> None:
    with pytest.raises(NotServerMetrics, match="--enable-metrics"):
        read_counts(KINDS["sglang"], fixture("vllm_1.txt"), "m")


# --- deltas --------------------------------------------------------------------------------


def test_deltas_baseline_increase_and_reset() -> None:
    kind = KINDS["vllm"]
    deltas = CounterDeltas()
    assert deltas.update(read_counts(kind, fixture("vllm_1.txt"), "m")) is None  # baseline
    window = deltas.update(read_counts(kind, fixture("vllm_2.txt"), "m"))
    assert window == {LLAMA: Usage(requests=20, prompt_tokens=2000, completion_tokens=8000)}
    # The server restarted and is lower than before: its new values are the increase.
    restarted = deltas.update(read_counts(kind, fixture("vllm_1.txt"), "m"))
    assert restarted == {LLAMA: Usage(requests=100, prompt_tokens=10_000,
                                      completion_tokens=50_000)}


def test_deltas_are_per_series() -> None:
    """One series going away is not a reset of its model; a new one counts from 0."""
    deltas = CounterDeltas()
    stop = ("requests", "m", (("reason", "stop"),))
    length = ("requests", "m", (("reason", "length"),))
    deltas.update({stop: 10.0, length: 5.0})
    assert deltas.update({stop: 12.0}) == {"m": Usage(requests=2.0)}
    assert deltas.update({stop: 12.0, length: 3.0}) == {"m": Usage(requests=3.0)}


# --- window energy -------------------------------------------------------------------------


def timeline(points: list[tuple[float, float, bool]]) -> Timeline:
    line = Timeline(max_points=1000)
    for time, energy, gap in points:
        line.append(EnergyPoint(time, energy, gap=gap))
    return line


def steady(watts: float, start: float, end: int) -> Timeline:
    return timeline([(float(t), watts * (t - start), False) for t in range(int(start), end + 1)])


def test_window_energy_interpolates_at_the_edges_and_skips_gaps() -> None:
    points = timeline([(0, 0, False), (1, 100, False), (2, 300, False), (3, 300, True),
                       (4, 400, False)]).after(float("-inf"))
    # [0.5, 1]: half of 100 J; [1, 2]: 200 J; [2, 3] is a gap; [3, 3.5]: half of 100 J.
    energy = gpu_window_energy(points, 0.5, 3.5, idle_w=60.0)
    assert energy.measured_s == pytest.approx(2.0)
    assert energy.total_j == pytest.approx(300.0)
    # Static per interval: min(ΔE, 60 W × Δt) = 30 + 60 + 30.
    assert energy.static_j == pytest.approx(120.0)
    assert gpu_window_energy(points, 0.5, 3.5, idle_w=None).static_j == 0.0


def test_split_by_weighted_tokens() -> None:
    energy = {0: GpuWindowEnergy(static_j=100.0, dynamic_j=500.0, measured_s=10.0),
              1: GpuWindowEnergy(static_j=100.0, dynamic_j=300.0, measured_s=10.0)}
    usage = {"a": Usage(requests=4, prompt_tokens=100, completion_tokens=300),
             "b": Usage(requests=1, prompt_tokens=500, completion_tokens=100)}
    # Weights with prefill weight 0.5: a = 50 + 300 = 350, b = 250 + 100 = 350.
    figures = split_window(usage, energy, 10.0, 20.0, prefill_weight=0.5)
    a, b = figures.models["a"], figures.models["b"]
    assert figures.weighting == "tokens" and figures.gpus == (0, 1)
    assert (a.gpu_dynamic_j, a.gpu_static_j) == pytest.approx((400.0, 100.0))
    assert (b.gpu_dynamic_j, b.gpu_static_j) == pytest.approx((400.0, 100.0))
    assert figures.measured_j == pytest.approx(1000.0) and figures.unattributed_j == 0.0
    # Weight 1 (the default): a = 400, b = 600 tokens.
    plain = split_window(usage, energy, 10.0, 20.0)
    assert plain.models["a"].gpu_j == pytest.approx(400.0)


def test_split_by_requests_without_tokens_and_idle_windows() -> None:
    energy = {0: GpuWindowEnergy(static_j=30.0, dynamic_j=90.0, measured_s=1.0)}
    figures = split_window({"x": Usage(requests=1), "y": Usage(requests=2)}, energy, 0, 1)
    assert figures.weighting == "requests"
    assert figures.models["y"].gpu_j == pytest.approx(80.0)
    idle = split_window({"x": Usage(requests=0, prompt_tokens=0)}, energy, 0, 1)
    assert idle.weighting == "none" and idle.unattributed_j == pytest.approx(120.0)
    assert idle.models["x"].gpu_j == 0.0


# --- the scraper over HTTP -----------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def serving(bodies: list[str], models: dict[str, object] | None,
                  test: Callable[[str], Awaitable[None]]) -> None:
    """Serve `bodies` in turn on /metrics (and `models` on /v1/models) while `test` runs."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text=bodies.pop(0) if len(bodies) > 1 else bodies[0])

    async def listing(_request: web.Request) -> web.Response:
        return web.json_response(models) if models is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", listing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        await test(f"http://{host}:{port}/metrics")
    finally:
        await runner.cleanup()


def scraper(url: str, kind: str, clock: Clock, metrics: WindowMetrics,
            gpus: Callable[[], tuple[int, ...]] = lambda: (0,), **kwargs: object) -> WindowScraper:
    return WindowScraper(
        kind, url, gpus=gpus, timelines={0: steady(200.0, 0.0, 30)},
        idle_power_w=lambda gpu: 50.0, metrics=metrics, clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def samples(metrics: WindowMetrics) -> CollectorRegistry:
    """A registry rendering `metrics`, to read with `get_sample_value`."""
    class Collector:
        def collect(self) -> Iterator[Metric]:
            return metrics.families(None)  # type: ignore[arg-type]  # the snapshot is unused

    registry = CollectorRegistry(auto_describe=True)
    registry.register(Collector())  # type: ignore[arg-type]
    return registry


class Sink:
    """A `WindowSink` that keeps what it is given."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, list[WindowFigures]]] = []

    def submit_windows(self, source: str, figures: Sequence[WindowFigures]) -> None:
        self.submitted.append((source, list(figures)))


def test_two_scrapes_of_a_real_server_give_one_window() -> None:
    metrics, clock, sink = WindowMetrics(), Clock(10.0), Sink()

    async def test(url: str) -> None:
        vllm = scraper(url, "vllm", clock, metrics, store=sink)
        assert await vllm.scrape_once() == []  # the baseline
        assert sink.submitted == [], "nothing settled, nothing stored"
        clock.now = 20.0
        (figures,) = await vllm.scrape_once()  # the timeline is already past t = 20
        await vllm.close()
        assert sink.submitted == [("scrape:vllm", [figures])], "once per settling scrape"
        window = figures.models[LLAMA]
        assert (figures.start, figures.end, figures.gpus) == (10.0, 20.0, (0,))
        # 200 W for 10 s on GPU 0, idle baseline 50 W.
        assert (window.gpu_static_j, window.gpu_dynamic_j) == pytest.approx((500.0, 1500.0))

    asyncio.run(serving([fixture("vllm_1.txt"), fixture("vllm_2.txt")], None, test))
    got = samples(metrics)
    labels = {"model": LLAMA, "source": "scrape:vllm"}
    assert got.get_sample_value("jouleprobe_window_requests_total", labels) == 20
    assert got.get_sample_value("jouleprobe_window_energy_joules_total",
                                {"component": "gpu_static", **labels}) == pytest.approx(500.0)
    assert got.get_sample_value("jouleprobe_window_tokens_total",
                                {"kind": "completion", **labels}) == 8000
    assert got.get_sample_value("jouleprobe_scrapes_total", {"source": "scrape:vllm"}) == 2


def test_a_window_waits_until_the_sampler_has_passed_its_end() -> None:
    metrics, clock = WindowMetrics(), Clock(25.0)

    async def test(url: str) -> None:
        vllm = scraper(url, "vllm", clock, metrics, max_settle_s=60.0)
        await vllm.scrape_once()
        clock.now = 35.0  # the timeline ends at t = 30
        assert await vllm.scrape_once() == []
        clock.now = 95.0  # past max_settle_s: settled with what was measured
        (settled,) = await vllm.scrape_once()
        await vllm.close()
        assert (settled.start, settled.end) == (25.0, 35.0)
        assert settled.measured_j == pytest.approx(200.0 * 5)

    asyncio.run(serving([fixture("vllm_1.txt"), fixture("vllm_2.txt")], None, test))


def test_a_server_without_model_label_is_named_by_its_v1_models() -> None:
    metrics, clock = WindowMetrics(), Clock(10.0)
    later = fixture("tgi_1.txt").replace("tgi_request_success 120", "tgi_request_success 125")

    async def test(url: str) -> None:
        tgi = scraper(url, "tgi", clock, metrics)
        await tgi.scrape_once()
        clock.now = 20.0
        (figures,) = await tgi.scrape_once()
        await tgi.close()
        assert figures.models["bigscience/bloom-560m"].usage.requests == 5
        assert figures.weighting == "requests"  # no token moved in this window

    models = {"object": "list", "data": [{"id": "bigscience/bloom-560m", "object": "model"}]}
    asyncio.run(serving([fixture("tgi_1.txt"), later], models, test))


def test_an_unreachable_server_is_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics, clock = WindowMetrics(), Clock(10.0)
    url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there

    async def test() -> None:
        down = scraper(url, "llamacpp", clock, metrics, model="qwen")
        with caplog.at_level(logging.WARNING, logger="agent.intake.scrapers.scraper"):
            assert await down.scrape_once() == []
            assert await down.scrape_once() == []
        await down.close()

    asyncio.run(test())
    got = samples(metrics)
    assert got.get_sample_value("jouleprobe_scrape_errors_total",
                                {"kind": "connect", "source": "scrape:llamacpp"}) == 2
    assert len([r for r in caplog.records if "scrape failed" in r.getMessage()]) == 1


def test_answers_that_are_not_metrics_are_failed_scrapes() -> None:
    metrics, clock = WindowMetrics(), Clock(10.0)

    async def test(url: str) -> None:
        for path in (url, url.replace("/metrics", "/nowhere")):
            wrong = scraper(path, "vllm", clock, metrics)
            assert await wrong.scrape_once() == []
            await wrong.close()

    asyncio.run(serving(["<html><body>Not the metrics</body></html>\n"], None, test))
    got = samples(metrics)
    source = "scrape:vllm"
    errors = "jouleprobe_scrape_errors_total"
    assert got.get_sample_value(errors, {"kind": "parse", "source": source}) == 1
    assert got.get_sample_value(errors, {"kind": "http_status", "source": source}) == 1


def test_windows_with_unknown_gpus_are_dropped_whole() -> None:
    metrics, clock = WindowMetrics(), Clock(10.0)

    def unknown() -> tuple[int, ...]:
        raise ValueError("nothing listens on port 8000")

    async def test(url: str) -> None:
        vllm = scraper(url, "vllm", clock, metrics, gpus=unknown)
        await vllm.scrape_once()
        clock.now = 20.0
        assert await vllm.scrape_once() == []
        await vllm.close()

    asyncio.run(serving([fixture("vllm_1.txt"), fixture("vllm_2.txt")], None, test))
    got = samples(metrics)
    assert got.get_sample_value("jouleprobe_scrape_errors_total",
                                {"kind": "gpus", "source": "scrape:vllm"}) == 1
    assert not any(sample.name == "jouleprobe_window_requests_total"
                   for family in got.collect() for sample in family.samples)


# --- the exposition ------------------------------------------------------------------------


def test_promtool_finds_nothing_to_lint() -> None:
    promtool = require_binary("promtool")
    metrics = WindowMetrics(max_models=1)
    usage = {'model "quoted"\\': Usage(requests=3, prompt_tokens=10, completion_tokens=20),
             "second": Usage(requests=1, prompt_tokens=1, completion_tokens=1)}
    energy = {0: GpuWindowEnergy(10.0, 20.0, 1.0)}
    metrics.observe("scrape:vllm", split_window(usage, energy, 0.0, 1.0))
    metrics.observe("scrape:vllm", split_window({}, energy, 1.0, 2.0))
    metrics.scraped("scrape:vllm")
    metrics.scrape_failed("scrape:vllm", "timeout")

    class Collector:
        def collect(self) -> list[Metric]:
            return list(metrics.families(None))  # type: ignore[arg-type]

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'model="other"' in text  # past the cap of one model
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_config_check_and_the_scrapers_know_the_same_servers() -> None:
    # The config names the kinds (it sits below intake); KINDS says how to read each.
    assert tuple(KINDS) == SCRAPE_KINDS
