"""Writing the store: records queued off the hot path, committed in batches by a thread.

`RecordStore.submit` and `RecordStore.submit_windows` only convert to rows and queue them;
a writer thread commits the queue every `flush_interval_s` in one transaction, and deletes
records past their retention now and then. `close()` (what SIGTERM calls) commits
everything still queued before it returns.

A scrape window arrives as whatever has its figures (`StoredWindow`:
`agent.intake.scrapers.window.WindowFigures` is one), so that the store depends on no
intake path.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.attribution.workloads import WorkloadRecord
from agent.requests import STATUSES, RequestEnergy, Sampling
from agent.store.reader import RecordReader
from agent.store.schema import (
    COLUMNS,
    WORKLOAD_COLUMNS,
    RecordStoreError,
    Row,
    open_writer,
    transaction,
)
from agent.units import check_pue

log = logging.getLogger(__name__)

_UPSERT = f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES "
_ROW_VALUES = f"({', '.join('?' * len(COLUMNS))})"
ROWS_PER_STATEMENT = 1000
"""Rows inserted by one statement (fewer where SQLite allows fewer bound variables).

The sqlite3 module lets go of the GIL for every step of a statement; with one row per
statement, each of those hand-overs can wait a whole switch interval (5 ms) for a busy
thread to let the GIL go, so a batch of many rows would crawl while the agent is busy.
Many rows per statement keep the hand-overs few."""
_INSERT_WINDOW = (
    "INSERT INTO windows (source, start_time, end_time, gpus, weighting, measured_j, "
    "unattributed_j, simulated, trace_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_WINDOW_MODEL = (
    "INSERT INTO window_models (window_id, model, requests, prompt_tokens, completion_tokens, "
    "gpu_dynamic_j, gpu_static_j) VALUES (?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_WORKLOAD = (f"INSERT INTO workloads ({', '.join(WORKLOAD_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(WORKLOAD_COLUMNS))})")
_WindowRows = tuple[Row, list[Row]]
"""A queued window: its `windows` row, and its `window_models` rows without the window id."""
_Queued = TypeVar("_Queued", Row, _WindowRows)


class WindowUsage(Protocol):
    """What one model did in a window; None for a quantity the server does not count."""

    @property
    def requests(self) -> float | None: ...

    @property
    def prompt_tokens(self) -> float | None: ...

    @property
    def completion_tokens(self) -> float | None: ...


class WindowShare(Protocol):
    """One model's share of a window's GPU energy."""

    @property
    def usage(self) -> WindowUsage: ...

    @property
    def gpu_dynamic_j(self) -> float: ...

    @property
    def gpu_static_j(self) -> float: ...


class StoredWindow(Protocol):
    """A settled scrape window as the store keeps it (monotonic times, joules)."""

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...

    @property
    def gpus(self) -> tuple[int, ...]: ...

    @property
    def weighting(self) -> str: ...

    @property
    def models(self) -> Mapping[str, WindowShare]: ...

    @property
    def unattributed_j(self) -> float: ...

    @property
    def measured_j(self) -> float: ...


def wall_clock_offset() -> float:
    """`time.time() - time.monotonic()`: add it to a monotonic time to get UTC epoch seconds.

    Take it once, at agent start, and give it to `RecordStore`. On Linux NTP slews both
    clocks alike, so the offset only changes when the wall clock is stepped; a fixed offset
    keeps records in their true order and their durations exact across such a step, at the
    cost of wall times off by the step until the agent restarts.
    """
    before = time.monotonic()
    wall = time.time()
    after = time.monotonic()
    return wall - (before + after) / 2


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The writer's counters since the store was opened, for the exporter and /healthz. A
    record is a request record, a scrape window (with its models' rows) or a workload
    stretch."""

    pending: int
    """Records queued, not yet committed."""
    written_total: int
    dropped_total: int
    """Records refused because the queue was full, or lost because the final write failed."""
    write_errors_total: int
    pruned_total: int
    """Records deleted by retention."""
    write_errors_since_commit: int
    """Flushes that failed since the latest one that committed: above 0, the store is
    failing now (its records wait in the queue, or are lost)."""
    last_write_error: str | None
    """Why the latest flush failed, while `write_errors_since_commit` is above 0."""


