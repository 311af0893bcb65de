"""Per-model energy report over the record store (`jouleprobe report`, /api/v1/summary):
per-request records, and the windows of scraped servers.

`model` holds the figures and how each is computed (pure), `render` the table, JSON and
CSV outputs, `command` the `jouleprobe report` command, `api` what the HTTP API reads.
"""

from agent.report.api import RecordsApi, summarize
from agent.report.command import parse_since, run_report
from agent.report.model import (
    BOUNDARIES,
    Boundary,
    Distribution,
    ModelReport,
    NodeTotals,
    Report,
    build_report,
    percentile,
    summary,
    to_json,
)
from agent.report.render import FORMATS, SIMULATED_LINE, render

__all__ = [
    "BOUNDARIES", "FORMATS", "SIMULATED_LINE", "Boundary", "Distribution", "ModelReport",
    "NodeTotals", "RecordsApi", "Report", "build_report", "parse_since", "percentile",
    "render", "run_report", "summarize", "summary", "to_json",
]
