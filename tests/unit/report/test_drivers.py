"""What drives a query's energy (`jouleprobe report --explain`, `--predict`): the fit, the
requests' concurrency, the bands, and the whole on a simulated load whose per-token costs
are known."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from agent.attribution import AttributionEngine
from agent.report import run_report
from agent.report.concurrency import band, mean_concurrency
from agent.report.drivers import explain, parse_predict, predict
from agent.report.fit import MIN_REQUESTS, EnergyFit, Refused, fit_energy, t_quantile
from agent.requests import Request
from agent.sampler import Sampler
from agent.sim.gpus import MODELS, SimulatedGpuSource
from agent.sim.load import PROFILES, RequestLoad, synthetic_trace
from agent.store import RecordReader, RecordStore, StoredRequest


def stored(rid: str, start: float, end: float | None, *, gpus: tuple[int, ...] = (0,),
           prompt: int | None = 100, completion: int | None = 50, it_j: float = 360.0,
           scheduled: float | None = None, status: str = "ok", model: str = "m",
           estimated: bool = False, max_tokens: int | None = None,
           temperature: float | None = None, n: int | None = None,
           gpu_model: str | None = None) -> StoredRequest:
    return StoredRequest(rid, model, "test", gpus, status, start, end,  # type: ignore[arg-type]
                         None, prompt, completion, it_j, 0.0, 0.0, 0.0, 1.0, False, False,
                         scheduled, estimated, max_tokens, temperature, None, n, gpu_model)


# --- the fit ---------------------------------------------------------------------------


def test_t_quantiles_against_the_tables() -> None:
    for dof, table in ((10, 2.2281), (17, 2.1098), (30, 2.0423), (120, 1.9799)):
        assert t_quantile(0.975, dof) == pytest.approx(table, abs=1e-4)


def test_the_fit_recovers_known_costs_with_intervals_that_contain_them() -> None:
    rng = random.Random(3)
    samples = []
    for _ in range(400):
        prompt, completion = rng.randint(10, 4000), rng.randint(5, 1000)
        # Noise that grows with the request, as measured energy's does.
        noise = rng.gauss(0.0, 2.0 + 0.01 * completion)
        samples.append((prompt, completion, 30.0 + 0.05 * prompt + 1.2 * completion + noise))
    fit = fit_energy(samples, model="m", boundary="it")
    assert isinstance(fit, EnergyFit)
    assert fit.per_request_j.contains(30.0) and fit.per_prompt_token_j.contains(0.05)
    assert fit.per_completion_token_j.contains(1.2)
    assert fit.per_completion_token_j.high - fit.per_completion_token_j.low < 0.02
    assert fit.r_squared > 0.99 and fit.requests == 400
    expected = fit.predict(500, 300)
    assert expected.contains(30.0 + 0.05 * 500 + 1.2 * 300)
    assert expected.low < expected.value < expected.high


def test_a_fit_is_refused_where_the_data_cannot_carry_it() -> None:
    few = [(i, 2 * i + 1, float(i)) for i in range(MIN_REQUESTS - 1)]
    assert "a fit needs 20" in _reason(fit_energy(few, model="m", boundary="it"))
    same_prompt = [(100, i, float(i)) for i in range(50)]
    assert "no spread in prompt" in _reason(fit_energy(same_prompt, model="m", boundary="it"))
    together = [(i, 2 * i, float(i)) for i in range(1, 50)]
    assert "move together" in _reason(fit_energy(together, model="m", boundary="gpu"))


def _reason(outcome: EnergyFit | Refused) -> str:
    assert isinstance(outcome, Refused)
    return outcome.reason


# --- concurrency ------------------------------------------------------------------------


def test_concurrency_is_the_time_weighted_count_on_the_requests_gpus() -> None:
    records = [
        stored("a", 0.0, 10.0),                    # 5 s alone, 5 s beside b: 1.5
        stored("b", 5.0, 15.0),                    # 5 s beside a, 5 s alone: 1.5
        stored("c", 15.0, 20.0),                   # right after b: alone, 1
        stored("d", 0.0, 20.0, gpus=(1,)),         # another GPU: alone
        stored("e", 2.0, 10.0, scheduled=6.0),     # queued until 6: 6-10 beside a and b
        stored("f", 3.0, None),                    # expired: no concurrency, not counted
        stored("g", 7.0, 7.0),                     # an instant beside a, b and e
    ]
    a, b, c, d, e, f, g = mean_concurrency(records)
    assert (a, b, c, d, f, g) == (pytest.approx(1.9), pytest.approx(1.9), 1.0, 1.0, None, 4.0)
    # a: [0,5) 1, [5,6) 2, [6,10) 3 → (5 + 2 + 12) / 10; b: [5,6) 2, [6,10) 3, [10,15) 1.
    assert e == pytest.approx(3.0)
    assert [band(x) for x in (1.0, 1.49, 1.5, 4.4, 16.4, 16.5)] == [
        "1", "1", "2-4", "2-4", "5-16", "17+"]


def test_bands_split_wh_per_query_by_length_status_and_concurrency() -> None:
    records = [stored(f"r{i}", 10.0 * i, 10.0 * i + 5, prompt=50 + 300 * (i % 2),
                      completion=30 if i < 4 else 500, it_j=3600.0 * (1 + i))
               for i in range(6)]
    records.append(stored("x", 100.0, 101.0, prompt=None, completion=None, status="failed",
                          it_j=36.0))
    (drivers,) = explain(records)
    by = {(b.dimension, b.band): b for b in drivers.bands}
    assert by["completion_tokens", "1-63"].requests == 4
    assert by["completion_tokens", "256-1023"].it_wh_mean == pytest.approx((5 + 6) / 2)
    assert by["completion_tokens", "unknown"].requests == 1
    assert by["prompt_tokens", "256-1023"].requests == 3
    assert by["status", "failed"].it_wh_mean == pytest.approx(0.01)
    assert by["concurrency", "1"].requests == 7
    assert all(isinstance(fit, Refused) for fit in drivers.fits)  # 6 requests only
    assert not any(b.dimension in ("max_tokens", "temperature", "n") for b in drivers.bands), (
        "no intake saw the generation parameters: no breakdown by them")


def test_bands_by_the_generation_parameters_the_requests_asked_for() -> None:
    records = [stored("greedy", 0.0, 1.0, max_tokens=64, temperature=0.0, n=1, it_j=36.0),
               stored("warm", 2.0, 3.0, max_tokens=1024, temperature=0.7, n=1, it_j=72.0),
               stored("hot", 4.0, 5.0, max_tokens=4096, temperature=1.5, n=4, it_j=360.0),
               stored("unseen", 6.0, 7.0, it_j=3.6)]
    (drivers,) = explain(records)
    by = {(b.dimension, b.band): b.it_wh_mean for b in drivers.bands}
    assert (by["max_tokens", "64-255"], by["max_tokens", "1024+"]) == (
        pytest.approx(0.01), pytest.approx(0.06))
    assert [band for dimension, band in by if dimension == "temperature"] == [
        "0", "(0, 1]", "> 1", "unknown"]
    assert by["n", "2+"] == pytest.approx(0.1) and by["n", "unknown"] == pytest.approx(0.001)


def test_predict_parses_and_names_the_flag() -> None:
    assert parse_predict("prompt=500,completion=300") == (500, 300, None)
    assert parse_predict(" prompt = 5 , completion=0, concurrency=8") == (5, 0, 8.0)
    for bad in ("prompt=500", "prompt=a,completion=1", "tokens=3", "prompt=-1,completion=2",
                "prompt=1,completion=2,concurrency=0.5"):
        with pytest.raises(ValueError, match="--predict"):
            parse_predict(bad)


# --- end to end, on a load whose per-token costs are known ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulated_store(path: Path, seed: int, duration_s: float) -> list[str]:
    """A simulated H100 serving small-8b one request at a time (no batching), through the
    real sampler and engine into a real store; returns the request ids in order of end."""
    h100 = MODELS["H100"]
    trace = synthetic_trace(1, concurrency=1, duration_s=duration_s, start=10.0, seed=seed,
                            models=("small-8b",))
    load = RequestLoad([h100])
    load.schedule(trace)
    clock = Clock()
    sampler = Sampler(SimulatedGpuSource([h100], load, clock=clock), interval_s=0.1)
    engine = AttributionEngine(sampler.timelines, policy="tokens", settle_s=0.5)
    store = RecordStore(path, pue=1.0, simulated=True, wall_offset=1.75e9,
                        retention_days=None)
    # As the proxy reports them: opened when they start, closed with their counts.
    for r in trace:
        engine.add(Request(r.id, r.model, "sim", (0,), r.start))
    pending = sorted(trace, key=lambda r: r.end)
    tick, done = 0, 0
    stop = pending[-1].end + 2.0
    while clock.now <= stop:
        clock.now = 0.013 + 0.1 * tick
        while done < len(pending) and pending[done].end <= clock.now:
            r = pending[done]
            engine.end(r.id, r.end, first_token=r.first_token, prompt_tokens=r.prompt_tokens,
                       completion_tokens=r.completion_tokens)
            done += 1
        sampler.sample_all()
        store.submit(engine.advance(clock.now))
        tick += 1
    store.close()
    return [r.id for r in pending]


def per_token_costs_j(model: str) -> tuple[float, float]:
    """The simulation's own GPU energy per prompt and per completion token for a request
    alone on an H100 (`agent.sim.load`): (idle + dynamic power of the phase) ÷ its rate."""
    h100, profile = MODELS["H100"], PROFILES[model]
    headroom = h100.tdp_w - h100.idle_w
    prefill_w = h100.idle_w + headroom * (1 - math.exp(-profile.prefill_fraction))
    decode_w = h100.idle_w + headroom * (1 - math.exp(-profile.decode_fraction))
    return (prefill_w / profile.prefill_tokens_per_s,
            decode_w / profile.decode_rate(1))


def test_explain_recovers_the_simulators_per_token_costs_at_concurrency_one(
        tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    simulated_store(path, seed=7, duration_s=240.0)
    report = json.loads(run_report(str(path), None, "json", None, explain=True))
    (drivers,) = report["drivers"]
    gpu = next(f for f in drivers["fits"] if f["boundary"] == "gpu" and
               f["concurrency_band"] == "all")
    prompt_j, completion_j = per_token_costs_j("small-8b")
    assert gpu["requests"] > 100
    assert gpu["per_completion_token_j"]["low"] <= completion_j <= (
        gpu["per_completion_token_j"]["high"])
    assert gpu["per_prompt_token_j"]["low"] <= prompt_j <= gpu["per_prompt_token_j"]["high"]
    assert gpu["per_request_j"]["low"] <= 0.0 <= gpu["per_request_j"]["high"]
    assert {f["concurrency_band"] for f in drivers["fits"]} == {"all", "1"}
    table = run_report(str(path), None, "table", None, explain=True)
    assert "On small-8b here, each completion token costs" in table


def test_predict_agrees_with_held_out_requests_of_that_size(tmp_path: Path) -> None:
    """Fit on one simulated run's requests, predict the mean energy of another run's at
    their mean lengths: the two agree within the prediction's interval, widened by the
    held-out mean's own sampling error (t × √(SE² + sd² / m)), since a held-out mean is
    itself a sample."""
    fitted, held_out = tmp_path / "fit.db", tmp_path / "held.db"
    simulated_store(fitted, seed=11, duration_s=240.0)
    simulated_store(held_out, seed=12, duration_s=240.0)
    records = list(RecordReader(held_out).query())
    m = len(records)
    assert m > 100
    prompt = sum(r.prompt_tokens or 0 for r in records) / m
    completion = sum(r.completion_tokens or 0 for r in records) / m
    measured = sum(r.gpu_j for r in records) / m
    (drivers,) = explain(list(RecordReader(fitted).query()))
    fit = next(f for f in drivers.fits if f.boundary == "gpu" and f.band == "all")
    assert isinstance(fit, EnergyFit)
    expected = fit.predict(prompt, completion)
    standard_error = (expected.high - expected.value) / fit.t_critical
    allowed = fit.t_critical * math.sqrt(standard_error**2 + fit.residual_sd_j**2 / m)
    assert abs(measured - expected.value) <= allowed
    assert allowed < 0.02 * measured  # and the interval says something
    # The command gives the same figure for whole token counts.
    report = json.loads(run_report(str(fitted), None, "json", None,
                                   predict=f"prompt={round(prompt)},"
                                           f"completion={round(completion)}"))
    (gpu,) = [p for p in report["predictions"] if p["boundary"] == "gpu"]
    assert gpu["energy_j"]["value"] == pytest.approx(
        fit.predict(round(prompt), round(completion)).value)
    assert "drivers" not in report  # --predict alone does not print the fits


def test_predict_names_a_band_with_no_requests(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    simulated_store(path, seed=5, duration_s=60.0)
    report = json.loads(run_report(str(path), None, "json", None,
                                   predict="prompt=100,completion=50,concurrency=32"))
    assert all(p["energy_j"] is None and "17+" in p["refused"] for p in report["predictions"])
    (drivers,) = explain(list(RecordReader(path).query()))
    assert predict((drivers,), 100, 50)[0].energy_j is not None


def test_each_gpu_model_gets_its_own_fit() -> None:
    """The same model on an H100 (1 J per completion token) and an H200 (0.5 J): two fits,
    each with its board's cost, and the CSV says which board."""
    import csv
    import io

    from agent.report.model import build_report
    from agent.report.render import render

    rng = random.Random(2)
    records = []
    for i in range(60):
        for board, cost in (("NVIDIA H100", 1.0), ("NVIDIA H200", 0.5)):
            prompt, completion = rng.randint(10, 2000), rng.randint(5, 500)
            records.append(stored(f"{board}-{i}", 10.0 * i, 10.0 * i + 5, prompt=prompt,
                                  completion=completion, gpu_model=board, gpus=(0,),
                                  it_j=2.0 + 0.01 * prompt + cost * completion))
    h100, h200 = explain(records)
    assert (h100.gpu_model, h200.gpu_model) == ("NVIDIA H100", "NVIDIA H200")
    costs = [next(f for f in d.fits if f.band == "all" and f.boundary == "it")
             for d in (h100, h200)]
    assert [f.per_completion_token_j.value for f in costs] == [  # type: ignore[union-attr]
        pytest.approx(1.0), pytest.approx(0.5)]
    built = build_report(records, generated=1.0, drivers=(h100, h200))
    rows = [r for r in csv.DictReader(io.StringIO(render(built, "csv"))) if r["level"] == "fit"]
    assert {r["gpu_model"] for r in rows} == {"NVIDIA H100", "NVIDIA H200"}
    assert "On m (NVIDIA H200) here" in render(built, "table")
