"""The simulated inference load: exact ground truth, phases, batching, live use, traces."""

from __future__ import annotations

import math
import threading

import pytest
from scripted import FakeClock

from agent.attribution import AttributionEngine
from agent.requests import Request
from agent.sampler import Sampler
from agent.sim.gpus import MODELS, SimulatedGpuSource
from agent.sim.load import PROFILES, RequestLoad, TraceRequest, synthetic_trace

H100 = MODELS["H100"]
HEADROOM = H100.tdp_w - H100.idle_w
SMALL = PROFILES["small-8b"]




def dynamic(nominal_w: float) -> float:
    """The batching curve, written out independently of the module."""
    return HEADROOM * (1 - math.exp(-nominal_w / HEADROOM))


def traced(rid: str, start: float, first: float, end: float, gpu: int = 0) -> TraceRequest:
    return TraceRequest(rid, "small-8b", gpu, start, first, end, 100, 50)


def idle_time(trace: list[TraceRequest], gpu: int, until: float) -> float:
    """Seconds of [0, until] with no request of `trace` running on `gpu`."""
    busy, reach = 0.0, 0.0
    for r in sorted((r for r in trace if r.gpu == gpu), key=lambda r: r.start):
        start, end = max(r.start, reach), min(r.end, until)
        if end > start:
            busy += end - start
        reach = max(reach, r.end)
    return until - busy


def in_flight(trace: list[TraceRequest], gpu: int, t0: float, t1: float) -> float:
    return sum(max(0.0, min(r.end, t1) - max(r.start, t0)) for r in trace if r.gpu == gpu) / (
        t1 - t0)


# --- ground truth --------------------------------------------------------------------------


def test_truth_sums_to_board_energy_minus_idle_with_no_request_running() -> None:
    trace = synthetic_trace(2, concurrency=4, duration_s=20.0, start=1.0, seed=3)
    load = RequestLoad([H100, H100])
    load.schedule(trace)
    source = SimulatedGpuSource([H100, H100], load, clock=FakeClock(0.0))
    until = max(r.end for r in trace) + 1.0
    for gpu in range(2):
        truths = sum(load.truth_j(r.id) for r in trace if r.gpu == gpu)
        # The source integrates the load numerically on its own grid: an independent check.
        board = source.true_energy_j(gpu, until)
        assert truths == pytest.approx(board - H100.idle_w * idle_time(trace, gpu, until),
                                       rel=1e-9)
        assert load.energy_j(gpu, 0.0, until) == pytest.approx(board, rel=1e-9)


def test_phases_draw_their_profile_power() -> None:
    load = RequestLoad([H100])
    load.schedule([traced("a", 1.0, 1.5, 4.0)])
    prefill, decode = SMALL.prefill_fraction * HEADROOM, SMALL.decode_fraction * HEADROOM
    assert load.power_w(0, 0.5) == H100.idle_w
    assert load.power_w(0, 1.2) == pytest.approx(H100.idle_w + dynamic(prefill))
    assert load.power_w(0, 3.0) == pytest.approx(H100.idle_w + dynamic(decode))
    assert load.power_w(0, 4.5) == H100.idle_w
    assert prefill > decode
    dyn, static = load.truth_parts_j("a")
    assert dyn == pytest.approx(dynamic(prefill) * 0.5 + dynamic(decode) * 2.5)
    assert static == pytest.approx(H100.idle_w * 3.0)
    assert load.truth_j("a") == pytest.approx(dyn + static)


def test_a_larger_model_draws_more_in_both_phases() -> None:
    large = PROFILES["large-70b"]
    assert large.prefill_fraction > SMALL.prefill_fraction
    assert large.decode_fraction > SMALL.decode_fraction
    assert large.decode_tokens_per_s < SMALL.decode_tokens_per_s


def test_batched_requests_share_the_saturated_power_and_split_idle_equally() -> None:
    load = RequestLoad([H100])
    # a: decode over [0, 4); b: decode over [2, 6) (first tokens at their starts).
    load.schedule([traced("a", 0.0, 0.0, 4.0), traced("b", 2.0, 2.0, 6.0)])
    one = SMALL.decode_fraction * HEADROOM
    assert load.power_w(0, 3.0) == pytest.approx(H100.idle_w + dynamic(2 * one))
    assert dynamic(2 * one) < 2 * dynamic(one)  # sublinear, as batching is
    for rid in ("a", "b"):
        dyn, static = load.truth_parts_j(rid)
        assert dyn == pytest.approx(2 * dynamic(one) + 2 * dynamic(2 * one) / 2)
        assert static == pytest.approx(2 * H100.idle_w + 2 * H100.idle_w / 2)


