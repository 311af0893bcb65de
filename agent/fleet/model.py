"""The fleet formulas, as pure functions over bounded quantities.

Every quantity is a `Span` (low, central, high): a single number is a span of width 0, a
`LOW:HIGH` input is a span whose central value is the midpoint, a measured mean is a span
whose bounds are its confidence interval. All formulas are products and quotients of
positive quantities, each monotone in every input, so the bounds propagate exactly by
evaluating each formula at its lowest and at its highest corner (`Span.__mul__` pairs
lows with lows, `Span.__truediv__` a low numerator with a high denominator). No sampling,
no distribution assumed: the low/high of an output is the worst case of its inputs.

The four modes (docs/design.md §9), each giving energy per year at the boundary of its
intensity figure:

- query:    E = Wh/query × queries/day × 365
- token:    E = J/token × tokens/day × 365 / 3600
- server:   E = units × W/unit × utilisation × 8760 h   (servers × kW, or GPUs × W)
- capacity: GPUs = queries/day ÷ (86400 × queries per GPU-second);
            E = GPUs × W/GPU × 8760 h (their measured power already holds their utilisation)

then × PUE where a PUE is given and the figure stops at the IT (or GPU) boundary: applied
once, in `facility_energy`, never inside a mode.

Beside the energy (issue 17):

- water:    on-site = IT energy × WUE (L/kWh of IT energy, The Green Grid's definition);
            off-site = electricity drawn (IT × PUE) × the grid's water intensity (EWIF,
            L/kWh generated); total = on-site + off-site (Li et al. 2023:
            W = E × (WUE + PUE × EWIF)). Per query and per year alike.
- training: overtaken on day T ÷ (inference energy a day); per query T ÷ (queries/day ×
            lifetime days); share of lifetime energy T ÷ (T + daily × lifetime days).
- per user: per month = per-query figure × queries a user a day × 365/12; its cost ×
            price/kWh, beside what the user pays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from agent.units import JOULES_PER_WH, check_pue

DAYS_PER_YEAR = 365
DAYS_PER_MONTH = DAYS_PER_YEAR / 12
HOURS_PER_YEAR = 8760
SECONDS_PER_DAY = 86400


Boundary = Literal["gpu", "it", "facility"]
BOUNDARIES: tuple[Boundary, ...] = ("gpu", "it", "facility")


@dataclass(frozen=True, slots=True)
class Span:
    """A quantity with bounds, low ≤ central ≤ high."""

    low: float
    central: float
    high: float

    def __post_init__(self) -> None:
        values = (self.low, self.central, self.high)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"a quantity must be finite, got {values}")
        if not self.low <= self.central <= self.high:
            raise ValueError(f"a quantity's bounds must be ordered low ≤ central ≤ high, "
                             f"got {values}")

    @classmethod
    def exact(cls, value: float) -> Span:
        return cls(value, value, value)

    @classmethod
    def between(cls, low: float, high: float) -> Span:
        """A scenario range: central is the midpoint."""
        if low > high:
            raise ValueError(f"a range must be LOW:HIGH with LOW ≤ HIGH, got {low}:{high}")
        return cls(low, (low + high) / 2, high)

    @property
    def is_range(self) -> bool:
        return self.low != self.high

    def _check_positive(self, what: str) -> None:
        if self.low < 0:
            raise ValueError(f"{what}: needs quantities ≥ 0, got {self}")

    def __mul__(self, other: Span | float) -> Span:
        other = _span(other)
        self._check_positive("product")
        other._check_positive("product")
        return Span(self.low * other.low, self.central * other.central, self.high * other.high)

    __rmul__ = __mul__

    def __add__(self, other: Span | float) -> Span:
        """A sum of quantities that grow with the same inputs (on-site + off-site water,
        inference + training energy): lows with lows, highs with highs."""
        other = _span(other)
        return Span(self.low + other.low, self.central + other.central,
                    self.high + other.high)

    __radd__ = __add__

    def __truediv__(self, other: Span | float) -> Span:
        other = _span(other)
        self._check_positive("quotient")
        if not other.low > 0:
            raise ValueError(f"division by a quantity that reaches 0: {other}")
        return Span(self.low / other.high, self.central / other.central,
                    self.high / other.low)

    def __pow__(self, exponent: int) -> Span:
        """Monotone for quantities ≥ 0 and exponents ≥ 0 (growth factors over years)."""
        self._check_positive("power")
        if exponent < 0:
            raise ValueError("negative exponents are not monotone here")
        return Span(self.low ** exponent, self.central ** exponent, self.high ** exponent)

    def complement(self) -> Span:
        """1 − x, bounds swapped (a higher efficiency gain is a lower remaining share)."""
        return Span(1 - self.high, 1 - self.central, 1 - self.low)

    def plus_one(self) -> Span:
        return Span(1 + self.low, 1 + self.central, 1 + self.high)


def _span(value: Span | float) -> Span:
    return value if isinstance(value, Span) else Span.exact(float(value))


# --- the modes -------------------------------------------------------------------------

def query_energy(wh_per_query: Span, queries_per_day: Span) -> Span:
    """Wh per year: Wh/query × queries/day × 365."""
    return wh_per_query * queries_per_day * DAYS_PER_YEAR


def token_energy(j_per_token: Span, tokens_per_day: Span) -> Span:
    """Wh per year: J/token × tokens/day × 365 / 3600."""
    return j_per_token * tokens_per_day * DAYS_PER_YEAR / JOULES_PER_WH


def server_energy(units: Span, watts_per_unit: Span, utilization: Span) -> Span:
    """Wh per year of `units` machines (servers or GPUs) drawing `watts_per_unit` at full
    load, loaded `utilization` of the time (average power = W × utilisation)."""
    return units * watts_per_unit * utilization * HOURS_PER_YEAR


def gpus_needed(queries_per_day: Span, queries_per_gpu_second: Span) -> Span:
    """GPUs that serve the volume at the measured throughput (fractional: a fleet figure)."""
    return queries_per_day / SECONDS_PER_DAY / queries_per_gpu_second


def servers_needed(gpus: Span, gpus_per_server: float) -> Span:
    """Whole servers: each bound rounded up."""
    if gpus_per_server <= 0:
        raise ValueError(f"GPUs per server must be > 0, got {gpus_per_server}")
    per = gpus / gpus_per_server
    return Span(math.ceil(per.low), math.ceil(per.central), math.ceil(per.high))


def capacity_energy(gpus: Span, gpu_watts: Span) -> Span:
    """Wh per year of `gpus` drawing their measured average power all year."""
    return gpus * gpu_watts * HOURS_PER_YEAR


def facility_energy(energy: Span, boundary: Boundary, pue: Span | None) -> tuple[Span, str]:
    """Applies the PUE once, and names the boundary of the result.

    A figure already at the facility boundary holds its PUE: another would count the
    building twice, so that is an error, not a silent product.
    """
    if pue is None:
        return energy, boundary
    check_pue(pue.low, "--pue")
    if boundary == "facility":
        raise ValueError("--pue: the energy figure is already at the facility boundary (it "
                         "includes a PUE); give an IT-boundary figure (--boundary it) to "
                         "apply another PUE")
    return energy * pue, "facility" if boundary == "it" else "gpu × PUE"


# --- derived figures ---------------------------------------------------------------------

def daily(annual_wh: Span) -> Span:
    return annual_wh / DAYS_PER_YEAR


def average_power_w(annual_wh: Span) -> Span:
    return annual_wh / HOURS_PER_YEAR


def per_query(annual_wh: Span, queries_per_day: Span) -> Span:
    """Wh per query implied by an annual figure and a volume (server and capacity modes).

    Energy and volume are not independent here (more queries on the same fleet cost less
    each), so the bounds pair low energy with high volume: the widest honest interval.
    """
    return annual_wh / (queries_per_day * DAYS_PER_YEAR)


def year_factor(years_after_start: int, growth: Span, efficiency_gain: Span) -> Span:
    """Energy in year start + k relative to the start year: demand grows by (1 + growth)
    a year and energy per unit of demand falls by (1 − efficiency gain) a year."""
    if years_after_start < 0:
        raise ValueError("years before the start year")
    if growth.low <= -1:
        raise ValueError(f"--growth: must be > −1 (−100 %), got {growth.low}")
    if not (efficiency_gain.low >= 0 and efficiency_gain.high < 1):
        raise ValueError(f"--efficiency-gain: must be in [0, 1), got {efficiency_gain}")
    return growth.plus_one() ** years_after_start * (
        efficiency_gain.complement() ** years_after_start
    )


def carbon_g(energy_wh: Span, g_per_kwh: Span) -> Span:
    return energy_wh / 1000 * g_per_kwh


def money(energy_wh: Span, price_per_kwh: Span) -> Span:
    return energy_wh / 1000 * price_per_kwh


# --- water: on-site and off-site -----------------------------------------------------------

def water_onsite_l(it_energy_wh: Span, wue_l_per_kwh: Span) -> Span:
    """On-site water: WUE (L per kWh of IT energy, The Green Grid's definition) × IT
    energy: what the facility's cooling evaporates."""
    return it_energy_wh / 1000 * wue_l_per_kwh


def water_offsite_l(grid_energy_wh: Span, ewif_l_per_kwh: Span) -> Span:
    """Off-site water: the grid's water intensity (L per kWh generated) × the electricity
    the facility draws (IT × PUE): what the power plants consume to make it."""
    return grid_energy_wh / 1000 * ewif_l_per_kwh


# --- training beside inference -------------------------------------------------------------

def overtaking_day(training_wh: Span, daily_inference_wh: Span) -> Span:
    """The day of service on which cumulative inference energy reaches the training
    energy: training ÷ inference energy per day (at a constant daily energy)."""
    return training_wh / daily_inference_wh


def training_share(training_wh: Span, lifetime_inference_wh: Span) -> Span:
    """Training's share of a model's lifetime energy, T ÷ (T + I): rising in T, falling in
    I, so its low pairs the lowest T with the highest I."""
    training_wh._check_positive("training energy")
    lifetime_inference_wh._check_positive("inference energy")

    def share(t: float, i: float) -> float:
        return t / (t + i) if t + i > 0 else 0.0

    return Span(share(training_wh.low, lifetime_inference_wh.high),
                share(training_wh.central, lifetime_inference_wh.central),
                share(training_wh.high, lifetime_inference_wh.low))


def per_user_per_month(per_query: Span, queries_per_user_per_day: Span) -> Span:
    """A per-query figure (Wh, L, money) for one user's month: × queries a user a day
    × 365/12 days."""
    return per_query * queries_per_user_per_day * DAYS_PER_MONTH


# --- numbers in and out ----------------------------------------------------------------

_SUFFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "%": 0.01}
_NUMBER = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKMBGT%]?)\s*")


