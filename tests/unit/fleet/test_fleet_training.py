"""Training beside inference, split water, and money per user (`jouleprobe fleet`, issue 17),
each checked against a hand computation."""

from __future__ import annotations

import pytest
from fleet_cli import fleet, fleet_json
from hypothesis import given
from hypothesis import strategies as st

from agent.fleet import model
from agent.fleet.estimate import estimate
from agent.fleet.model import Span

positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def spans(draw: st.DrawFn, values: st.SearchStrategy[float] = positive) -> Span:
    a, b = draw(values), draw(values)
    return Span.between(min(a, b), max(a, b))




# --- training ----------------------------------------------------------------------------

def test_the_overtaking_day_and_the_share_per_query_by_hand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GPT-3's 1,287 MWh beside de Vries's ChatGPT: 2.9 Wh × 195 M requests a day.
    result = fleet_json(capsys, "--wh-per-query", "2.9", "--queries-per-day", "195M",
                        "--training-energy", "1287MWh", "--lifetime", "1y")
    daily = 2.9 * 195e6  # 565.5 MWh a day
    assert result["daily_energy_wh"] == pytest.approx(daily)
    assert result["training_overtaken_on_day"] == pytest.approx(1287e6 / daily)  # 2.276
    assert 2.27 < result["training_overtaken_on_day"] < 2.28
    queries = 195e6 * 365
    assert result["lifetime_queries"] == pytest.approx(queries)
    assert result["training_wh_per_query"] == pytest.approx(1287e6 / queries)  # 0.0181 Wh
    assert result["total_wh_per_query"] == pytest.approx(2.9 + 1287e6 / queries)
    assert result["lifetime_inference_wh"] == pytest.approx(daily * 365)
    assert result["training_share_of_lifetime_energy"] == pytest.approx(
        1287e6 / (1287e6 + daily * 365))
    assert result["training_energy_wh"] == pytest.approx(1287e6)
    assert result["training_boundary"] == "facility"
    labels = [e["label"] for e in result["training_equivalents"]]
    assert "phone charges" in labels and "days of New York City's electricity" in labels
    phone = next(e for e in result["training_equivalents"] if e["label"] == "phone charges")
    assert phone["value"] == pytest.approx(1287e6 / 15.0)
    assert all(e["source"] and e["year"] for e in result["training_equivalents"])


def test_training_ranges_give_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "0.2:0.4", "--queries-per-day", "1B",
                        "--training-energy", "1:2GWh", "--lifetime", "6mo:2y")
    low, high = result["low"], result["high"]
    # The earliest overtaking: least training, most inference a day; the latest: the reverse.
    assert low["training_overtaken_on_day"] == pytest.approx(1e9 / (0.4 * 1e9))
    assert high["training_overtaken_on_day"] == pytest.approx(2e9 / (0.2 * 1e9))
    assert low["lifetime_days"] == pytest.approx(365 / 2)
    assert high["lifetime_days"] == pytest.approx(730)
    # Training per query: least training over the most queries, and the reverse.
    assert low["training_wh_per_query"] == pytest.approx(1e9 / (1e9 * 730))
    assert high["training_wh_per_query"] == pytest.approx(2e9 / (1e9 * 182.5))
    assert low["training_share_of_lifetime_energy"] == pytest.approx(
        1e9 / (1e9 + 0.4e9 * 730))
    assert high["training_share_of_lifetime_energy"] == pytest.approx(
        2e9 / (2e9 + 0.2e9 * 182.5))
    _, table, _ = fleet(capsys, "--wh-per-query", "0.2:0.4", "--queries-per-day", "1B",
                        "--training-energy", "1:2GWh")
    overtaken = next(line for line in table.splitlines() if "overtaken on day" in line)
    assert "2.5 … 10" in overtaken and "central 5" in overtaken