class RecordStore(RecordReader):
    """The store as the agent holds it: batched writes on a thread, retention, and reads.

    `submit`, `submit_windows` and `submit_workloads` never wait on the disk: they are
    called on the attribution path and on the event loop, which must not stall behind a
    slow or locked file. They feed one queue, committed in one transaction per flush, which
    holds at most `max_pending` records (requests, windows and workloads together); past
    that, new records are refused, counted in `dropped_total` (for the exporter) and logged,
    while everything already queued is kept. A write that fails for a passing reason
    (file locked, disk full: `sqlite3.OperationalError`) keeps its batch queued for the
    next flush; any other failure cannot succeed on retry, so that batch is counted as
    dropped rather than blocking every later record behind it.

    Retention: the writer deletes records whose end (for an expired request, its start)
    is older than `retention_days`, windows with their models' rows, on its first pass and
    every `prune_interval_s` after.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pue: float,
        simulated: bool,
        wall_offset: float | None = None,
        flush_interval_s: float = 1.0,
        retention_days: float | None = 30.0,
        prune_interval_s: float = 3600.0,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.time,
        gpu_models: Mapping[int, str] | None = None,
    ) -> None:
        """`pue`: the site PUE that attribution used for `facility_j`, stored with each
        record. `simulated`: whether the node's GPUs are simulated, stored with each record
        so that every reader can label its figures (the store outlives the agent that wrote
        it). `wall_offset`: `wall_clock_offset()` taken at agent start (taken now if
        None). `retention_days`: records whose end is older are deleted every
        `prune_interval_s` by the writer (None keeps everything). `max_pending`: the
        queue's bound, in records. `clock`: the wall clock, for retention and the summary's
        window. `gpu_models`: NVML's name of each GPU, stored with each record (the report
        fits each model's energy per GPU model)."""
        check_pue(pue, "pue")
        if flush_interval_s <= 0 or prune_interval_s <= 0:
            raise ValueError("flush and prune intervals must be > 0")
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be > 0 or None, got {retention_days}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.pue = pue
        self.simulated = simulated
        self.gpu_models = dict(gpu_models or {})
        self.wall_offset = wall_clock_offset() if wall_offset is None else wall_offset
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.prune_interval_s = prune_interval_s
        self.max_pending = max_pending
        self._writer = open_writer(os.fspath(path))
        try:
            super().__init__(path, clock=clock)
        except RecordStoreError:
            self._writer.close()
            raise
        self._lock = threading.Lock()
        self._pending: list[Row] = []
        self._pending_windows: list[_WindowRows] = []
        self._pending_workloads: list[Row] = []
        """The queues. Never rebound, only emptied under the lock: `submit` names its queue
        before taking the lock, so a list swapped out meanwhile would take its records
        away uncounted."""
        self._closed = False
        self._wake = threading.Event()
        self._written = self._dropped = self._write_errors = self._pruned = 0
        self._errors_since_commit = 0
        self._last_error: str | None = None
        self._dropping = False
        """Records were refused since the last successful write (one warning per episode)."""
        self._thread = threading.Thread(target=self._run, name="jouleprobe-records", daemon=True)
        self._thread.start()

    def submit(self, energies: Sequence[RequestEnergy]) -> None:
        """Queue the records of finished (or expired) requests; returns at once. A request
        id already stored is replaced. Raises ValueError for a record that could never be
        stored (unknown status, non-finite energy), RuntimeError once closed."""
        self._enqueue(self._pending, [self._row(energy) for energy in energies])

    def submit_windows(self, source: str, figures: Sequence[StoredWindow],
                       trace_source: str | None = None) -> None:
        """Queue settled scrape windows of `source` (`scrape:vllm`, ...); returns at once.
        `trace_source`: where the same server's request spans go (`trace:SERVICE`), whose
        records the report compares with the windows' counts. Raises ValueError for a
        window that could never be stored (a non-finite figure), RuntimeError once
        closed."""
        self._enqueue(self._pending_windows,
                      [self._window_rows(source, window, trace_source) for window in figures])

    def submit_workloads(self, records: Sequence[WorkloadRecord]) -> None:
        """Queue closed stretches of the workload view (one workload on one GPU, or a GPU's
        unattributed energy); returns at once. Raises ValueError for one that could never
        be stored (a non-finite figure), RuntimeError once closed."""
        self._enqueue(self._pending_workloads, [self._workload_row(r) for r in records])

    def _enqueue(self, queue: list[_Queued], items: list[_Queued]) -> None:
        """Append what fits under `max_pending` to `queue`; refuse and count the rest."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"record store {self.path} is closed")
            room = max(0, self.max_pending - self._queued())
            queue.extend(items[:room])
            refused = len(items) - min(room, len(items))
            self._dropped += refused
            warn = refused > 0 and not self._dropping
            self._dropping = self._dropping or refused > 0
        if warn:
            log.warning("record queue full (%d records): new records are dropped, and "
                        "counted, until the writer catches up", self.max_pending)

    def _row(self, energy: RequestEnergy) -> Row:
        """Converts now, to plain Python types (numpy numbers included), so that the queued
        row cannot change with the caller's objects and cannot fail to bind later."""
        request = energy.request
        if request.status not in STATUSES:
            raise ValueError(f"request {request.id}: unknown status {request.status!r}")
        joules = tuple(float(j) for j in (
            energy.gpu_dynamic_j, energy.gpu_static_j, energy.host_j, energy.facility_j
        ))
        if not all(math.isfinite(j) for j in joules):
            raise ValueError(f"request {request.id}: non-finite energy {joules}")
        return (
            str(request.id), str(request.model), str(request.source),
            _gpu_list(request.gpus), request.status,
            self._wall(request.start), _optional(self._wall, request.end),
            _optional(self._wall, request.first_token),
            _optional(int, request.prompt_tokens), _optional(int, request.completion_tokens),
            *joules, self.pue, int(energy.late), int(self.simulated),
            _optional(self._wall, request.scheduled), int(request.tokens_estimated),
            *_sampling(request.sampling), self._gpu_model(request.gpus), energy.split,
            _optional(float, energy.prefill_weight),
        )

    def _gpu_model(self, gpus: Iterable[int]) -> str | None:
        """NVML's name of the request's GPUs ("+"-joined where they differ)."""
        names = sorted({self.gpu_models[gpu] for gpu in gpus if gpu in self.gpu_models})
        return "+".join(names) if names else None

    def _window_rows(self, source: str, window: StoredWindow, trace_source: str | None
                     ) -> _WindowRows:
        """Converts now, like `_row`; a quantity the server does not count stays None,
        apart from a counted 0."""
        shares = [
            (str(name), _optional(float, share.usage.requests),
             _optional(float, share.usage.prompt_tokens),
             _optional(float, share.usage.completion_tokens),
             float(share.gpu_dynamic_j), float(share.gpu_static_j))
            for name, share in window.models.items()
        ]
        start, end = self._wall(window.start), self._wall(window.end)
        measured, unattributed = float(window.measured_j), float(window.unattributed_j)
        numbers = [start, end, measured, unattributed,
                   *(value for share in shares for value in share[1:] if value is not None)]
        if not all(math.isfinite(value) for value in numbers):
            raise ValueError(f"window of {source} ending {window.end}: non-finite figure")
        row = (str(source), start, end, _gpu_list(window.gpus), window.weighting, measured,
               unattributed, int(self.simulated), _optional(str, trace_source))
        return row, shares

    def _workload_row(self, record: WorkloadRecord) -> Row:
        """Converts now, like `_row`."""
        name = record.name
        figures = (float(record.energy_j), float(record.gpu_seconds), float(record.peak_w))
        alone = (float(record.alone_j), float(record.requests_j))
        start, end = self._wall(record.start), self._wall(record.end)
        if not all(math.isfinite(value) for value in (*figures, *alone, start, end)):
            raise ValueError(f"workload {name.workload} on GPU {record.gpu}: non-finite figure")
        return (str(name.workload), str(name.kind), str(name.namespace), str(name.pod),
                str(name.container), int(record.gpu), self._gpu_model((record.gpu,)), start,
                end, *figures, int(record.inference), *alone, int(self.simulated))

    def _queued(self) -> int:
        return len(self._pending) + len(self._pending_windows) + len(self._pending_workloads)

    def _wall(self, monotonic: float) -> float:
        return float(monotonic) + self.wall_offset

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._queued(), self._written,
                              self._dropped, self._write_errors, self._pruned,
                              self._errors_since_commit, self._last_error)

    def close(self) -> None:
        """Commit every queued record, stop the writer and close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        next_prune = time.monotonic()
        while True:
            closing_now = self._wake.wait(self.flush_interval_s)
            self._flush(final=closing_now)
            if self.retention_days is not None and time.monotonic() >= next_prune:
                self._prune(self.retention_days)
                next_prune = time.monotonic() + self.prune_interval_s
            if closing_now:
                break
        self._writer.close()

    def _flush(self, *, final: bool) -> None:
        with self._lock:
            batch, windows = _take(self._pending), _take(self._pending_windows)
            workloads = _take(self._pending_workloads)
        if not batch and not windows and not workloads:
            return
        try:
            with transaction(self._writer):
                _insert(self._writer, batch)
                _insert_windows(self._writer, windows)
                self._writer.executemany(_INSERT_WORKLOAD, workloads)
        except Exception as exc:  # the writer thread must outlive any one bad batch
            retry = isinstance(exc, sqlite3.OperationalError) and not final
            with self._lock:
                self._write_errors += 1
                self._errors_since_commit += 1
                self._last_error = f"writing to {self.path} failed: {exc}"
                if retry:
                    self._pending[:0] = batch
                    self._pending_windows[:0] = windows
                    self._pending_workloads[:0] = workloads
                else:
                    self._dropped += len(batch) + len(windows) + len(workloads)
            log.exception("writing %d request records, %d windows and %d workload stretches "
                          "to %s failed%s", len(batch), len(windows), len(workloads), self.path,
                          "; will retry" if retry else "; they are lost")
            return
        with self._lock:
            self._written += len(batch) + len(windows) + len(workloads)
            self._errors_since_commit = 0
            self._last_error = None
            self._dropping = False

    def _prune(self, retention_days: float) -> None:
        cutoff = self.clock() - retention_days * 86400.0
        try:
            with transaction(self._writer):
                deleted = self._writer.execute(
                    "DELETE FROM requests WHERE end_time < ?1"
                    " OR (end_time IS NULL AND start_time < ?1)", (cutoff,)
                ).rowcount
                deleted += self._writer.execute(  # their window_models rows cascade
                    "DELETE FROM windows WHERE end_time < ?", (cutoff,)
                ).rowcount
                deleted += self._writer.execute(
                    "DELETE FROM workloads WHERE end_time < ?", (cutoff,)
                ).rowcount
        except sqlite3.Error:
            log.exception("deleting records older than %g days from %s failed",
                          retention_days, self.path)
            return
        with self._lock:
            self._pruned += deleted


def _take(queue: list[_Queued]) -> list[_Queued]:
    """What `queue` holds, emptying it in place."""
    taken = queue.copy()
    queue.clear()
    return taken


def _optional(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


def _sampling(sampling: Sampling | None) -> tuple[Any, ...]:
    if sampling is None:
        return (None, None, None, None)
    return (_optional(int, sampling.max_tokens), _optional(float, sampling.temperature),
            _optional(float, sampling.top_p), _optional(int, sampling.n))


def _gpu_list(gpus: Iterable[int]) -> str:
    return ",".join(str(int(gpu)) for gpu in gpus)


def _insert(connection: sqlite3.Connection, rows: list[Row]) -> None:
    """Upserts `rows`: full chunks many per statement (see ROWS_PER_STATEMENT), the rest
    one per row. Only two statement texts ever exist, so sqlite3's statement cache stays
    small (a text per leftover length grew RSS by tens of MB in bench/soak.py)."""
    variables = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per_statement = max(1, min(ROWS_PER_STATEMENT, variables // len(COLUMNS)))
    whole = len(rows) - len(rows) % per_statement
    many = _UPSERT + ", ".join([_ROW_VALUES] * per_statement)
    for first in range(0, whole, per_statement):
        connection.execute(many, [v for row in rows[first:first + per_statement] for v in row])
    connection.executemany(_UPSERT + _ROW_VALUES, rows[whole:])


def _insert_windows(connection: sqlite3.Connection, windows: list[_WindowRows]) -> None:
    """Inserts each window, then its models' rows under the id SQLite gave it. Windows are
    few (one per scrape interval and source), so one statement per row costs nothing."""
    for row, models in windows:
        window_id = connection.execute(_INSERT_WINDOW, row).lastrowid
        connection.executemany(_INSERT_WINDOW_MODEL, [(window_id, *model) for model in models])
