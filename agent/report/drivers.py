"""What makes one query cost more than another (`jouleprobe report --explain`): per model,
the energy model fitted over its records (`agent.report.fit`), overall and per band of
concurrency, and Wh per query broken down by completion length, prompt length, status,
concurrency and the generation parameters the request asked for (max_tokens, temperature,
n: where the intake saw them, else "unknown"); and the expected energy of a request of
given lengths (`--predict`).

Bands of token counts take the server's own counts only (an estimate, from counted chunks,
would put a request in the wrong band); a request without them is in band "unknown".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.report.concurrency import BANDS as CONCURRENCY_BANDS
from agent.report.concurrency import band as concurrency_band
from agent.report.concurrency import band_of, mean_concurrency
from agent.report.fit import EnergyFit, Interval, Refused, fit_energy
from agent.store import StoredRequest
from agent.units import JOULES_PER_WH

FIT_BOUNDARIES = ("gpu", "it")
COMPLETION_BANDS: tuple[tuple[str, float], ...] = (
    ("1-63", 64), ("64-255", 256), ("256-1023", 1024), ("1024+", math.inf))
PROMPT_BANDS: tuple[tuple[str, float], ...] = (
    ("0-255", 256), ("256-1023", 1024), ("1024-4095", 4096), ("4096+", math.inf))
MAX_TOKENS_BANDS: tuple[tuple[str, float], ...] = (
    ("0-63", 64), ("64-255", 256), ("256-1023", 1024), ("1024+", math.inf))
TEMPERATURE_BANDS = ("0", "(0, 1]", "> 1")
"""Greedy, the usual sampling range, hotter."""
DIMENSIONS = ("completion_tokens", "prompt_tokens", "status", "concurrency", "max_tokens",
              "temperature", "n")
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class BandFigures:
    """The requests of one model in one band of one dimension."""

    dimension: str
    band: str
    requests: int
    it_wh_mean: float
    it_wh_median: float
    gpu_wh_mean: float


@dataclass(frozen=True, slots=True)
class ModelDrivers:
    """One model on one GPU model (NVML's name; None for records of an agent that did not
    store it): a token costs what the board it runs on makes it cost."""

    model: str
    gpu_model: str | None
    fits: tuple[EnergyFit | Refused, ...]
    """Per boundary (gpu, it): over all its requests, then per concurrency band that has
    any."""
    bands: tuple[BandFigures, ...]


@dataclass(frozen=True, slots=True)
class Prediction:
    """The expected energy of a request of `prompt_tokens` and `completion_tokens` on
    `model`, at one boundary, from the fit of `band`."""

    model: str
    gpu_model: str | None
    boundary: str
    band: str
    prompt_tokens: int
    completion_tokens: int
    energy_j: Interval | None
    """The mean of such requests, with its 95 % confidence interval; None: refused."""
    residual_sd_j: float | None
    """How far one request scatters around the mean."""
    reason: str | None = None
    """Why there is no prediction."""


def _counted(record: StoredRequest) -> bool:
    return (record.prompt_tokens is not None and record.completion_tokens is not None
            and not record.tokens_estimated)


def _by_bounds(value: int | None, bounds: tuple[tuple[str, float], ...]) -> str:
    return UNKNOWN if value is None else band_of(value, bounds)


def explain(records: Sequence[StoredRequest]) -> tuple[ModelDrivers, ...]:
    """The drivers of every (model, GPU model) of `records` (finished ones), by name."""
    concurrency = mean_concurrency(records)
    groups: dict[tuple[str, str | None], list[tuple[StoredRequest, float | None]]] = (
        defaultdict(list))
    for record, mean in zip(records, concurrency, strict=True):
        if record.end is not None:
            groups[record.model, record.gpu_model].append((record, mean))
    return tuple(_model_drivers(model, gpu, groups[model, gpu])
                 for model, gpu in sorted(groups, key=lambda key: (key[0], key[1] or "")))


def _model_drivers(model: str, gpu_model: str | None,
                   rows: list[tuple[StoredRequest, float | None]]) -> ModelDrivers:
    fits: list[EnergyFit | Refused] = []
    for boundary in FIT_BOUNDARIES:
        energy = _energy(boundary)
        counted = [(r, c) for r, c in rows if _counted(r)]
        fits.append(_fit(model, boundary, "all", counted, energy))
        for name, _ in CONCURRENCY_BANDS:
            members = [(r, c) for r, c in counted if c is not None
                       and concurrency_band(c) == name]
            if members:
                fits.append(_fit(model, boundary, name, members, energy))
    keys: dict[str, Callable[[StoredRequest, float | None], str]] = {
        "completion_tokens": lambda r, _: _by_bounds(
            r.completion_tokens if _counted(r) else None, COMPLETION_BANDS),
        "prompt_tokens": lambda r, _: _by_bounds(
            r.prompt_tokens if _counted(r) else None, PROMPT_BANDS),
        "status": lambda r, _: r.status,
        "concurrency": lambda _, c: UNKNOWN if c is None else concurrency_band(c),
        "max_tokens": lambda r, _: _by_bounds(r.max_tokens, MAX_TOKENS_BANDS),
        "temperature": lambda r, _: _temperature_band(r.temperature),
        "n": lambda r, _: UNKNOWN if r.n is None else "1" if r.n == 1 else "2+",
    }
    orders = {
        "completion_tokens": [name for name, _ in COMPLETION_BANDS],
        "prompt_tokens": [name for name, _ in PROMPT_BANDS],
        "status": ["ok", "cancelled", "failed"],
        "concurrency": [name for name, _ in CONCURRENCY_BANDS],
        "max_tokens": [name for name, _ in MAX_TOKENS_BANDS],
        "temperature": list(TEMPERATURE_BANDS),
        "n": ["1", "2+"],
    }
    bands: list[BandFigures] = []
    for dimension in DIMENSIONS:
        groups: dict[str, list[StoredRequest]] = defaultdict(list)
        for record, mean in rows:
            groups[keys[dimension](record, mean)].append(record)
        if set(groups) == {UNKNOWN}:
            continue  # no intake of this model sees it: no breakdown to give
        for name in [*orders[dimension], UNKNOWN]:
            if grouped := groups.get(name):
                it = [r.it_j / JOULES_PER_WH for r in grouped]
                bands.append(BandFigures(
                    dimension, name, len(grouped), math.fsum(it) / len(it),
                    statistics.median(it),
                    math.fsum(r.gpu_j for r in grouped) / len(grouped) / JOULES_PER_WH))
    return ModelDrivers(model, gpu_model, tuple(fits), tuple(bands))


def _temperature_band(temperature: float | None) -> str:
    if temperature is None:
        return UNKNOWN
    return "0" if temperature == 0 else "(0, 1]" if temperature <= 1 else "> 1"


def _energy(boundary: str) -> Callable[[StoredRequest], float]:
    return (lambda r: r.gpu_j) if boundary == "gpu" else (lambda r: r.it_j)


def _fit(model: str, boundary: str, band: str,
         rows: Sequence[tuple[StoredRequest, float | None]],
         energy: Callable[[StoredRequest], float]) -> EnergyFit | Refused:
    samples = [(int(r.prompt_tokens or 0), int(r.completion_tokens or 0), energy(r))
               for r, _ in rows]
    return fit_energy(samples, model=model, boundary=boundary, band=band)


def predict(drivers: Sequence[ModelDrivers], prompt_tokens: int, completion_tokens: int,
            concurrency: float | None = None) -> tuple[Prediction, ...]:
    """Per model and boundary, the expected energy of such a request, from the fit over
    all its requests, or over the band of `concurrency` where given."""
    wanted = "all" if concurrency is None else concurrency_band(concurrency)
    out = []
    for model in drivers:
        for fit in model.fits:
            if fit.band != wanted:
                continue
            if isinstance(fit, Refused):
                out.append(Prediction(model.model, model.gpu_model, fit.boundary, wanted,
                                      prompt_tokens, completion_tokens, None, None,
                                      fit.reason))
            else:
                out.append(Prediction(model.model, model.gpu_model, fit.boundary, wanted,
                                      prompt_tokens, completion_tokens,
                                      fit.predict(prompt_tokens, completion_tokens),
                                      fit.residual_sd_j))
        if not any((p.model, p.gpu_model) == (model.model, model.gpu_model) for p in out):
            for boundary in FIT_BOUNDARIES:
                out.append(Prediction(model.model, model.gpu_model, boundary, wanted,
                                      prompt_tokens, completion_tokens, None, None,
                                      f"no request ran at concurrency band {wanted}"))
    return tuple(out)


def parse_predict(text: str) -> tuple[int, int, float | None]:
    """`--predict prompt=500,completion=300[,concurrency=8]`."""
    values: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("prompt", "completion", "concurrency"):
            raise ValueError(f"--predict: expected prompt=N,completion=N[,concurrency=N], "
                             f"got {text!r}")
        values[key] = value.strip()
    if "prompt" not in values or "completion" not in values:
        raise ValueError(f"--predict: prompt= and completion= are both needed, got {text!r}")
    try:
        prompt, completion = int(values["prompt"]), int(values["completion"])
        concurrency = float(values["concurrency"]) if "concurrency" in values else None
    except ValueError:
        raise ValueError(f"--predict: token counts are whole numbers and concurrency a "
                         f"number, got {text!r}") from None
    if prompt < 0 or completion < 0 or (concurrency is not None and not concurrency >= 1):
        raise ValueError(f"--predict: token counts must be >= 0 and concurrency >= 1, got "
                         f"{text!r}")
    return prompt, completion, concurrency
