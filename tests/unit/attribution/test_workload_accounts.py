"""The workload view of a GPU's intervals: who gets each joule, conserved."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted import ScriptedOccupancies

from agent.attribution.workloads import OTHER, UNATTRIBUTED, WorkloadAccounts
from agent.workloads.naming import WorkloadName, pod_container

SERVER = pod_container("ml", "vllm-0", "vllm")
TRAINER = pod_container("research", "train-7", "trainer")
NOTEBOOK = WorkloadName("process:python", "process")




def by_name(accounts: WorkloadAccounts, gpu: int) -> dict[WorkloadName, float]:
    return {name: joules for (name, index), joules in accounts.totals().energy_j.items()
            if index == gpu}


def test_a_gpu_held_by_one_container_gives_it_every_joule() -> None:
    script = ScriptedOccupancies()
    script.at(0, 10.0, exclusive=SERVER, present={5: TRAINER}, weights={5: 90})
    accounts = WorkloadAccounts(script)
    accounts.interval(0, 0.0, 1.0, 300.0, 60.0, serving=True)
    accounts.interval(0, 1.0, 2.0, 70.0, 60.0, serving=False)
    assert by_name(accounts, 0) == {SERVER: 370.0}
    assert accounts.totals().unattributed_j[0] == 0.0
    assert accounts.totals().inference == {SERVER}


def test_a_shared_gpu_splits_dynamic_by_sm_and_static_by_presence() -> None:
    script = ScriptedOccupancies()
    script.at(1, 10.0, present={11: SERVER, 12: TRAINER, 13: None},
              weights={11: 30, 12: 60, 13: 10})
    accounts = WorkloadAccounts(script)
    accounts.interval(1, 0.0, 1.0, 360.0, 60.0, serving=False)  # static 60, dynamic 300
    shares = by_name(accounts, 1)
    assert shares[SERVER] == pytest.approx(20.0 + 90.0)
    assert shares[TRAINER] == pytest.approx(20.0 + 180.0)
    assert accounts.totals().unattributed_j[1] == pytest.approx(20.0 + 30.0)
    assert accounts.totals().inference == frozenset()


def test_no_occupancy_yet_leaves_everything_unattributed() -> None:
    accounts = WorkloadAccounts(ScriptedOccupancies())
    accounts.interval(0, 0.0, 0.1, 5.0, None, serving=False)
    assert accounts.totals().unattributed_j == {0: 5.0}
    assert accounts.totals().energy_j == {}


def test_without_an_idle_baseline_idle_energy_of_a_quiet_gpu_stays_unattributed() -> None:
    script = ScriptedOccupancies()
    script.at(0, 10.0, present={11: NOTEBOOK})  # listed, no SM activity
    accounts = WorkloadAccounts(script)
    accounts.interval(0, 0.0, 1.0, 60.0, None, serving=False)
    assert accounts.totals().unattributed_j[0] == 60.0
    assert by_name(accounts, 0) == {NOTEBOOK: 0.0}


def test_the_only_busy_workload_beside_requests_is_marked_inference() -> None:
    script = ScriptedOccupancies()
    script.at(0, 1.0, present={1: SERVER, 2: TRAINER}, weights={1: 50})
    script.at(0, 2.0, present={1: SERVER, 2: TRAINER}, weights={1: 50, 2: 40})
    accounts = WorkloadAccounts(script)
    accounts.interval(0, 1.0, 2.0, 100.0, 50.0, serving=True)  # both busy: marks none
    assert accounts.totals().inference == frozenset()
    accounts.interval(0, 0.0, 1.0, 100.0, 50.0, serving=True)
    assert accounts.totals().inference == {SERVER}


def test_series_past_the_cap_go_to_other_and_a_gone_workload_frees_its_place() -> None:
    script = ScriptedOccupancies()
    names = [WorkloadName(f"process:p{i}", "process") for i in range(4)]
    script.at(0, 1.0, present={1: names[0], 2: names[1]}, weights={1: 1, 2: 1})
    script.at(0, 1000.0, present={3: names[2]}, weights={3: 1})
    script.at(0, 2000.0, present={4: names[3]}, weights={4: 1})
    accounts = WorkloadAccounts(script, max_series=1, gone_after_s=300.0)
    accounts.interval(0, 0.0, 1.0, 10.0, None, serving=False)
    assert by_name(accounts, 0) == {names[0]: 5.0, OTHER: 5.0}
    accounts.interval(0, 999.0, 1000.0, 10.0, None, serving=False)
    assert by_name(accounts, 0) == {names[0]: 5.0, OTHER: 15.0}
    records = accounts.take_records(1250.0)
    assert {record.name for record in records} == {names[0], names[1]}
    accounts.interval(0, 1999.0, 2000.0, 10.0, None, serving=False)
    assert by_name(accounts, 0) == {OTHER: 15.0, names[3]: 10.0}


def test_records_are_stretches_closed_when_gone_by_period_and_at_drain() -> None:
    script = ScriptedOccupancies()
    script.at(0, 1e9, exclusive=SERVER)
    accounts = WorkloadAccounts(script, gone_after_s=60.0, record_period_s=100.0)
    for second in range(150):
        accounts.interval(0, float(second), second + 1.0, 100.0 + second, 50.0,
                          serving=second < 10)
    first, unowned = sorted(accounts.take_records(150.0), key=lambda r: r.name != SERVER)
    assert (unowned.name, unowned.energy_j, unowned.gpu_seconds) == (UNATTRIBUTED, 0.0, 0.0)
    assert (first.name, first.gpu, first.start, first.end) == (SERVER, 0, 0.0, 150.0)
    assert first.energy_j == pytest.approx(sum(100.0 + s for s in range(150)))
    assert first.gpu_seconds == pytest.approx(150.0)
    assert first.peak_w == pytest.approx(249.0)
    assert first.inference
    accounts.interval(0, 150.0, 151.0, 80.0, 50.0, serving=False)
    assert accounts.take_records(151.0) == []
    (last,) = [r for r in accounts.take_records(151.0, final=True) if r.name == SERVER]
    assert (last.start, last.end, last.energy_j, last.inference) == (150.0, 151.0, 80.0, False)


occupancy_strategy = st.builds(
    lambda exclusive, present, weights: (exclusive, present, weights),
    st.one_of(st.none(), st.sampled_from([SERVER, TRAINER])),
    st.dictionaries(st.integers(1, 8), st.one_of(st.none(), st.sampled_from(
        [SERVER, TRAINER, NOTEBOOK])), max_size=6),
    st.dictionaries(st.integers(1, 8), st.floats(0, 100), max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(
        st.floats(1e-3, 5.0),             # interval length
        st.floats(0.0, 5e3),              # energy
        st.one_of(st.none(), st.floats(0.0, 800.0)),  # idle baseline
        occupancy_strategy,
        st.booleans(),
    ), min_size=1, max_size=40),
    cap=st.integers(1, 3),
)
def test_per_gpu_workloads_and_unattributed_sum_to_the_measured_energy(
    steps: list[tuple[float, float, float | None,
                      tuple[WorkloadName | None, dict[int, WorkloadName | None],
                            dict[int, float]], bool]],
    cap: int,
) -> None:
    script = ScriptedOccupancies()
    accounts = WorkloadAccounts(script, max_series=cap)
    t = 0.0
    for seconds, energy, idle, (exclusive, present, weights), serving in steps:
        present = {**{pid: None for pid in weights}, **present}
        script.at(0, t + seconds, exclusive=exclusive, present=present, weights=weights)
        accounts.interval(0, t, t + seconds, energy, idle, serving)
        t += seconds
    totals = accounts.totals()
    measured = math.fsum(step[1] for step in steps)
    owned = math.fsum(by_name(accounts, 0).values())
    assert totals.measured_j[0] == pytest.approx(measured, rel=1e-12, abs=1e-9)
    assert owned + totals.unattributed_j[0] == pytest.approx(measured, rel=1e-9, abs=1e-9)
    assert all(joules >= 0 for joules in by_name(accounts, 0).values())
    records = accounts.take_records(t, final=True)
    assert math.fsum(r.energy_j for r in records if r.name != UNATTRIBUTED) == pytest.approx(
        owned, rel=1e-9, abs=1e-9)
    assert math.fsum(r.energy_j for r in records) == pytest.approx(measured, rel=1e-9, abs=1e-9)
    assert math.fsum(r.gpu_seconds for r in records) <= t * (1 + 1e-9)
