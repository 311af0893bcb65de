"""`jouleprobe report`: its arguments, and the rendered report of a store."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.report.model import NodeTotals, build_report
from agent.report.render import FORMATS, render
from agent.store import RecordReader, RecordStoreError
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
) -> str:
    """`jouleprobe report`: the rendered report of the store at `store_path`.

    Raises ValueError naming the bad argument (--store, --since, --format).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    now = datetime.now(UTC).timestamp()
    since_s = parse_since(since, now) if since is not None else None
    try:
        reader = RecordReader(store_path)
        report = build_report(
            reader.query(since=since_s, model=model),
            generated=now, since=since_s, model=model, node_totals=node_totals,
            windows=reader.window_totals(since=since_s, model=model),
        )
    except RecordStoreError as exc:
        raise ValueError(f"--store: {exc}") from None
    return render(report, fmt)
