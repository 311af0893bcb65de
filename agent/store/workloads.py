"""The workload view's records summed per period: every GPU joule of the period's stretches,
to a workload group or unattributed (schema version 7, `agent.store.schema`).

A stretch is one workload on one GPU (`agent.attribution.workloads.WorkloadRecord`); it
counts in a period when it ended in it, as windows do, so a period's figures are those of
the stretches that closed in it (stretches close at least every `workloads.record_period`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.attribution.workloads import UNATTRIBUTED
from agent.store.schema import WORKLOADS_VERSION, version

GROUPINGS: tuple[str, ...] = ("workload", "namespace", "pod", "kind", "gpu")
"""What `report --workloads --by` groups stretches by: a column of `workloads`."""


@dataclass(frozen=True, slots=True)
class WorkloadGroup:
    """The stretches of one group (a workload, a namespace, ...) over the period."""

    key: str
    """The group's value: the workload's name, the namespace ('' off Kubernetes), ..."""
    kinds: tuple[str, ...]
    """The kinds of workload in it (`agent.workloads.naming.Kind`: pod, container, unit,
    process)."""
    energy_j: float
    gpu_seconds: float
    peak_w: float
    """The highest power of any one of its workloads on one GPU."""
    inference: bool
    """Whether any of its workloads served inference (it held a GPU alone, or was its only
    busy workload, while requests ran)."""
    stretches: int

    @property
    def mean_w(self) -> float | None:
        return self.energy_j / self.gpu_seconds if self.gpu_seconds > 0 else None


@dataclass(frozen=True, slots=True)
class StoredWorkloads:
    """The period's stretches grouped `by`: Σ groups + unattributed = measured."""

    by: str
    groups: tuple[WorkloadGroup, ...]
    """Most energy first."""
    measured_j: float
    """All GPU energy of the period's stretches, unattributed included."""
    unattributed_j: float
    """The GPU energy no workload received (no process was seen on the GPU)."""
    start: float | None
    """UTC epoch seconds of the earliest stretch's start; None without stretches."""
    end: float | None
    simulated: bool
    inference_j: float = 0.0
    """The energy of the workloads that served inference in the period (whatever `by`)."""
    serving_alone_j: float = 0.0
    """Of `inference_j`, the energy while each had its GPU to itself (allocated to it, or
    alone on it): there the two views split the same energy, so it compares with its
    requests'."""
    requests_j: float = 0.0
    """What the per-request view gave requests in those intervals."""

    @property
    def overhead_j(self) -> float:
        """The inference servers' idle and overhead where they had their GPUs to themselves:
        their energy there beyond their requests'."""
        return self.serving_alone_j - self.requests_j

    @property
    def other_j(self) -> float:
        """The energy of the workloads that served none: training, batch, notebooks, ..."""
        return self.measured_j - self.unattributed_j - self.inference_j


_SELECT_GROUPS = """
SELECT {column}, group_concat(DISTINCT kind), sum(energy_j), sum(gpu_seconds), max(peak_w),
       max(inference), count(*)
FROM workloads WHERE kind != ?1 AND (?2 IS NULL OR end_time >= ?2)
GROUP BY {column} ORDER BY sum(energy_j) DESC, {column}
"""
_SELECT_TOTALS = """
WITH period AS (SELECT * FROM workloads WHERE ?2 IS NULL OR end_time >= ?2),
     serving AS (SELECT DISTINCT workload FROM period WHERE inference = 1 AND kind != ?1)
SELECT total(energy_j), total(CASE WHEN kind = ?1 THEN energy_j ELSE 0 END), min(start_time),
       max(end_time), max(simulated),
       total(CASE WHEN workload IN serving THEN energy_j ELSE 0 END),
       total(CASE WHEN workload IN serving THEN alone_j ELSE 0 END),
       total(CASE WHEN workload IN serving THEN requests_j ELSE 0 END)
FROM period
"""


def read_workloads(connection: sqlite3.Connection, since: float | None, by: str
                   ) -> StoredWorkloads:
    """Sums over the stretches that ended at or after `since` (UTC epoch seconds), in one
    snapshot of the file; none from a file older than version 7. Raises ValueError for a
    grouping not in `GROUPINGS`."""
    if by not in GROUPINGS:
        raise ValueError(f"--by: expected one of {', '.join(GROUPINGS)}, got {by!r}")
    connection.execute("BEGIN")  # one read transaction: the groups and totals agree
    if version(connection) < WORKLOADS_VERSION:
        return StoredWorkloads(by, (), 0.0, 0.0, None, None, False)
    params = (UNATTRIBUTED.kind, since)
    groups = tuple(
        WorkloadGroup(str(key), tuple(sorted(str(kinds).split(","))), energy, seconds, peak,
                      bool(inference), count)
        for key, kinds, energy, seconds, peak, inference, count
        in connection.execute(_SELECT_GROUPS.format(column=by), params)
    )
    measured, unattributed, start, end, simulated, *serving = connection.execute(
        _SELECT_TOTALS, params).fetchone()
    return StoredWorkloads(by, groups, measured, unattributed, start, end, bool(simulated),
                           *serving)