def test_a_pue_applies_to_the_training_energy_too(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "1", "--queries-per-day", "1M",
                        "--boundary", "it", "--pue", "1.25", "--training-energy", "1GWh",
                        "--water-l-per-kwh", "1", "--grid-water-l-per-kwh", "2",
                        "--training-carbon-g-per-kwh", "100")
    assert result["training_energy_wh"] == pytest.approx(1.25e9)
    assert result["training_boundary"] == "facility"
    # On-site water counts the IT energy, off-site the electricity drawn.
    assert result["training_water_onsite_l"] == pytest.approx(1e6 * 1)
    assert result["training_water_offsite_l"] == pytest.approx(1.25e6 * 2)
    assert result["training_carbon_g"] == pytest.approx(1.25e6 * 100)
    assert result["inputs"]["training_carbon_g_per_kwh"]["origin"] \
        == "--training-carbon-g-per-kwh"
    # Unless given, the training's grid is the inference's.
    default = fleet_json(capsys, "--wh-per-query", "1", "--queries-per-day", "1M",
                         "--training-energy", "1GWh", "--carbon-g-per-kwh", "200")
    assert default["training_carbon_g"] == pytest.approx(1e6 * 200)
    assert default["inputs"]["lifetime"]["origin"] == "default: 1 year (--lifetime)"


def test_a_training_preset_keeps_its_own_boundary(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--preset", "bloom-training", "--wh-per-query", "0.3",
                        "--queries-per-day", "10M")
    assert result["training_boundary"] == "gpu" and result["boundary"] == "facility"
    assert result["training_energy_wh"] == pytest.approx(433_196e3)
    assert any("training energy at the gpu boundary as preset" in n for n in result["notes"])
    # The inference site's PUE is not the training run's: the published figure is kept.
    with_pue = fleet_json(capsys, "--preset", "bloom-training", "--wh-per-query", "0.3",
                          "--queries-per-day", "10M", "--pue", "1.2")
    assert with_pue["training_energy_wh"] == pytest.approx(433_196e3)
    assert with_pue["training_boundary"] == "gpu"
    assert with_pue["training_carbon_g"] == pytest.approx(24.7e6, rel=1e-3)
    assert any("training carbon and water from its gpu energy alone" in n
               for n in with_pue["notes"]), "GPU energy alone: an undercount, said"
    gpt3 = fleet_json(capsys, "--preset", "gpt3-training", "--wh-per-query", "0.3",
                      "--queries-per-day", "10M")
    assert any("training water on-site" in n and "upper bound" in n for n in gpt3["notes"])
    code, _, err = fleet(capsys, "--preset", "gpt3-training")
    assert code == 2 and "gives a training run" in err and "--wh-per-query" in err


def test_training_in_every_format(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--wh-per-query", "0.3", "--queries-per-day", "1B", "--training-energy", "50GWh",
            "--years", "2025:2027", "--growth", "20%")
    _, table, _ = fleet(capsys, *argv)
    assert "Training beside inference:" in table and "overtaken on day" in table
    assert "Equivalents (the training run compared with):" in table
    assert "US households for a year" in table
    assert "training: the overtaking day" in table  # the series holds no growth for it
    _, csv, _ = fleet(capsys, *argv, "--format", "csv")
    rows = {line.split(",")[0]: line for line in csv.splitlines()}
    assert rows["training_overtaken_on_day"].startswith(
        f"training_overtaken_on_day,,{50e9 / (0.3e9)!r}")
    assert "lifetime_queries" in rows and "training_water_l" in rows


# --- water -------------------------------------------------------------------------------

def test_water_splits_on_site_and_off_site_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "1", "--queries-per-day", "1000",
                        "--boundary", "it", "--pue", "1.5", "--water-l-per-kwh", "2",
                        "--grid-water-l-per-kwh", "4")
    it_kwh = 1 * 1000 * 365 / 1000  # 365 kWh of IT energy a year
    assert result["water_onsite_l_per_year"] == pytest.approx(it_kwh * 2)  # 730 L
    assert result["water_offsite_l_per_year"] == pytest.approx(it_kwh * 1.5 * 4)  # 2,190 L
    assert result["water_l_per_year"] == pytest.approx(730 + 2190)
    assert result["water_onsite_l_per_query"] == pytest.approx(0.001 * 2)
    assert result["water_offsite_l_per_query"] == pytest.approx(0.001 * 1.5 * 4)
    assert result["water_l_per_query"] == pytest.approx(0.008)
    assert result["queries_per_bottle"] == pytest.approx(0.5 / 0.008)
    origins = {k: result["inputs"][k]["origin"] for k in ("water_l_per_kwh",
                                                          "grid_water_l_per_kwh")}
    assert origins == {"water_l_per_kwh": "--water-l-per-kwh",
                       "grid_water_l_per_kwh": "--grid-water-l-per-kwh"}


