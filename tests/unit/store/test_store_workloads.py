"""The workload stretches in the store: written, summed per group and period, pruned."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from scripted import FIXTURES

from agent.attribution.workloads import UNATTRIBUTED, WorkloadRecord
from agent.store import GROUPINGS, RecordReader, RecordStore
from agent.workloads.naming import WorkloadName, pod_container

OFFSET = 1_750_000_000.0
"""Monotonic time t is UTC epoch OFFSET + t."""
WEB = pod_container("shop", "web-7d9f", "server")
LLM = pod_container("inference", "vllm-0", "vllm")
TRAIN = pod_container("inference", "trainer-0", "torch")
SLURM = WorkloadName("slurmd.service", "unit")


def stretch(name: WorkloadName, gpu: int, start: float, end: float, energy_j: float, *,
            seconds: float | None = None, peak_w: float = 300.0, inference: bool = False,
            alone_j: float = 0.0, requests_j: float = 0.0) -> WorkloadRecord:
    return WorkloadRecord(name, gpu, start, end, energy_j,
                          end - start if seconds is None else seconds, peak_w, inference,
                          alone_j, requests_j)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    opened = RecordStore(tmp_path / "records.db", pue=1.2, simulated=False,
                         wall_offset=OFFSET, flush_interval_s=3600.0, retention_days=None,
                         gpu_models={0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3"})
    yield opened
    opened.close()


def test_stretches_are_stored_whole_and_summed_per_group(store: RecordStore) -> None:
    store.submit_workloads([
        stretch(LLM, 0, 0.0, 100.0, 40_000.0, peak_w=650.0, inference=True, alone_j=40_000.0,
                requests_j=31_000.0),
        stretch(TRAIN, 1, 0.0, 100.0, 30_000.0, seconds=50.0, peak_w=500.0),
        stretch(SLURM, 1, 0.0, 100.0, 10_000.0, seconds=50.0, peak_w=200.0),
        stretch(WEB, 1, 100.0, 160.0, 6_000.0),
        stretch(UNATTRIBUTED, 0, 100.0, 160.0, 4_500.0, seconds=0.0, peak_w=0.0),
    ])
    store.close()
    with closing(sqlite3.connect(store.path)) as connection:
        row = connection.execute(
            "SELECT workload, kind, namespace, pod, container, gpu, gpu_model, start_time, "
            "end_time, energy_j, gpu_seconds, peak_w, inference, alone_j, requests_j, simulated "
            "FROM workloads "
            "WHERE pod = 'vllm-0'").fetchone()
    assert row == (LLM.workload, "pod", "inference", "vllm-0", "vllm", 0,
                   "NVIDIA H100 80GB HBM3", OFFSET, OFFSET + 100.0, 40_000.0, 100.0, 650.0, 1,
                   40_000.0, 31_000.0, 0)

    by_namespace = RecordReader(store.path).workloads(by="namespace")
    assert [(g.key, g.kinds, g.energy_j, g.gpu_seconds, g.peak_w, g.inference, g.stretches)
            for g in by_namespace.groups] == [
        ("inference", ("pod",), 70_000.0, 150.0, 650.0, True, 2),
        ("", ("unit",), 10_000.0, 50.0, 200.0, False, 1),
        ("shop", ("pod",), 6_000.0, 60.0, 300.0, False, 1),
    ]
    assert by_namespace.measured_j == 90_500.0
    assert by_namespace.unattributed_j == 4_500.0
    assert math.isclose(sum(g.energy_j for g in by_namespace.groups)
                        + by_namespace.unattributed_j, by_namespace.measured_j)
    assert (by_namespace.start, by_namespace.end) == (OFFSET, OFFSET + 160.0)
    assert by_namespace.groups[0].mean_w == 70_000.0 / 150.0
    # Inference versus other work, by workload whatever the grouping (the trainer shares
    # the serving pod's namespace); the serving pod had its GPU to itself: its idle and
    # overhead is its energy beyond its requests'.
    assert (by_namespace.inference_j, by_namespace.other_j) == (40_000.0, 46_000.0)
    assert (by_namespace.serving_alone_j, by_namespace.requests_j,
            by_namespace.overhead_j) == (40_000.0, 31_000.0, 9_000.0)

    by_gpu = RecordReader(store.path).workloads(by="gpu")
    assert [(g.key, g.energy_j) for g in by_gpu.groups] == [("1", 46_000.0), ("0", 40_000.0)]
    by_kind = RecordReader(store.path).workloads(by="kind")
    assert [g.key for g in by_kind.groups] == ["pod", "unit"]


def test_a_period_counts_the_stretches_that_ended_in_it(store: RecordStore) -> None:
    store.submit_workloads([stretch(LLM, 0, 0.0, 3600.0, 1e6),
                            stretch(LLM, 0, 3600.0, 7200.0, 2e6),
                            stretch(UNATTRIBUTED, 0, 3600.0, 7200.0, 5e4)])
    store.close()
    recent = RecordReader(store.path).workloads(since=OFFSET + 5000.0)
    assert [(g.key, g.energy_j, g.stretches) for g in recent.groups] == [
        (LLM.workload, 2e6, 1)]
    assert (recent.measured_j, recent.unattributed_j) == (2e6 + 5e4, 5e4)
    empty = RecordReader(store.path).workloads(since=OFFSET + 9000.0)
    assert (empty.groups, empty.measured_j, empty.start) == ((), 0.0, None)


def test_an_unknown_grouping_is_refused_naming_the_choices(store: RecordStore) -> None:
    with pytest.raises(ValueError, match="--by: expected one of workload, namespace"):
        store.workloads(by="pid")
    assert "gpu" in GROUPINGS


def test_a_stretch_that_could_never_be_stored_is_refused_at_submit(store: RecordStore) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        store.submit_workloads([stretch(LLM, 0, 0.0, 1.0, math.nan)])
    store.submit_workloads([stretch(LLM, 0, 0.0, 1.0, 5.0)])
    assert store.stats().pending == 1


def test_stretches_share_the_queue_bound_and_the_retention(tmp_path: Path) -> None:
    day = 86400.0
    path = tmp_path / "records.db"
    store = RecordStore(path, pue=1.2, simulated=True, wall_offset=OFFSET,
                        flush_interval_s=3600.0, retention_days=None, max_pending=2)
    store.submit_workloads([stretch(LLM, 0, 0.0, 10.0, 1.0), stretch(LLM, 0, 7 * day, 9 * day, 2.0),
                            stretch(WEB, 0, 0.0, 1.0, 3.0)])
    assert (store.stats().pending, store.stats().dropped_total) == (2, 1)
    store.close()
    assert RecordReader(path).workloads().simulated
    pruner = RecordStore(path, pue=1.2, simulated=True, wall_offset=OFFSET,
                         retention_days=2, clock=lambda: OFFSET + 10 * day)
    pruner.close()
    assert pruner.stats().pruned_total == 1
    assert [g.energy_j for g in RecordReader(path).workloads().groups] == [2.0]


def test_a_file_older_than_the_workloads_reads_none_and_the_writer_migrates_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "records.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript((FIXTURES / "records_v1.sql").read_text())
    assert RecordReader(path).workloads().groups == ()
    store = RecordStore(path, pue=1.2, simulated=False, wall_offset=OFFSET,
                        retention_days=None)
    store.submit_workloads([stretch(LLM, 0, 0.0, 1.0, 5.0)])
    store.close()
    assert [g.key for g in RecordReader(path).workloads().groups] == [LLM.workload]
