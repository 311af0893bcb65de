"""The report as text: a fixed-width table, JSON (`agent.report.model.to_json`) or CSV.

**CSV** holds both levels in one table, one row per model (`level` = `request`, over
every intake source, `source` empty) or per (source, model) (`level` = `window`). A
column that does not apply to a level is empty. Window rows fill `source`, `windows`,
`requests`, the token counts, `gpu_wh_mean` (their Wh per query: a mean of per-request
values is also GPU energy ÷ requests), the two `gpu_j_per_…` ratios, `unattributed_share`
(their source's) and `simulated`; request rows fill all but `source` and `windows`. The
GPU-boundary columns are thus comparable across levels. With `--explain`, `fit` rows (per
model, boundary and concurrency band: the coefficients with their interval, R², or why the
fit was refused) and `band` rows (per model, dimension and band: requests and Wh per query)
follow. The trace coverage and predictions are in the table and JSON only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence

from agent.report.fit import EnergyFit, Interval, Refused
from agent.report.model import (
    BOUNDARIES,
    BOUNDARY_DEFINITIONS,
    COVERAGE_DEFINITION,
    DRIVERS_DEFINITION,
    PERCENTILE_METHOD,
    TOKEN_DEFINITIONS,
    WINDOW_DEFINITION,
    Report,
    iso_utc,
    to_json,
)
from agent.requests import STATUSES
from agent.store import WindowTotals
from agent.units import JOULES_PER_WH, flag_text

FORMATS: tuple[str, ...] = ("table", "json", "csv")
SIMULATED_LINE = "SIMULATED GPUs: these figures come from simulated hardware, not measurements"
"""The table's first line when any of its records was measured on simulated GPUs."""

