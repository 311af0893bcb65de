"""Reading the store: request records one by one, scrape windows and workload stretches
summed per period.

Each read opens its own read-only connection (`agent.store.schema.open_reader`), which
makes reads safe from any thread and lets `jouleprobe report` read a store it cannot write.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

from agent.requests import BoundaryEnergy, RequestStatus, Split
from agent.store.schema import (
    ADDED_COLUMNS,
    COLUMNS,
    TRACE_SOURCE_VERSION,
    WINDOWS_VERSION,
    RecordStoreError,
    Row,
    check_version,
    open_reader,
    version,
)
from agent.store.workloads import StoredWorkloads, read_workloads
from agent.units import JOULES_PER_WH


def _select(file_version: int) -> str:
    """The records' SELECT for a file of that version: a column it lacks reads as what
    such a file stands for."""
    columns = [
        f"{ADDED_COLUMNS[name][1]} AS {name}"
        if name in ADDED_COLUMNS and file_version < ADDED_COLUMNS[name][0] else name
        for name in COLUMNS
    ]
    return f"SELECT {', '.join(columns)} FROM requests"


_WINDOWS_SINCE = "(?1 IS NULL OR w.end_time >= ?1)"
_SELECT_WINDOW_MODELS = f"""
    SELECT w.source, m.model, count(*), sum(m.requests), sum(m.prompt_tokens),
           sum(m.completion_tokens), sum(m.gpu_dynamic_j), sum(m.gpu_static_j), max(w.simulated)
    FROM windows AS w JOIN window_models AS m ON m.window_id = w.id
    WHERE {_WINDOWS_SINCE} AND (?2 IS NULL OR m.model = ?2)
    GROUP BY w.source, m.model ORDER BY w.source, m.model"""
"""Per (source, model). SQL's sum() is NULL over only NULLs: a quantity no window counted
stays None, apart from a counted 0."""
_SELECT_WINDOW_SOURCES = f"""
    SELECT w.source, count(*), sum(w.measured_j), sum(w.unattributed_j), max(w.simulated)
    FROM windows AS w
    WHERE {_WINDOWS_SINCE} AND (?2 IS NULL OR w.source IN (
        SELECT DISTINCT w.source FROM windows AS w JOIN window_models AS m ON m.window_id = w.id
        WHERE {_WINDOWS_SINCE} AND m.model = ?2))
    GROUP BY w.source ORDER BY w.source"""
"""Per source, over all its windows: with a model, the sources that served that model."""
_SELECT_TRACE_COVERAGE = f"""
    WITH traced AS (
        SELECT w.id, w.source, w.trace_source, w.start_time, w.end_time FROM windows AS w
        WHERE {_WINDOWS_SINCE} AND w.trace_source IS NOT NULL),
    spans AS (
        SELECT t.id, count(r.id) AS requests, total(r.completion_tokens) AS completion_tokens
        FROM traced AS t LEFT JOIN requests AS r ON r.source = t.trace_source
            AND r.end_time > t.start_time AND r.end_time <= t.end_time
        GROUP BY t.id),
    counted AS (
        SELECT t.id, sum(m.requests) AS requests, sum(m.completion_tokens) AS completion_tokens
        FROM traced AS t LEFT JOIN window_models AS m ON m.window_id = t.id GROUP BY t.id)
    SELECT t.source, t.trace_source, count(*), sum(s.requests), sum(s.completion_tokens),
           sum(c.requests), sum(c.completion_tokens)
    FROM traced AS t JOIN spans AS s USING (id) JOIN counted AS c USING (id)
    GROUP BY t.source, t.trace_source ORDER BY t.source, t.trace_source"""
"""Per scraped server that is also a trace source, over its windows: the records of its
spans whose request ended in one of them (in (start, end], as the live coverage counts),
and what its counters say it finished in them."""


@dataclass(frozen=True, slots=True)
class StoredRequest(BoundaryEnergy):
    """One record as stored: times in UTC epoch seconds, energies in joules."""

    id: str
    model: str
    source: str
    gpus: tuple[int, ...]
    status: RequestStatus
    start: float
    end: float | None
    """None: the request was still running at the agent's maximum age, or when the agent
    stopped (`expired`); its figures cover only its first part."""
    first_token: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    gpu_dynamic_j: float
    gpu_static_j: float
    host_j: float
    facility_j: float
    """The building's overhead: IT energy × (PUE − 1)."""
    pue: float
    late: bool
    """Reported after part of its lifetime had been attributed to others: the figures
    cover only the rest."""
    simulated: bool
    """Measured on simulated GPUs: the figures show the method, not real hardware."""
    scheduled: float | None = None
    """When the server began on it, where the server said; None: unknown."""
    tokens_estimated: bool = False
    """The token counts are the intake's estimate, not the server's figures."""
    max_tokens: int | None = None
    """The generation parameters it asked for, where the intake saw them; None: not."""
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    gpu_model: str | None = None
    """NVML's name of its GPUs; None where the agent that wrote it did not say."""
    split: Split | None = None
    """How its GPUs split its intervals (`RequestEnergy.split`); None: not recorded."""
    prefill_weight: float | None = None

    @classmethod
    def from_row(cls, row: Row) -> StoredRequest:
        gpus = tuple(int(index) for index in row[3].split(",")) if row[3] else ()
        values: Row = (*row[:3], gpus, *row[4:15], bool(row[15]), bool(row[16]), row[17],
                       bool(row[18]), *row[19:26])
        return cls(*values)

    @property
    def expired(self) -> bool:
        return self.end is None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: energy per boundary component (gpu_dynamic, gpu_static, host,
        facility overhead) and the gpu and it totals, in J and in Wh."""
        joules = {
            "gpu_dynamic": self.gpu_dynamic_j, "gpu_static": self.gpu_static_j,
            "host": self.host_j, "facility": self.facility_j, "gpu": self.gpu_j, "it": self.it_j,
        }
        return {
            "id": self.id,
            "model": self.model,
            "source": self.source,
            "gpus": list(self.gpus),
            "status": self.status,
            "start": self.start,
            "end": self.end,
            "first_token": self.first_token,
            "duration_s": self.end - self.start if self.end is not None else None,
            "time_to_first_token_s": (
                self.first_token - self.start if self.first_token is not None else None
            ),
            "scheduled": self.scheduled,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_estimated": self.tokens_estimated,
            "sampling": {"max_tokens": self.max_tokens, "temperature": self.temperature,
                         "top_p": self.top_p, "n": self.n},
            "gpu_model": self.gpu_model,
            "attribution": {"split": self.split, "prefill_weight": self.prefill_weight},
            "pue": self.pue,
            "late": self.late,
            "expired": self.expired,
            "simulated": self.simulated,
            "energy_j": joules,
            "energy_wh": {name: j / JOULES_PER_WH for name, j in joules.items()},
        }


@dataclass(frozen=True, slots=True)
class ModelWindows:
    """One model's scrape windows from one source over the period, summed
    (`RecordReader.window_totals`); None for a quantity the server does not count."""

    source: str
    model: str
    windows: int
    """Windows in which the server listed the model (whether it did work in them or not)."""
    requests: float | None
    prompt_tokens: float | None
    completion_tokens: float | None
    gpu_dynamic_j: float
    gpu_static_j: float
    simulated: bool

    @property
    def gpu_j(self) -> float:
        return self.gpu_dynamic_j + self.gpu_static_j

    @property
    def gpu_wh_per_query(self) -> float | None:
        return self.gpu_j / JOULES_PER_WH / self.requests if self.requests else None

    @property
    def gpu_j_per_completion_token(self) -> float | None:
        return self.gpu_j / self.completion_tokens if self.completion_tokens else None

    @property
    def gpu_j_per_token_all(self) -> float | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        tokens = self.prompt_tokens + self.completion_tokens
        return self.gpu_j / tokens if tokens else None


@dataclass(frozen=True, slots=True)
class SourceWindows:
    """One source's scrape windows over the period: all their GPU energy, and the part
    that no model received."""

    source: str
    windows: int
    measured_j: float
    unattributed_j: float
    simulated: bool

    @property
    def unattributed_share(self) -> float | None:
        return self.unattributed_j / self.measured_j if self.measured_j > 0 else None


@dataclass(frozen=True, slots=True)
class TraceCoverage:
    """A scraped server that also exports its request spans, over the period's windows:
    the spans' share of the requests and completion tokens its own counters say it
    finished. Spans miss what vLLM does not trace (a request its client aborted) and what
    a full exporter queue dropped; the share says how much of the server's work the
    per-request records cover. Never added to either figure."""

    source: str
    """The scrape source (`scrape:vllm`)."""
    trace_source: str
    """Its spans' source (`trace:SERVICE`)."""
    windows: int
    span_requests: int
    """Records of its spans whose request ended in one of the windows."""
    span_completion_tokens: float
    requests: float | None
    """What its counters say it finished in the windows; None where it counts none."""
    completion_tokens: float | None

    @property
    def requests_share(self) -> float | None:
        return self.span_requests / self.requests if self.requests else None

    @property
    def completion_tokens_share(self) -> float | None:
        return (self.span_completion_tokens / self.completion_tokens
                if self.completion_tokens else None)


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """The scrape windows of a report's period: per (source, model), per source, and the
    trace coverage of the scraped servers that also export spans."""

    models: tuple[ModelWindows, ...] = ()
    sources: tuple[SourceWindows, ...] = ()
    coverage: tuple[TraceCoverage, ...] = ()

    def by_source(self) -> Iterator[tuple[SourceWindows, list[ModelWindows]]]:
        for source in self.sources:
            yield source, [model for model in self.models if model.source == source.source]


