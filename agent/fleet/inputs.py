"""Measured inputs for the fleet extrapolation: from a record store, a running agent, or
Prometheus across the fleet.

Each source gives a `Measurement`: mean Wh per query and J per token at each boundary,
throughput per GPU and power per GPU where it can know them, the PUE in use, and whether
the GPUs were simulated. The figures carry bounds where the source gives a spread:

- store: the 95 % percentile-bootstrap confidence interval of the mean (resampling whole
  records, so Wh/query and J/token of one resample come from the same requests). Seeded:
  the same records always give the same interval.
- agent and Prometheus: their means only (a summary holds no spread), so bounds are equal
  to the mean, and the output says so.

Whether GPUs were simulated: each source says it itself. Prometheus and a running agent
through `jouleprobe_gpu_info{simulated="true"}`; a record store through each record's
`simulated` flag, written by the agent that measured it.
"""

from __future__ import annotations

import json
import math
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.fleet.model import BOUNDARIES, Boundary, Span
from agent.units import JOULES_PER_WH

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Measurement:
    origin: str
    """Where the figures come from, e.g. "store /tmp/demo.db (1,234 records)"."""
    requests: int
    wh_per_query: Mapping[Boundary, Span]
    j_per_token: Mapping[Boundary, Span] | None
    """Energy ÷ (prompt + completion tokens), over requests that reported tokens."""
    queries_per_gpu_second: Span | None
    gpu_watts: Span | None
    """Average power per GPU; see `notes` for what it covers."""
    pue: Span | None
    simulated: bool | None
    """None: the source cannot tell (Prometheus or an agent that reports no GPU)."""
    notes: tuple[str, ...] = field(default=())
    capacity_notes: tuple[str, ...] = field(default=())
    """What the throughput and power figures cover (shown in the capacity mode)."""
    queries_per_day: Span | None = None
    """The measured fleet's own volume (Prometheus only): used when no volume is given."""


class MeasurementError(ValueError):
    """The source cannot give the figures; the message says which source and why."""


# --- record store ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Row:
    joules: tuple[float, float, float]
    """gpu, it, facility."""
    tokens: int | None


def _bootstrap(rows: Sequence[_Row], seed: int = 0) -> tuple[dict[Boundary, Span],
                                                               dict[Boundary, Span] | None]:
    """Mean Wh/query (mean of records) and J/token (ratio of sums) at each boundary, with
    the bootstrap interval of each, from the same resamples."""
    n = len(rows)
    with_tokens = [row for row in rows if row.tokens]

    def wh(sample: Sequence[_Row]) -> list[float]:
        return [math.fsum(r.joules[i] for r in sample) / len(sample) / JOULES_PER_WH
                for i in range(3)]

    def per_token(sample: Sequence[_Row]) -> list[float] | None:
        tokens = sum(r.tokens or 0 for r in sample)
        if not tokens:
            return None
        return [math.fsum(r.joules[i] for r in sample if r.tokens) / tokens for i in range(3)]

    central_wh, central_tok = wh(rows), per_token(rows)
    rng = random.Random(seed)
    wh_samples: list[list[float]] = [[], [], []]
    tok_samples: list[list[float]] = [[], [], []]
    for _ in range(BOOTSTRAP_RESAMPLES if n > 1 else 0):
        sample = rng.choices(rows, k=n)
        for i, value in enumerate(wh(sample)):
            wh_samples[i].append(value)
        resampled = per_token(sample)
        for i, value in enumerate(resampled or ()):
            tok_samples[i].append(value)

    wh_spans = {b: _interval(central_wh[i], wh_samples[i]) for i, b in enumerate(BOUNDARIES)}
    tok_spans = None
    if central_tok is not None and with_tokens:
        tok_spans = {b: _interval(central_tok[i], tok_samples[i]) for i, b in enumerate(BOUNDARIES)}
    return wh_spans, tok_spans


def _interval(central: float, samples: list[float]) -> Span:
    """The percentile interval of bootstrap `samples` around the `central` estimate."""
    if not samples:
        return Span.exact(central)
    ordered = sorted(samples)
    tail = (1 - CONFIDENCE) / 2
    low = ordered[int(tail * (len(ordered) - 1))]
    high = ordered[math.ceil((1 - tail) * (len(ordered) - 1))]
    return Span(min(low, central), central, max(high, central))


