"""The record store: one SQLite file, written in batches off the hot path.

It holds three kinds of records. Per-request records (table `requests`) come from the
attribution engine through `RecordStore.submit`. Scrape windows (tables `windows`, one row
per window, and `window_models`, one row per model of a window) come from the scrapers
through `RecordStore.submit_windows`: a scraped server gives per-model counts per window,
not per request, so its figures are kept apart and never mixed into request rows. Workload
stretches (table `workloads`: one workload on one GPU, or a GPU's unattributed energy) come
from the workload view through `RecordStore.submit_workloads`. The calls only convert to
rows and queue them; a writer thread commits the queue every
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

`schema` holds the tables, their migrations and how connections are opened, `reader` the
reads and the types they return, `writer` the queue, the writer thread and retention.
"""

from agent.store.reader import (
    ModelWindows,
    RecordReader,
    SourceWindows,
    StoredRequest,
    TraceCoverage,
    WindowTotals,
)
from agent.store.schema import RecordStoreError
from agent.store.workloads import GROUPINGS, StoredWorkloads, WorkloadGroup
from agent.store.writer import RecordStore, StoredWindow, StoreStats, wall_clock_offset

__all__ = [
    "GROUPINGS", "ModelWindows", "RecordReader", "RecordStore", "RecordStoreError", "SourceWindows",
    "StoreStats", "StoredRequest", "StoredWindow", "StoredWorkloads", "TraceCoverage",
    "WindowTotals", "WorkloadGroup", "wall_clock_offset",
]