def test_board_power_never_exceeds_tdp() -> None:
    load = RequestLoad([H100])
    load.schedule([traced(f"r{i}", 0.0, 0.5, 2.0) for i in range(200)])
    assert H100.tdp_w * 0.99 < load.power_w(0, 0.2) <= H100.tdp_w
    assert load.power_w(0, 1.0) <= H100.tdp_w


def test_unfinished_and_unknown_requests_have_no_truth() -> None:
    load = RequestLoad([H100])
    load.begin("a", 0, "small-8b", 1.0)
    with pytest.raises(ValueError, match="not finished"):
        load.truth_j("a")
    with pytest.raises(KeyError):
        load.truth_j("nope")


# --- scheduling and live use ---------------------------------------------------------------


def test_live_events_give_the_same_truth_as_a_schedule() -> None:
    scheduled, live = RequestLoad([H100]), RequestLoad([H100])
    scheduled.schedule([traced("a", 1.0, 1.2, 3.0), traced("b", 2.0, 2.5, 5.0)])
    assert live.begin("a", 0, "small-8b", 1.0) == 1.0
    live.first_token("a", 1.2)
    live.begin("b", 0, "small-8b", 2.0)
    live.first_token("b", 2.5)
    live.finish("a", 3.0)
    live.finish("b", 5.0)
    for rid in ("a", "b"):
        assert live.truth_j(rid) == pytest.approx(scheduled.truth_j(rid), rel=1e-12)


def test_what_was_read_never_changes() -> None:
    load = RequestLoad([H100, H100])
    assert load.power_w(0, 10.0) == H100.idle_w
    # A live event that arrives late takes effect when the board was last read...
    assert load.begin("late", 0, "small-8b", 8.0) == 10.0
    assert load.power_w(0, 9.0) == H100.idle_w
    assert load.power_w(0, 10.0) > H100.idle_w
    # ... other boards are unaffected, and a schedule may not rewrite the past.
    assert load.begin("other", 1, "small-8b", 8.0) == 8.0
    with pytest.raises(ValueError, match="past cannot change"):
        load.schedule([traced("x", 9.0, 9.5, 12.0)])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda load: load.begin("a", 0, "small-8b", 0.0), "already exists"),
        (lambda load: load.begin("b", 5, "small-8b", 0.0), "no GPU 5"),
        (lambda load: load.begin("b", 0, "huge-1t", 0.0), "unknown model"),
        (lambda load: load.finish("nope", 1.0), "no request"),
        (lambda load: load.schedule([traced("c", 2.0, 1.0, 3.0)]), "out of order"),
    ],
)
def test_bad_calls_are_rejected(call, match: str) -> None:
    load = RequestLoad([H100])
    load.begin("a", 0, "small-8b", 0.0)
    with pytest.raises(ValueError, match=match):
        call(load)


def test_concurrent_readers_and_a_live_load_generator() -> None:
    """Smoke test: readers on two threads while a third drives requests live."""
    load = RequestLoad([H100])
    clock = [0.0]
    stop = threading.Event()
    failures: list[BaseException] = []
    effective: dict[str, tuple[float, float]] = {}

    def read() -> None:
        try:
            while not stop.is_set():
                assert H100.idle_w <= load.power_w(0, clock[0]) <= H100.tdp_w
        except BaseException as exc:  # surfaced below, on the test's thread
            failures.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for i in range(300):
            rid = f"r{i}"
            clock[0] += 0.01
            start = load.begin(rid, 0, "small-8b", clock[0])
            clock[0] += 0.005
            load.first_token(rid, clock[0])
            if i >= 3:  # keep a few requests running at once
                done = f"r{i - 3}"
                effective[done] = (effective[done][0], load.finish(done, clock[0]))
            effective[rid] = (start, math.inf)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not failures
    for i in range(297, 300):
        rid = f"r{i}"
        effective[rid] = (effective[rid][0], load.finish(rid, clock[0] + 0.01))
    until = clock[0] + 1.0
    trace = [TraceRequest(rid, "small-8b", 0, s, s, e, 0, 0) for rid, (s, e) in effective.items()]
    total = sum(load.truth_j(rid) for rid in effective)
    assert total == pytest.approx(
        load.energy_j(0, 0.0, until) - H100.idle_w * idle_time(trace, 0, until), rel=1e-9)


# --- synthetic traces ----------------------------------------------------------------------


