"""The record store: a real SQLite file, its writer thread, retention and crash safety; the
scrape windows beside the requests, and the migration of a version-1 file."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from scripted import FIXTURES, ROOT, wait_until

from agent.intake.scrapers import GpuWindowEnergy, Usage, WindowFigures, split_window
from agent.report import summarize
from agent.requests import Request, RequestEnergy, Sampling
from agent.store import (
    ModelWindows,
    RecordReader,
    RecordStore,
    RecordStoreError,
    SourceWindows,
    StoredRequest,
    WindowTotals,
    schema,
    writer,
)

OFFSET = 1_750_000_000.0
"""Wall-clock offset used throughout: monotonic time t is UTC epoch OFFSET + t."""


def energy(
    request_id: str, *, model: str = "llama", start: float = 10.0, end: float | None = 12.5,
    first_token: float | None = 0.25, prompt: int | None = 100, completion: int | None = 40,
    status: str = "ok", gpus: tuple[int, ...] = (0, 1), dynamic: float = 300.0,
    static: float = 60.0, host: float = 40.0, facility: float = 80.0, late: bool = False,
    scheduled: float | None = None, estimated: bool = False, sampling: Sampling | None = None,
) -> RequestEnergy:
    """`first_token` and `scheduled` are relative to `start`."""
    first = start + first_token if first_token is not None else None
    request = Request(request_id, model, "proxy:vllm", gpus, start, end, first, prompt,
                      completion, status,  # type: ignore[arg-type]
                      None if scheduled is None else start + scheduled, estimated, sampling)
    return RequestEnergy(request, dynamic, static, host, facility, late=late,
                         expired=end is None)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


@pytest.fixture
def open_store(path: Path) -> Iterator[Callable[..., RecordStore]]:
    """Opens stores on `path` and closes them. Defaults: PUE 1.2, real GPUs, OFFSET, no
    timed flush (an hour away), no retention (OFFSET may be older than the default 30 days)."""
    opened: list[RecordStore] = []

    def make(**kwargs: object) -> RecordStore:
        options: dict[str, object] = {"pue": 1.2, "simulated": False, "wall_offset": OFFSET,
                                      "flush_interval_s": 3600.0, "retention_days": None}
        options.update(kwargs)
        store = RecordStore(path, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_round_trip_of_every_field(path: Path, open_store: Callable[..., RecordStore]) -> None:
    store = open_store(gpu_models={0: "NVIDIA H100 80GB HBM3", 2: "NVIDIA H200",
                                   3: "NVIDIA H100 80GB HBM3"})
    store.submit([
        replace(energy("a", gpus=(2, 3), status="cancelled", late=True, scheduled=0.125,
                       estimated=True, sampling=Sampling(max_tokens=64, temperature=0.7, n=2)),
                split="queue-aware", prefill_weight=0.02),
        energy("expired", end=None, first_token=None, prompt=None, completion=None, gpus=(0,)),
    ])
    store.close()

    record = RecordReader(path).get("a")
    assert record == {
        "id": "a", "model": "llama", "source": "proxy:vllm", "gpus": [2, 3],
        "status": "cancelled",
        "start": OFFSET + 10.0, "end": OFFSET + 12.5, "first_token": OFFSET + 10.25,
        "duration_s": 2.5, "time_to_first_token_s": 0.25,
        "scheduled": OFFSET + 10.125, "prompt_tokens": 100, "completion_tokens": 40,
        "tokens_estimated": True,
        "sampling": {"max_tokens": 64, "temperature": 0.7, "top_p": None, "n": 2},
        "gpu_model": "NVIDIA H100 80GB HBM3+NVIDIA H200",
        "attribution": {"split": "queue-aware", "prefill_weight": 0.02},
        "pue": 1.2, "late": True, "expired": False, "simulated": False,
        "energy_j": {"gpu_dynamic": 300.0, "gpu_static": 60.0, "host": 40.0,
                     "facility": 80.0, "gpu": 360.0, "it": 400.0},
        "energy_wh": {"gpu_dynamic": 300 / 3600, "gpu_static": 60 / 3600, "host": 40 / 3600,
                      "facility": 80 / 3600, "gpu": 360 / 3600, "it": 400 / 3600},
    }
    expired = RecordReader(path).get("expired")
    assert expired is not None
    assert expired["end"] is None and expired["expired"] is True
    assert expired["duration_s"] is None and expired["time_to_first_token_s"] is None
    assert expired["prompt_tokens"] is None and expired["gpus"] == [0]
    assert list(RecordReader(path).query()) == [StoredRequest(
        "a", "llama", "proxy:vllm", (2, 3), "cancelled", OFFSET + 10.0, OFFSET + 12.5,
        OFFSET + 10.25, 100, 40, 300.0, 60.0, 40.0, 80.0, 1.2, late=True, simulated=False,
        scheduled=OFFSET + 10.125, tokens_estimated=True, max_tokens=64, temperature=0.7,
        n=2, gpu_model="NVIDIA H100 80GB HBM3+NVIDIA H200", split="queue-aware",
        prefill_weight=0.02,
    )], "query() yields finished records only"
    assert expired["sampling"] == {"max_tokens": None, "temperature": None, "top_p": None,
                                   "n": None}


def test_a_store_of_simulated_gpus_marks_every_record(
        path: Path, open_store: Callable[..., RecordStore]) -> None:
    store = open_store(simulated=True)
    store.submit([energy("a"), energy("expired", end=None)])
    store.close()
    for request_id in ("a", "expired"):
        record = RecordReader(path).get(request_id)
        assert record is not None and record["simulated"] is True
    assert [r.simulated for r in RecordReader(path).query()] == [True]
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT DISTINCT simulated FROM requests").fetchall() == [(1,)]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            connection.execute("UPDATE requests SET simulated = 2")


def test_file_is_in_wal_mode_with_schema_version(path: Path,
                                                 open_store: Callable[..., RecordStore]) -> None:
    open_store()
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        indexed = {row[1] for row in connection.execute("PRAGMA index_list(requests)")}
    assert {"requests_by_end", "requests_by_model"} <= indexed


def test_writer_thread_flushes_without_close(open_store: Callable[..., RecordStore]) -> None:
    store = open_store(flush_interval_s=0.01)
    store.submit([energy("a")])
    store.submit([energy("b"), energy("c")])
    wait_until(lambda: store.stats().written_total == 3)
    assert [r.id for r in store.query()] == ["a", "b", "c"]
    assert store.stats().pending == 0


def test_close_commits_every_queued_record(path: Path,
                                           open_store: Callable[..., RecordStore]) -> None:
    store = open_store()  # the timed flush is an hour away: only close() can write these
    for batch in range(3):  # 2,700 rows: more than one statement's ROWS_PER_STATEMENT
        store.submit([energy(f"r{batch}-{i}", end=12.5 + batch) for i in range(900)])
    assert store.get("r0-0") is None
    store.close()
    store.close()  # idempotent
    assert sum(1 for _ in RecordReader(path).query()) == 2700 > writer.ROWS_PER_STATEMENT
    assert store.stats().written_total == 2700


def test_resubmitted_id_replaces_the_record(open_store: Callable[..., RecordStore]) -> None:
    store = open_store(flush_interval_s=0.01)
    store.submit([energy("a", dynamic=1.0)])
    wait_until(lambda: store.get("a") is not None)
    store.submit([energy("a", dynamic=2.0, model="other")])
    store.submit([energy("b", dynamic=1.0), energy("b", dynamic=3.0)])  # within one batch
    wait_until(lambda: store.stats().written_total == 4)
    assert sorted((r.id, r.gpu_dynamic_j, r.model) for r in store.query()) == [
        ("a", 2.0, "other"), ("b", 3.0, "llama"),
    ]


def test_retention_removes_only_old_records(path: Path,
                                            open_store: Callable[..., RecordStore]) -> None:
    day = 86400.0
    now = OFFSET + 10 * day
    writer = open_store()
    writer.submit([
        energy("old", start=7 * day, end=7 * day + 5),  # ended 3 days before `now`
        energy("old-expired", start=7 * day, end=None),
        energy("recent", start=10 * day - 65, end=10 * day - 60),
        energy("recent-expired", start=10 * day - 600, end=None),
        energy("started-old-ended-recently", start=7 * day, end=9 * day),
    ])
    writer.close()

    # The first pass of the writer (here the one close() forces) applies retention.
    pruner = open_store(retention_days=2, clock=lambda: now)
    pruner.close()

    assert sorted(r.id for r in RecordReader(path).query()) == [
        "recent", "started-old-ended-recently",
    ]
    assert RecordReader(path).get("recent-expired") is not None
    assert RecordReader(path).get("old-expired") is None
    assert pruner.stats().pruned_total == 2


def test_get_of_an_unknown_id_is_none(open_store: Callable[..., RecordStore]) -> None:
    assert open_store().get("nope") is None


def test_full_queue_refuses_new_records_and_counts_them(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    store = open_store(max_pending=3)
    store.submit([energy("a"), energy("b")])
    store.submit([energy("c"), energy("d"), energy("e")])
    stats = store.stats()
    assert (stats.pending, stats.dropped_total) == (3, 2)
    store.close()
    assert [r.id for r in RecordReader(path).query()] == ["a", "b", "c"], "oldest kept"


def test_failed_write_is_kept_and_retried(monkeypatch: pytest.MonkeyPatch, path: Path,
                                          open_store: Callable[..., RecordStore]) -> None:
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_S", 0.01)
    store = open_store(flush_interval_s=0.01)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer's commit fails
    try:
        store.submit([energy("a")])
        wait_until(lambda: store.stats().write_errors_total >= 1)
        assert store.stats().written_total == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: store.get("a") is not None)
    assert store.stats().dropped_total == 0


def test_a_batch_that_can_never_be_written_does_not_block_later_ones(
    monkeypatch: pytest.MonkeyPatch, open_store: Callable[..., RecordStore]
) -> None:
    real_insert = writer._insert

    def insert(connection: sqlite3.Connection, rows: list[schema.Row]) -> None:
        if any(row[0] == "poison" for row in rows):
            raise sqlite3.IntegrityError("CHECK constraint failed")
        real_insert(connection, rows)

    monkeypatch.setattr(writer, "_insert", insert)
    store = open_store(flush_interval_s=0.01)
    store.submit([energy("poison")])
    wait_until(lambda: store.stats().dropped_total == 1)
    store.submit([energy("after")])
    wait_until(lambda: store.get("after") is not None)
    assert store.get("poison") is None and store.stats().write_errors_total == 1


def test_records_close_cannot_write_are_counted_as_dropped(
    monkeypatch: pytest.MonkeyPatch, path: Path, open_store: Callable[..., RecordStore]
) -> None:
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_S", 0.01)
    store = open_store()
    with closing(sqlite3.connect(path, isolation_level=None)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        store.submit([energy("a"), energy("b")])
        store.close()
        blocker.execute("ROLLBACK")
    stats = store.stats()
    assert (stats.written_total, stats.dropped_total, stats.pending) == (0, 2, 0)


def test_records_that_could_never_be_stored_are_refused_at_submit(
    open_store: Callable[..., RecordStore]
) -> None:
    store = open_store()
    with pytest.raises(ValueError, match="non-finite"):
        store.submit([energy("a", host=math.nan)])
    bad = energy("b")
    object.__setattr__(bad.request, "status", "weird")  # Request is frozen: force it
    with pytest.raises(ValueError, match="unknown status"):
        store.submit([bad])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.submit([energy("c")])


def test_unclosed_store_leaves_a_database_a_second_store_opens(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    first = open_store(flush_interval_s=0.01)
    first.submit([energy("a")])
    wait_until(lambda: first.get("a") is not None)
    # `first` is never closed before the second store opens, as after a killed writer.
    second = open_store(flush_interval_s=0.01)
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert second.get("a") is not None
    second.submit([energy("b")])
    second.close()
    assert RecordReader(path).get("b") is not None


def test_database_of_a_sigkilled_writer_opens_intact(path: Path) -> None:
    child = textwrap.dedent(f"""
        import itertools, time
        from agent.store import RecordStore
        from agent.requests import Request, RequestEnergy
        store = RecordStore({str(path)!r}, pue=1.2, simulated=False, flush_interval_s=0.001)
        for n in itertools.count():
            batch = [RequestEnergy(Request(f"{{n}}-{{i}}", "m", "s", (0,), 1.0, 2.0), 1, 1, 1, 1)
                     for i in range(50)]
            store.submit(batch)
            if n == 5:
                print("writing", flush=True)
            time.sleep(0.001)
    """)
    with subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == "writing\n"
            wait_until(lambda: path.exists() and _count(path) > 0)
        finally:
            process.send_signal(signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, "killed while it was still writing"

    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = RecordStore(path, pue=1.2, simulated=False)
    try:
        store.submit([energy("after")])
    finally:
        store.close()
    assert RecordReader(path).get("after") is not None


def _count(path: Path) -> int:
    return sum(1 for _ in RecordReader(path).query())


def test_reader_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(RecordStoreError, match="no record store"):
        RecordReader(tmp_path / "missing.db")
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(RecordStoreError, match="not a jouleprobe record store"):
        RecordStore(foreign, pue=1.2, simulated=False)
    newer = tmp_path / "newer.db"
    with closing(sqlite3.connect(newer)) as connection:
        connection.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(RecordStoreError, match="newer jouleprobe"):
        RecordReader(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RecordStoreError, match="cannot read"):
        RecordReader(garbage)


def test_summary_covers_only_its_window(open_store: Callable[..., RecordStore]) -> None:
    now = OFFSET + 1000.0
    store = open_store(clock=lambda: now)
    store.submit([
        energy("old", model="a", start=100.0, end=200.0, dynamic=3600.0),
        energy("in", model="a", start=900.0, end=950.0, dynamic=7200.0, static=0.0, host=0.0,
               facility=720.0, prompt=10, completion=90),
    ])
    store.submit_windows("scrape:vllm", [  # 3000 J each; the first ends before the window
        window(190.0, models={"w": Usage(1, 1, 1)}),
        window(950.0, models={"w": Usage(5, 100, 500)}),
    ])
    store.close()
    summary = summarize(store, window_s=300.0)
    assert summary["window_s"] == 300.0
    assert summary["models"] == {"a": {
        "requests": 1,
        "wh_per_query_mean": {"gpu_dynamic": 2.0, "gpu": 2.0, "it": 2.0, "facility": 2.2},
        "it_j_per_completion_token": 80.0,
        "it_j_per_token_all": 72.0,
    }}
    assert summary["windows"] == {"scrape:vllm": {
        "windows": 1,
        "unattributed_share": 0.0,
        "models": {"w": {
            "windows": 1, "requests": 5.0, "gpu_wh_per_query": 3000.0 / 3600 / 5,
            "gpu_j_per_completion_token": 6.0, "gpu_j_per_token_all": 5.0,
        }},
    }}
    with pytest.raises(ValueError, match="window_s"):
        summarize(store, window_s=0)


# --- scrape windows ------------------------------------------------------------------------


def window(start: float, *, models: dict[str, Usage] | None = None, gpus: tuple[int, ...] = (0,),
           watts: float = 300.0, idle_w: float = 100.0) -> WindowFigures:
    """A 10 s window from `start` at `watts` on each of `gpus`, split by `split_window`."""
    energy = {gpu: GpuWindowEnergy(idle_w * 10, (watts - idle_w) * 10, 10.0) for gpu in gpus}
    return split_window(models or {}, energy, start, start + 10.0)


def test_windows_round_trip_with_uncounted_quantities_apart_from_zero(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    store = open_store()
    store.submit_windows("scrape:vllm", [
        window(100.0, models={"a": Usage(4, 100, 300), "b": Usage(0, 0, 100)}, gpus=(0, 1)),
        window(110.0, models={"a": Usage(0, 0, 0), "b": Usage(1, 0, 0)}, gpus=(0, 1)),
    ])
    store.submit_windows("scrape:triton", [window(100.0, models={"r": Usage(requests=7)})])
    store.close()

    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute(
            "SELECT source, start_time, end_time, gpus, weighting, measured_j, unattributed_j, "
            "simulated FROM windows ORDER BY id").fetchall() == [
            ("scrape:vllm", OFFSET + 100.0, OFFSET + 110.0, "0,1", "tokens", 6000.0, 0.0, 0),
            ("scrape:vllm", OFFSET + 110.0, OFFSET + 120.0, "0,1", "requests", 6000.0, 0.0, 0),
            ("scrape:triton", OFFSET + 100.0, OFFSET + 110.0, "0", "requests", 3000.0, 0.0, 0),
        ]
        assert connection.execute(
            "SELECT model, requests, prompt_tokens, completion_tokens FROM window_models "
            "WHERE window_id = 3").fetchall() == [("r", 7.0, None, None)]

    totals = RecordReader(path).window_totals()
    # GPU energy 6000 J per vllm window (2000 static): by tokens 400 : 100 in the first,
    # by requests 0 : 1 in the second.
    assert totals.models == (
        ModelWindows("scrape:triton", "r", 1, 7.0, None, None, 2000.0, 1000.0, simulated=False),
        ModelWindows("scrape:vllm", "a", 2, 4.0, 100.0, 300.0, 3200.0, 1600.0,
                     simulated=False),
        ModelWindows("scrape:vllm", "b", 2, 1.0, 0.0, 100.0, 800.0 + 4000.0, 400.0 + 2000.0,
                     simulated=False),
    )
    assert totals.sources == (
        SourceWindows("scrape:triton", 1, 3000.0, 0.0, simulated=False),
        SourceWindows("scrape:vllm", 2, 12000.0, 0.0, simulated=False),
    )


def test_window_totals_select_by_end_and_model(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    store = open_store(simulated=True)
    store.submit_windows("scrape:vllm", [
        window(100.0, models={"a": Usage(1, 1, 1)}),
        window(200.0, models={"a": Usage(2, 2, 2), "b": Usage(3, 3, 3)}),
        window(300.0, models={"a": Usage(0, 0, 0)}),  # nothing done: all unattributed
    ])
    store.submit_windows("scrape:tgi", [window(200.0, models={"c": Usage(1, 1, 1)})])
    store.close()
    reader = RecordReader(path)

    since = reader.window_totals(since=OFFSET + 210.0)  # windows ending at 210 and later
    assert [(m.source, m.model, m.windows, m.requests) for m in since.models] == [
        ("scrape:tgi", "c", 1, 1.0), ("scrape:vllm", "a", 2, 2.0), ("scrape:vllm", "b", 1, 3.0),
    ]
    vllm = since.sources[1]
    assert (vllm.windows, vllm.measured_j, vllm.unattributed_j) == (2, 6000.0, 3000.0)
    assert vllm.unattributed_share == 0.5 and vllm.simulated
    only_b = reader.window_totals(model="b")
    assert [(m.source, m.model) for m in only_b.models] == [("scrape:vllm", "b")]
    assert [(s.source, s.windows) for s in only_b.sources] == [("scrape:vllm", 3)], \
        "a source's figures cover all its windows"
    assert reader.window_totals(model="nobody") == WindowTotals()


def test_a_version_1_file_is_read_without_windows_and_migrated_by_the_writer(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript((FIXTURES / "records_v1.sql").read_text())
    reader = RecordReader(path)
    (record,) = reader.query()
    assert (record.id, record.scheduled, record.tokens_estimated) == ("v1-request", None, False)
    assert reader.window_totals() == WindowTotals()

    store = open_store()
    store.submit_windows("scrape:vllm", [window(100.0, models={"a": Usage(1, 1, 1)})])
    store.close()
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert [(r.id, r.scheduled, r.tokens_estimated) for r in reader.query()] == [
        ("v1-request", None, False)]
    assert [m.model for m in reader.window_totals().models] == ["a"]


def test_the_trace_coverage_of_a_scraped_server_counts_its_spans_in_its_windows(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    """Windows [100, 110] and [110, 120] of a server that also exports spans: its counters
    say 5 requests and 50 tokens; records of its spans ended at 105, 110 (the first window:
    ends in (start, end]) and 115; one ended after the windows, one of another source in
    them; a window of another server carries no trace source."""
    from agent.store import TraceCoverage

    def span(request_id: str, end: float, completion: int | None,
             source: str = "trace:vllm-a") -> RequestEnergy:
        record = energy(request_id, start=end - 1.0, end=end, completion=completion)
        return replace(record, request=replace(record.request, source=source))

    store = open_store()
    store.submit_windows("scrape:vllm", [
        window(100.0, models={"a": Usage(3, 30, 30)}),
        window(110.0, models={"a": Usage(1, 10, 10), "b": Usage(1, 10, 10)})],
        trace_source="trace:vllm-a")
    store.submit_windows("scrape:tgi", [window(100.0, models={"c": Usage(9, 9, 9)})])
    store.submit([span("s1", 105.0, 10), span("s2", 110.0, 12), span("s3", 115.0, None),
                  span("late", 121.0, 10), span("other", 105.0, 10, source="proxy:vllm")])
    store.close()

    reader = RecordReader(path)
    (coverage,) = reader.window_totals().coverage
    assert coverage == TraceCoverage("scrape:vllm", "trace:vllm-a", 2, 3, 22.0, 5.0, 50.0)
    assert (coverage.requests_share, coverage.completion_tokens_share) == (0.6, 0.44)
    (later,) = reader.window_totals(since=OFFSET + 115.0).coverage
    assert (later.windows, later.span_requests, later.requests) == (1, 1, 2.0)
    assert reader.window_totals(model="c").coverage == (coverage,)  # whatever the model
    assert TraceCoverage("s", "t", 1, 0, 0.0, None, 0.0).requests_share is None


def test_retention_removes_old_windows_with_their_models(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    day = 86400.0
    writer = open_store()
    writer.submit_windows("scrape:vllm", [
        window(7 * day, models={"a": Usage(1, 1, 1), "b": Usage(1, 1, 1)}),
        window(10 * day - 60, models={"a": Usage(1, 1, 1)}),
    ])
    writer.close()
    pruner = open_store(retention_days=2, clock=lambda: OFFSET + 10 * day)
    pruner.close()
    assert pruner.stats().pruned_total == 1
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT count(*) FROM windows").fetchone()[0] == 1
        assert connection.execute("SELECT model FROM window_models").fetchall() == [("a",)]


def test_windows_wait_for_the_flush_and_close_commits_them(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    store = open_store()  # the timed flush is an hour away
    store.submit([energy("r")])
    store.submit_windows("scrape:vllm", [window(100.0, models={"a": Usage(1, 1, 1)})])
    assert store.stats().pending == 2
    assert store.window_totals() == WindowTotals()
    store.close()
    assert store.stats().written_total == 2
    assert [m.model for m in RecordReader(path).window_totals().models] == ["a"]


def test_a_full_queue_refuses_windows_and_counts_them(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    store = open_store(max_pending=3)
    store.submit([energy("a"), energy("b")])
    store.submit_windows("scrape:vllm", [window(100.0), window(110.0)])
    stats = store.stats()
    assert (stats.pending, stats.dropped_total) == (3, 1)
    store.close()
    assert RecordReader(path).window_totals().sources[0].windows == 1, "oldest kept"
    with pytest.raises(RuntimeError, match="closed"):
        store.submit_windows("scrape:vllm", [window(120.0)])


def test_windows_that_could_never_be_stored_are_refused_at_submit(
    open_store: Callable[..., RecordStore]
) -> None:
    bad = window(100.0, models={"a": Usage(requests=math.inf)})
    with pytest.raises(ValueError, match="non-finite"):
        open_store().submit_windows("scrape:vllm", [bad])


def test_records_submitted_while_the_writer_flushes_are_all_counted_and_stored(
    path: Path, open_store: Callable[..., RecordStore]
) -> None:
    """Submitters race the writer thread's flushes (which take the whole queue): every
    record ends up written or dropped, and every written one is in the file. (A submit that
    took the queue before the writer swapped it once lost its records uncounted, in CI.)"""
    store = open_store(flush_interval_s=1e-4, max_pending=50)
    per_thread, threads = 10_000, 3

    def submit(thread: int) -> None:
        for i in range(per_thread):
            store.submit([energy(f"t{thread}-{i}")])

    workers = [threading.Thread(target=submit, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.close()
    stats = store.stats()
    assert stats.written_total + stats.dropped_total == per_thread * threads
    assert _count(path) == stats.written_total
