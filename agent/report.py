"""Per-model energy report over the record store (`jouleprobe report`, /api/v1/summary):
per-request records, and the windows of scraped servers.

Every figure is computed one way, here, for every output (table, JSON, CSV, the summary
endpoint):

- **Boundaries** are nested totals per request, in joules as stored, shown in Wh:
  `gpu_dynamic`; `gpu` = gpu_dynamic + gpu_static; `it` = gpu + host (CPU + DRAM);
  `facility` = it + facility overhead = it × PUE (the full boundary that Google's 0.24 Wh
  per prompt uses).
- **Wh per query**: mean, median, p90 and p99 over the model's finished requests, whatever
  their status: a cancelled or failed request still spent the energy, and leaving it out
  would make the fleet look cheaper than it is. The status counts are shown next to it.
  Requests still running at the agent's maximum age (stored without an end) are not
  finished and not counted; late-reported ones (figures for only part of their lifetime,
  flagged `late` in their record) are.
- **Percentiles** use linear interpolation between closest ranks (Hyndman & Fan type 7,
  the default of numpy and of spreadsheets' PERCENTILE.INC): for sorted x₀…xₙ₋₁ and
  q in [0, 1], h = (n − 1)·q and the value is x⌊h⌋ + (h − ⌊h⌋)(x⌊h⌋₊₁ − x⌊h⌋). It is
  continuous in q, so a p99 over few requests moves smoothly instead of jumping to the
  maximum as nearest-rank does.
- **Energy per token**: the store holds a request's energy as a whole, not split into its
  prefill phase [start, first token) and decode phase, so no honest "J per prompt token"
  exists. Two ratios are given, both at the IT boundary, both as *ratio of sums* over the
  requests that reported both token counts (so a long request weighs by its size, as in
  fleet extrapolation E = J/token × tokens):
  `it_j_per_completion_token` = IT energy ÷ completion tokens (prefill energy included),
  `it_j_per_token_all` = IT energy ÷ (prompt + completion tokens); and the same two at the
  GPU boundary (`gpu_j_per_…`), to compare with scrape windows, which have no host energy.
- **Scrape windows** (servers scraped for their own metrics, which count requests and
  tokens per model but time no request): per (source, model), the windows' summed
  requests, tokens and GPU energy (`gpu_dynamic`, `gpu_static`), and ratios of those sums:
  `gpu_wh_per_query` = GPU energy ÷ requests, `gpu_j_per_completion_token` and
  `gpu_j_per_token_all` as above (all: where both kinds are counted). They are means, with
  no percentiles (a window holds no per-request values), at the GPU boundary only: host
  and facility energy are not given to windows (`agent.intake.scrapers.window` says why).
  A quantity the server does not count is None (shown "-", empty in CSV), never 0. Per
  source, the unattributed share is the part of its windows' GPU energy that no model
  received (windows in which its server did nothing). Windows are selected by their end,
  as requests are; `--model` selects theirs too.
- **Unattributed share** (only when the caller supplies node totals, e.g. from the
  `jouleprobe_gpu_energy_joules_total` and `jouleprobe_gpu_unattributed_energy_joules_total`
  counters over the same period): unattributed GPU energy ÷ GPU energy. It is a node figure,
  not a per-model one.
- **Simulated GPUs**: a model (or a source's windows) is `simulated` when any of its
  records (windows) was measured on simulated GPUs, and so is the report when any is;
  every format says so (a first line in the table, `simulated` in JSON and in each CSV
  row), so that a simulated figure is never mistaken for a measurement.
- **CSV** holds both levels in one table, one row per model (`level` = `request`, over
  every intake source, `source` empty) or per (source, model) (`level` = `window`). A
  column that does not apply to a level is empty. Window rows fill `source`, `windows`,
  `requests`, the token counts, `gpu_wh_mean` (their Wh per query: a mean of per-request
  values is also GPU energy ÷ requests), the two `gpu_j_per_…` ratios, `unattributed_share`
  (their source's) and `simulated`; request rows fill all but `source` and `windows`. The
  GPU-boundary columns are thus comparable across levels.

Times are UTC. The functions are pure except `run_report`, which reads a store.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from agent.requests import STATUSES
from agent.units import JOULES_PER_WH, flag_text

if TYPE_CHECKING:
    from agent.records import StoredRequest

Boundary = Literal["gpu_dynamic", "gpu", "it", "facility"]
BOUNDARIES: tuple[Boundary, ...] = ("gpu_dynamic", "gpu", "it", "facility")
BOUNDARY_DEFINITIONS: Mapping[Boundary, str] = {
    "gpu_dynamic": "GPU energy above the idle baseline",
    "gpu": "gpu_dynamic + gpu_static",
    "it": "gpu + host (CPU + DRAM)",
    "facility": "it × PUE",
}
FORMATS: tuple[str, ...] = ("table", "json", "csv")
SIMULATED_LINE = "SIMULATED GPUs: these figures come from simulated hardware, not measurements"
"""The table's first line when any of its records was measured on simulated GPUs."""


