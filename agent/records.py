"""The record store: one SQLite file, written in batches off the hot path.

It holds two kinds of records. Per-request records (table `requests`) come from the
attribution engine through `RecordStore.submit`. Scrape windows (tables `windows`, one row
per window, and `window_models`, one row per model of a window) come from the scrapers
through `RecordStore.submit_windows`: a scraped server gives per-model counts per window,
not per request, so its figures are kept apart and never mixed into request rows. Both
calls only convert to rows and queue them; a writer thread commits the queue every
`flush_interval_s` in one transaction, and deletes records past their retention now and
then. `close()` (what SIGTERM calls) commits everything still queued before it returns.

The file is in WAL mode, so readers (the report, the HTTP API) never wait for the writer
and see only committed batches; each read opens its own read-only connection, which
makes reads safe from any thread and lets `jouleprobe report` read a store it cannot
write. `synchronous=NORMAL` means a power cut may lose the last committed batches but
never corrupts the file; a killed process loses nothing committed.

Times: requests and windows are timed on the monotonic clock; records hold UTC epoch
seconds, `monotonic + wall_offset`, with the offset taken once at agent start
(`wall_clock_offset()`).

Schema versions (`PRAGMA user_version`): 1 has the requests; 2 adds the windows. The agent
(the writer) migrates an older file in place when it opens it; a reader never writes, so a
reader of a version-1 file simply finds no windows.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from agent import report
from agent.requests import RequestEnergy, RequestStatus
from agent.units import JOULES_PER_WH, check_pue

if TYPE_CHECKING:
    from agent.intake.scrapers.window import WindowFigures

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
"""How long one statement waits for another connection's lock before failing."""

_COLUMNS = (
    "id", "model", "source", "gpus", "status", "start_time", "end_time", "first_token_time",
    "prompt_tokens", "completion_tokens", "gpu_dynamic_j", "gpu_static_j", "host_j",
    "facility_j", "pue", "late", "simulated",
)
_SCHEMA_STEPS: tuple[tuple[str, ...], ...] = (
    (  # version 1: per-request records
        """CREATE TABLE requests (
            id                TEXT PRIMARY KEY,
            model             TEXT NOT NULL,
            source            TEXT NOT NULL,
            gpus              TEXT NOT NULL,  -- GPU indices, comma-separated: "0,1"
            status            TEXT NOT NULL CHECK (status IN ('ok', 'cancelled', 'failed')),
            start_time        REAL NOT NULL,  -- UTC epoch seconds
            end_time          REAL,           -- NULL: still running at the maximum age (expired)
            first_token_time  REAL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            gpu_dynamic_j     REAL NOT NULL,
            gpu_static_j      REAL NOT NULL,
            host_j            REAL NOT NULL,
            facility_j        REAL NOT NULL,  -- (dynamic + static + host) × (pue − 1)
            pue               REAL NOT NULL,
            late              INTEGER NOT NULL CHECK (late IN (0, 1)),
            simulated         INTEGER NOT NULL CHECK (simulated IN (0, 1))  -- the node's GPUs
        ) WITHOUT ROWID""",
        "CREATE INDEX requests_by_end ON requests (end_time)",
        "CREATE INDEX requests_by_model ON requests (model, end_time)",
    ),
    (  # version 2: scrape windows (agent.intake.scrapers.window.WindowFigures)
        """CREATE TABLE windows (
            id             INTEGER PRIMARY KEY,
            source         TEXT NOT NULL,  -- scrape:vllm, ...
            start_time     REAL NOT NULL,  -- UTC epoch seconds
            end_time       REAL NOT NULL,
            gpus           TEXT NOT NULL,  -- GPU indices, comma-separated: "0,1"
            weighting      TEXT NOT NULL CHECK (weighting IN ('tokens', 'requests', 'none')),
            measured_j     REAL NOT NULL,  -- all GPU energy of the window on its GPUs
            unattributed_j REAL NOT NULL,  -- the part no model received
            simulated      INTEGER NOT NULL CHECK (simulated IN (0, 1))  -- the node's GPUs
        )""",
        "CREATE INDEX windows_by_end ON windows (end_time)",
        """CREATE TABLE window_models (
            window_id         INTEGER NOT NULL REFERENCES windows (id) ON DELETE CASCADE,
            model             TEXT NOT NULL,
            requests          REAL,  -- NULL: the server does not count it (0 is a count)
            prompt_tokens     REAL,
            completion_tokens REAL,
            gpu_dynamic_j     REAL NOT NULL,
            gpu_static_j      REAL NOT NULL,
            PRIMARY KEY (window_id, model)
        ) WITHOUT ROWID""",
    ),
)
"""What each schema version adds: step n brings a file from version n to n + 1."""
SCHEMA_VERSION = len(_SCHEMA_STEPS)
"""Kept in `PRAGMA user_version`. A change to the tables appends a step above, which
migrates older files in place when the agent opens them."""
_WINDOWS_VERSION = 2
"""The schema version that added the windows."""
_UPSERT = f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}) VALUES "
_ROW_VALUES = f"({', '.join('?' * len(_COLUMNS))})"
ROWS_PER_STATEMENT = 1000
"""Rows inserted by one statement (fewer where SQLite allows fewer bound variables).

The sqlite3 module lets go of the GIL for every step of a statement; with one row per
statement, each of those hand-overs can wait a whole switch interval (5 ms) for a busy
thread to let the GIL go, so a batch of many rows would crawl while the agent is busy.
Many rows per statement keep the hand-overs few."""
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM requests"
_INSERT_WINDOW = (
    "INSERT INTO windows (source, start_time, end_time, gpus, weighting, measured_j, "
    "unattributed_j, simulated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_WINDOW_MODEL = (
    "INSERT INTO window_models (window_id, model, requests, prompt_tokens, completion_tokens, "
    "gpu_dynamic_j, gpu_static_j) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
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

Row = tuple[Any, ...]
_WindowRows = tuple[Row, list[Row]]
"""A queued window: its `windows` row, and its `window_models` rows without the window id."""
_Queued = TypeVar("_Queued", Row, _WindowRows)


class RecordStoreError(Exception):
    """The store cannot be opened or read; the message names the file and the reason."""


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
class StoredRequest:
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

    @classmethod
    def from_row(cls, row: Row) -> StoredRequest:
        gpus = tuple(int(index) for index in row[3].split(",")) if row[3] else ()
        return cls(row[0], row[1], row[2], gpus, *row[4:-2], late=bool(row[-2]),
                   simulated=bool(row[-1]))

    @property
    def expired(self) -> bool:
        return self.end is None

    @property
    def gpu_j(self) -> float:
        return self.gpu_dynamic_j + self.gpu_static_j

    @property
    def it_j(self) -> float:
        return self.gpu_j + self.host_j

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
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "pue": self.pue,
            "late": self.late,
            "expired": self.expired,
            "simulated": self.simulated,
            "energy_j": joules,
            "energy_wh": {name: j / JOULES_PER_WH for name, j in joules.items()},
        }