def parse_number(text: str) -> float:
    """`9e9`, `9B`, `195M`, `6.5k`, `1,000`, `20%` → float. `k`/`K` thousand, `M` million,
    `B`/`G` billion, `T` trillion, `%` hundredth. A lower-case `m` is refused: milli or
    million?"""
    match = _NUMBER.fullmatch(text.replace(",", "").replace("_", ""))
    if match is None:
        hint = " (use M for million)" if text.strip().endswith("m") else ""
        raise ValueError(f"expected a number such as 9e9, 9B, 195M, 6.5k or 20%{hint}, "
                         f"got {text!r}")
    value = float(match.group(1)) * _SUFFIXES[match.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def parse_span(text: str) -> Span:
    """A number, or a range `LOW:HIGH` (central: the midpoint)."""
    low, sep, high = text.partition(":")
    if not sep:
        return Span.exact(parse_number(text))
    return Span.between(parse_number(low), parse_number(high))


ENERGY_UNITS = (("TWh", 1e12), ("GWh", 1e9), ("MWh", 1e6), ("kWh", 1e3), ("Wh", 1.0),
                 ("mWh", 1e-3))
POWER_UNITS = (("TW", 1e12), ("GW", 1e9), ("MW", 1e6), ("kW", 1e3), ("W", 1.0), ("mW", 1e-3))


def scale(value: float, units: tuple[tuple[str, float], ...], digits: int = 3) -> str:
    """`value` in the largest of `units` (largest first, the smallest last) it reaches."""
    if value == 0:
        return f"0 {units[-2][0]}"
    for unit, size in units:
        if abs(value) >= size * (1 - 0.5 * 10 ** -digits):
            return f"{value / size:.{digits}g} {unit}"
    unit, size = units[-1]
    return f"{value / size:.{digits}g} {unit}"


_ENERGY_TEXT = re.compile(r"\s*(.*?)\s*(TWh|GWh|MWh|kWh|Wh)\s*")
_ENERGY_SIZE = dict(ENERGY_UNITS)


def _parse_energy(text: str, unit: str | None = None) -> tuple[float, str]:
    if text.strip().endswith("mWh"):
        raise ValueError(f"mWh is milliwatt-hours: write MWh for megawatt-hours, got {text!r}")
    match = _ENERGY_TEXT.fullmatch(text)
    if match is None:
        if unit is None:
            raise ValueError(f"expected an energy with its unit (Wh, kWh, MWh, GWh, TWh) "
                             f"such as 50GWh or 1287MWh, got {text!r}")
        number = text
    else:
        number, unit = match.group(1), match.group(2)
    return parse_number(number) * _ENERGY_SIZE[unit], unit


def parse_energy_span(text: str) -> Span:
    """`50GWh`, `1,287 MWh`, `433196kWh`, or a range `400MWh:1.3GWh` (`1:2GWh`: the low
    end takes the high end's unit) → Wh."""
    low, sep, high = text.partition(":")
    if not sep:
        return Span.exact(_parse_energy(text)[0])
    high_wh, unit = _parse_energy(high)
    return Span.between(_parse_energy(low, unit)[0], high_wh)


_DURATION_DAYS = {"d": 1.0, "day": 1.0, "days": 1.0, "w": 7.0, "week": 7.0, "weeks": 7.0,
                  "mo": DAYS_PER_MONTH, "month": DAYS_PER_MONTH, "months": DAYS_PER_MONTH,
                  "y": float(DAYS_PER_YEAR), "yr": float(DAYS_PER_YEAR),
                  "year": float(DAYS_PER_YEAR), "years": float(DAYS_PER_YEAR)}
_DURATION_TEXT = re.compile(r"\s*(.*?)\s*([a-z]+)\s*")


def _parse_days(text: str) -> float:
    match = _DURATION_TEXT.fullmatch(text)
    if match is None or match.group(2) not in _DURATION_DAYS:
        raise ValueError(f"expected a duration with its unit (d, w, mo, y) such as 1y, 18mo "
                         f"or 90d, got {text!r}")
    return parse_number(match.group(1)) * _DURATION_DAYS[match.group(2)]


def parse_duration_span(text: str) -> Span:
    """`1y`, `18mo`, `90d`, `2w`, or a range `6mo:2y` → days (a year is 365 days, a month
    365/12)."""
    low, sep, high = text.partition(":")
    if not sep:
        return Span.exact(_parse_days(text))
    return Span.between(_parse_days(low), _parse_days(high))


def format_energy(wh: float, digits: int = 3) -> str:
    """Auto-scaled: 0.24 Wh, 564 MWh, 29.2 TWh (`digits` significant digits)."""
    return scale(wh, ENERGY_UNITS, digits)
