"""Scrapers of inference servers' /metrics: parsing each server's real exposition, counter
deltas and resets, the window energy split against hand-computed values, and the
`WindowScraper` against a real HTTP server on loopback. Times are scripted: the scraper's
clock and the timelines' points are set by each test."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from scripted import FIXTURES, FakeClock, free_port, require_binary

from agent.config import SCRAPE_KINDS
from agent.intake.scrapers import (
    KINDS,
    CounterDeltas,
    CounterWindow,
    GpuWindowEnergy,
    Usage,
    WindowFigures,
    WindowScraper,
    gpu_window_energy,
    read_counts,
    split_window,
)
from agent.intake.scrapers.kinds import NotServerMetrics, SeriesKey, describe
from agent.timeline import EnergyPoint, Timeline
from exporters.window_metrics import WindowMetrics


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def per_model(counts: dict[SeriesKey, float]) -> dict[tuple[str, str], float]:
    totals: dict[tuple[str, str], float] = {}
    for (quantity, model, _), value in counts.items():
        totals[(model, quantity)] = totals.get((model, quantity), 0.0) + value
    return totals


# --- parsing -------------------------------------------------------------------------------
# Every server file read here is under fixtures/metrics/ and says where it is from: the
# llama.cpp and TGI ones are servers' output, the Triton ones pasted by users or a backend's
# README, the SGLang ones its own metrics code. No verbatim vLLM /metrics capture with whole
# families was found (see tests/fixtures/metrics/README.md), so the vllm kind is read here
# only through Triton's vLLM backend, which exports vLLM's own counters.

IDLE, BUSY = "metrics/llamacpp_b11434_idle.txt", "metrics/llamacpp_b11434_busy.txt"
"""A real llama-server (b11434, tests/llama_server.py) before and after a few requests."""


def line_value(text: str, series: str) -> float:
    """The value on the exposition line of `series` (name and labels as written)."""
    (value,) = [line.removeprefix(f"{series} ") for line in text.splitlines()
                if line.startswith(f"{series} ")]
    return float(value)


TGI = "metrics/tgi_3.3_datadog.txt"
TRITON_ENSEMBLE = "metrics/triton_trtllm_ensemble_2023-11.txt"


def test_a_tgi_capture_parses() -> None:
    """TGI labels no model; its requests are its success counter, its tokens the sums of its
    input-length and generated-tokens histograms."""
    text = fixture(TGI)
    assert per_model(read_counts(KINDS["tgi"], text, "served")) == {
        ("served", "requests"): line_value(text, "tgi_request_success"),
        ("served", "prompt_tokens"): line_value(text, "tgi_request_input_length_sum"),
        ("served", "completion_tokens"): line_value(text, "tgi_request_generated_tokens_sum"),
    } == {("served", "requests"): 109, ("served", "prompt_tokens"): 662,
          ("served", "completion_tokens"): 3423}
    # Of its 111 requests, the 2 that failed validation count neither as finished requests
    # nor in the input-length histogram, which is observed once a request is valid.
    assert line_value(text, "tgi_request_count") == 111
    assert line_value(text, 'tgi_request_failure{err="validation"}') == 2
    assert line_value(text, "tgi_request_input_length_count") == 109
    assert describe(KINDS["tgi"], text) == [
        "requests: tgi_request_success_total",
        "prompt_tokens: tgi_request_input_length_sum",
        "completion_tokens: tgi_request_generated_tokens_sum",
    ]


def test_each_model_of_a_triton_ensemble_counts_its_own_requests() -> None:
    """A user's paste of a TensorRT-LLM ensemble: each composing model is a model of its own,
    so one client request is a request of the ensemble and of each model it ran. The
    tensorrt_llm model counts 0: the bug the paste reports (fixed in Triton r23.12)."""
    text = fixture(TRITON_ENSEMBLE)
    requests = {model: line_value(text, f'nv_inference_request_success{{model="{model}",'
                                        'version="1"}')
                for model in ("ensemble", "preprocessing", "postprocessing", "tensorrt_llm")}
    assert requests == {"ensemble": 59, "preprocessing": 59, "postprocessing": 59,
                        "tensorrt_llm": 0}
    counts = read_counts(KINDS["triton"], text, "unused")
    assert per_model(counts) == {(model, "requests"): n for model, n in requests.items()}
    # No token family in it: tokens are unknown (None), and doctor says so.
    deltas = CounterDeltas()
    deltas.update(counts, 0.0)
    assert usage(deltas.update(counts, 1.0))["ensemble"].prompt_tokens is None
    assert describe(KINDS["triton"], text)[1].startswith("prompt_tokens: MISSING")


QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
QWEN_LABEL = f'{{model_name="{QWEN}"}}'


@pytest.mark.parametrize(("capture", "requests_series"), [
    ("metrics/sglang_0.4.3.txt", "sglang:num_requests_total"),
    # Before 0.4.2 there is no request counter: finished requests are the latency count.
    ("metrics/sglang_0.4.0.txt", "sglang:e2e_request_latency_seconds_count"),
])
def test_sglang_requests_are_read_from_the_family_its_version_has(
    capture: str, requests_series: str,
) -> None:
    text = fixture(capture)
    assert per_model(read_counts(KINDS["sglang"], text, "unused")) == {
        (QWEN, "requests"): line_value(text, requests_series + QWEN_LABEL),
        (QWEN, "prompt_tokens"): line_value(text, "sglang:prompt_tokens_total" + QWEN_LABEL),
        (QWEN, "completion_tokens"):
            line_value(text, "sglang:generation_tokens_total" + QWEN_LABEL),
    }


def test_sglang_before_its_first_request_counts_nothing_yet() -> None:
    """Its empty answer is a baseline of zeros, so the first requests are in a window."""
    kind = KINDS["sglang"]
    idle, busy = (read_counts(kind, fixture(f"metrics/sglang_0.4.0{name}.txt"), "m")
                  for name in ("_idle", ""))
    assert idle == {}
    assert describe(kind, fixture("metrics/sglang_0.4.0_idle.txt"))[0].startswith("no metric yet")
    deltas = CounterDeltas()
    deltas.update(idle, 0.0)
    assert usage(deltas.update(busy, 15.0)) == {
        QWEN: Usage(**{quantity: value for (quantity, _, _), value in busy.items()})}


def test_a_request_is_not_counted_twice_where_both_families_count_it() -> None:
    text = fixture("metrics/sglang_0.4.3.txt")
    both = [line_value(text, name + QWEN_LABEL) for name in (
        "sglang:num_requests_total", "sglang:e2e_request_latency_seconds_count")]
    assert both[0] == both[1] > 0
    requests = [key for key in read_counts(KINDS["sglang"], text, "m") if key[0] == "requests"]
    assert len(requests) == 1


def test_tritons_vllm_backend_tokens_are_read_with_tritons_labels() -> None:
    text = fixture("metrics/triton_vllm_backend_readme.txt")
    labels = '{model="vllm_model",version="1"}'
    counts = read_counts(KINDS["triton"], text, "unused")
    assert per_model(counts) == {
        ("vllm_model", "prompt_tokens"): line_value(text, "vllm:prompt_tokens_total" + labels),
        ("vllm_model", "completion_tokens"):
            line_value(text, "vllm:generation_tokens_total" + labels),
    }
    # No request family in it: requests are unknown (None), not 0.
    deltas = CounterDeltas()
    deltas.update(counts, 0.0)
    assert usage(deltas.update(counts, 1.0))["vllm_model"].requests is None


def test_a_llama_server_capture_parses() -> None:
    text = fixture(BUSY)
    assert per_model(read_counts(KINDS["llamacpp"], text, "served")) == {
        ("served", "prompt_tokens"): line_value(text, "llamacpp:prompt_tokens_total"),
        ("served", "completion_tokens"): line_value(text, "llamacpp:tokens_predicted_total"),
    }


def test_a_body_sent_as_one_json_string_is_decoded() -> None:
    """llama.cpp builds of late 2025 (ggml-org/llama.cpp#17384) passed the exposition to the
    server's JSON `ok()` response helper, which dumped it as one JSON string: quoted,
    newlines escaped (fixed by #17386 with an `ok()` for std::string). A real capture,
    dumped the same way."""
    text = fixture(BUSY)
    quoted = json.dumps(text, ensure_ascii=False)
    assert quoted.startswith('"# ') and "\n" not in quoted and "\\n" in quoted
    kind = KINDS["llamacpp"]
    assert read_counts(kind, quoted, "m") == read_counts(kind, text, "m")
    with pytest.raises(ValueError):
        read_counts(kind, '"# HELP llamacpp:prompt_tokens_total', "m")  # cut short


def test_a_family_of_another_declared_type_is_not_read() -> None:
    text = fixture(BUSY).replace(
        "# TYPE llamacpp:prompt_tokens_total counter", "# TYPE llamacpp:prompt_tokens_total gauge")
    quantities = {quantity for quantity, _, _ in read_counts(KINDS["llamacpp"], text, "m")}
    assert quantities == {"completion_tokens"}
    assert "prompt_tokens: MISSING" in describe(KINDS["llamacpp"], text)[1]
    assert "declared gauge, not counter" in describe(KINDS["llamacpp"], text)[1]


def test_another_servers_metrics_are_refused() -> None:
    with pytest.raises(NotServerMetrics, match="--enable-metrics"):
        read_counts(KINDS["sglang"], fixture(BUSY), "m")


def test_describe_names_the_family_read_and_what_is_missing() -> None:
    old, new = (describe(KINDS["sglang"], fixture(f"metrics/sglang_{v}.txt"))
                for v in ("0.4.0", "0.4.3"))
    assert old[0] == ("requests: sglang:e2e_request_latency_seconds_count; "
                      "no sglang:num_requests_total")
    assert new[0] == ("requests: sglang:num_requests_total, "
                      "else sglang:e2e_request_latency_seconds_count")
    triton = describe(KINDS["triton"], fixture("metrics/triton_vllm_backend_readme.txt"))
    assert triton[0].startswith("requests: MISSING, none of nv_inference_request_success_total")
    assert triton[1] == "prompt_tokens: vllm:prompt_tokens_total; no nv_llm_input_token_len_sum"
    assert describe(KINDS["llamacpp"], fixture(IDLE))[0] == "requests: not exported by llamacpp"


# --- deltas --------------------------------------------------------------------------------


def test_deltas_baseline_increase_and_reset() -> None:
    kind = KINDS["llamacpp"]
    idle, busy = (read_counts(kind, fixture(name), "m") for name in (IDLE, BUSY))
    deltas = CounterDeltas()
    assert deltas.update(idle, 10.0) is None  # baseline
    window = deltas.update(busy, 20.0)
    assert window is not None and (window.start, window.end) == (10.0, 20.0)
    increase = {quantity: busy[key] - idle[key] for key in busy for quantity in [key[0]]}
    assert window.usage == {"m": Usage(**increase)}
    assert all(value > 0 for value in increase.values())
    # The server restarted and is lower than before: its new values are the increase.
    restarted = deltas.update(idle, 30.0)
    assert restarted is not None
    assert restarted.usage == {"m": Usage(**{key[0]: idle[key] for key in idle})}


def test_deltas_are_per_series() -> None:
    """One series going away is not a reset of its model; a new one counts from 0."""
    deltas = CounterDeltas()
    stop = ("requests", "m", (("reason", "stop"),))
    length = ("requests", "m", (("reason", "length"),))
    deltas.update({stop: 10.0, length: 5.0}, 0.0)
    assert usage(deltas.update({stop: 12.0}, 1.0)) == {"m": Usage(requests=2.0)}
    assert usage(deltas.update({stop: 12.0, length: 3.0}, 2.0)) == {"m": Usage(requests=3.0)}


def usage(window: CounterWindow | None) -> dict[str, Usage]:
    assert window is not None
    return window.usage


def printed(value: int) -> float:
    """`value` as llama.cpp writes it: a C++ stream's default, six significant digits
    (tools/server/server-task.cpp, `to_metrics`), which is printf's %g."""
    return float(f"{value:g}")


TOKENS: SeriesKey = ("completion_tokens", "m", ())


def test_six_digit_counters_carry_a_still_window_into_the_next() -> None:
    assert f"{1_234_567:g}" == "1.23457e+06" and f"{999_999:g}" == "999999"
    deltas = CounterDeltas(significant_digits=6, max_carry_s=60.0)
    true = 1_234_561
    deltas.update({TOKENS: printed(true)}, 0.0)
    true += 4  # 1234565 is still written 1.23456e+06: no window yet, nothing said is 0
    assert deltas.update({TOKENS: printed(true)}, 15.0) is None
    true += 5  # 1234570: written 1.23457e+06, one step of 10 since the baseline
    window = deltas.update({TOKENS: printed(true)}, 30.0)
    assert window is not None and (window.start, window.end) == (0.0, 30.0)
    assert window.usage["m"].completion_tokens == printed(true) - printed(1_234_561) == 10


def test_six_digit_windows_add_up_to_the_counter_and_none_is_empty_by_rounding() -> None:
    deltas = CounterDeltas(significant_digits=6, max_carry_s=60.0)
    now, true = 0.0, 998_000
    done = {now: true}  # the true count at each scrape
    deltas.update({TOKENS: printed(true)}, now)
    windows = []
    for step in [3, 700, 1, 1, 2, 999, 4, 0, 6, 13, 1, 250, 7, 7, 7, 7] * 3:
        now, true = now + 15.0, true + step
        done[now] = true
        windows += [w for w in [deltas.update({TOKENS: printed(true)}, now)] if w]
    assert printed(true) > 1e6, "the walk crosses into six-digit rounding"
    tokens = [usage(w)["m"].completion_tokens or 0.0 for w in windows]
    assert sum(tokens) == printed(done[windows[-1].end]) - printed(998_000)
    for window, counted in zip(windows, tokens, strict=True):
        work = done[window.end] - done[window.start]
        assert counted >= 0 and (counted > 0 or work == 0), (window, counted, work)
        assert abs(counted - work) <= 10, "within a step of what was done"
    assert any(w.end - w.start > 15.0 for w in windows), "some windows were carried"


def test_an_idle_six_digit_counter_still_closes_windows_after_max_carry() -> None:
    deltas = CounterDeltas(significant_digits=6, max_carry_s=60.0)
    deltas.update({TOKENS: 2.5e6}, 0.0)
    assert [deltas.update({TOKENS: 2.5e6}, t) for t in (15.0, 30.0, 45.0)] == [None] * 3
    idle = deltas.update({TOKENS: 2.5e6}, 60.0)
    assert idle is not None and idle.usage["m"].completion_tokens == 0.0
    exact = CounterDeltas()  # a server that writes every digit is never carried
    exact.update({TOKENS: 2.5e6}, 0.0)
    assert exact.update({TOKENS: 2.5e6}, 15.0) is not None


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


def scraper(url: str, kind: str, clock: FakeClock, metrics: WindowMetrics,
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

    def submit_windows(self, source: str, figures: Sequence[WindowFigures],
                       trace_source: str | None = None) -> None:
        self.submitted.append((source, list(figures)))


def test_two_scrapes_of_a_real_server_give_one_window() -> None:
    metrics, clock, sink = WindowMetrics(), FakeClock(10.0), Sink()
    idle, busy = fixture(IDLE), fixture(BUSY)

    async def test(url: str) -> None:
        llama = scraper(url, "llamacpp", clock, metrics, store=sink, model="tiny")
        assert await llama.scrape_once() == []  # the baseline
        assert sink.submitted == [], "nothing settled, nothing stored"
        clock.now = 20.0
        (figures,) = await llama.scrape_once()  # the timeline is already past t = 20
        await llama.close()
        assert sink.submitted == [("scrape:llamacpp", [figures])], "once per settling scrape"
        window = figures.models["tiny"]
        assert (figures.start, figures.end, figures.gpus) == (10.0, 20.0, (0,))
        # 200 W for 10 s on GPU 0, idle baseline 50 W.
        assert (window.gpu_static_j, window.gpu_dynamic_j) == pytest.approx((500.0, 1500.0))

    asyncio.run(serving([idle, busy], None, test))
    got = samples(metrics)
    labels = {"model": "tiny", "source": "scrape:llamacpp"}
    assert got.get_sample_value("jouleprobe_window_energy_joules_total",
                                {"component": "gpu_static", **labels}) == pytest.approx(500.0)
    predicted = "llamacpp:tokens_predicted_total"
    assert got.get_sample_value("jouleprobe_window_tokens_total", {"kind": "completion", **labels}
                                ) == line_value(busy, predicted) - line_value(idle, predicted)
    assert got.get_sample_value("jouleprobe_scrapes_total", {"source": "scrape:llamacpp"}) == 2


def test_a_retired_source_leaves_the_metrics_later_unless_scraped_again() -> None:
    """An annotated pod gone: its series stay `retire_after_s` (for Prometheus to read the
    last increments), then leave; one scraped again before that stays."""
    clock = FakeClock(100.0)
    metrics = WindowMetrics(retire_after_s=600.0, clock=clock)
    for source in ("scrape:vllm:a/pod-1", "scrape:vllm:a/pod-2"):
        metrics.scraped(source)
        metrics.scrape_failed(source, "timeout")
    metrics.retire("scrape:vllm:a/pod-1")
    metrics.retire("scrape:vllm:a/pod-2")
    clock.now = 650.0
    metrics.scraped("scrape:vllm:a/pod-2")  # back before its series left
    assert samples(metrics).get_sample_value(
        "jouleprobe_scrapes_total", {"source": "scrape:vllm:a/pod-1"}) == 1
    clock.now = 700.0
    got = samples(metrics)
    assert got.get_sample_value("jouleprobe_scrapes_total",
                                {"source": "scrape:vllm:a/pod-1"}) is None
    assert got.get_sample_value("jouleprobe_scrape_errors_total",
                                {"source": "scrape:vllm:a/pod-1", "kind": "timeout"}) is None
    assert got.get_sample_value("jouleprobe_scrapes_total",
                                {"source": "scrape:vllm:a/pod-2"}) == 2


def test_a_window_waits_until_the_sampler_has_passed_its_end() -> None:
    metrics, clock = WindowMetrics(), FakeClock(25.0)

    async def test(url: str) -> None:
        llama = scraper(url, "llamacpp", clock, metrics, max_settle_s=60.0, model="tiny")
        await llama.scrape_once()
        clock.now = 35.0  # the timeline ends at t = 30
        assert await llama.scrape_once() == []
        clock.now = 95.0  # past max_settle_s: settled with what was measured
        (settled,) = await llama.scrape_once()
        await llama.close()
        assert (settled.start, settled.end) == (25.0, 35.0)
        assert settled.measured_j == pytest.approx(200.0 * 5)

    asyncio.run(serving([fixture(IDLE), fixture(BUSY)], None, test))


def test_a_server_without_model_label_is_named_by_its_v1_models() -> None:
    metrics, clock = WindowMetrics(), FakeClock(10.0)

    async def test(url: str) -> None:
        llama = scraper(url, "llamacpp", clock, metrics)
        await llama.scrape_once()
        clock.now = 20.0
        (figures,) = await llama.scrape_once()
        await llama.close()
        assert list(figures.models) == ["/models/tiny.gguf"]
        assert figures.weighting == "tokens"

    models: dict[str, object] = {"object": "list", "data": [{"id": "/models/tiny.gguf"}]}
    asyncio.run(serving([fixture(IDLE), fixture(BUSY)], models, test))


def test_the_model_of_the_urls_query_names_the_windows() -> None:
    """llama.cpp's router mode serves one model's metrics per `?model=ID`, and lists all
    of its models in /v1/models: the query's is the one scraped."""
    metrics, clock = WindowMetrics(), FakeClock(10.0)

    async def test(url: str) -> None:
        llama = scraper(f"{url}?model=second", "llamacpp", clock, metrics)
        await llama.scrape_once()
        clock.now = 20.0
        (figures,) = await llama.scrape_once()
        await llama.close()
        assert list(figures.models) == ["second"]

    models: dict[str, object] = {"object": "list", "data": [{"id": "first"}, {"id": "second"}]}
    asyncio.run(serving([fixture(IDLE), fixture(BUSY)], models, test))


def test_an_unreachable_server_is_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics, clock = WindowMetrics(), FakeClock(10.0)
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
    metrics, clock = WindowMetrics(), FakeClock(10.0)

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
    metrics, clock = WindowMetrics(), FakeClock(10.0)

    def unknown() -> tuple[int, ...]:
        raise ValueError("nothing listens on port 8000")

    async def test(url: str) -> None:
        llama = scraper(url, "llamacpp", clock, metrics, gpus=unknown, model="tiny")
        await llama.scrape_once()
        clock.now = 20.0
        assert await llama.scrape_once() == []
        await llama.close()

    asyncio.run(serving([fixture(IDLE), fixture(BUSY)], None, test))
    got = samples(metrics)
    assert got.get_sample_value("jouleprobe_scrape_errors_total",
                                {"kind": "gpus", "source": "scrape:llamacpp"}) == 1
    assert not any(sample.name == "jouleprobe_window_tokens_total"
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
