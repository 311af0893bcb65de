"""What drives a query's energy: a linear energy model per model, fitted over its records.

    E ≈ e₀ + e_p · prompt_tokens + e_c · completion_tokens

by ordinary least squares over the stored requests that reported both counts (the server's
own, not estimates), at the GPU and IT boundaries. e₀ is what a request costs on its own
(scheduling, the first forward pass's fixed part, its share of the idle baseline while it
waits on nothing), e_p and e_c what each prompt and completion token adds.

- **Intervals** are 95 % confidence intervals from heteroscedasticity-robust standard
  errors (White's HC1: energy scatters more for long requests than for short ones, which
  breaks the constant-variance assumption of the textbook intervals) and Student's t with
  n − 3 degrees of freedom.
- **Per concurrency band**: J/token falls as batches grow, so one fit over a node whose
  load varied would average unlike things; fits are also made per band of the request's
  concurrency (`agent.report.concurrency`).
- **Refused, with the reason,** where the data cannot carry a fit: fewer than
  `MIN_REQUESTS` requests, no spread in prompt or in completion lengths, or lengths that
  move together so closely that their costs cannot be told apart.
- **Prediction**: the expected energy of a request of given lengths, x·β, with the 95 %
  confidence interval of that mean (what the mean of many such requests falls in); one
  request scatters around it by about the residual standard deviation, also given.

Pure Python (three parameters): no numerical library is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

MIN_REQUESTS = 20
"""Fewest requests a fit is made over: with three parameters, fewer leave its intervals
too wide to say anything."""
MAX_CORRELATION = 0.99
"""Prompt and completion lengths more correlated than this cannot be told apart."""
CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Interval:
    """A value with its 95 % confidence interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True, slots=True)
class EnergyFit:
    """E ≈ e₀ + e_p · prompt + e_c · completion for one model, boundary and band."""

    model: str
    boundary: str
    """gpu or it."""
    band: str
    """"all", or a concurrency band (`agent.report.concurrency.BANDS`)."""
    requests: int
    per_request_j: Interval
    per_prompt_token_j: Interval
    per_completion_token_j: Interval
    r_squared: float
    residual_sd_j: float
    covariance: tuple[tuple[float, float, float], ...]
    """The robust covariance of (e₀, e_p, e_c), for predictions."""
    t_critical: float

    def predict(self, prompt_tokens: float, completion_tokens: float) -> Interval:
        """The expected energy (J) of a request of these lengths, with the confidence
        interval of that mean."""
        x = (1.0, float(prompt_tokens), float(completion_tokens))
        beta = (self.per_request_j.value, self.per_prompt_token_j.value,
                self.per_completion_token_j.value)
        mean = sum(b * v for b, v in zip(beta, x, strict=True))
        variance = sum(x[i] * self.covariance[i][j] * x[j] for i in range(3) for j in range(3))
        half = self.t_critical * math.sqrt(max(variance, 0.0))
        return Interval(mean, mean - half, mean + half)


@dataclass(frozen=True, slots=True)
class Refused:
    """No fit for this model, boundary and band, and why."""

    model: str
    boundary: str
    band: str
    requests: int
    reason: str


def fit_energy(samples: Sequence[tuple[int, int, float]], *, model: str, boundary: str,
               band: str = "all") -> EnergyFit | Refused:
    """The fit over `samples` of (prompt tokens, completion tokens, energy in J)."""
    n = len(samples)

    def refuse(reason: str) -> Refused:
        return Refused(model, boundary, band, n, reason)

    if n < MIN_REQUESTS:
        return refuse(f"{n} request(s) with both token counts; a fit needs "
                      f"{MIN_REQUESTS} at least")
    prompts = [float(p) for p, _, _ in samples]
    completions = [float(c) for _, c, _ in samples]
    energies = [e for _, _, e in samples]
    for name, values in (("prompt", prompts), ("completion", completions)):
        if max(values) == min(values):
            return refuse(f"no spread in {name} lengths (all {n} requests had "
                          f"{values[0]:.0f} tokens): their cost cannot be measured")
    correlation = _correlation(prompts, completions)
    if abs(correlation) > MAX_CORRELATION:
        return refuse(f"prompt and completion lengths move together (correlation "
                      f"{correlation:.3f}): their costs cannot be told apart")
    # Columns scaled to their largest value, so that X'X is well conditioned.
    scale = (1.0, max(map(abs, prompts)) or 1.0, max(map(abs, completions)) or 1.0)
    rows = [(1.0, p / scale[1], c / scale[2]) for p, c in zip(prompts, completions,
                                                              strict=True)]
    xtx = [[math.fsum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    inverse = _inverse(xtx)
    if inverse is None:
        return refuse("the lengths leave the fit undetermined")
    xty = [math.fsum(r[i] * e for r, e in zip(rows, energies, strict=True)) for i in range(3)]
    beta = [math.fsum(inverse[i][j] * xty[j] for j in range(3)) for i in range(3)]
    residuals = [e - math.fsum(b * v for b, v in zip(beta, r, strict=True))
                 for r, e in zip(rows, energies, strict=True)]
    # White's HC1: (X'X)⁻¹ X' diag(e²) X (X'X)⁻¹ × n / (n − k).
    meat = [[math.fsum(r[i] * r[j] * u * u for r, u in zip(rows, residuals, strict=True))
             for j in range(3)] for i in range(3)]
    robust = _product(_product(inverse, meat), inverse)
    dof = n - 3
    covariance = tuple(tuple(robust[i][j] * n / dof / (scale[i] * scale[j])
                             for j in range(3)) for i in range(3))
    t = t_quantile(0.5 + CONFIDENCE / 2, dof)
    mean = math.fsum(energies) / n
    total = math.fsum((e - mean) ** 2 for e in energies)
    squared = math.fsum(u * u for u in residuals)
    intervals = []
    for i in range(3):
        value = beta[i] / scale[i]
        half = t * math.sqrt(max(covariance[i][i], 0.0))
        intervals.append(Interval(value, value - half, value + half))
    per_request, per_prompt, per_completion = intervals
    return EnergyFit(
        model, boundary, band, n, per_request, per_prompt, per_completion,
        r_squared=1.0 - squared / total if total > 0 else 1.0,
        residual_sd_j=math.sqrt(squared / dof),
        covariance=covariance,  # type: ignore[arg-type]  # 3 × 3 by construction
        t_critical=t,
    )


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion about the normal one (to
    within 1e-4 from 10 degrees of freedom, 5e-4 at 5; fits have 17 at least)."""
    z = NormalDist().inv_cdf(p)
    v = float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z)
            / (92160 * v**4))


def _correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy)


def _inverse(matrix: list[list[float]]) -> list[list[float]] | None:
    """Gauss-Jordan with partial pivoting; None where the matrix is singular."""
    size = len(matrix)
    work = [[*row, *(1.0 if i == j else 0.0 for j in range(size))]
            for i, row in enumerate(matrix)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(work[r][column]))
        if abs(work[pivot][column]) < 1e-12 * max(abs(v) for row in matrix for v in row):
            return None
        work[column], work[pivot] = work[pivot], work[column]
        lead = work[column][column]
        work[column] = [v / lead for v in work[column]]
        for row in range(size):
            if row != column:
                factor = work[row][column]
                work[row] = [a - factor * b for a, b in zip(work[row], work[column],
                                                            strict=True)]
    return [row[size:] for row in work]


def _product(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[math.fsum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))]
            for i in range(len(a))]