class RecordReader:
    """Read-only access to a store file; every call opens (and closes) its own connection."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
                 ) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        """Wall clock (UTC epoch seconds), for the summary's window."""
        if not os.path.exists(self.path):
            raise RecordStoreError(f"no record store at {self.path}")
        with self._reading() as connection:
            _check_version(connection, self.path)

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection, closed afterwards; any SQLite failure in the block
        becomes a RecordStoreError naming the file."""
        try:
            with closing(self._connect()) as connection:
                yield connection
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot read {self.path}: {exc}") from exc

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The JSON-ready record of one request (`StoredRequest.to_json`), None if unknown."""
        with self._reading() as connection:
            row = connection.execute(f"{_SELECT} WHERE id = ?", (request_id,)).fetchone()
        return StoredRequest.from_row(row).to_json() if row is not None else None

    def query(self, since: float | None = None, model: str | None = None
              ) -> Iterator[StoredRequest]:
        """Finished records (expired ones have no end and are left out) that ended at or
        after `since` (UTC epoch seconds), of `model` if given, oldest end first. Rows
        stream from one consistent snapshot of the file."""
        clauses, params = ["end_time IS NOT NULL"], []
        if since is not None:
            clauses.append("end_time >= ?")
            params.append(since)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        where = " AND ".join(clauses)
        with self._reading() as connection:
            for row in connection.execute(
                f"{_SELECT} WHERE {where} ORDER BY end_time", params
            ):
                yield StoredRequest.from_row(row)

    def window_totals(self, since: float | None = None, model: str | None = None
                      ) -> report.WindowTotals:
        """Sums over the scrape windows that ended at or after `since` (UTC epoch seconds):
        per (source, model), of `model` if given; and per source, over all its windows
        (with `model`, only the sources that served it). Summed in SQL, from one snapshot
        of the file, so that the two agree; none from a version-1 file."""
        with self._reading() as connection:
            connection.execute("BEGIN")  # one read transaction: one snapshot for both
            if _version(connection) < _WINDOWS_VERSION:
                return report.WindowTotals()
            params = (since, model)
            models = connection.execute(_SELECT_WINDOW_MODELS, params).fetchall()
            sources = connection.execute(_SELECT_WINDOW_SOURCES, params).fetchall()
        return report.WindowTotals(
            models=tuple(
                report.ModelWindows(*row[:-1], simulated=bool(row[-1])) for row in models
            ),
            sources=tuple(
                report.SourceWindows(*row[:-1], simulated=bool(row[-1])) for row in sources
            ),
        )

    def summary(self, window_s: float) -> dict[str, Any]:
        """Per model over the last `window_s` seconds: count, mean Wh per query at each
        boundary, J per token; and the scrape windows' figures (`report.summary`, computed
        as the report computes them)."""
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        now = self._clock()
        since = now - window_s
        built = report.build_report(self.query(since=since), generated=now, since=since,
                                    windows=self.window_totals(since=since))
        return report.summary(built, window_s)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The writer's counters since the store was opened, for the exporter. A record is a
    request record or a scrape window (with its models' rows)."""

    pending: int
    """Records queued, not yet committed."""
    written_total: int
    dropped_total: int
    """Records refused because the queue was full, or lost because the final write failed."""
    write_errors_total: int
    pruned_total: int
    """Records deleted by retention."""


class RecordStore(RecordReader):
    """The store as the agent holds it: batched writes on a thread, retention, and reads.

    `submit` and `submit_windows` never wait on the disk: they are called on the
    attribution path and on the event loop, which must not stall behind a slow or locked
    file. Both feed one queue, committed in one transaction per flush, which holds at most
    `max_pending` records (requests and windows together); past
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
    ) -> None:
        """`pue`: the site PUE that attribution used for `facility_j`, stored with each
        record. `simulated`: whether the node's GPUs are simulated, stored with each record
        so that every reader can label its figures (the store outlives the agent that wrote
        it). `wall_offset`: `wall_clock_offset()` taken at agent start (taken now if
        None). `retention_days`: records whose end is older are deleted every
        `prune_interval_s` by the writer (None keeps everything). `max_pending`: the
        queue's bound, in records. `clock`: the wall clock, for retention and the summary's
        window."""
        check_pue(pue, "pue")
        if flush_interval_s <= 0 or prune_interval_s <= 0:
            raise ValueError("flush and prune intervals must be > 0")
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be > 0 or None, got {retention_days}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.pue = pue
        self.simulated = simulated
        self.wall_offset = wall_clock_offset() if wall_offset is None else wall_offset
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.prune_interval_s = prune_interval_s
        self.max_pending = max_pending
        self._writer = _open_writer(os.fspath(path))
        try:
            super().__init__(path, clock=clock)
        except RecordStoreError:
            self._writer.close()
            raise
        self._lock = threading.Lock()
        self._pending: list[Row] = []
        self._pending_windows: list[_WindowRows] = []
        self._closed = False
        self._wake = threading.Event()
        self._written = self._dropped = self._write_errors = self._pruned = 0
        self._dropping = False
        """Records were refused since the last successful write (one warning per episode)."""
        self._thread = threading.Thread(target=self._run, name="jouleprobe-records", daemon=True)
        self._thread.start()

    def submit(self, energies: Sequence[RequestEnergy]) -> None:
        """Queue the records of finished (or expired) requests; returns at once. A request
        id already stored is replaced. Raises ValueError for a record that could never be
        stored (unknown status, non-finite energy), RuntimeError once closed."""
        self._enqueue(self._pending, [self._row(energy) for energy in energies])

    def submit_windows(self, source: str, figures: Sequence[WindowFigures]) -> None:
        """Queue settled scrape windows of `source` (`scrape:vllm`, ...); returns at once.
        Raises ValueError for a window that could never be stored (a non-finite figure),
        RuntimeError once closed."""
        self._enqueue(self._pending_windows,
                      [self._window_rows(source, window) for window in figures])

    def _enqueue(self, queue: list[_Queued], items: list[_Queued]) -> None:
        """Append what fits under `max_pending` to `queue`; refuse and count the rest."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"record store {self.path} is closed")
            room = max(0, self.max_pending - len(self._pending) - len(self._pending_windows))
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
        if request.status not in report.STATUSES:
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
        )

    def _window_rows(self, source: str, window: WindowFigures) -> _WindowRows:
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
               unattributed, int(self.simulated))
        return row, shares

    def _wall(self, monotonic: float) -> float:
        return float(monotonic) + self.wall_offset

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._pending) + len(self._pending_windows), self._written,
                              self._dropped, self._write_errors, self._pruned)

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
            batch, self._pending = self._pending, []
            windows, self._pending_windows = self._pending_windows, []
        if not batch and not windows:
            return
        try:
            with _transaction(self._writer):
                _insert(self._writer, batch)
                _insert_windows(self._writer, windows)
        except Exception as exc:  # the writer thread must outlive any one bad batch
            retry = isinstance(exc, sqlite3.OperationalError) and not final
            with self._lock:
                self._write_errors += 1
                if retry:
                    self._pending[:0] = batch
                    self._pending_windows[:0] = windows
                else:
                    self._dropped += len(batch) + len(windows)
            log.exception("writing %d request records and %d windows to %s failed%s",
                          len(batch), len(windows), self.path,
                          "; will retry" if retry else "; they are lost")
            return
        with self._lock:
            self._written += len(batch) + len(windows)
            self._dropping = False

    def _prune(self, retention_days: float) -> None:
        cutoff = self._clock() - retention_days * 86400.0
        try:
            with _transaction(self._writer):
                deleted = self._writer.execute(
                    "DELETE FROM requests WHERE end_time < ?1"
                    " OR (end_time IS NULL AND start_time < ?1)", (cutoff,)
                ).rowcount
                deleted += self._writer.execute(  # their window_models rows cascade
                    "DELETE FROM windows WHERE end_time < ?", (cutoff,)
                ).rowcount
        except sqlite3.Error:
            log.exception("deleting records older than %g days from %s failed",
                          retention_days, self.path)
            return
        with self._lock:
            self._pruned += deleted