PERCENTILE_METHOD = "linear interpolation between closest ranks (Hyndman-Fan type 7)"
TOKEN_DEFINITIONS: Mapping[str, str] = {
    "it_j_per_completion_token": "IT energy ÷ completion tokens (prefill energy included)",
    "it_j_per_token_all": "IT energy ÷ (prompt + completion tokens)",
    "gpu_j_per_completion_token": "GPU energy ÷ completion tokens (prefill energy included)",
    "gpu_j_per_token_all": "GPU energy ÷ (prompt + completion tokens)",
}
WINDOW_DEFINITION = (
    "ratio-of-sums means over whole scrape windows, whose GPU energy on the source's GPUs is "
    "shared among its models by tokens (by requests where the server counts no tokens): "
    "no percentiles (a window has no per-request values), GPU boundary only (the host "
    "serves every server of the node, and a window has no per-request timing to share it by)"
)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) of ascending `ordered`, by linear interpolation (type 7)."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    h = (len(ordered) - 1) * q
    low = math.floor(h)
    if low + 1 >= len(ordered):
        return ordered[-1]
    return ordered[low] + (h - low) * (ordered[low + 1] - ordered[low])


@dataclass(frozen=True, slots=True)
class Distribution:
    """Per-request values of one boundary, in Wh."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        ordered = sorted(values)
        if not ordered:
            raise ValueError("distribution of no values")
        return cls(
            mean=math.fsum(ordered) / len(ordered),
            median=percentile(ordered, 0.5),
            p90=percentile(ordered, 0.9),
            p99=percentile(ordered, 0.99),
        )


@dataclass(frozen=True, slots=True)
class ModelReport:
    model: str
    requests: int
    by_status: Mapping[str, int]
    wh_per_query: Mapping[Boundary, Distribution]
    requests_with_tokens: int
    """Requests that reported both prompt and completion tokens: the token figures' basis."""
    prompt_tokens: int
    completion_tokens: int
    it_j_per_completion_token: float | None
    it_j_per_token_all: float | None
    gpu_j_per_completion_token: float | None
    gpu_j_per_token_all: float | None
    simulated: bool
    """Some of its records were measured on simulated GPUs."""


@dataclass(frozen=True, slots=True)
class NodeTotals:
    """GPU energy of the node over the report's period, and the part no request received."""

    gpu_j: float
    unattributed_gpu_j: float

    def __post_init__(self) -> None:
        if not self.gpu_j > 0:
            raise ValueError(f"node totals: GPU energy must be > 0 J, got {self.gpu_j}")
        if not 0 <= self.unattributed_gpu_j <= self.gpu_j:
            raise ValueError(
                f"node totals: unattributed energy must be in [0, {self.gpu_j}] J, "
                f"got {self.unattributed_gpu_j}"
            )

    @property
    def unattributed_share(self) -> float:
        return self.unattributed_gpu_j / self.gpu_j


@dataclass(frozen=True, slots=True)
class ModelWindows:
    """One model's scrape windows from one source over the period, summed
    (`agent.records.RecordReader.window_totals`); None for a quantity the server does not
    count."""

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
class WindowTotals:
    """The scrape windows of a report's period: per (source, model), and per source."""

    models: tuple[ModelWindows, ...] = ()
    sources: tuple[SourceWindows, ...] = ()

    def by_source(self) -> Iterator[tuple[SourceWindows, list[ModelWindows]]]:
        for source in self.sources:
            yield source, [model for model in self.models if model.source == source.source]