def test_synthetic_trace_is_deterministic_for_a_seed() -> None:
    one = synthetic_trace(2, concurrency=4, duration_s=30.0, seed=7)
    assert one == synthetic_trace(2, concurrency=4, duration_s=30.0, seed=7)
    assert one != synthetic_trace(2, concurrency=4, duration_s=30.0, seed=8)


def test_synthetic_trace_shape() -> None:
    trace = synthetic_trace(2, concurrency=4, duration_s=60.0, start=5.0, seed=1)
    assert [r.start for r in trace] == sorted(r.start for r in trace)
    assert len({r.id for r in trace}) == len(trace)
    assert {r.model for r in trace if r.gpu == 0} == {"small-8b"}
    assert {r.model for r in trace if r.gpu == 1} == {"large-70b"}
    assert all(5.0 <= r.start < 65.0 and r.start < r.first_token < r.end for r in trace)
    assert all(round(t, 3) == t for r in trace for t in (r.start, r.first_token, r.end))
    assert len({r.prompt_tokens for r in trace}) > 20  # heterogeneous lengths
    assert len({r.completion_tokens for r in trace}) > 20
    request = trace[0].to_request()
    assert (request.gpus, request.start, request.end, request.first_token) == (
        (trace[0].gpu,), trace[0].start, trace[0].end, trace[0].first_token)
    assert request.prompt_tokens == trace[0].prompt_tokens


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_synthetic_trace_runs_about_the_target_concurrency(concurrency: int) -> None:
    trace = synthetic_trace(2, concurrency=concurrency, duration_s=200.0, seed=2)
    for gpu in range(2):
        # Away from the ramp up and the tail: the clients' pauses keep it a little below.
        mean = in_flight(trace, gpu, 40.0, 200.0)
        assert 0.8 * concurrency <= mean <= 1.02 * concurrency


# --- end to end ----------------------------------------------------------------------------


def test_tokens_policy_matches_the_truth_at_concurrency_one() -> None:
    """The real sampler and engine, on a simulated clock, against the load's truth."""
    trace = synthetic_trace(1, concurrency=1, duration_s=20.0, start=5.0, seed=4)
    load = RequestLoad([H100])
    load.schedule(trace)
    clock = FakeClock(0.0)
    source = SimulatedGpuSource([H100], load, clock=clock)
    sampler = Sampler(source, interval_s=0.1)
    engine = AttributionEngine(sampler.timelines, policy="tokens")
    for r in trace:
        engine.add(Request(id=r.id, model=r.model, source="test", gpus=(0,), start=r.start))
    attributed: dict[str, float] = {}
    tick, ended = 0, 0
    end = max(r.end for r in trace) + engine.settle_s + 0.5
    while clock.now <= end:
        # Reads 17 ms off the counter's refresh grid, as an unsynchronised sampler's are.
        clock.now = 0.017 + 0.1 * tick
        while ended < len(trace) and trace[ended].end <= clock.now:
            r = trace[ended]
            engine.end(r.id, r.end, first_token=r.first_token, prompt_tokens=r.prompt_tokens,
                       completion_tokens=r.completion_tokens)
            ended += 1
        sampler.sample_all()
        attributed.update((e.request.id, e.gpu_j) for e in engine.advance(clock.now))
        tick += 1
    assert set(attributed) == {r.id for r in trace}
    errors = sorted(abs(attributed[r.id] / load.truth_j(r.id) - 1) for r in trace)
    assert len(errors) >= 8
    assert errors[len(errors) // 2] < 0.05  # the median
    assert errors[-1] < 0.25  # even the shortest request
    total = sum(attributed.values())
    assert total == pytest.approx(sum(load.truth_j(r.id) for r in trace), rel=0.05)


def test_a_bounded_batch_queues_requests_first_come_first_served() -> None:
    trace = synthetic_trace(2, concurrency=12, duration_s=30.0, start=1.0, seed=5, max_batch=4)
    queued = [r for r in trace if r.arrival is not None]
    assert queued and all(r.arrival < r.start for r in queued)
    for gpu in (0, 1):
        board = [r for r in trace if r.gpu == gpu]
        # Never more than 4 running at once: at every start, count those still running.
        for r in board:
            assert sum(1 for o in board if o.start <= r.start < o.end) <= 4
        # First come, first served: starts in the order of arrival.
        by_arrival = sorted(board, key=lambda r: (r.arrived, r.id))
        assert [r.start for r in by_arrival] == sorted(r.start for r in by_arrival)
    unbounded = synthetic_trace(2, concurrency=12, duration_s=30.0, start=1.0, seed=5)
    assert all(r.arrival is None for r in unbounded)
