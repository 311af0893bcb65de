"""`jouleprobe report`: its arguments, and the rendered report of a store."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from agent.report.drivers import ModelDrivers, parse_predict
from agent.report.drivers import explain as explain_records
from agent.report.drivers import predict as predict_energy
from agent.report.model import NodeTotals, build_report
from agent.report.render import FORMATS, render
from agent.report.workloads import render_workloads
from agent.store import RecordReader, RecordStoreError, StoredRequest
from agent.units import duration_seconds


def parse_since(text: str, now: float) -> float:
    """`--since` as UTC epoch seconds: a duration back from `now` ("90s", "30m", "1h",
    "2d", "1w"; "m" is minutes) or an ISO 8601 time ("2025-06-01", "2025-06-01T12:00:00Z",
    "2025-06-01T14:00+02:00"). A time without an offset is taken as UTC, like every time
    this report shows.
    """
    value = text.strip()
    seconds = duration_seconds(value)
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"--since: the duration must be longer than 0, got {text!r}")
        if seconds > now:
            raise ValueError(f"--since: {text!r} reaches back before 1970")
        return now - seconds
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since: expected a duration (30m, 1h, 2d) or an ISO 8601 time "
            f"(2025-06-01T12:00:00Z), got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    since = moment.timestamp()
    if since > now:
        raise ValueError(f"--since: {text!r} is in the future")
    return since


def run_report(
    store_path: str,
    since: str | None,
    fmt: str,
    model: str | None,
    *,
    node_totals: NodeTotals | None = None,
    explain: bool = False,
    predict: str | None = None,
    workloads_by: str | None = None,
) -> str:
    """`jouleprobe report`: the rendered report of the store at `store_path`; with
    `explain`, what drives each model's energy; with `predict` ("prompt=500,completion=300"),
    the expected energy of such a request (`agent.report.drivers`); with `workloads_by`
    (`--workloads --by namespace`), the GPU energy by workload group instead
    (`agent.report.workloads`).

    Raises ValueError naming the bad argument (--store, --since, --format, --predict, --by).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    now = datetime.now(UTC).timestamp()
    since_s = parse_since(since, now) if since is not None else None
    if workloads_by is not None:
        for flag, given in (("--model", model), ("--explain", explain), ("--predict", predict)):
            if given:
                raise ValueError(f"{flag}: applies to the request report, not --workloads")
        try:
            totals = RecordReader(store_path).workloads(since=since_s, by=workloads_by)
        except RecordStoreError as exc:
            raise ValueError(f"--store: {exc}") from None
        return render_workloads(totals, fmt, since=since_s)
    asked = parse_predict(predict) if predict is not None else None
    try:
        reader = RecordReader(store_path)
        records: Iterable[StoredRequest] = reader.query(since=since_s, model=model)
        drivers: tuple[ModelDrivers, ...] = ()
        if explain or asked is not None:
            kept = list(records)  # read twice: for the fits and for the report
            drivers, records = explain_records(kept), kept
        report = build_report(
            records, generated=now, since=since_s, model=model, node_totals=node_totals,
            windows=reader.window_totals(since=since_s, model=model),
            drivers=drivers if explain else (),
            predictions=predict_energy(drivers, *asked) if asked is not None else (),
        )
    except RecordStoreError as exc:
        raise ValueError(f"--store: {exc}") from None
    return render(report, fmt)