@dataclass(frozen=True, slots=True)
class Report:
    generated: float
    """Wall-clock time (UTC epoch seconds) the report was computed."""
    since: float | None
    """Requests that ended at or after this time (UTC epoch seconds); None: all stored."""
    model: str | None
    """The model the report was restricted to, if any."""
    models: tuple[ModelReport, ...]
    node_totals: NodeTotals | None = None
    windows: WindowTotals = WindowTotals()

    @property
    def simulated(self) -> bool:
        """Some of its records or windows were measured on simulated GPUs."""
        return any(model.simulated for model in self.models) or any(
            source.simulated for source in self.windows.sources
        )


@dataclass(slots=True)
class _ModelAccumulator:
    joules: dict[Boundary, list[float]] = field(
        default_factory=lambda: {boundary: [] for boundary in BOUNDARIES}
    )
    statuses: Counter[str] = field(default_factory=Counter)
    token_requests: int = 0
    token_gpu_j: list[float] = field(default_factory=list)
    token_it_j: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    simulated: bool = False

    def add(self, record: StoredRequest) -> None:
        gpu = record.gpu_dynamic_j + record.gpu_static_j
        it = gpu + record.host_j
        for boundary, value in zip(
            BOUNDARIES, (record.gpu_dynamic_j, gpu, it, it + record.facility_j), strict=True
        ):
            self.joules[boundary].append(value)
        self.statuses[record.status] += 1
        self.simulated = self.simulated or record.simulated
        if record.prompt_tokens is not None and record.completion_tokens is not None:
            self.token_requests += 1
            self.token_gpu_j.append(gpu)
            self.token_it_j.append(it)
            self.prompt_tokens += record.prompt_tokens
            self.completion_tokens += record.completion_tokens

    def finish(self, model: str) -> ModelReport:
        gpu_j, it_j = math.fsum(self.token_gpu_j), math.fsum(self.token_it_j)
        all_tokens = self.prompt_tokens + self.completion_tokens
        return ModelReport(
            model=model,
            requests=sum(self.statuses.values()),
            by_status={status: self.statuses[status] for status in STATUSES},
            wh_per_query={
                boundary: Distribution.of(j / JOULES_PER_WH for j in values)
                for boundary, values in self.joules.items()
            },
            requests_with_tokens=self.token_requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            it_j_per_completion_token=(
                it_j / self.completion_tokens if self.completion_tokens else None
            ),
            it_j_per_token_all=it_j / all_tokens if all_tokens else None,
            gpu_j_per_completion_token=(
                gpu_j / self.completion_tokens if self.completion_tokens else None
            ),
            gpu_j_per_token_all=gpu_j / all_tokens if all_tokens else None,
            simulated=self.simulated,
        )


def build_report(
    records: Iterable[StoredRequest],
    *,
    generated: float,
    since: float | None = None,
    model: str | None = None,
    node_totals: NodeTotals | None = None,
    windows: WindowTotals | None = None,
) -> Report:
    """The report over `records` and `windows` (both already selected by `since` and
    `model`), models by name.

    Memory grows with the number of records (four floats each, for the percentiles).
    """
    accumulators: dict[str, _ModelAccumulator] = {}
    for record in records:
        accumulators.setdefault(record.model, _ModelAccumulator()).add(record)
    models = tuple(accumulators[name].finish(name) for name in sorted(accumulators))
    return Report(generated, since, model, models, node_totals, windows or WindowTotals())


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_since(text: str, now: float) -> float:
    """`--since` as UTC epoch seconds: a duration back from `now` ("90s", "30m", "1h",
    "2d", "1w"; "m" is minutes) or an ISO 8601 time ("2025-06-01", "2025-06-01T12:00:00Z",
    "2025-06-01T14:00+02:00"). A time without an offset is taken as UTC, like every time
    this report shows.
    """
    value = text.strip()
    duration = _DURATION.fullmatch(value)
    if duration:
        seconds = float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
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


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _model_json(model: ModelReport) -> dict[str, Any]:
    return {
        "model": model.model,
        "requests": model.requests,
        "requests_by_status": dict(model.by_status),
        "wh_per_query": {
            boundary: {
                "mean": dist.mean, "median": dist.median, "p90": dist.p90, "p99": dist.p99,
            }
            for boundary, dist in model.wh_per_query.items()
        },
        "requests_with_tokens": model.requests_with_tokens,
        "prompt_tokens": model.prompt_tokens,
        "completion_tokens": model.completion_tokens,
        "it_j_per_completion_token": model.it_j_per_completion_token,
        "it_j_per_token_all": model.it_j_per_token_all,
        "gpu_j_per_completion_token": model.gpu_j_per_completion_token,
        "gpu_j_per_token_all": model.gpu_j_per_token_all,
        "simulated": model.simulated,
    }


