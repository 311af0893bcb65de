"""The record store as the HTTP API reads it (`exporters.http.Records`): one request's
record as stored, and GET /api/v1/summary, the report's figures over the latest window.

The store only stores; the summary is a report, computed as `jouleprobe report` computes
it, so it is made here and the store never depends on the report.
"""

from __future__ import annotations

from typing import Any

from agent.report.model import build_report, summary
from agent.store import RecordReader


def summarize(reader: RecordReader, window_s: float) -> dict[str, Any]:
    """Per model over the last `window_s` seconds of the reader's clock: count, mean Wh per
    query at each boundary, J per token; and the scrape windows' figures
    (`agent.report.model.summary`)."""
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    now = reader.clock()
    since = now - window_s
    built = build_report(reader.query(since=since), generated=now, since=since,
                         windows=reader.window_totals(since=since))
    return summary(built, window_s)


class RecordsApi:
    """What GET /api/v1/requests/{id} and GET /api/v1/summary read, over `reader`."""

    def __init__(self, reader: RecordReader) -> None:
        self.reader = reader

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self.reader.get(request_id)

    def summary(self, window_s: float) -> dict[str, Any]:
        return summarize(self.reader, window_s)