def from_records(records: Iterable[Any], origin: str) -> Measurement:
    """From `agent.store.StoredRequest`s (finished ones): Wh/query, J/token, the
    throughput per GPU over the span the records cover, the GPU power attributed to
    requests over that span, and whether any record was measured on simulated GPUs.

    Throughput is what the node served at the load it had, not its capacity; the power is
    the energy attributed to requests only (idle gaps between requests are unattributed,
    not in the records): both say so in `notes`.
    """
    rows: list[_Row] = []
    gpus: set[int] = set()
    gpu_j = it_j = facility_j = 0.0
    first = math.inf
    last = -math.inf
    simulated = False
    for record in records:
        if record.end is None:
            continue
        it = record.it_j
        rows.append(_Row((record.gpu_j, it, it + record.facility_j),
                         (record.prompt_tokens or 0) + (record.completion_tokens or 0)
                         if record.prompt_tokens is not None
                         and record.completion_tokens is not None else None))
        gpus.update(record.gpus)
        simulated = simulated or record.simulated
        gpu_j += record.gpu_j
        it_j += it
        facility_j += it + record.facility_j
        first = min(first, record.start)
        last = max(last, record.end)
    if not rows:
        raise MeasurementError(f"{origin}: no finished request records")
    wh, per_token = _bootstrap(rows)
    span_s = last - first
    capacity_notes = []
    throughput = power = None
    if gpus and span_s > 0:
        gpu_seconds = len(gpus) * span_s
        throughput = Span.exact(len(rows) / gpu_seconds)
        power = Span.exact(gpu_j / gpu_seconds)
        capacity_notes.append(
            f"throughput {len(rows)} requests over {span_s:.0f} s on {len(gpus)} GPU(s): "
            f"the load the node had, not its capacity"
        )
        capacity_notes.append("GPU power: energy attributed to requests over that span (idle gaps "
                     "are not in the records): a lower bound of the boards' draw")
    pue = Span.exact(facility_j / it_j) if it_j > 0 else None
    return Measurement(origin=f"{origin} ({len(rows):,} records)", requests=len(rows),
                       wh_per_query=wh, j_per_token=per_token,
                       queries_per_gpu_second=throughput, gpu_watts=power, pue=pue,
                       simulated=simulated, capacity_notes=tuple(capacity_notes))


def from_store(path: str, *, model: str | None = None, since: float | None = None
               ) -> Measurement:
    from agent.store import RecordReader, RecordStoreError

    try:
        records = list(RecordReader(path).query(since=since, model=model))
    except RecordStoreError as exc:
        raise MeasurementError(f"--from-store: {exc}") from None
    scope = f", model {model}" if model else ""
    return from_records(records, f"store {path}{scope}")


# --- a running agent ---------------------------------------------------------------------

def _http_get(url: str) -> bytes:
    # Proxies are for the outside world; agents and Prometheus are on the operator's network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HTTP_TIMEOUT_S) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        raise MeasurementError(f"{url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MeasurementError(f"{url}: {exc}") from None


def _simulated_from_metrics(text: str) -> tuple[bool | None, float | None]:
    """From an agent's /metrics: whether any GPU is simulated, and the site PUE."""
    from prometheus_client.parser import text_string_to_metric_families

    simulated: bool | None = None
    pue = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jouleprobe_gpu_info":
                simulated = bool(simulated) or sample.labels.get("simulated") == "true"
            elif sample.name == "jouleprobe_site_pue_ratio":
                pue = sample.value
    return simulated, pue


def summary_measurement(summary: Mapping[str, Any], origin: str, *, model: str | None,
                        simulated: bool | None, pue: float | None) -> Measurement:
    """From the JSON of GET /api/v1/summary: request-weighted means over its models."""
    models = summary.get("models", {})
    if model is not None:
        if model not in models:
            raise MeasurementError(f"{origin}: no requests of model {model!r} in the window "
                                   f"(models: {', '.join(models) or 'none'})")
        models = {model: models[model]}
    total = sum(m["requests"] for m in models.values())
    if not total:
        raise MeasurementError(f"{origin}: no finished requests in the summary's window")
    wh = {
        b: Span.exact(math.fsum(m["requests"] * m["wh_per_query_mean"][b]
                                for m in models.values()) / total)
        for b in BOUNDARIES
    }
    per_token: dict[Boundary, Span] | None = None
    token_models = [m for m in models.values() if m.get("it_j_per_token_all") is not None]
    if token_models and pue is not None:
        # The summary gives IT J/token per model; weigh models by their requests.
        weight = sum(m["requests"] for m in token_models)
        it = math.fsum(m["requests"] * m["it_j_per_token_all"] for m in token_models) / weight
        gpu_share = wh["gpu"].central / wh["it"].central if wh["it"].central else 1.0
        per_token = {"gpu": Span.exact(it * gpu_share), "it": Span.exact(it),
                     "facility": Span.exact(it * pue)}
    notes: tuple[str, ...] = ("means only: the summary holds no spread, so no confidence "
                              "interval",)
    if token_models and len(token_models) > 1:
        notes += ("J/token: models weighed by their request counts",)
    return Measurement(origin=f"{origin} ({total:,} requests in {summary.get('window_s')} s)",
                       requests=total, wh_per_query=wh, j_per_token=per_token,
                       queries_per_gpu_second=None, gpu_watts=None,
                       pue=Span.exact(pue) if pue is not None else None,
                       simulated=simulated, notes=notes)


def from_agent(url: str, *, window: str = "1h", model: str | None = None) -> Measurement:
    base = url.rstrip("/")
    query = urllib.parse.urlencode({"window": window})
    try:
        summary = json.loads(_http_get(f"{base}/api/v1/summary?{query}"))
    except json.JSONDecodeError as exc:
        raise MeasurementError(f"--from-agent: {base}/api/v1/summary: not JSON: {exc}") from None
    simulated, pue = _simulated_from_metrics(_http_get(f"{base}/metrics").decode())
    return summary_measurement(summary, f"agent {base}", model=model, simulated=simulated,
                               pue=pue)