def _window_ratios(model: ModelWindows) -> dict[str, Any]:
    return {
        "windows": model.windows,
        "requests": model.requests,
        "gpu_wh_per_query": model.gpu_wh_per_query,
        "gpu_j_per_completion_token": model.gpu_j_per_completion_token,
        "gpu_j_per_token_all": model.gpu_j_per_token_all,
    }


def _windows_json(windows: WindowTotals) -> list[dict[str, Any]]:
    return [
        {
            "source": source.source,
            "windows": source.windows,
            "gpu_j": source.measured_j,
            "unattributed_j": source.unattributed_j,
            "unattributed_share": source.unattributed_share,
            "simulated": source.simulated,
            "models": [
                {
                    "model": model.model,
                    **_window_ratios(model),
                    "prompt_tokens": model.prompt_tokens,
                    "completion_tokens": model.completion_tokens,
                    "gpu_dynamic_j": model.gpu_dynamic_j,
                    "gpu_static_j": model.gpu_static_j,
                    "simulated": model.simulated,
                }
                for model in models
            ],
        }
        for source, models in windows.by_source()
    ]


def _definitions() -> dict[str, Any]:
    return {
        "boundaries": dict(BOUNDARY_DEFINITIONS),
        "percentiles": PERCENTILE_METHOD,
        "tokens": dict(TOKEN_DEFINITIONS),
        "statuses_included": list(STATUSES),
        "windows": WINDOW_DEFINITION,
    }


def to_json(report: Report) -> dict[str, Any]:
    """The whole report as JSON-ready data (energy in Wh per query, J per token; the
    windows' energy sums in J)."""
    totals = report.node_totals
    return {
        "generated": _iso(report.generated),
        "since": _iso(report.since) if report.since is not None else None,
        "model": report.model,
        "simulated": report.simulated,
        "definitions": _definitions(),
        "unattributed_share": totals.unattributed_share if totals else None,
        "node_gpu_j": totals.gpu_j if totals else None,
        "models": [_model_json(model) for model in report.models],
        "windows": _windows_json(report.windows),
    }


def summary(report: Report, window_s: float) -> dict[str, Any]:
    """The compact per-model figures of GET /api/v1/summary: count, mean Wh per query at
    each boundary, J per token; the scrape windows' figures per source and model; and
    whether any came from simulated GPUs."""
    return {
        "window_s": window_s,
        "since": _iso(report.since) if report.since is not None else None,
        "simulated": report.simulated,
        "models": {
            model.model: {
                "requests": model.requests,
                "wh_per_query_mean": {
                    boundary: dist.mean for boundary, dist in model.wh_per_query.items()
                },
                "it_j_per_completion_token": model.it_j_per_completion_token,
                "it_j_per_token_all": model.it_j_per_token_all,
            }
            for model in report.models
        },
        "windows": {
            source.source: {
                "windows": source.windows,
                "unattributed_share": source.unattributed_share,
                "models": {model.model: _window_ratios(model) for model in models},
            }
            for source, models in report.windows.by_source()
        },
    }


_STATS = ("mean", "median", "p90", "p99")
_CSV_HEADER = [
    "level", "source", "model", "windows", "requests",
    *(f"requests_{status}" for status in STATUSES),
    *(f"{boundary}_wh_{stat}" for boundary in BOUNDARIES for stat in _STATS),
    "requests_with_tokens", "prompt_tokens", "completion_tokens",
    "it_j_per_completion_token", "it_j_per_token_all",
    "gpu_j_per_completion_token", "gpu_j_per_token_all", "unattributed_share", "simulated",
]


