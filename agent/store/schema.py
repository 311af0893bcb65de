"""The store file's tables, their migrations, and how connections to it are opened.

Schema versions (`PRAGMA user_version`): 1 has the requests; 2 adds the windows; 3 adds
when the server began each request and whether its token counts are estimates; 4 adds the
trace source of a scraped server that also exports its request spans; 5 adds the
generation parameters a request asked for (`agent.requests.Sampling`); 6 adds its GPUs'
model and how they split its intervals (`RequestEnergy.split`, `prefill_weight`); 7 adds
the workloads (`agent.attribution.workloads.WorkloadRecord`: every GPU joule to a
container, a process or unattributed, in stretches of one workload on one GPU). The agent
(the writer) migrates an older file in place when it opens it; a reader never writes, so a
reader of a version-1 file simply finds no windows, and of an older one the defaults of
the columns added since (`ADDED_COLUMNS`).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from typing import Any

BUSY_TIMEOUT_S = 10.0
"""How long one statement waits for another connection's lock before failing."""

COLUMNS = (
    "id", "model", "source", "gpus", "status", "start_time", "end_time", "first_token_time",
    "prompt_tokens", "completion_tokens", "gpu_dynamic_j", "gpu_static_j", "host_j",
    "facility_j", "pue", "late", "simulated", "scheduled_time", "tokens_estimated",
    "max_tokens", "temperature", "top_p", "n", "gpu_model", "split", "prefill_weight",
)
"""The columns of `requests`, in the order rows are written and read."""
WORKLOAD_COLUMNS = (
    "workload", "kind", "namespace", "pod", "container", "gpu", "gpu_model", "start_time",
    "end_time", "energy_j", "gpu_seconds", "peak_w", "inference", "alone_j", "requests_j",
    "simulated",
)
"""The columns of `workloads` that rows are written with."""
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
    (  # version 3: server-side timing and estimated counts (agent.requests.Request)
        "ALTER TABLE requests ADD COLUMN scheduled_time REAL",  # UTC; NULL: unknown
        "ALTER TABLE requests ADD COLUMN tokens_estimated INTEGER NOT NULL DEFAULT 0 "
        "CHECK (tokens_estimated IN (0, 1))",
    ),
    (  # version 4: the trace coverage of a scraped server (agent.report.coverage)
        # trace:SERVICE, whose requests' records the window's counts are compared with;
        # NULL: the server exports no spans
        "ALTER TABLE windows ADD COLUMN trace_source TEXT",
    ),
    (  # version 5: generation parameters (agent.requests.Sampling); NULL: not seen
        "ALTER TABLE requests ADD COLUMN max_tokens INTEGER",
        "ALTER TABLE requests ADD COLUMN temperature REAL",
        "ALTER TABLE requests ADD COLUMN top_p REAL",
        "ALTER TABLE requests ADD COLUMN n INTEGER",
    ),
    (  # version 6: its GPUs' model (NVML's name) and how they split its intervals
        "ALTER TABLE requests ADD COLUMN gpu_model TEXT",  # NULL: not known (older agent)
        "ALTER TABLE requests ADD COLUMN split TEXT CHECK (split IN "
        "('time', 'weighted', 'queue-aware', 'counts-unknown'))",
        "ALTER TABLE requests ADD COLUMN prefill_weight REAL",
    ),
    (  # version 7: the workload view (agent.attribution.workloads.WorkloadRecord)
        """CREATE TABLE workloads (
            id          INTEGER PRIMARY KEY,
            workload    TEXT NOT NULL,  -- unique on the node; 'unattributed' for the rest
            kind        TEXT NOT NULL,  -- pod, container, unit, process; 'none'
            namespace   TEXT NOT NULL,  -- '' off Kubernetes
            pod         TEXT NOT NULL,
            container   TEXT NOT NULL,
            gpu         INTEGER NOT NULL,
            gpu_model   TEXT,           -- NVML's name; NULL: not known
            start_time  REAL NOT NULL,  -- UTC epoch seconds
            end_time    REAL NOT NULL,
            energy_j    REAL NOT NULL,  -- GPU energy of the stretch (the GPU boundary)
            gpu_seconds REAL NOT NULL,  -- shared intervals count 1/parties to each
            peak_w      REAL NOT NULL,
            inference   INTEGER NOT NULL CHECK (inference IN (0, 1)),
            alone_j     REAL NOT NULL,  -- its energy while it had the GPU to itself
            requests_j  REAL NOT NULL,  -- of which the requests' (the per-request view's)
            simulated   INTEGER NOT NULL CHECK (simulated IN (0, 1))  -- the node's GPUs
        )""",
        "CREATE INDEX workloads_by_end ON workloads (end_time)",
    ),
)
"""What each schema version adds: step n brings a file from version n to n + 1."""
SCHEMA_VERSION = len(_SCHEMA_STEPS)
"""Kept in `PRAGMA user_version`. A change to the tables appends a step above, which
migrates older files in place when the agent opens them."""
WINDOWS_VERSION = 2
"""The schema version that added the windows."""
TRACE_SOURCE_VERSION = 4
"""The schema version that added the windows' trace source."""
WORKLOADS_VERSION = 7
"""The schema version that added the workloads."""
ADDED_COLUMNS = {"scheduled_time": (3, "NULL"), "tokens_estimated": (3, "0"),
                 "max_tokens": (5, "NULL"), "temperature": (5, "NULL"), "top_p": (5, "NULL"),
                 "n": (5, "NULL"), "gpu_model": (6, "NULL"), "split": (6, "NULL"),
                 "prefill_weight": (6, "NULL")}
"""Columns of `requests` added after version 1: the version that added each, and the value
a file of an older version stands for."""

Row = tuple[Any, ...]


class RecordStoreError(Exception):
    """The store cannot be opened or read; the message names the file and the reason."""


class transaction:
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


def version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def check_version(connection: sqlite3.Connection, path: str) -> None:
    found = version(connection)
    if found > SCHEMA_VERSION:
        raise RecordStoreError(
            f"{path} has schema version {found}, written by a newer jouleprobe "
            f"(this one reads version {SCHEMA_VERSION})"
        )
    if found == 0:
        raise RecordStoreError(f"{path} is not a jouleprobe record store")


def open_reader(path: str) -> sqlite3.Connection:
    """A read-only connection: it never writes, so it opens a store it cannot write."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)


def open_writer(path: str) -> sqlite3.Connection:
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
    with transaction(connection):
        found = version(connection)
        if found == 0 and connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise RecordStoreError(f"{path} is not a jouleprobe record store")
        if found < SCHEMA_VERSION:  # a new file, or one an older jouleprobe wrote
            for step in _SCHEMA_STEPS[found:]:
                for statement in step:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    check_version(connection, path)