# --- Prometheus --------------------------------------------------------------------------

def _promql(base: str, query: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": query})
    try:
        answer = json.loads(_http_get(f"{base}/api/v1/query?{params}"))
    except json.JSONDecodeError as exc:
        raise MeasurementError(f"--from-prometheus: {base}: not JSON: {exc}") from None
    if answer.get("status") != "success":
        raise MeasurementError(f"--from-prometheus: {query}: {answer.get('error', answer)}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _values(base: str, query: str, label: str | None = None) -> dict[str, float]:
    out = {}
    for series in _promql(base, query):
        value = float(series["value"][1])
        if math.isfinite(value):
            out[series["metric"].get(label, "") if label else ""] = value
    return out


def from_prometheus(url: str, *, window: str = "1h", model: str | None = None) -> Measurement:
    """Fleet-wide figures from the recording rules of deploy/prometheus/recording.yml.

    Per-job ratios are combined weighted by each job's request rate, which is the ratio of
    the fleet's sums: Σ energy rate ÷ Σ request rate.
    """
    base = url.rstrip("/")
    if window not in ("5m", "1h"):
        raise ValueError(f"--window: the recording rules exist for 5m and 1h, got {window!r}")
    w = f"rate{window}"
    if model is None:
        ratio = f"job_boundary:jouleprobe_request_energy_joules_per_request:ratio_{w}"
        rate = f"job:jouleprobe_requests:{w}"
        per_token = f"job:jouleprobe_request_energy_joules_per_token:ratio_{w}"
        tokens = f"job:jouleprobe_request_tokens:{w}"
        match, on = "", "job"
    else:
        escaped = model.replace("\\", "\\\\").replace('"', '\\"')
        match = f'{{model="{escaped}"}}'
        ratio = f"job_model_boundary:jouleprobe_request_energy_joules_per_request:ratio_{w}"
        rate = f"job_model:jouleprobe_requests:{w}"
        per_token = f"job_model:jouleprobe_request_energy_joules_per_token:ratio_{w}"
        tokens = f"instance_model:jouleprobe_request_tokens:{w}"
        on = "job, model"
    weighted = _values(
        base,
        f"sum by (boundary) ({ratio}{match} * on ({on}) group_left () {rate}{match}) "
        f"/ ignoring (boundary) group_left () sum({rate}{match})",
        "boundary",
    )
    if not all(b in weighted for b in BOUNDARIES):
        raise MeasurementError(
            f"--from-prometheus: {base} has no {ratio}{match} for every boundary (got "
            f"{sorted(weighted) or 'none'}): are the rules of deploy/prometheus/recording.yml "
            f"loaded, and did requests finish in the last {window}?"
        )
    query_rate = sum(_values(base, f"sum({rate}{match})").values())
    wh = {b: Span.exact(weighted[b] / JOULES_PER_WH) for b in BOUNDARIES}
    it_per_token = _values(
        base,
        f"sum({per_token}{match} * on ({on}) group_left () "
        f"sum by ({on}) ({tokens}{match})) / sum({tokens}{match})",
    ).get("")
    j_per_token = None
    if it_per_token is not None and wh["it"].central > 0:
        scale = {b: wh[b].central / wh["it"].central for b in BOUNDARIES}
        j_per_token = {b: Span.exact(it_per_token * scale[b]) for b in BOUNDARIES}
    gpus = sum(_values(base, "sum(job:jouleprobe_gpus:count)").values())
    simulated_gpus = sum(_values(base, "sum(job:jouleprobe_gpus_simulated:count)").values())
    gpu_power = sum(_values(base, f"sum(job:jouleprobe_gpu_energy_joules:{w})").values())
    notes = [f"rates over {window}; means only (no confidence interval from rates)"]
    capacity_notes = []
    throughput = watts = None
    if gpus > 0:
        watts = Span.exact(gpu_power / gpus)
        capacity_notes.append(f"GPU power: the measured draw of all {gpus:.0f} GPUs, busy or "
                              "idle")
        if model is None:
            throughput = Span.exact(query_rate / gpus)
            capacity_notes.append("throughput: the fleet's query rate ÷ its GPUs, at the load "
                                  "it had")
    pue_values = _values(base, "avg(jouleprobe_site_pue_ratio)")
    pue = Span.exact(pue_values[""]) if "" in pue_values else None
    return Measurement(
        origin=f"prometheus {base} ({gpus:.0f} GPUs, {query_rate:.3g} queries/s over {window})",
        requests=0, wh_per_query=wh, j_per_token=j_per_token,
        queries_per_gpu_second=throughput, gpu_watts=watts, pue=pue,
        simulated=None if gpus == 0 else simulated_gpus > 0, notes=tuple(notes),
        capacity_notes=tuple(capacity_notes),
        queries_per_day=Span.exact(query_rate * 86400) if query_rate > 0 else None,
    )