def test_water_defaults_keep_their_sources(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "1", "--queries-per-day", "1000")
    onsite = result["inputs"]["water_l_per_kwh"]
    offsite = result["inputs"]["grid_water_l_per_kwh"]
    assert (onsite["low"], onsite["high"]) == (0.2, 1.8) and onsite["kind"] == "default"
    assert offsite["value"] == 3.142 and "Li, J. Yang" in offsite["origin"]
    assert "2304.03271" in offsite["origin"] and "2023" in offsite["origin"]
    # A facility figure without a PUE: WUE × facility energy, said to be an upper bound.
    assert any("upper bound" in note for note in result["notes"])
    _, table, _ = fleet(capsys, "--wh-per-query", "1", "--queries-per-day", "1000")
    assert "    on-site" in table and "    off-site" in table


@given(wh=spans(), volume=spans(), pue=spans(st.floats(1.0, 3.0)),
       wue=spans(st.floats(0.0, 5.0)), ewif=spans(st.floats(0.0, 10.0)),
       training=spans(), lifetime=spans(st.floats(1.0, 3650.0)))
def test_on_site_plus_off_site_is_the_total(
    wh: Span, volume: Span, pue: Span, wue: Span, ewif: Span, training: Span, lifetime: Span
) -> None:
    result = estimate({"wh_per_query": wh, "queries_per_day": volume, "pue": pue,
                       "water_l_per_kwh": wue, "grid_water_l_per_kwh": ewif,
                       "training_energy": training, "lifetime": lifetime},
                      boundary="it")
    per_query = result.water_l_per_query
    assert per_query is not None and result.training is not None
    for total, parts in ((result.water_l, (result.water_onsite_l, result.water_offsite_l)),
                         (per_query, (result.water_onsite_l_per_query,
                                      result.water_offsite_l_per_query)),
                         (result.training.water_l, (result.training.water_onsite_l,
                                                    result.training.water_offsite_l))):
        onsite, offsite = parts
        assert onsite is not None and offsite is not None
        for bound in ("low", "central", "high"):
            assert getattr(total, bound) == pytest.approx(
                getattr(onsite, bound) + getattr(offsite, bound), rel=1e-12)
    t = result.training
    for span in (t.overtaking_day, t.share_of_lifetime_energy, t.wh_per_query, t.energy_wh,
                 t.total_wh_per_query, t.carbon_g, *(e.value for e in t.equivalents)):
        assert span is not None and span.low <= span.central <= span.high


# --- money per user ----------------------------------------------------------------------

def test_money_per_user_per_month_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "3", "--queries-per-day", "1M",
                        "--queries-per-user-per-day", "20", "--price-per-kwh", "0.15",
                        "--revenue-per-user", "20", "--training-energy", "1287MWh")
    month = 365 / 12
    assert result["users"] == pytest.approx(1e6 / 20)
    assert result["wh_per_user_per_month"] == pytest.approx(3 * 20 * month)  # 1,825 Wh
    assert result["money_per_user_per_month"] == pytest.approx(1.825 * 0.15)  # 0.274
    assert result["revenue_per_user_per_month"] == 20
    assert result["energy_cost_share_of_revenue"] == pytest.approx(1.825 * 0.15 / 20)
    training_per_query = 1287e6 / (1e6 * 365)  # 3.53 Wh, over a year's queries
    with_training = (3 + training_per_query) * 20 * month
    assert result["wh_per_user_per_month_with_training"] == pytest.approx(with_training)
    assert result["money_per_user_per_month_with_training"] == pytest.approx(
        with_training / 1000 * 0.15)
    _, table, _ = fleet(capsys, "--wh-per-query", "3", "--queries-per-day", "1M",
                        "--queries-per-user-per-day", "20", "--price-per-kwh", "0.15",
                        "--revenue-per-user", "20")
    assert "Per user (20 queries a day" in table
    cost = next(line for line in table.splitlines() if "energy cost/month" in line)
    assert "$0.274" in cost
    share = next(line for line in table.splitlines() if "cost ÷ revenue" in line)
    assert "1.37 %" in share