def _optional(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


def _gpu_list(gpus: Iterable[int]) -> str:
    return ",".join(str(int(gpu)) for gpu in gpus)


def _insert(connection: sqlite3.Connection, rows: list[Row]) -> None:
    """Upserts `rows`: full chunks many per statement (see ROWS_PER_STATEMENT), the rest
    one per row. Only two statement texts ever exist, so sqlite3's statement cache stays
    small (a text per leftover length grew RSS by tens of MB in bench/soak.py)."""
    variables = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per_statement = max(1, min(ROWS_PER_STATEMENT, variables // len(_COLUMNS)))
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


class _transaction:
    """BEGIN IMMEDIATE … COMMIT on an autocommit connection; ROLLBACK on any error."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self._connection.execute("BEGIN IMMEDIATE")
        return self._connection

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                self._connection.execute("COMMIT")
        finally:
            if self._connection.in_transaction:  # the body or the COMMIT itself failed
                self._connection.execute("ROLLBACK")


def _version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _check_version(connection: sqlite3.Connection, path: str) -> None:
    version = _version(connection)
    if version > SCHEMA_VERSION:
        raise RecordStoreError(
            f"{path} has schema version {version}, written by a newer jouleprobe "
            f"(this one reads version {SCHEMA_VERSION})"
        )
    if version == 0:
        raise RecordStoreError(f"{path} is not a jouleprobe record store")


def _open_writer(path: str) -> sqlite3.Connection:
    """The writer's connection, with WAL on and the schema in place (created if absent).

    Made here, on the caller's thread, so that a bad path fails at agent start; afterwards
    only the writer thread uses it.
    """
    try:
        connection = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise RecordStoreError(f"cannot open {path}: {exc}") from exc
    try:
        _prepare(connection, path)
    except sqlite3.Error as exc:
        connection.close()
        raise RecordStoreError(f"cannot open {path}: {exc}") from exc
    except RecordStoreError:
        connection.close()
        raise
    return connection


def _prepare(connection: sqlite3.Connection, path: str) -> None:
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise RecordStoreError(
            f"{path}: SQLite cannot use WAL mode there (journal mode {mode!r}); "
            f"put the store on a local filesystem"
        )
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")  # pruning a window prunes its models' rows
    with _transaction(connection):
        version = _version(connection)
        if version == 0 and connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise RecordStoreError(f"{path} is not a jouleprobe record store")
        if version < SCHEMA_VERSION:  # a new file, or one an older jouleprobe wrote
            for step in _SCHEMA_STEPS[version:]:
                for statement in step:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    _check_version(connection, path)
