"""Property tests of the fleet formulas (agent/fleet/model.py) and of the estimate's rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.fleet import model
from agent.fleet.estimate import estimate, parse_years
from agent.fleet.model import Span

positive = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)
factor = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
pues = st.floats(min_value=1.0, max_value=3.0, allow_nan=False)


@st.composite
def spans(draw: st.DrawFn, values: st.SearchStrategy[float] = positive) -> Span:
    a, b = draw(values), draw(values)
    return Span.between(min(a, b), max(a, b))


@given(wh=spans(), volume=spans(), k=factor)
def test_query_energy_is_linear_in_volume(wh: Span, volume: Span, k: float) -> None:
    base = model.query_energy(wh, volume)
    scaled = model.query_energy(wh, volume * k)
    for got, want in zip((scaled.low, scaled.central, scaled.high),
                         (base.low * k, base.central * k, base.high * k), strict=True):
        assert got == pytest.approx(want, rel=1e-9)


@given(j=spans(), tokens=spans(), k=factor)
def test_token_energy_is_linear_in_volume(j: Span, tokens: Span, k: float) -> None:
    assert model.token_energy(j, tokens * k).central == pytest.approx(
        model.token_energy(j, tokens).central * k, rel=1e-9)


@given(units=spans(), watts=spans(), k=factor)
def test_server_energy_is_linear_in_units(units: Span, watts: Span, k: float) -> None:
    one = Span.exact(1.0)
    assert model.server_energy(units * k, watts, one).high == pytest.approx(
        model.server_energy(units, watts, one).high * k, rel=1e-9)


def test_the_formulas_match_design_section_8() -> None:
    assert model.query_energy(Span.exact(2.0), Span.exact(10.0)).central == 2 * 10 * 365
    assert model.token_energy(Span.exact(3600.0), Span.exact(1.0)).central == 365
    assert model.server_energy(Span.exact(2), Span.exact(1000.0), Span.exact(0.5)).central \
        == 2 * 1000 * 0.5 * 8760
    gpus = model.gpus_needed(Span.exact(86400 * 10.0), Span.exact(2.0))
    assert gpus.central == 5
    assert model.servers_needed(gpus, 8).central == 1
    assert model.capacity_energy(gpus, Span.exact(300.0)).central == 5 * 300 * 8760


@given(wh=spans(), volume=spans(), pue=pues)
def test_pue_is_applied_once(wh: Span, volume: Span, pue: float) -> None:
    it = model.query_energy(wh, volume)
    facility, boundary = model.facility_energy(it, "it", Span.exact(pue))
    assert boundary == "facility"
    assert facility.central == pytest.approx(it.central * pue, rel=1e-12)
    with pytest.raises(ValueError, match="already at the facility boundary"):
        model.facility_energy(facility, "facility", Span.exact(pue))
    assert model.facility_energy(it, "it", None) == (it, "it")


@given(wh=st.floats(0.01, 100), q=st.floats(1, 1e10), pue=pues)
def test_the_command_applies_a_pue_once_to_an_it_figure(wh: float, q: float, pue: float) -> None:
    result = estimate({"wh_per_query": Span.exact(wh), "queries_per_day": Span.exact(q),
                       "pue": Span.exact(pue)}, boundary="it")
    assert result.boundary == "facility"
    assert result.annual_energy_wh.central == pytest.approx(wh * q * 365 * pue, rel=1e-9)
    assert result.wh_per_query is not None
    assert result.wh_per_query.central == pytest.approx(wh * pue, rel=1e-9)


def test_a_pue_on_a_facility_figure_is_refused() -> None:
    with pytest.raises(ValueError, match="already"):
        estimate({"wh_per_query": Span.exact(0.3), "queries_per_day": Span.exact(1e9),
                  "pue": Span.exact(1.2)}, boundary="facility")


@given(wh=spans(), volume=spans(), pue=spans(st.floats(1.0, 3.0)),
       growth=spans(st.floats(-0.5, 1.0)), gain=spans(st.floats(0.0, 0.5)),
       years=st.integers(0, 8))
def test_ranges_stay_ordered_through_every_output(
    wh: Span, volume: Span, pue: Span, growth: Span, gain: Span, years: int
) -> None:
    result = estimate(
        {"wh_per_query": wh, "queries_per_day": volume, "pue": pue, "growth": growth,
         "efficiency_gain": gain, "price_per_kwh": Span.between(0.05, 0.2)},
        boundary="it", years=(2025, 2025 + years),
    )
    spans_out = [result.annual_energy_wh, result.daily_energy_wh, result.average_power_w,
                 result.carbon_g, result.water_l, result.money, result.wh_per_query,
                 *(row.annual_energy_wh for row in result.years),
                 *(e.value for e in result.equivalents)]
    for span in spans_out:
        assert span is not None
        assert span.low <= span.central <= span.high
    assert len(result.years) == years + 1


@given(wh=spans(), volume=spans(), x=st.floats(0, 1), y=st.floats(0, 1))
def test_bounds_hold_every_point_inside_the_input_ranges(
    wh: Span, volume: Span, x: float, y: float
) -> None:
    bounds = model.query_energy(wh, volume)
    point = model.query_energy(Span.exact(wh.low + x * (wh.high - wh.low)),
                               Span.exact(volume.low + y * (volume.high - volume.low)))
    assert bounds.low * (1 - 1e-12) <= point.central <= bounds.high * (1 + 1e-12)


@pytest.mark.parametrize(("wh", "text"), [
    (0.24, "240 mWh"), (564e6, "564 MWh"), (29.2e12, "29.2 TWh"), (0.0, "0 Wh"),
    (999.9996, "1 kWh"),
])
def test_energy_is_written_in_the_largest_unit_it_reaches(wh: float, text: str) -> None:
    assert model.format_energy(wh) == text


@pytest.mark.parametrize(("text", "value"), [
    ("9e9", 9e9), ("9B", 9e9), ("195M", 195e6), ("6.5k", 6500), ("1,000", 1000),
    ("20%", 0.2), ("2T", 2e12), (".5", 0.5), ("-0.05", -0.05),
])
def test_numbers_accept_the_usual_forms(text: str, value: float) -> None:
    assert model.parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "9m", "1e999", "9 billion", "1:2:3"])
def test_bad_numbers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        model.parse_span(text)


def test_ranges_parse_with_a_midpoint_and_refuse_reversed_bounds() -> None:
    assert model.parse_span("6.5:10.2") == Span(6.5, 8.35, 10.2)
    assert model.parse_span("1M:2M") == Span(1e6, 1.5e6, 2e6)
    with pytest.raises(ValueError, match="LOW ≤ HIGH"):
        model.parse_span("10:1")


def test_format_energy_scales_to_the_readable_unit() -> None:
    assert model.format_energy(564_252_000) == "564 MWh"
    assert model.format_energy(29.2e12) == "29.2 TWh"
    assert model.format_energy(0.24) == "240 mWh"
    assert model.format_energy(999.99) == "1 kWh"


def test_year_factor_compounds_growth_and_efficiency() -> None:
    factor = model.year_factor(2, Span.exact(0.5), Span.exact(0.2))
    assert factor.central == pytest.approx((1.5 * 0.8) ** 2)
    wider = model.year_factor(1, Span.between(0.1, 0.3), Span.between(0.0, 0.1))
    assert (wider.low, wider.high) == pytest.approx((1.1 * 0.9, 1.3))
    with pytest.raises(ValueError, match="efficiency"):
        model.year_factor(1, Span.exact(0), Span.exact(1.0))


def test_years_parse() -> None:
    assert parse_years("2025:2030") == (2025, 2030)
    assert parse_years("2027") == (2027, 2027)
    for bad in ("2030:2025", "soon", "2025:"):
        with pytest.raises(ValueError, match="--years"):
            parse_years(bad)


def test_span_refuses_disorder_and_non_finite_values() -> None:
    with pytest.raises(ValueError):
        Span(2, 1, 3)
    with pytest.raises(ValueError):
        Span.exact(math.inf)