class RecordReader:
    """Read-only access to a store file; every call opens (and closes) its own connection."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
                 ) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        """Wall clock (UTC epoch seconds): the store's now, for retention and for the
        summary's window (`agent.report.summarize`)."""
        if not os.path.exists(self.path):
            raise RecordStoreError(f"no record store at {self.path}")
        with self._reading() as connection:
            check_version(connection, self.path)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection, closed afterwards; any SQLite failure in the block
        becomes a RecordStoreError naming the file."""
        try:
            with closing(open_reader(self.path)) as connection:
                yield connection
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot read {self.path}: {exc}") from exc

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The JSON-ready record of one request (`StoredRequest.to_json`), None if unknown."""
        with self._reading() as connection:
            row = connection.execute(f"{_select(version(connection))} WHERE id = ?",
                                     (request_id,)).fetchone()
        return StoredRequest.from_row(row).to_json() if row is not None else None

    def query(self, since: float | None = None, model: str | None = None
              ) -> Iterator[StoredRequest]:
        """Finished records (expired ones have no end and are left out) that ended at or
        after `since` (UTC epoch seconds), of `model` if given, oldest end first. Rows
        stream from one consistent snapshot of the file."""
        clauses = ["end_time IS NOT NULL"]
        params: list[float | str] = []
        if since is not None:
            clauses.append("end_time >= ?")
            params.append(since)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        where = " AND ".join(clauses)
        with self._reading() as connection:
            for row in connection.execute(
                f"{_select(version(connection))} WHERE {where} ORDER BY end_time", params
            ):
                yield StoredRequest.from_row(row)

    def window_totals(self, since: float | None = None, model: str | None = None
                      ) -> WindowTotals:
        """Sums over the scrape windows that ended at or after `since` (UTC epoch seconds):
        per (source, model), of `model` if given; and per source, over all its windows
        (with `model`, only the sources that served it); and the trace coverage per
        scraped server that also exports spans, whatever `model` (its spans may name the
        model otherwise than its metrics). Summed in SQL, from one snapshot of the file, so
        that all agree; none from a version-1 file, no coverage from one older than 4."""
        with self._reading() as connection:
            connection.execute("BEGIN")  # one read transaction: one snapshot for all
            found = version(connection)
            if found < WINDOWS_VERSION:
                return WindowTotals()
            params = (since, model)
            models = connection.execute(_SELECT_WINDOW_MODELS, params).fetchall()
            sources = connection.execute(_SELECT_WINDOW_SOURCES, params).fetchall()
            coverage = (connection.execute(_SELECT_TRACE_COVERAGE, (since,)).fetchall()
                        if found >= TRACE_SOURCE_VERSION else [])
        return WindowTotals(
            models=tuple(ModelWindows(*_simulated_flag(row)) for row in models),
            sources=tuple(SourceWindows(*_simulated_flag(row)) for row in sources),
            coverage=tuple(TraceCoverage(*row) for row in coverage),
        )

    def workloads(self, since: float | None = None, by: str = "workload") -> StoredWorkloads:
        """The workload stretches that ended at or after `since` (UTC epoch seconds),
        summed per `by` group (`agent.store.workloads.GROUPINGS`), with the period's
        measured and unattributed GPU energy. Raises ValueError for an unknown `by`."""
        with self._reading() as connection:
            return read_workloads(connection, since, by)


def _simulated_flag(row: Row) -> Row:
    """`row` with its last column, `simulated` as SQLite's 0 or 1, as a bool."""
    return (*row[:-1], bool(row[-1]))