_STATS = ("mean", "median", "p90", "p99")
_CSV_HEADER = [
    "level", "source", "model", "windows", "requests",
    *(f"requests_{status}" for status in STATUSES),
    *(f"{boundary}_wh_{stat}" for boundary in BOUNDARIES for stat in _STATS),
    "requests_with_tokens", "prompt_tokens", "completion_tokens",
    "it_j_per_completion_token", "it_j_per_token_all",
    "gpu_j_per_completion_token", "gpu_j_per_token_all", "unattributed_share", "simulated",
    "dimension", "band", "boundary", "concurrency_band",
    *(f"{name}_{part}" for name in ("per_request_j", "per_prompt_token_j",
                                    "per_completion_token_j") for part in ("value", "low",
                                                                           "high")),
    "r_squared", "refused", "gpu_model",
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
    for drivers in report.drivers:
        for fit in drivers.fits:
            row = {"level": "fit", "model": drivers.model, "gpu_model": drivers.gpu_model or "",
                   "boundary": fit.boundary,
                   "concurrency_band": fit.band, "requests": fit.requests}
            if isinstance(fit, Refused):
                row["refused"] = fit.reason
            else:
                for name in ("per_request_j", "per_prompt_token_j", "per_completion_token_j"):
                    interval: Interval = getattr(fit, name)
                    row.update({f"{name}_value": repr(interval.value),
                                f"{name}_low": repr(interval.low),
                                f"{name}_high": repr(interval.high)})
                row["r_squared"] = repr(fit.r_squared)
            writer.writerow(row)
        for band in drivers.bands:
            writer.writerow({"level": "band", "model": drivers.model,
                             "gpu_model": drivers.gpu_model or "",
                             "dimension": band.dimension, "band": band.band,
                             "requests": band.requests, "it_wh_mean": repr(band.it_wh_mean),
                             "it_wh_median": repr(band.it_wh_median),
                             "gpu_wh_mean": repr(band.gpu_wh_mean)})
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
        return f"{scope}all stored requests and windows (report at {iso_utc(report.generated)})"
    return (f"{scope}requests and windows that ended {iso_utc(report.since)} … "
            f"{iso_utc(report.generated)}")


def _render_table(report: Report) -> str:
    lines = [SIMULATED_LINE] if report.simulated else []
    lines += [f"jouleprobe report: {_period(report)}", ""]
    if report.models:
        lines += _request_section(report)
    else:
        lines.append("no requests in the record store for this period")
    if report.windows.models:
        lines += ["", *_window_section(report.windows)]
    if report.windows.coverage:
        lines += ["", *_coverage_section(report.windows)]
    if report.drivers:
        lines += ["", *_drivers_section(report)]
    if report.predictions:
        lines += ["", *_predictions_section(report)]
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
    for model in report.models:
        if model.requests_queue_unknown:
            lines += textwrap.wrap(
                f"{model.model}: queue time unknown for {model.requests_queue_unknown} of "
                f"{model.requests} requests (their intake cannot see the server's queue, as "
                "the plain proxy in front of vLLM cannot): what the GPU did while they "
                "waited is in their figures.", width=90)
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


def _coverage_section(windows: WindowTotals) -> list[str]:
    lines = ["Trace coverage (the spans' share of what the server's counters finished)"]
    lines += _table(
        ["source", "spans of", "windows", "requests", "of", "share", "completion tokens",
         "of", "share"],
        [
            [c.source, c.trace_source, str(c.windows), str(c.span_requests),
             _count(c.requests), _share(c.requests_share), _count(c.span_completion_tokens),
             _count(c.completion_tokens), _share(c.completion_tokens_share)]
            for c in windows.coverage
        ],
        left=2,
    )
    lines += textwrap.wrap(f"Coverage: {COVERAGE_DEFINITION}; \"-\": the server counts "
                           "none.", width=90)
    return lines


def _interval(interval: Interval, digits: int = 3) -> str:
    return (f"{interval.value:.{digits}g} ({interval.low:.{digits}g} … "
            f"{interval.high:.{digits}g})")


def _drivers_section(report: Report) -> list[str]:
    lines = ["What drives the energy of a query (E ≈ e0 + e_p × prompt + e_c × completion)"]
    for model in report.drivers:
        overall = next((f for f in model.fits if f.boundary == "it" and f.band == "all"),
                       None)
        board = f" ({model.gpu_model})" if model.gpu_model else ""
        if isinstance(overall, EnergyFit):
            lines.append(
                f"On {model.model}{board} here, each completion token costs "
                f"{overall.per_completion_token_j.value:.3g} J, each prompt token "
                f"{overall.per_prompt_token_j.value:.3g} J, a request "
                f"{overall.per_request_j.value:.3g} J on its own (IT boundary, "
                f"R² {overall.r_squared:.2f}, {overall.requests} requests).")
        fitted = [fit for fit in model.fits if isinstance(fit, EnergyFit)]
        if fitted:
            lines += _table(
                ["model", "boundary", "concurrency", "requests", "e0 J (95% CI)",
                 "e_p J/prompt token", "e_c J/completion token", "R²"],
                [[model.model, fit.boundary, fit.band, str(fit.requests),
                  _interval(fit.per_request_j), _interval(fit.per_prompt_token_j),
                  _interval(fit.per_completion_token_j), f"{fit.r_squared:.3f}"]
                 for fit in fitted], left=3)
        lines += [f"{model.model}, {fit.boundary}, concurrency {fit.band}: no fit, "
                  f"{fit.reason}." for fit in model.fits if isinstance(fit, Refused)]
        per_query = _formatter(value for b in model.bands
                               for value in (b.it_wh_mean, b.it_wh_median, b.gpu_wh_mean))
        lines += ["", f"{model.model}{board}: Wh per query by band"]
        lines += _table(
            ["by", "band", "requests", "it mean Wh", "it median Wh", "gpu mean Wh"],
            [[b.dimension, b.band, str(b.requests), per_query(b.it_wh_mean),
              per_query(b.it_wh_median), per_query(b.gpu_wh_mean)] for b in model.bands],
            left=2)
        lines.append("")
    lines += textwrap.wrap(f"Fits: {DRIVERS_DEFINITION}.", width=90)
    return lines


def _predictions_section(report: Report) -> list[str]:
    first = report.predictions[0]
    lines = [f"Expected energy of a request of {first.prompt_tokens} prompt and "
             f"{first.completion_tokens} completion tokens (concurrency band {first.band})"]
    rows = []
    for p in report.predictions:
        if p.energy_j is None:
            rows.append([p.model, p.boundary, f"refused: {p.reason}", "", ""])
        else:
            wh = Interval(p.energy_j.value / JOULES_PER_WH, p.energy_j.low / JOULES_PER_WH,
                          p.energy_j.high / JOULES_PER_WH)
            rows.append([p.model, p.boundary, _interval(p.energy_j, 4), _interval(wh, 4),
                         f"{p.residual_sd_j:.3g}"])
    lines += _table(["model", "boundary", "mean J (95% CI)", "mean Wh (95% CI)",
                     "one request ± J (sd)"], rows, left=3)
    return lines


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


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

