"""The report's figures: the data model behind every output of `jouleprobe report` and of
GET /api/v1/summary, per-request records and the windows of scraped servers.

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
- **Trace coverage**: for a scraped server that also exports its request spans (its
  `[[scrape]]` table names the trace source), over its windows: the records of its spans
  whose request ended in one of them, as a share of the requests and completion tokens its
  own counters say it finished there (ratio of sums). vLLM traces no request its client
  aborted, and a full exporter queue drops spans: the share says how much of the server's
  work the per-request records cover. It is never added to either figure. It is per
  server, whatever `--model` (a server's spans may name the model otherwise than its
  metrics).
- **Unattributed share** (only when the caller supplies node totals, e.g. from the
  `jouleprobe_gpu_energy_joules_total` and `jouleprobe_gpu_unattributed_energy_joules_total`
  counters over the same period): unattributed GPU energy ÷ GPU energy. It is a node figure,
  not a per-model one.
- **Simulated GPUs**: a model (or a source's windows) is `simulated` when any of its
  records (windows) was measured on simulated GPUs, and so is the report when any is;
  every format says so (a first line in the table, `simulated` in JSON and in each CSV
  row), so that a simulated figure is never mistaken for a measurement.

Times are UTC. Everything here is pure: `agent.report.command` and `agent.report.api` read
the store.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from agent.report.drivers import ModelDrivers, Prediction
from agent.report.fit import EnergyFit, Interval, Refused
from agent.requests import STATUSES
from agent.store import ModelWindows, StoredRequest, WindowTotals
from agent.units import JOULES_PER_WH

Boundary = Literal["gpu_dynamic", "gpu", "it", "facility"]
BOUNDARIES: tuple[Boundary, ...] = ("gpu_dynamic", "gpu", "it", "facility")
BOUNDARY_DEFINITIONS: Mapping[Boundary, str] = {
    "gpu_dynamic": "GPU energy above the idle baseline",
    "gpu": "gpu_dynamic + gpu_static",
    "it": "gpu + host (CPU + DRAM)",
    "facility": "it × PUE",
}

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

DRIVERS_DEFINITION = (
    "E ≈ e0 + e_p × prompt tokens + e_c × completion tokens, by least squares over the "
    "model's requests with the server's own counts, per boundary, overall and per band of "
    "the request's concurrency (the time-weighted mean of requests running on its GPUs, "
    "itself included); 95 % confidence intervals from heteroscedasticity-robust (HC1) "
    "standard errors and Student's t; a prediction's interval is that of the mean of such "
    "requests, one request scattering around it by about the residual standard deviation"
)
COVERAGE_DEFINITION = (
    "per scraped server that also exports its request spans: the records of its spans whose "
    "request ended in its windows ÷ the requests (completion tokens) its own counters say it "
    "finished in them; never added to either figure"
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
    requests_queue_unknown: int = 0
    """Requests whose intake could not say when the server began on them (the plain proxy
    in front of a server that reports no timings): the GPU's work while they waited in the
    server's queue is in their figures."""


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
class Report:
    generated: float
    """Wall-clock time (UTC epoch seconds) the report was computed."""
    since: float | None
    """Requests that ended at or after this time (UTC epoch seconds); None: all stored."""
    model: str | None
    """The model the report was restricted to, if any."""
    models: tuple[ModelReport, ...]
    node_totals: NodeTotals | None = None
    windows: WindowTotals = field(default_factory=WindowTotals)
    drivers: tuple[ModelDrivers, ...] = ()
    """What drives each model's energy (`--explain`); empty unless asked for."""
    predictions: tuple[Prediction, ...] = ()
    """The expected energy of a request of given lengths (`--predict`)."""

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
    queue_unknown: int = 0

    def add(self, record: StoredRequest) -> None:
        gpu, it = record.gpu_j, record.it_j
        for boundary, value in zip(
            BOUNDARIES, (record.gpu_dynamic_j, gpu, it, it + record.facility_j), strict=True
        ):
            self.joules[boundary].append(value)
        self.statuses[record.status] += 1
        self.simulated = self.simulated or record.simulated
        self.queue_unknown += record.scheduled is None
        # J per token only from the server's own counts: an estimate (content chunks
        # counted) runs low wherever one chunk carries several tokens.
        if (record.prompt_tokens is not None and record.completion_tokens is not None
                and not record.tokens_estimated):
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
            requests_queue_unknown=self.queue_unknown,
        )