def test_money_per_user_without_a_price_gives_energy_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = fleet_json(capsys, "--wh-per-query", "0.5:1", "--queries-per-day", "1M",
                        "--queries-per-user-per-day", "10")
    assert result["money_per_user_per_month"] is None
    assert result["low"]["wh_per_user_per_month"] == pytest.approx(0.5 * 10 * 365 / 12)
    assert result["high"]["wh_per_user_per_month"] == pytest.approx(1 * 10 * 365 / 12)


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (("--training-energy", "50"), "--training-energy: expected an energy with its unit"),
    (("--training-energy", "5mWh"), "--training-energy: mWh is milliwatt-hours"),
    (("--training-energy=-1GWh",), "--training-energy: must be > 0"),
    (("--training-energy", "1GWh", "--lifetime", "1"), "--lifetime: expected a duration"),
    (("--training-energy", "1GWh", "--lifetime", "0d"), "--lifetime: must be > 0"),
    (("--lifetime", "1y"), "--lifetime: goes with a training run"),
    (("--training-carbon-g-per-kwh", "100"), "--training-carbon-g-per-kwh: goes with"),
    (("--grid-water-l-per-kwh", "-1"), "--grid-water-l-per-kwh: must be ≥ 0"),
    (("--water-l-per-kwh", "x"), "--water-l-per-kwh: expected a number"),
    (("--revenue-per-user", "20"), "--revenue-per-user: compares"),
    (("--queries-per-user-per-day", "10", "--revenue-per-user", "20"),
     "--revenue-per-user: needs --price-per-kwh"),
    (("--queries-per-user-per-day", "0"), "--queries-per-user-per-day: must be > 0"),
])
def test_bad_training_water_and_user_inputs_name_their_flag(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = fleet(capsys, "--wh-per-query", "1", "--queries-per-day", "1M", *argv)
    assert code == 2
    assert message in err


def test_per_user_needs_an_energy_per_query(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = fleet(capsys, "--j-per-token", "0.5", "--tokens-per-day", "1T",
                         "--queries-per-user-per-day", "10")
    assert code == 2 and "--queries-per-user-per-day: needs the energy per query" in err


# --- parsing and formatting --------------------------------------------------------------

@pytest.mark.parametrize(("text", "wh"), [
    ("50GWh", Span.exact(50e9)), ("1,287 MWh", Span.exact(1287e6)),
    ("433196kWh", Span.exact(433_196e3)), ("400MWh:1.3GWh", Span.between(400e6, 1.3e9)),
    ("1:2GWh", Span.between(1e9, 2e9)), ("2TWh", Span.exact(2e12)),
])
def test_energies_parse_with_their_unit(text: str, wh: Span) -> None:
    assert model.parse_energy_span(text) == wh


@pytest.mark.parametrize(("text", "days"), [
    ("1y", Span.exact(365)), ("18mo", Span.exact(547.5)), ("90d", Span.exact(90)),
    ("2w", Span.exact(14)), ("6mo:2y", Span.between(182.5, 730)),
])
def test_durations_parse_in_days(text: str, days: Span) -> None:
    assert model.parse_duration_span(text) == days


@pytest.mark.parametrize("text", ["1", "1h", "y", "2y:1y"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        model.parse_duration_span(text)


def test_counts_below_one_keep_their_value(capsys: pytest.CaptureFixture[str]) -> None:
    # 0.22 × 1.09 = 0.2398 Wh is 0.799 of a 2009 Google search (0.3 Wh), not 799.
    _, table, _ = fleet(capsys, "--preset", "gemini-2025", "--queries-per-day", "1")
    line = next(line for line in table.splitlines() if "Google searches of 2009" in line)
    assert " 0.799 " in line
