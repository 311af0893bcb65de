"""Attribution rules (docs/design.md §5), one test per rule, then property-based conservation."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.attribution import (
    PREFILL_WEIGHT_BOUNDS,
    AttributionEngine,
    CapacityExceeded,
)
from agent.attribution.learners import PrefillWeightLearner
from agent.config import Policy
from agent.requests import Request, RequestEnergy
from agent.timeline import EnergyPoint, Timeline

LATER = 1_000.0
"""A time when every interval of the small timelines below has settled."""


def timeline(*points: tuple[float, float] | tuple[float, float, bool]) -> Timeline:
    """(time, cumulative energy[, gap]) points."""
    line = Timeline(max_points=10_000)
    for point in points:
        line.append(EnergyPoint(point[0], point[1], gap=len(point) > 2 and bool(point[2])))
    return line


def steady(watts: float, until: float, step: float = 1.0, start: float = 0.0) -> Timeline:
    count = round((until - start) / step)
    return timeline(*((start + i * step, watts * i * step) for i in range(count + 1)))


def req(rid: str, start: float, end: float | None, gpus: tuple[int, ...] = (0,), **kw) -> Request:
    return Request(id=rid, model="m", source="test", gpus=gpus, start=start, end=end, **kw)


def engine(timelines: dict[int, Timeline], **kw) -> AttributionEngine:
    kw.setdefault("max_age_s", 10_000.0)
    return AttributionEngine(timelines, **kw)


def run(eng: AttributionEngine, *requests: Request, now: float = LATER) -> dict[str, RequestEnergy]:
    for request in requests:
        eng.add(request)
    return {energy.request.id: energy for energy in eng.advance(now)}


def test_a_request_alone_gets_all_energy_split_at_the_idle_baseline() -> None:
    eng = engine({0: steady(200.0, 10.0)}, idle_power_w={0: 50.0})
    out = run(eng, req("a", 0.0, 10.0))
    assert out["a"].gpu_static_j == pytest.approx(500.0)
    assert out["a"].gpu_dynamic_j == pytest.approx(1500.0)
    assert out["a"].it_j == pytest.approx(2000.0)
    gpu = eng.totals().gpus[0]
    assert gpu.unattributed_j == 0.0
    assert gpu.measured_j == pytest.approx(2000.0)


def test_static_part_never_exceeds_the_interval_energy() -> None:
    eng = engine({0: steady(30.0, 4.0)}, idle_power_w={0: 50.0})
    out = run(eng, req("a", 0.0, 4.0))
    assert out["a"].gpu_static_j == pytest.approx(120.0)
    assert out["a"].gpu_dynamic_j == 0.0


def test_two_equal_overlapping_requests_share_equally() -> None:
    eng = engine({0: steady(100.0, 10.0)})
    out = run(eng, req("a", 0.0, 10.0), req("b", 0.0, 10.0))
    assert out["a"].gpu_j == pytest.approx(500.0)
    assert out["b"].gpu_j == pytest.approx(500.0)


def test_requests_starting_and_ending_inside_one_interval_weigh_their_overlap() -> None:
    eng = engine({0: timeline((0.0, 0.0), (10.0, 1000.0))})
    out = run(eng, req("a", 2.0, 4.0), req("b", 3.0, 9.0))
    assert out["a"].gpu_j == pytest.approx(250.0)
    assert out["b"].gpu_j == pytest.approx(750.0)
    assert eng.totals().gpus[0].unattributed_j == 0.0


def test_a_request_spanning_many_intervals_gets_each_one_it_overlaps() -> None:
    energies = [0.0, 10.0, 40.0, 45.0, 145.0, 150.0, 350.0, 351.0, 400.0]
    # A 0 W baseline, so that the empty ends of its first and last intervals cost nothing.
    eng = engine({0: timeline(*((float(t), e) for t, e in enumerate(energies)))},
                 idle_power_w={0: 0.0})
    out = run(eng, req("a", 1.5, 6.25))  # overlaps intervals [1, 2) … [6, 7)
    assert out["a"].gpu_j == pytest.approx(351.0 - 10.0)
    totals = eng.totals().gpus[0]
    assert totals.unattributed_j == pytest.approx(10.0 + 49.0)


def test_idle_energy_of_the_empty_part_of_an_interval_is_unattributed() -> None:
    # One 10 s interval at 100 W on a 50 W baseline; the request covers its first half.
    eng = engine({0: timeline((0.0, 0.0), (10.0, 1000.0))}, idle_power_w={0: 50.0})
    out = run(eng, req("a", 0.0, 5.0))
    assert out["a"].gpu_static_j == pytest.approx(250.0)  # half of the interval's 500 J
    assert out["a"].gpu_dynamic_j == pytest.approx(500.0)
    assert eng.totals().gpus[0].unattributed_j == pytest.approx(250.0)


def test_empty_time_is_where_no_request_runs_not_where_one_does_not() -> None:
    # [0, 10) at 100 W, 50 W baseline: a runs [1, 4), b runs [3, 6): empty for 1 + 4 s.
    eng = engine({0: timeline((0.0, 0.0), (10.0, 1000.0))}, idle_power_w={0: 50.0})
    out = run(eng, req("a", 1.0, 4.0), req("b", 3.0, 6.0))
    assert eng.totals().gpus[0].unattributed_j == pytest.approx(250.0)
    assert out["a"].gpu_j == pytest.approx(375.0)
    assert out["b"].gpu_j == pytest.approx(375.0)
    assert out["a"].gpu_static_j + out["b"].gpu_static_j == pytest.approx(250.0)


def test_empty_time_takes_at_most_the_interval_energy() -> None:
    eng = engine({0: timeline((0.0, 0.0), (10.0, 100.0))}, idle_power_w={0: 50.0})
    out = run(eng, req("a", 8.0, 10.0))
    assert out["a"].gpu_j == 0.0
    assert eng.totals().gpus[0].unattributed_j == pytest.approx(100.0)


def test_interval_with_no_request_is_unattributed_and_teaches_the_idle_power() -> None:
    eng = engine({0: steady(60.0, 10.0)})
    assert run(eng) == {}
    totals = eng.totals().gpus[0]
    assert totals.unattributed_j == pytest.approx(600.0)
    assert eng.idle_power_w(0) == pytest.approx(60.0)


@pytest.mark.parametrize(("prefill_weight", "share_a"), [(0.5, 0.5), (2.0, 0.8)])
def test_tokens_policy_weighs_prompt_tokens_by_the_prefill_weight(
    prefill_weight: float, share_a: float
) -> None:
    # [0, 4): A is in prefill (40 prompt tokens), B decodes 20 tokens; [4, 8): A decodes alone.
    eng = engine({0: timeline((0.0, 0.0), (4.0, 400.0), (8.0, 500.0))},
                 policy="tokens", prefill_weight=prefill_weight)
    out = run(
        eng,
        req("a", 0.0, 8.0, first_token=4.0, prompt_tokens=40, completion_tokens=10),
        req("b", 0.0, 4.0, prompt_tokens=0, completion_tokens=20),
    )
    assert out["a"].gpu_j == pytest.approx(400.0 * share_a + 100.0)
    assert out["b"].gpu_j == pytest.approx(400.0 * (1 - share_a))


def test_tokens_policy_unknown_tokens_weigh_as_the_mean_known_rate() -> None:
    eng = engine({0: timeline((0.0, 0.0), (10.0, 600.0))}, policy="tokens", prefill_weight=1.0)
    out = run(
        eng,
        req("fast", 0.0, 10.0, prompt_tokens=10, completion_tokens=20),  # 3 tokens/s
        req("slow", 0.0, 10.0, prompt_tokens=0, completion_tokens=10),  # 1 token/s
        req("unknown", 0.0, 10.0),  # weighs like 2 tokens/s, the mean of the two
    )
    assert out["fast"].gpu_j == pytest.approx(300.0)
    assert out["slow"].gpu_j == pytest.approx(100.0)
    assert out["unknown"].gpu_j == pytest.approx(200.0)


def test_tokens_policy_splits_by_time_where_every_weight_is_zero() -> None:
    eng = engine({0: timeline((0.0, 0.0), (10.0, 300.0))}, policy="tokens", prefill_weight=1.0)
    out = run(
        eng,
        req("a", 0.0, 10.0, prompt_tokens=0, completion_tokens=0),
        req("b", 5.0, 10.0, prompt_tokens=0, completion_tokens=0),
    )
    assert out["a"].gpu_j == pytest.approx(200.0)
    assert out["b"].gpu_j == pytest.approx(100.0)


def test_gap_intervals_are_neither_attributed_nor_counted() -> None:
    line = timeline((0.0, 0.0), (1.0, 100.0), (2.0, 100.0, True), (3.0, 200.0))
    eng = engine({0: line})
    out = run(eng, req("a", 0.0, 3.0), req("inside_gap", 1.2, 1.8))
    assert out["a"].gpu_j == pytest.approx(200.0)
    assert out["inside_gap"].it_j == 0.0
    totals = eng.totals().gpus[0]
    assert totals.measured_j == pytest.approx(200.0)
    assert totals.unattributed_j == 0.0


def test_a_late_request_gets_only_the_unprocessed_part() -> None:
    eng = engine({0: steady(100.0, 10.0)}, settle_s=2.0)
    assert eng.advance(7.0) == []  # processes [0, 5)
    out = run(eng, req("late", 3.0, 9.0))
    assert out["late"].gpu_j == pytest.approx(400.0)  # [5, 9) only
    assert out["late"].late
    totals = eng.totals()
    assert totals.late_requests == 1
    assert totals.gpus[0].unattributed_j == pytest.approx(600.0)


def test_a_request_before_the_first_measurement_is_not_late() -> None:
    eng = engine({0: steady(100.0, 10.0, start=5.0)})
    eng.advance(LATER)
    out = run(eng, req("early", 0.0, 4.0))
    assert out["early"].it_j == 0.0
    assert not out["early"].late


def test_settling_waits_for_batched_reports() -> None:
    eng = engine({0: steady(100.0, 10.0)}, settle_s=2.0)
    eng.add(req("a", 0.0, 3.0))
    assert eng.advance(4.0) == []  # [0, 2) is processed, [2, 3) has not settled yet
    eng.add(req("reported_late_but_in_time", 2.0, 3.0))
    out = {e.request.id: e for e in eng.advance(5.0)}
    assert out["a"].gpu_j == pytest.approx(250.0)
    assert out["reported_late_but_in_time"].gpu_j == pytest.approx(50.0)
    assert not out["reported_late_but_in_time"].late


def test_a_gpu_fed_by_spans_waits_longer_and_the_others_do_not() -> None:
    """GPU 1 waits 5 s (a trace source's settle), GPU 0 the default 1 s; the host, which
    both GPUs' requests share, waits as long as the longest."""
    eng = engine({0: steady(100.0, 20.0), 1: steady(100.0, 20.0)},
                 host_timeline=steady(10.0, 20.0), settle_s=1.0, gpu_settle_s={1: 5.0})
    assert (eng.gpu_settle_s, eng.longest_settle_s) == ({0: 1.0, 1: 5.0}, 5.0)
    eng.advance(10.0)
    totals = eng.totals()
    assert totals.gpus[0].measured_j == pytest.approx(900.0)  # [0, 9)
    assert totals.gpus[1].measured_j == pytest.approx(500.0)  # [0, 5)
    assert totals.host is not None and totals.host.measured_j == pytest.approx(50.0)
    # A span 4 s after its request on GPU 1 is in time; a report as late on GPU 0 is not.
    out = run(eng, req("span", 5.0, 6.0, gpus=(1,)), req("report", 5.0, 6.0))
    assert not out["span"].late and out["span"].gpu_j == pytest.approx(100.0)
    assert out["report"].late and out["report"].gpu_j == 0.0
    with pytest.raises(ValueError, match=r"GPU\(s\) \[2\]"):
        engine({0: steady(100.0, 1.0)}, gpu_settle_s={2: 5.0})


def test_an_open_request_holds_back_the_intervals_it_overlaps() -> None:
    eng = engine({0: steady(100.0, 10.0)}, settle_s=0.0)
    eng.add(req("short", 0.0, 2.0))
    eng.add(req("long", 1.0, None))
    assert eng.advance(8.0) == []
    assert eng.totals().gpus[0].measured_j == pytest.approx(100.0)  # only [0, 1)
    assert eng.end("long", 6.0)
    out = {e.request.id: e for e in eng.advance(8.0)}
    assert out["short"].gpu_j == pytest.approx(150.0)
    assert out["long"].gpu_j == pytest.approx(450.0)


def test_end_fills_in_what_the_start_did_not_know() -> None:
    eng = engine({0: timeline((0.0, 0.0), (10.0, 300.0))}, policy="tokens", prefill_weight=1.0)
    eng.add(req("a", 0.0, None))
    eng.add(req("b", 0.0, 10.0, prompt_tokens=5, completion_tokens=5))
    assert eng.end("a", 10.0, first_token=1.0, prompt_tokens=10, completion_tokens=10,
                   status="cancelled")
    out = {e.request.id: e for e in eng.advance(LATER)}
    assert out["a"].request.status == "cancelled"
    assert out["a"].request.completion_tokens == 10
    assert out["a"].gpu_j == pytest.approx(200.0)


@pytest.mark.parametrize(("policy", "share_a"), [("equal", 200.0), ("tokens", 800.0 / 3)])
def test_time_queued_in_the_server_gets_no_energy(policy: Policy, share_a: float) -> None:
    # a arrives at 0 but the server begins on it at 6 (it said so: `scheduled`); b runs
    # [0, 10), alone until 6. At 100 W, b gets [0, 6) whole and they share [6, 10): by
    # time, or by tokens (a: 2 prompt tokens/s on [6, 8), 2 completion tokens/s on
    # [8, 10); b: 1 completion token/s on [6, 10)).
    eng = engine({0: steady(100.0, 10.0)}, policy=policy, prefill_weight=1.0)
    eng.add(req("a", 0.0, None))
    eng.add(req("b", 0.0, 10.0, prompt_tokens=4, completion_tokens=4, first_token=6.0))
    assert eng.end("a", 10.0, first_token=8.0, prompt_tokens=4, completion_tokens=4,
                   scheduled=6.0, tokens_estimated=True)
    out = {e.request.id: e for e in eng.advance(LATER)}
    assert out["a"].request.scheduled == 6.0 and out["a"].request.tokens_estimated
    assert out["a"].gpu_j == pytest.approx(share_a)
    assert out["b"].gpu_j == pytest.approx(1000.0 - share_a)


def test_a_server_start_outside_the_request_is_rejected() -> None:
    with pytest.raises(ValueError, match="scheduled"):
        req("a", 5.0, 10.0, scheduled=4.0)
    with pytest.raises(ValueError, match="scheduled"):
        req("a", 5.0, 10.0, first_token=6.0, scheduled=7.0)


def test_unknown_gpu_is_rejected_and_counted() -> None:
    eng = engine({0: steady(100.0, 10.0)})
    with pytest.raises(ValueError, match=r"GPU\(s\) \[3\]"):
        eng.add(req("a", 0.0, 1.0, gpus=(0, 3)))
    with pytest.raises(ValueError, match="empty"):
        req("b", 0.0, 1.0, gpus=())
    assert eng.totals().unknown_gpu_requests == 1
    assert eng.totals().pending_requests == 0


def test_invalid_requests_are_rejected() -> None:
    eng = engine({0: steady(100.0, 10.0)})
    eng.add(req("a", 5.0, None))
    with pytest.raises(ValueError, match="already pending"):
        eng.add(req("a", 5.0, None))
    with pytest.raises(ValueError, match="before it starts"):
        eng.end("a", 4.0)
    with pytest.raises(ValueError, match="twice"):
        req("b", 0.0, 1.0, gpus=(0, 0))
    assert not eng.end("never-started", 6.0)
    assert eng.totals().unmatched_ends == 1


def test_host_energy_is_split_over_the_requests_of_every_gpu() -> None:
    host = timeline((0.0, 0.0), (10.0, 300.0), (20.0, 400.0))
    eng = engine({0: steady(100.0, 20.0), 1: steady(100.0, 20.0)}, host_timeline=host)
    out = run(eng, req("a", 0.0, 10.0, gpus=(0,)), req("b", 0.0, 10.0, gpus=(1,)))
    assert out["a"].host_j == pytest.approx(150.0)
    assert out["b"].host_j == pytest.approx(150.0)
    host_totals = eng.totals().host
    assert host_totals is not None
    assert host_totals.unattributed_j == pytest.approx(100.0)
    assert host_totals.attributed_j == pytest.approx(300.0)


def test_facility_energy_is_it_energy_times_pue_minus_one() -> None:
    host = steady(20.0, 10.0)
    eng = engine({0: steady(100.0, 10.0)}, host_timeline=host, pue=1.25,
                 idle_power_w={0: 40.0})
    energy = run(eng, req("a", 0.0, 10.0))["a"]
    assert energy.it_j == pytest.approx(1200.0)
    assert energy.gpu_j == pytest.approx(1000.0)
    assert energy.facility_j == pytest.approx(300.0)


def test_a_request_still_open_at_max_age_is_finalised_with_what_is_known() -> None:
    eng = engine({0: steady(100.0, 100.0)}, max_age_s=30.0, settle_s=1.0)
    eng.add(req("stuck", 10.0, None))
    assert eng.advance(39.0) == []
    (energy,) = eng.advance(45.0)
    assert energy.expired
    assert energy.request.end is None
    assert energy.gpu_j == pytest.approx(3000.0)  # [10, 40)
    assert not eng.end("stuck", 50.0)
    totals = eng.totals()
    assert totals.expired_requests == 1
    assert totals.unmatched_ends == 1


def test_a_stalled_timeline_finalises_its_requests_with_what_was_measured() -> None:
    eng = engine({0: steady(100.0, 10.0)}, max_age_s=30.0)
    eng.add(req("a", 5.0, 20.0))  # the GPU stopped reporting at t=10
    assert eng.advance(25.0) == []
    (energy,) = eng.advance(45.0)
    assert energy.gpu_j == pytest.approx(500.0)


def test_idle_power_is_learned_from_pooled_idle_stretches() -> None:
    # The counter steps every 200 ms while sampled at 10 Hz: single intervals read 0 or
    # 120 W, which must not drag the baseline to 0.
    points, energy = [(0.0, 0.0)], 0.0
    for i in range(1, 301):
        energy += 12.0 * (i % 2 == 0) if i <= 200 else 30.0
        points.append((i / 10, energy))
    eng = engine({0: timeline(*points)})
    assert eng.idle_power_w(0) is None
    out = run(eng, req("a", 20.0, 30.0))
    assert eng.idle_power_w(0) == pytest.approx(60.0)
    assert out["a"].gpu_static_j == pytest.approx(600.0)
    assert out["a"].gpu_dynamic_j == pytest.approx(2400.0)


def test_before_any_idle_power_is_known_all_gpu_energy_is_dynamic() -> None:
    eng = engine({0: steady(100.0, 10.0)})
    energy = run(eng, req("a", 0.0, 10.0))["a"]
    assert energy.gpu_static_j == 0.0
    assert energy.gpu_dynamic_j == pytest.approx(1000.0)
    assert eng.totals().gpus[0].idle_power_w is None


def test_pending_requests_are_capped() -> None:
    eng = engine({0: steady(100.0, 10.0)}, max_pending=2)
    eng.add(req("a", 0.0, None))
    eng.add(req("b", 0.0, 1.0))
    with pytest.raises(CapacityExceeded):
        eng.add(req("c", 0.0, None))
    assert eng.totals().over_capacity_requests == 1


def test_finished_requests_and_processed_intervals_are_dropped() -> None:
    eng = engine({0: steady(100.0, 100.0, step=0.1)}, settle_s=0.0)
    for i in range(50):
        eng.add(req(f"r{i}", i * 2.0, i * 2.0 + 1.5))
    assert len(eng.advance(LATER)) == 50
    assert eng.totals().pending_requests == 0
    assert eng.advance(LATER) == []


# --- the prefill weight: fixed, or measured ("auto") ---------------------------------------


def learner(**kw: float) -> PrefillWeightLearner:
    return PrefillWeightLearner(**{"sample_s": 1.0, "window": 600, "min_samples": 30, **kw})


def feed(learn: PrefillWeightLearner, samples: Sequence[tuple[float, float, float, float]]
         ) -> None:
    """(dynamic J, prompt tokens, completion tokens, busy s) samples of one second each."""
    for energy, prompt, completion, busy in samples:
        learn.observe(energy, prompt, completion, busy, 1.0)


def work(rng: random.Random, a: float, b: float, count: int, noise: float = 0.0
         ) -> list[tuple[float, float, float, float]]:
    """Seconds of a board whose dynamic energy is a·P + b·D (± `noise` relative), busy
    throughout, with prompt and completion tokens that vary independently."""
    out = []
    for _ in range(count):
        prompt = rng.choice([0.0, rng.uniform(100, 8000)])
        completion = rng.uniform(20, 600)
        energy = (a * prompt + b * completion) * (1 + rng.uniform(-noise, noise))
        out.append((energy, prompt, completion, 1.0))
    return out


def test_learner_recovers_the_ratio_of_the_two_token_costs() -> None:
    learn = learner()
    feed(learn, work(random.Random(1), a=0.004, b=0.25, count=200, noise=0.05))
    assert learn.value == pytest.approx(0.016, rel=0.05)


def test_learner_gives_nothing_before_enough_samples() -> None:
    learn = learner(min_samples=30)
    pure = [(0.004 * 1000, 1000.0, 0.0, 1.0), (0.25 * 100, 0.0, 100.0, 1.0)]  # ideal samples
    feed(learn, pure * 14 + pure[:1])
    assert learn.value is None
    feed(learn, pure[1:])
    assert learn.value == pytest.approx(0.016)


def test_learner_pools_short_intervals_into_samples() -> None:
    learn = learner(min_samples=3, window=10**9)
    for prompt, completion in [(1000, 0), (0, 100), (2000, 50), (500, 200)]:
        for _ in range(10):  # ten 0.1 s intervals: one sample
            learn.observe((0.01 * prompt + 0.5 * completion) / 10, prompt / 10,
                          completion / 10, 0.1, 0.1)
    assert learn.value == pytest.approx(0.02)


def test_learner_forgets_old_samples() -> None:
    """Memory is bounded: the fit is a fixed set of sums whose old terms fade, so the
    weight follows a change of regime instead of averaging over all history."""
    learn = learner(window=50, min_samples=10)
    rng = random.Random(3)
    feed(learn, work(rng, a=0.004, b=0.25, count=2000))
    assert learn.value == pytest.approx(0.016)
    feed(learn, work(rng, a=0.01, b=0.25, count=500))
    assert learn.value == pytest.approx(0.04, rel=1e-3)


def test_learner_refuses_collinear_tokens() -> None:
    # Every request has the same shape and its tokens are spread over its lifetime: P = 4·D.
    learn = learner(min_samples=10)
    rng = random.Random(4)
    samples = []
    for _ in range(200):
        completion = rng.uniform(50, 500)
        samples.append((0.004 * 4 * completion + 0.25 * completion, 4 * completion,
                        completion, 1.0))
    feed(learn, samples)
    assert learn.value is None


def test_learner_refuses_energy_that_follows_time_not_tokens() -> None:
    # A board at its power limit: 600 W whatever the token mix.
    learn = learner(min_samples=10)
    rng = random.Random(5)
    feed(learn, [(600.0 * busy, prompt, completion, busy)
                 for _, prompt, completion, _ in work(rng, 0.004, 0.25, 300)
                 for busy in [rng.uniform(0.5, 1.0)]])
    assert learn.value is None


def test_learner_holds_the_last_measured_weight_while_it_cannot_measure() -> None:
    """Once measured, the weight stays while the window cannot measure it (here every
    request comes to have the same shape), and a new measurement replaces it once the load
    lets the fit be trusted again."""
    learn = learner(window=50, min_samples=10)
    rng = random.Random(8)
    feed(learn, work(rng, a=0.004, b=0.25, count=200))
    assert learn.value == pytest.approx(0.016)
    same_shape = [(0.004 * 4 * d + 0.25 * d, 4 * d, d, 1.0)
                  for d in (rng.uniform(50, 500) for _ in range(500))]
    fresh = learner(window=50, min_samples=10)
    feed(fresh, same_shape)
    assert fresh.value is None  # such a window alone measures nothing
    feed(learn, same_shape)
    assert learn.value == pytest.approx(0.016)
    feed(learn, work(rng, a=0.01, b=0.25, count=500))
    assert learn.value == pytest.approx(0.04, rel=1e-3)


def test_learner_refuses_a_weight_outside_the_plausible_range() -> None:
    low, high = PREFILL_WEIGHT_BOUNDS
    learn = learner(min_samples=10)
    feed(learn, work(random.Random(6), a=0.0, b=0.25, count=100))  # prompts are free
    assert learn.value is None
    learn = learner(min_samples=10)
    feed(learn, work(random.Random(7), a=1.0, b=0.25, count=100))  # a prompt token costs 4
    assert learn.value is None
    learn = learner(min_samples=10, window=50)
    feed(learn, work(random.Random(7), a=high * 0.25, b=0.25, count=100))
    assert learn.value == pytest.approx(high)
    feed(learn, work(random.Random(6), a=low * 0.25, b=0.25, count=2000))
    assert learn.value == pytest.approx(low)


def test_learner_leaves_out_samples_at_the_power_limit() -> None:
    """Samples at the limit are not fitted at all: they neither move the weight nor count."""
    learn = learner(min_samples=10)
    samples = work(random.Random(9), a=0.004, b=0.25, count=100)
    for energy, prompt, completion, busy in samples:
        learn.observe(energy, prompt, completion, busy, 1.0, energy * 1.01)  # below the limit
    assert learn.value == pytest.approx(0.016)
    for energy, prompt, completion, busy in work(random.Random(10), 0.0, 0.25, 500):
        learn.observe(energy, prompt, completion, busy, 1.0, energy)  # at the limit
    assert learn.value == pytest.approx(0.016)


def test_engine_learns_only_below_the_power_limit() -> None:
    """The engine hands the learner the board's power limit: with the limit just above
    what the board draws, it measures the weight; at the limit, it never does."""

    def learned(limit_w: float) -> float | None:
        points, t, energy = [(0.0, 0.0)], 0.0, 0.0
        requests = []
        rng = random.Random(11)
        for n in range(120):  # one request per second: 0.2 s prefill, then decode
            prompt, completion = rng.randint(100, 4000), rng.randint(20, 200)
            requests.append(req(f"r{n}", t, t + 1.0, first_token=t + 0.2,
                                prompt_tokens=prompt, completion_tokens=completion))
            for part, joules in ((0.2, 0.004 * prompt), (0.8, 0.25 * completion)):
                t += part
                energy += joules
                points.append((t, energy))
        eng = engine({0: timeline(*points)}, policy="tokens", idle_power_w={0: 0.0},
                     power_limit_w=lambda gpu: limit_w)
        run(eng, *requests)
        return eng.totals().gpus[0].prefill_weight

    assert learned(1e6) == pytest.approx(0.016)
    assert learned(1.0) is None


def test_learner_ignores_idle_samples_and_restarts_a_sample_after_an_interruption() -> None:
    learn = learner(min_samples=3, window=10**9)
    learn.observe(-1.0, 0.0, 0.0, 0.0, 5.0)  # idle: no sample
    learn.observe(1e6, 1e6, 0.0, 0.5, 0.5)  # half a sample, then a gap: discarded
    learn.interrupt()
    feed(learn, [(10.0, 1000.0, 0.0, 1.0), (50.0, 0.0, 100.0, 1.0), (60.0, 1000.0, 100.0, 1.0)])
    assert learn.value == pytest.approx(0.02)


def test_auto_weight_splits_by_time_until_it_is_measured() -> None:
    eng = engine({0: timeline((0.0, 0.0), (4.0, 400.0))}, policy="tokens",
                 idle_power_w={0: 0.0})
    out = run(eng,
              req("prefill", 0.0, 4.0, first_token=4.0, prompt_tokens=4000, completion_tokens=1),
              req("decode", 0.0, 4.0, prompt_tokens=0, completion_tokens=40))
    assert out["prefill"].gpu_j == pytest.approx(200.0)
    assert out["decode"].gpu_j == pytest.approx(200.0)
    assert eng.totals().gpus[0].prefill_weight is None


def test_totals_report_the_prefill_weight_in_use() -> None:
    assert engine({0: steady(1.0, 1.0)}, policy="tokens", prefill_weight=0.5
                  ).totals().gpus[0].prefill_weight == 0.5
    assert engine({0: steady(1.0, 1.0)}, policy="equal", prefill_weight=0.5
                  ).totals().gpus[0].prefill_weight is None
    with pytest.raises(ValueError, match="prefill weight"):
        engine({0: steady(1.0, 1.0)}, prefill_weight="measured")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefill weight"):
        engine({0: steady(1.0, 1.0)}, prefill_weight=-1.0)


def test_auto_weight_is_learned_from_the_engine_intervals_and_then_used() -> None:
    """One request at a time, each 1 s of prefill then 2 s of decode, on a board drawing
    50 W + 0.01 J per prompt token + 0.5 J per completion token; then two requests share
    an interval, one in prefill, one decoding, and split it by the learned weight 0.02."""
    rng = random.Random(8)
    line, energy, t = Timeline(10_000), 0.0, 0.0
    requests = []
    line.append(EnergyPoint(0.0, 0.0))
    for i in range(12):
        prompt, completion = rng.randint(200, 3000), rng.randint(10, 200)
        requests.append(req(f"r{i}", t, t + 3.0, first_token=t + 1.0, prompt_tokens=prompt,
                            completion_tokens=completion))
        for joules in (50.0 + 0.01 * prompt, 50.0 + 0.5 * completion / 2,
                       50.0 + 0.5 * completion / 2):
            t += 1.0
            energy += joules
            line.append(EnergyPoint(t, energy))
    t += 1.0  # a: 1000 prompt tokens (weighing 20), b: 60 completion tokens (weighing 60)
    energy += 50.0 + 0.01 * 1000 + 0.5 * 60
    line.append(EnergyPoint(t, energy))
    requests += [req("a", t - 1.0, t, first_token=t, prompt_tokens=1000, completion_tokens=0),
                 req("b", t - 1.0, t, first_token=t - 1.0, prompt_tokens=0,
                     completion_tokens=60)]
    eng = engine({0: line}, policy="tokens", idle_power_w={0: 50.0},
                 prefill_min_samples=10)
    out = run(eng, *requests)
    assert eng.totals().gpus[0].prefill_weight == pytest.approx(0.02)
    assert out["a"].gpu_dynamic_j == pytest.approx(10.0)  # its own 0.01 J × 1000
    assert out["b"].gpu_dynamic_j == pytest.approx(30.0)  # its own 0.5 J × 60


def test_energy_is_conserved_while_the_learned_weight_moves() -> None:
    """Weights only split each interval's energy: whatever the learner does between two
    intervals, every joule goes to a request or to unattributed, exactly once."""
    rng = random.Random(9)
    requests = []
    for i in range(300):
        start = round(rng.uniform(0, 60), 1)
        first = start + rng.choice([0.1, 0.3])
        requests.append(req(f"r{i}", start, first + rng.choice([0.2, 0.5, 1.0]),
                            first_token=first, prompt_tokens=rng.randint(1, 4000),
                            completion_tokens=rng.randint(1, 300)))
    points, energy = [(0.0, 0.0)], 0.0
    for step in range(1, 650):  # 20 W idle; a prompt token's cost drifts from 1 to 15 mJ
        t0, t1 = (step - 1) / 10, step / 10
        energy += 2.0 * rng.uniform(0.9, 1.1)
        for r in requests:
            assert r.end is not None and r.first_token is not None
            for a, b, joules in ((r.start, r.first_token, (0.001 + t0 / 5000) * r.prompt_tokens),
                                 (r.first_token, r.end, 0.3 * r.completion_tokens)):
                energy += joules * max(0.0, min(b, t1) - max(a, t0)) / (b - a)
        points.append((t1, energy))
    eng = engine({0: timeline(*points)}, policy="tokens", idle_power_w={0: 20.0}, settle_s=0.0,
                 prefill_sample_s=0.3, prefill_window=10, prefill_min_samples=3)
    for request in requests:
        eng.add(request)
    results, weights = [], set()
    for now in range(1, 70):
        results += eng.advance(float(now))
        weights.add(eng.totals().gpus[0].prefill_weight)
    assert len(weights - {None}) > 3
    gpu = eng.totals().gpus[0]
    assert gpu.gpu_static_j + gpu.gpu_dynamic_j + gpu.unattributed_j == pytest.approx(
        energy, rel=1e-12)
    assert sum(r.gpu_j for r in results) == pytest.approx(gpu.gpu_static_j + gpu.gpu_dynamic_j,
                                                          rel=1e-12)
    assert len(results) == len(requests)


# --- property-based: random timelines, random requests ------------------------------------

TICK = 0.125
"""Times are multiples of an exact binary fraction, offset like a real monotonic clock."""


@st.composite
def timelines_st(draw: st.DrawFn, base: float) -> list[EnergyPoint]:
    ticks = sorted(draw(st.sets(st.integers(0, 120), min_size=2, max_size=25)))
    points, energy = [], 0.0
    for i, tick in enumerate(ticks):
        gap = i > 0 and draw(st.integers(0, 5)) == 0
        if not gap:
            energy += draw(st.one_of(st.just(0.0), st.floats(0.001, 1000.0)))
        points.append(EnergyPoint(base + tick * TICK, energy, gap=gap))
    return points


@st.composite
def requests_st(draw: st.DrawFn, base: float, gpus: int, policy: Policy) -> list[Request]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        start = draw(st.integers(-10, 125))
        end = start + draw(st.integers(0, 60))
        subset = draw(st.sets(st.integers(0, gpus - 1), min_size=1))
        tokens: dict[str, object] = {}
        if policy == "tokens" and draw(st.booleans()):
            tokens = {"prompt_tokens": draw(st.integers(1, 5000)),
                      "completion_tokens": draw(st.integers(1, 5000))}
            if draw(st.booleans()):
                tokens["first_token"] = base + draw(st.integers(start, end)) * TICK
        out.append(Request(id=f"r{i}", model="m", source="test", gpus=tuple(sorted(subset)),
                           start=base + start * TICK, end=base + end * TICK, **tokens))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    base = draw(st.sampled_from([0.0, 1_000_000.0]))
    gpus = draw(st.integers(1, 3))
    policy: Policy = draw(st.sampled_from(["equal", "tokens"]))
    return {
        "base": base,
        "policy": policy,
        "gpu_points": [draw(timelines_st(base)) for _ in range(gpus)],
        "host_points": draw(st.one_of(st.none(), timelines_st(base))),
        "requests": draw(requests_st(base, gpus, policy)),
        "idle": {g: draw(st.floats(0.0, 2000.0)) for g in range(gpus) if draw(st.booleans())},
        "prefill_weight": draw(st.sampled_from([0.25, 1.0, 3.0, "auto"])),
    }


def measured(points: Sequence[EnergyPoint]) -> float:
    return sum(b.energy_j - a.energy_j for a, b in itertools.pairwise(points)
               if not b.gap)


def overlaps_measured_energy(points: Sequence[EnergyPoint], request: Request,
                             idle_w: float = 0.0, lane: Sequence[Request] = ()) -> bool:
    """Whether the request overlaps an interval with energy to share: above the idle energy
    of the stretches of it when none of the lane's requests ran."""
    assert request.end is not None
    return any(
        not b.gap and b.energy_j - a.energy_j > idle_w * empty_s(a.time, b.time, lane)
        and max(a.time, request.start) < min(b.time, request.end)
        for a, b in itertools.pairwise(points)
    )


def empty_s(t0: float, t1: float, requests: Sequence[Request]) -> float:
    busy, reach = 0.0, t0
    for r in sorted(requests, key=lambda r: r.start):
        assert r.end is not None
        start, end = max(r.start, reach), min(r.end, t1)
        if end > start:
            busy += end - start
            reach = end
    return (t1 - t0) - busy


def build(scenario: dict, *, fill: bool = True) -> tuple[AttributionEngine, list[Timeline],
                                                          Timeline | None]:
    lines = [Timeline(10_000) for _ in scenario["gpu_points"]]
    host = None if scenario["host_points"] is None else Timeline(10_000)
    if fill:
        for line, points in zip(lines, scenario["gpu_points"], strict=True):
            for point in points:
                line.append(point)
        for point in scenario["host_points"] or ():
            host.append(point)
    eng = AttributionEngine(
        dict(enumerate(lines)), host, policy=scenario["policy"],
        prefill_weight=scenario["prefill_weight"], idle_power_w=scenario["idle"],
        pue=1.5, settle_s=1.0, max_age_s=100.0, idle_sample_s=0.5,
        prefill_sample_s=0.25, prefill_window=8, prefill_min_samples=3,  # weights that move
    )
    return eng, lines, host


def check_conservation(eng: AttributionEngine, scenario: dict,
                       results: Sequence[RequestEnergy]) -> None:
    totals = eng.totals()
    assert totals.pending_requests == 0
    for gpu, points in enumerate(scenario["gpu_points"]):
        t = totals.gpus[gpu]
        assert math.isclose(t.gpu_dynamic_j + t.gpu_static_j + t.unattributed_j,
                             measured(points), rel_tol=1e-9, abs_tol=1e-9)
        assert min(t.gpu_dynamic_j, t.gpu_static_j, t.unattributed_j) >= 0
    attributed = sum(t.gpu_dynamic_j + t.gpu_static_j for t in totals.gpus.values())
    assert math.isclose(sum(r.gpu_j for r in results), attributed, rel_tol=1e-9, abs_tol=1e-9)
    if scenario["host_points"] is not None:
        assert totals.host is not None
        assert math.isclose(totals.host.attributed_j + totals.host.unattributed_j,
                            measured(scenario["host_points"]), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(sum(r.host_j for r in results), totals.host.attributed_j,
                            rel_tol=1e-9, abs_tol=1e-9)
    for r in results:
        assert min(r.gpu_dynamic_j, r.gpu_static_j, r.host_j, r.facility_j) >= 0
        assert r.facility_j == pytest.approx(r.it_j * 0.5)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_property_conservation_and_fair_shares(scenario: dict) -> None:
    eng, _, _ = build(scenario)
    for request in scenario["requests"]:
        eng.add(request)
    results = eng.advance(scenario["base"] + 1_000.0)
    assert sorted(r.request.id for r in results) == sorted(r.id for r in scenario["requests"])
    check_conservation(eng, scenario, results)
    for r in results:
        # Where a GPU's idle power is learned, the test cannot know its value at each
        # interval: such a request may get nothing only where a 0 W baseline gives it some.
        exact = all(g in scenario["idle"] for g in r.request.gpus)
        shares = [overlaps_measured_energy(
            scenario["gpu_points"][g], r.request, scenario["idle"].get(g, 0.0),
            [q for q in scenario["requests"] if g in q.gpus]) for g in r.request.gpus]
        if scenario["host_points"] is not None:
            shares.append(overlaps_measured_energy(scenario["host_points"], r.request))
        assert (r.it_j > 0) == any(shares) if exact else (r.it_j > 0) <= any(shares)
        assert not r.late


@settings(max_examples=120, deadline=None)
@given(scenarios(), st.data())
def test_property_conservation_with_live_traffic(scenario: dict, data: st.DataObject) -> None:
    """Points arrive over time; requests are reported open or complete, on time or late."""
    eng, lines, host = build(scenario, fill=False)
    base = scenario["base"]
    arrivals: list[tuple[float, int, object]] = []
    for i, request in enumerate(scenario["requests"]):
        if data.draw(st.booleans()):
            arrivals.append((request.start, i, ("open", request)))
            arrivals.append((request.end, i, ("end", request)))
        else:
            delay = data.draw(st.sampled_from([0.0, 0.5, 3.0]))
            arrivals.append((request.end + delay, i, ("complete", request)))
    feeds = [(p.time, g, p) for g, pts in enumerate(scenario["gpu_points"]) for p in pts]
    feeds += [(p.time, -1, p) for p in scenario["host_points"] or ()]
    steps = sorted({t for t, _, _ in arrivals} | {t for t, _, _ in feeds})
    arrivals.sort(key=lambda a: (a[0], a[1], a[2][0] != "open"))
    feeds.sort(key=lambda f: f[0])
    results: list[RequestEnergy] = []
    for now in steps:
        while feeds and feeds[0][0] <= now:
            _, gpu, point = feeds.pop(0)
            (host if gpu < 0 else lines[gpu]).append(point)
        while arrivals and arrivals[0][0] <= now:
            _, _, (kind, request) = arrivals.pop(0)
            if kind == "end":
                assert eng.end(request.id, request.end, first_token=request.first_token,
                               prompt_tokens=request.prompt_tokens,
                               completion_tokens=request.completion_tokens)
            else:
                eng.add(_opened(request) if kind == "open" else request)
        results += eng.advance(now)
    results += eng.advance(base + 10_000.0)
    assert sorted(r.request.id for r in results) == sorted(r.id for r in scenario["requests"])
    check_conservation(eng, scenario, results)
    assert eng.totals().late_requests == sum(r.late for r in results)


def _opened(request: Request) -> Request:
    """The request as its start event reports it: no end, no counts yet."""
    return Request(id=request.id, model=request.model, source=request.source,
                   gpus=request.gpus, start=request.start)


# --- queue-aware intervals ------------------------------------------------------------


def test_the_costs_of_a_token_alone_are_measured_on_requests_running_alone() -> None:
    """Samples of one request at a time teach the alone costs; samples of four at a time,
    whose tokens cost less (a batch shares the board), teach the overall weight only."""
    rng = random.Random(11)
    learn = learner()
    for energy, prompt, completion, busy in work(rng, a=0.05, b=1.0, count=60):
        learn.observe(energy, prompt, completion, busy, 1.0, request_s=busy)
    assert learn.alone_costs_j == (pytest.approx(0.05), pytest.approx(1.0))
    for energy, prompt, completion, busy in work(rng, a=0.05, b=0.25, count=3000):
        learn.observe(energy, prompt, completion, busy, 1.0, request_s=4 * busy)
    assert learn.alone_costs_j == (pytest.approx(0.05), pytest.approx(1.0)), "held"
    assert learn.value == pytest.approx(0.2, rel=0.05), "the weight follows the batch"


def queue_aware_engine(watts: float, *requests: Request) -> dict[str, RequestEnergy]:
    """One GPU at `watts` for 10 s (idle 100 W, 1 s intervals), whose prompt token costs
    1 J alone and completion token 10 J, taught to its learner."""
    eng = engine({0: steady(watts, 10.0)}, policy="tokens", idle_power_w={0: 100.0},
                 settle_s=0.0)
    learner_of_gpu = eng._gpus[0].weight_learner
    assert learner_of_gpu is not None
    learner_of_gpu.value, learner_of_gpu.alone_costs_j = 0.1, (1.0, 10.0)
    return run(eng, *requests)


def prefill_beside_decode(prompt: int, completion: int, *, aware: bool = True
                          ) -> tuple[Request, Request]:
    """Over [0, 10): one request's prefill of `prompt` tokens in [0, 5) (then nothing),
    beside one that decodes `completion` tokens throughout."""
    return (req("prefill", 0.0, 10.0, first_token=5.0, prompt_tokens=prompt,
                completion_tokens=0, scheduled=0.0 if aware else None),
            req("decode", 0.0, 10.0, first_token=0.0, prompt_tokens=0,
                completion_tokens=completion, scheduled=0.0))


def test_a_queue_aware_interval_gives_prompt_tokens_their_cost_and_idle_by_presence() -> None:
    """1,000 W: 900 J of dynamic energy a second, more than the second's tokens cost alone
    (200 prompt tokens, 1 J each; 15 completion tokens, 10 J each). The prompt tokens get
    their cost, the completion tokens the rest; the idle baseline goes by presence."""
    out = queue_aware_engine(1000.0, *prefill_beside_decode(1000, 150))
    assert out["prefill"].gpu_dynamic_j == pytest.approx(1000.0)
    assert out["decode"].gpu_dynamic_j == pytest.approx(8000.0)
    assert out["prefill"].gpu_static_j == pytest.approx(500.0)
    assert out["decode"].gpu_static_j == pytest.approx(500.0)
    assert [(out[r].split, out[r].prefill_weight) for r in ("prefill", "decode")] == [
        ("queue-aware", 0.1)] * 2, "the record says which split its GPU used"


def test_a_saturated_board_scales_the_prompt_cost_down() -> None:
    """400 W: 300 J of dynamic energy a second for work that costs 900 J alone (600
    prompt tokens, 30 completion tokens): a third of their cost for the prompt tokens."""
    out = queue_aware_engine(400.0, *prefill_beside_decode(3000, 300))
    assert out["prefill"].gpu_dynamic_j == pytest.approx(5 * 200.0)
    assert out["decode"].gpu_dynamic_j == pytest.approx(5 * 100.0 + 5 * 300.0)


def test_a_request_whose_queue_time_is_unknown_keeps_the_weighted_split() -> None:
    """Without `scheduled` for one of them, each second is split by the weight (0.1):
    20 weighted prompt tokens against 15 completion tokens, static and dynamic alike."""
    out = queue_aware_engine(1000.0, *prefill_beside_decode(1000, 150, aware=False))
    assert (out["prefill"].split, out["decode"].split) == ("weighted", "queue-aware")
    assert out["prefill"].gpu_j == pytest.approx(5 * 1000.0 * 20 / 35)
    assert out["decode"].gpu_j == pytest.approx(5 * 1000.0 * 15 / 35 + 5 * 1000.0)


def test_the_record_says_a_split_by_time_and_one_as_an_average_request() -> None:
    equal = run(engine({0: steady(100.0, 10.0)}), req("a", 0.0, 5.0))
    assert (equal["a"].split, equal["a"].prefill_weight) == ("time", None)
    weighted = engine({0: steady(100.0, 10.0)}, policy="tokens", prefill_weight=0.02)
    out = run(weighted, req("known", 0.0, 5.0, prompt_tokens=10, completion_tokens=5),
              req("unknown", 0.0, 5.0))
    assert (out["known"].split, out["unknown"].split) == ("weighted", "counts-unknown")
    assert out["known"].prefill_weight == 0.02
