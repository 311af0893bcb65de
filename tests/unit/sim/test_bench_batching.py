"""bench/batching.py, the continuous-batching simulator of the accuracy benchmark: its books
balance, its scheduler keeps its rules, and the real source integrates its power exactly."""

from __future__ import annotations

import random
import sys
from dataclasses import replace

import pytest
from scripted import ROOT

from agent.sim.gpus import MODELS, SimulatedGpuSource

sys.path.insert(0, str(ROOT / "bench"))
from batching import (
    COSTS,
    MAX_BATCH,
    POWER_CAP_W,
    BatchingLoad,
    BatchingServer,
)

GPUS = [replace(MODELS["H100"], idle_w=80.0), replace(MODELS["H100"], idle_w=75.0)]


def _load(concurrency: int, seconds: float = 20.0, seed: str = "t") -> BatchingLoad:
    load = BatchingLoad(GPUS, ["small-8b", "large-70b"])
    load.serve(concurrency, 1.0, seconds, seed)
    return load


class _Fixed(random.Random):
    """Median lengths (400 prompt, 180 completion tokens), no spread, one request only."""

    def uniform(self, a: float, b: float) -> float:
        return a

    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        return 0.0

    def expovariate(self, lambd: float = 1.0) -> float:
        return 1e6


def test_a_lone_request_gets_every_joule_of_its_steps_and_the_step_times_of_the_model() -> None:
    server = BatchingServer(0, GPUS[0], COSTS["small-8b"])
    (done,), stats = server.serve(1, 2.0, 1.0, _Fixed(), "r")
    request = done.trace
    cost = COSTS["small-8b"]
    assert (request.prompt_tokens, request.completion_tokens) == (400, 180)
    assert request.start == 2.0 and request.arrival is None
    prefill_ms = round(cost.duration_s(400, 0, 0) * 1000)
    assert request.first_token == pytest.approx(2.0 + prefill_ms / 1000)
    assert stats.steps == 180  # one prefill step, then 179 decode steps
    decode_ms = sum(round(cost.duration_s(0, 1, 400 + k) * 1000) for k in range(1, 180))
    assert request.end == pytest.approx(request.first_token + decode_ms / 1000)
    assert done.prefill_j == pytest.approx(400 * cost.prefill_j)
    assert done.static_j == pytest.approx(80.0 * (request.end - request.start))
    load = BatchingLoad(GPUS[:1], ["small-8b"])
    load.servers[0] = server
    assert done.truth_j == pytest.approx(load.energy_j(0, request.start, request.end),
                                         rel=1e-12)


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_truth_plus_idle_with_nothing_running_is_the_boards_energy(concurrency: int) -> None:
    load = _load(concurrency)
    end = max(server.free_ms for server in load.servers) / 1000 + 0.5
    for index in range(len(GPUS)):
        exact = load.energy_j(index, 0.0, end)
        assert load.accounted_j(index, end) == pytest.approx(exact, rel=1e-12)


def test_the_real_source_integrates_the_power_exactly() -> None:
    load = _load(32, seconds=5.0)
    clock = [0.0]
    source = SimulatedGpuSource(GPUS, load, clock=lambda: clock[0])
    end = max(server.free_ms for server in load.servers) / 1000 + 0.25
    for index in range(len(GPUS)):
        assert source.true_energy_j(index, end) == pytest.approx(
            load.accounted_j(index, end), rel=1e-12)


def test_the_scheduler_keeps_its_rules() -> None:
    load = _load(32)
    for server in load.servers:
        requests = [r.trace for r in server.requests]
        assert len(requests) > 50
        for r in requests:
            assert r.arrived <= r.start < r.first_token <= r.end
            assert r.end - r.first_token >= (r.completion_tokens - 1) / 1000
        # First come, first served: requests leave the queue in order of arrival.
        by_arrival = sorted(requests, key=lambda r: (r.arrived, r.id))
        starts = [r.start for r in by_arrival]
        assert starts == sorted(starts)
        # Never more than max_batch sequences in a step.
        changes = sorted([(r.start, 1) for r in requests] + [(r.end, -1) for r in requests])
        running = peak = 0
        for _, delta in changes:
            running += delta
            peak = max(peak, running)
        assert peak == MAX_BATCH
        assert sum(r.arrival is not None for r in requests) > len(requests) // 2
        assert max(server.pieces.power_w) <= POWER_CAP_W + 1e-9
        assert min(server.pieces.power_w) == server.gpu.idle_w


def test_it_is_deterministic_for_a_seed_and_differs_between_seeds() -> None:
    def run(seed: str) -> list[tuple[object, ...]]:
        load = _load(8, seconds=5.0, seed=seed)
        return [(r.trace, r.truth_j) for s in load.servers for r in s.requests]

    assert run("a") == run("a")
    assert run("a") != run("b")


def test_a_phase_may_not_start_while_the_board_is_busy() -> None:
    load = _load(8, seconds=5.0)
    with pytest.raises(ValueError, match="busy"):
        load.serve(1, 2.0, 1.0, "again")