def _render_csv(report: Report) -> str:
    """One row per model, then one per (source, model) of the windows (module docstring:
    CSV); empty cells where a figure does not apply or is unknown."""
    out = io.StringIO()
    writer = csv.DictWriter(out, _CSV_HEADER, restval="", lineterminator="\n")
    writer.writeheader()
    share = report.node_totals.unattributed_share if report.node_totals else None
    for model in report.models:
        row: dict[str, object] = {
            "level": "request", "model": model.model, "requests": model.requests,
            **{f"requests_{status}": model.by_status[status] for status in STATUSES},
            "requests_with_tokens": model.requests_with_tokens,
            "prompt_tokens": model.prompt_tokens, "completion_tokens": model.completion_tokens,
            "it_j_per_completion_token": _csv_number(model.it_j_per_completion_token),
            "it_j_per_token_all": _csv_number(model.it_j_per_token_all),
            "gpu_j_per_completion_token": _csv_number(model.gpu_j_per_completion_token),
            "gpu_j_per_token_all": _csv_number(model.gpu_j_per_token_all),
            "unattributed_share": _csv_number(share), "simulated": flag_text(model.simulated),
        }
        for boundary in BOUNDARIES:
            dist = model.wh_per_query[boundary]
            for stat, value in zip(_STATS, (dist.mean, dist.median, dist.p90, dist.p99),
                                   strict=True):
                row[f"{boundary}_wh_{stat}"] = repr(value)
        writer.writerow(row)
    for source, models in report.windows.by_source():
        for window in models:
            writer.writerow({
                "level": "window", "source": window.source, "model": window.model,
                "windows": window.windows, "requests": _csv_number(window.requests),
                "prompt_tokens": _csv_number(window.prompt_tokens),
                "completion_tokens": _csv_number(window.completion_tokens),
                "gpu_wh_mean": _csv_number(window.gpu_wh_per_query),
                "gpu_j_per_completion_token": _csv_number(window.gpu_j_per_completion_token),
                "gpu_j_per_token_all": _csv_number(window.gpu_j_per_token_all),
                "unattributed_share": _csv_number(source.unattributed_share),
                "simulated": flag_text(window.simulated),
            })
    return out.getvalue()


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _formatter(values: Iterable[float | None]) -> Callable[[float | None], str]:
    """Fixed-point with one number of decimals for a whole column group, enough to give
    the smallest non-zero value four significant digits (so that columns line up)."""
    smallest = min((abs(v) for v in values if v), default=1.0)
    decimals = min(max(3 - math.floor(math.log10(smallest)), 0), 12)
    return lambda value: "-" if value is None else f"{value:.{decimals}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Fixed-width columns: the first `left` left-aligned (names), the rest right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for cells in (headers, *rows):
        padded = [
            cell.ljust(width) if index < left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return lines


def _period(report: Report) -> str:
    scope = f"model {report.model}, " if report.model else ""
    if report.since is None:
        return f"{scope}all stored requests and windows (report at {_iso(report.generated)})"
    return (f"{scope}requests and windows that ended {_iso(report.since)} … "
            f"{_iso(report.generated)}")


def _render_table(report: Report) -> str:
    lines = [SIMULATED_LINE] if report.simulated else []
    lines += [f"jouleprobe report: {_period(report)}", ""]
    if report.models:
        lines += _request_section(report)
    else:
        lines.append("no requests in the record store for this period")
    if report.windows.models:
        lines += ["", *_window_section(report.windows)]
    return "\n".join(lines) + "\n"


def _request_section(report: Report) -> list[str]:
    per_token = _formatter(
        value for m in report.models
        for value in (m.it_j_per_completion_token, m.it_j_per_token_all)
    )
    lines = ["Requests, and energy per token at the IT boundary"]
    lines += _table(
        ["model", "requests", *STATUSES, "with tokens", "prompt tokens", "completion tokens",
         "J/completion token", "J/token (all)"],
        [
            [model.model, str(model.requests), *(str(model.by_status[s]) for s in STATUSES),
             str(model.requests_with_tokens), str(model.prompt_tokens),
             str(model.completion_tokens), per_token(model.it_j_per_completion_token),
             per_token(model.it_j_per_token_all)]
            for model in report.models
        ],
        left=1,
    )
    wh = _formatter(
        value for m in report.models for d in m.wh_per_query.values()
        for value in (d.mean, d.median, d.p90, d.p99)
    )
    lines += ["", "Energy per query"]
    rows = []
    for model in report.models:
        for index, boundary in enumerate(BOUNDARIES):
            dist = model.wh_per_query[boundary]
            rows.append([
                model.model if index == 0 else "", boundary,
                *(wh(value) for value in (dist.mean, dist.median, dist.p90, dist.p99)),
            ])
    lines += _table(["model", "boundary", "mean Wh", "median Wh", "p90 Wh", "p99 Wh"], rows, 2)
    lines += [
        "",
        *(f"{b:<12} = {d}" for b, d in BOUNDARY_DEFINITIONS.items()),
        f"Percentiles: {PERCENTILE_METHOD}; all statuses counted.",
        "J/completion token = " + TOKEN_DEFINITIONS["it_j_per_completion_token"] + ",",
        "J/token (all) = " + TOKEN_DEFINITIONS["it_j_per_token_all"] + ",",
        "both over the requests that reported their tokens (column: with tokens).",
    ]
    if report.node_totals is not None:
        totals = report.node_totals
        lines.append(
            f"Unattributed GPU energy (node): {totals.unattributed_share:.1%} of "
            f"{totals.gpu_j / JOULES_PER_WH:.4g} Wh."
        )
    return lines


def _window_section(windows: WindowTotals) -> list[str]:
    models = windows.models
    energy = _formatter(j / JOULES_PER_WH for m in models for j in (m.gpu_dynamic_j,
                                                                    m.gpu_static_j))
    per_query = _formatter(m.gpu_wh_per_query for m in models)
    per_token = _formatter(
        value for m in models for value in (m.gpu_j_per_completion_token, m.gpu_j_per_token_all)
    )
    lines = ["Scraped windows (window-level, GPU boundary)"]
    lines += _table(
        ["source", "model", "windows", "requests", "prompt tokens", "completion tokens",
         "dynamic Wh", "static Wh", "Wh/query", "J/completion token", "J/token (all)"],
        [
            [m.source, m.model, str(m.windows), *(_count(value) for value in (
                m.requests, m.prompt_tokens, m.completion_tokens)),
             energy(m.gpu_dynamic_j / JOULES_PER_WH), energy(m.gpu_static_j / JOULES_PER_WH),
             per_query(m.gpu_wh_per_query), per_token(m.gpu_j_per_completion_token),
             per_token(m.gpu_j_per_token_all)]
            for m in models
        ],
        left=2,
    )
    lines.append("")
    for source in windows.sources:
        share = source.unattributed_share
        lines.append(
            f"{source.source}: {source.windows} window(s), "
            f"{source.measured_j / JOULES_PER_WH:.4g} Wh of GPU energy"
            + (f", {share:.1%} of it unattributed (windows in which the server did nothing)."
               if share is not None else ".")
        )
    lines += [
        *textwrap.wrap(f"Window figures are {WINDOW_DEFINITION}.", width=90),
        "Wh/query = GPU energy ÷ requests,",
        "J/completion token = " + TOKEN_DEFINITIONS["gpu_j_per_completion_token"] + ",",
        "J/token (all) = " + TOKEN_DEFINITIONS["gpu_j_per_token_all"] + ";",
        "dynamic and static Wh: the windows' GPU energy; \"-\": the server does not count it.",
    ]
    return lines


def _count(value: float | None) -> str:
    """A count from a server's counters: a whole number as such, "-" where not counted."""
    if value is None:
        return "-"
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def render(report: Report, fmt: str) -> str:
    """The report as `table` (fixed-width text), `json` or `csv` (one row per model, and
    per scraped source and model)."""
    if fmt == "table":
        return _render_table(report)
    if fmt == "json":
        return json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _render_csv(report)
    raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


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
    # Imported here, not at the top: agent.records imports this module for its summary.
    from agent.records import RecordReader, RecordStoreError

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