def build_report(
    records: Iterable[StoredRequest],
    *,
    generated: float,
    since: float | None = None,
    model: str | None = None,
    node_totals: NodeTotals | None = None,
    windows: WindowTotals | None = None,
    drivers: tuple[ModelDrivers, ...] = (),
    predictions: tuple[Prediction, ...] = (),
) -> Report:
    """The report over `records` and `windows` (both already selected by `since` and
    `model`), models by name.

    Memory grows with the number of records (four floats each, for the percentiles).
    """
    accumulators: dict[str, _ModelAccumulator] = {}
    for record in records:
        accumulators.setdefault(record.model, _ModelAccumulator()).add(record)
    models = tuple(accumulators[name].finish(name) for name in sorted(accumulators))
    return Report(generated, since, model, models, node_totals, windows or WindowTotals(),
                  drivers, predictions)


def iso_utc(epoch: float) -> str:
    """`epoch` (UTC epoch seconds) as ISO 8601 in UTC, to the second: "2025-06-01T12:00:00Z"."""
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
        "requests_queue_unknown": model.requests_queue_unknown,
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


def _coverage_json(windows: WindowTotals) -> list[dict[str, Any]]:
    return [
        {
            "source": coverage.source,
            "trace_source": coverage.trace_source,
            "windows": coverage.windows,
            "span_requests": coverage.span_requests,
            "requests": coverage.requests,
            "requests_share": coverage.requests_share,
            "span_completion_tokens": coverage.span_completion_tokens,
            "completion_tokens": coverage.completion_tokens,
            "completion_tokens_share": coverage.completion_tokens_share,
        }
        for coverage in windows.coverage
    ]


def _interval_json(interval: Interval | None) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"value": interval.value, "low": interval.low, "high": interval.high}


def _fit_json(fit: EnergyFit | Refused) -> dict[str, Any]:
    common = {"boundary": fit.boundary, "concurrency_band": fit.band,
              "requests": fit.requests}
    if isinstance(fit, Refused):
        return {**common, "refused": fit.reason}
    return {
        **common,
        "per_request_j": _interval_json(fit.per_request_j),
        "per_prompt_token_j": _interval_json(fit.per_prompt_token_j),
        "per_completion_token_j": _interval_json(fit.per_completion_token_j),
        "r_squared": fit.r_squared,
        "residual_sd_j": fit.residual_sd_j,
    }


def _drivers_json(drivers: tuple[ModelDrivers, ...]) -> list[dict[str, Any]]:
    return [
        {
            "model": model.model,
            "gpu_model": model.gpu_model,
            "fits": [_fit_json(fit) for fit in model.fits],
            "bands": [
                {"dimension": b.dimension, "band": b.band, "requests": b.requests,
                 "it_wh_mean": b.it_wh_mean, "it_wh_median": b.it_wh_median,
                 "gpu_wh_mean": b.gpu_wh_mean}
                for b in model.bands
            ],
        }
        for model in drivers
    ]


def _prediction_json(prediction: Prediction) -> dict[str, Any]:
    return {
        "model": prediction.model, "gpu_model": prediction.gpu_model,
        "boundary": prediction.boundary,
        "concurrency_band": prediction.band, "prompt_tokens": prediction.prompt_tokens,
        "completion_tokens": prediction.completion_tokens,
        "energy_j": _interval_json(prediction.energy_j),
        "residual_sd_j": prediction.residual_sd_j, "refused": prediction.reason,
    }


def _definitions() -> dict[str, Any]:
    return {
        "boundaries": dict(BOUNDARY_DEFINITIONS),
        "percentiles": PERCENTILE_METHOD,
        "tokens": dict(TOKEN_DEFINITIONS),
        "statuses_included": list(STATUSES),
        "windows": WINDOW_DEFINITION,
        "trace_coverage": COVERAGE_DEFINITION,
        "drivers": DRIVERS_DEFINITION,
    }


def to_json(report: Report) -> dict[str, Any]:
    """The whole report as JSON-ready data (energy in Wh per query, J per token; the
    windows' energy sums in J)."""
    totals = report.node_totals
    return {
        "generated": iso_utc(report.generated),
        "since": iso_utc(report.since) if report.since is not None else None,
        "model": report.model,
        "simulated": report.simulated,
        "definitions": _definitions(),
        "unattributed_share": totals.unattributed_share if totals else None,
        "node_gpu_j": totals.gpu_j if totals else None,
        "models": [_model_json(model) for model in report.models],
        "windows": _windows_json(report.windows),
        "trace_coverage": _coverage_json(report.windows),
        **({"drivers": _drivers_json(report.drivers)} if report.drivers else {}),
        **({"predictions": [_prediction_json(p) for p in report.predictions]}
           if report.predictions else {}),
    }


def summary(report: Report, window_s: float) -> dict[str, Any]:
    """The compact per-model figures of GET /api/v1/summary: count, mean Wh per query at
    each boundary, J per token; the scrape windows' figures per source and model; and
    whether any came from simulated GPUs."""
    return {
        "window_s": window_s,
        "since": iso_utc(report.since) if report.since is not None else None,
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
        "trace_coverage": _coverage_json(report.windows),
    }

