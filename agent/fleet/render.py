"""A fleet estimate as a table, JSON, CSV, or a plot of its yearly series.

Honest bounds: wherever a figure has a range (from a `LOW:HIGH` input, a confidence
interval, or a default such as the water range), the table shows the range first and the
central value after it, never the central value alone; JSON and CSV carry all three.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from agent.fleet import facts
from agent.fleet.estimate import Estimate, PerUser, Training
from agent.fleet.facts import Equivalent
from agent.fleet.model import ENERGY_UNITS, POWER_UNITS, Span, scale

FORMATS = ("table", "json", "csv")
_MASS_UNITS = (("Mt", 1e12), ("kt", 1e9), ("t", 1e6), ("kg", 1e3), ("g", 1.0), ("mg", 1e-3))
_WATER_UNITS = (("GL", 1e9), ("ML", 1e6), ("m³", 1e3), ("L", 1.0), ("mL", 1e-3))
# Below 1 a count or a sum of money keeps its plain unit (the last entry is the fallback).
_MONEY_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("", 1.0))
_COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("", 1.0))


def _fields(estimate: Estimate) -> dict[str, Span | None]:
    """The headline figures, by their JSON names (training and per-user figures only where
    their inputs were given)."""
    per_query = estimate.wh_per_query
    fields: dict[str, Span | None] = {
        "annual_energy_wh": estimate.annual_energy_wh,
        "daily_energy_wh": estimate.daily_energy_wh,
        "average_power_w": estimate.average_power_w,
        "wh_per_query": per_query,
        "carbon_g_per_year": estimate.carbon_g,
        "water_l_per_year": estimate.water_l,
        "water_onsite_l_per_year": estimate.water_onsite_l,
        "water_offsite_l_per_year": estimate.water_offsite_l,
        "money_per_year": estimate.money,
        "carbon_g_per_query": _per_query(estimate, "carbon_g_per_kwh"),
        "water_l_per_query": estimate.water_l_per_query,
        "water_onsite_l_per_query": estimate.water_onsite_l_per_query,
        "water_offsite_l_per_query": estimate.water_offsite_l_per_query,
        "queries_per_bottle": _per_bottle(estimate.water_l_per_query),
        "money_per_query": _per_query(estimate, "price_per_kwh"),
        "gpus": estimate.gpus,
        "servers": estimate.servers,
    }
    if (training := estimate.training) is not None:
        fields |= {
            "training_energy_wh": training.energy_wh,
            "lifetime_days": training.lifetime_days,
            "lifetime_inference_wh": training.lifetime_inference_wh,
            "training_overtaken_on_day": training.overtaking_day,
            "training_share_of_lifetime_energy": training.share_of_lifetime_energy,
            "lifetime_queries": training.lifetime_queries,
            "training_wh_per_query": training.wh_per_query,
            "total_wh_per_query": training.total_wh_per_query,
            "training_carbon_g": training.carbon_g,
            "training_water_l": training.water_l,
            "training_water_onsite_l": training.water_onsite_l,
            "training_water_offsite_l": training.water_offsite_l,
        }
    if (user := estimate.per_user) is not None:
        fields |= {
            "users": user.users,
            "wh_per_user_per_month": user.wh_per_month,
            "wh_per_user_per_month_with_training": user.wh_per_month_with_training,
            "money_per_user_per_month": user.money_per_month,
            "money_per_user_per_month_with_training": user.money_per_month_with_training,
            "revenue_per_user_per_month": user.revenue_per_month,
            "energy_cost_share_of_revenue": user.cost_share_of_revenue,
            "energy_cost_share_of_revenue_with_training":
                user.cost_share_of_revenue_with_training,
        }
    return fields


def _per_bottle(water_l_per_query: Span | None) -> Span | None:
    """Queries per bottle of water (Li et al.'s 500 mL): the press's unit."""
    if water_l_per_query is None or not water_l_per_query.low > 0:
        return None
    return Span.exact(facts.bottle_l()) / water_l_per_query


def _per_query(estimate: Estimate, intensity: str) -> Span | None:
    """kWh per query × the intensity per kWh, so that bounds pair as the inputs do."""
    if estimate.wh_per_query is None or intensity not in estimate.inputs:
        return None
    return estimate.wh_per_query / 1000 * estimate.inputs[intensity].value


def _ranged(fields: dict[str, Span | None]) -> bool:
    return any(span is not None and span.is_range for span in fields.values())


def to_json(estimate: Estimate) -> dict[str, Any]:
    fields = _fields(estimate)
    out: dict[str, Any] = {
        "simulated": estimate.simulated,
        "mode": estimate.mode,
        "boundary": estimate.boundary,
        **{name: None if span is None else span.central for name, span in fields.items()},
    }
    if _ranged(fields) or estimate.has_range:
        out["low"] = {n: None if s is None else s.low for n, s in fields.items()}
        out["high"] = {n: None if s is None else s.high for n, s in fields.items()}
    out["years"] = [
        {"year": row.year, "annual_energy_wh": row.annual_energy_wh.central,
         "low": row.annual_energy_wh.low, "high": row.annual_energy_wh.high}
        for row in estimate.years
    ]
    out["equivalents"] = _equivalents_json(estimate.equivalents)
    if estimate.training is not None:
        out["training_boundary"] = estimate.training.boundary
        out["training_equivalents"] = _equivalents_json(estimate.training.equivalents)
    out["inputs"] = {
        "boundary": {"value": estimate.boundary, "origin": estimate.boundary_origin,
                     "kind": "derived"},
        **{name: {"value": i.value.central, "low": i.value.low, "high": i.value.high,
                  "origin": i.origin, "kind": i.kind}
           for name, i in sorted(estimate.inputs.items())},
    }
    out["notes"] = list(estimate.notes)
    return out


def _equivalents_json(equivalents: tuple[Equivalent, ...]) -> list[dict[str, Any]]:
    return [
        {"label": e.label, "value": e.value.central, "low": e.value.low, "high": e.value.high,
         "share": e.share, "source": e.source, "year": e.year}
        for e in equivalents
    ]


def _csv(estimate: Estimate) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["quantity", "year", "central", "low", "high"])
    for name, span in _fields(estimate).items():
        if span is not None:
            writer.writerow([name, "", repr(span.central), repr(span.low), repr(span.high)])
    for row in estimate.years:
        span = row.annual_energy_wh
        writer.writerow(["annual_energy_wh", row.year, repr(span.central), repr(span.low),
                         repr(span.high)])
    return buffer.getvalue()


def _show(span: Span | None, fmt: Callable[[float], str]) -> str:
    if span is None:
        return "-"
    if not span.is_range:
        return fmt(span.central)
    return f"{fmt(span.low)} … {fmt(span.high)}  (central {fmt(span.central)})"


def _units(units: tuple[tuple[str, float], ...], suffix: str = "", prefix: str = ""
           ) -> Callable[[float], str]:
    return lambda v: prefix + scale(v, units).rstrip() + suffix


def _share(value: float) -> str:
    return f"{value * 100:.3g} %"


def banner(estimate: Estimate) -> str | None:
    if estimate.simulated:
        return ("SIMULATED GPUs: a measured input comes from simulated GPUs; the figures "
                "show the method, not real hardware.")
    if estimate.simulated is None:
        return ("Hardware unknown: the source reports no GPU, so whether its GPUs were real "
                "is not known.")
    return None


def _table(estimate: Estimate) -> str:
    lines = [f"jouleprobe fleet: {estimate.mode} mode, energy at the {estimate.boundary} "
             f"boundary"]
    if (text := banner(estimate)) is not None:
        lines.append(text)
    energy, power = _units(ENERGY_UNITS), _units(POWER_UNITS)
    mass = _units(_MASS_UNITS, " CO2e")
    water = _units(_WATER_UNITS)
    count = _units(_COUNT_UNITS)
    currency = _units(_MONEY_UNITS, prefix="$")
    rows = [
        ("annual energy", _show(estimate.annual_energy_wh, energy)),
        ("daily energy", _show(estimate.daily_energy_wh, energy)),
        ("average power", _show(estimate.average_power_w, power)),
        ("energy per query", _show(estimate.wh_per_query, lambda v: f"{v:.3g} Wh")),
    ]
    fields = _fields(estimate)
    rows += [
        ("carbon per year", _show(estimate.carbon_g, mass)),
        ("carbon per query", _show(fields["carbon_g_per_query"], mass)),
        ("water per year", _show(estimate.water_l, water) + "  (on-site + off-site)"),
        ("  on-site", _show(estimate.water_onsite_l, water) + "  (WUE × IT energy)"),
        ("  off-site", _show(estimate.water_offsite_l, water)
         + "  (grid water × electricity drawn)"),
        ("water per query", _show(fields["water_l_per_query"], water)),
        ("  on-site", _show(fields["water_onsite_l_per_query"], water)),
        ("  off-site", _show(fields["water_offsite_l_per_query"], water)),
    ]
    if fields["queries_per_bottle"] is not None:
        rows.append((f"queries / {facts.bottle_l() * 1000:g} mL",
                     _show(fields["queries_per_bottle"], count)))
    if estimate.money is not None:
        rows += [("money per year", _show(estimate.money, currency)),
                 ("money per query", _show(fields["money_per_query"], lambda v: f"${v:.3g}"))]
    if estimate.gpus is not None:
        rows += [("GPUs needed", _show(estimate.gpus, count)),
                 ("servers needed", _show(estimate.servers, count))]
    lines.append("")
    lines += _rows(rows)
    if len(estimate.years) > 1:
        lines += ["", "  year  annual energy"]
        lines += [f"  {row.year}  {_show(row.annual_energy_wh, energy)}"
                  for row in estimate.years]
    lines += ["", "Equivalents (annual energy compared with):"]
    lines += _equivalent_lines(estimate.equivalents)
    if estimate.training is not None:
        lines += _training_lines(estimate.training)
    if estimate.per_user is not None:
        lines += _per_user_lines(estimate.per_user)
    width = max(18, *(len(name) + 2 for name in estimate.inputs))
    lines += ["", "Inputs:", f"  {'boundary':<{width}}{estimate.boundary}",
              f"  {'':<{width}}from {estimate.boundary_origin}"]
    for name, item in sorted(estimate.inputs.items()):
        lines.append(f"  {name:<{width}}{_show(item.value, _INPUT_FORMATS.get(name, _plain))}")
        lines.append(f"  {'':<{width}}from {item.origin}")
    if estimate.notes:
        lines += ["", "Notes:", *(f"  - {note}" for note in estimate.notes)]
    return "\n".join(lines) + "\n"


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    """`name  value` lines, the values aligned (at column 20, or past the longest name)."""
    width = max(18, *(len(name) + 2 for name, _ in rows))
    return [f"  {name:<{width}}{value}" for name, value in rows]


def _plain(value: float) -> str:
    return f"{value:.4g}"


_INPUT_FORMATS: dict[str, Callable[[float], str]] = {
    "training_energy": lambda v: scale(v, ENERGY_UNITS, 4),
    "lifetime": lambda v: f"{v:.4g} days",
}


def _equivalent_lines(equivalents: tuple[Equivalent, ...]) -> list[str]:
    count = _units(_COUNT_UNITS)
    return [f"  {e.label:<48}{_show(e.value, _share if e.share else count)}   "
            f"[{e.source}; figure for {e.year}]" for e in equivalents]


def _days(value: float) -> str:
    return f"{value:.3g}"


def _training_lines(training: Training) -> list[str]:
    energy, water = _units(ENERGY_UNITS), _units(_WATER_UNITS)
    count, mass = _units(_COUNT_UNITS), _units(_MASS_UNITS, " CO2e")
    per_query = _units(ENERGY_UNITS)
    given = "" if training.given_boundary == training.boundary else \
        f": {_show(training.given_wh, energy)} at the {training.given_boundary} boundary × PUE"
    rows = [
        ("training energy", f"{_show(training.energy_wh, energy)}  (at the "
                            f"{training.boundary} boundary{given})"),
        ("lifetime", _show(training.lifetime_days, lambda v: f"{v:.3g} days")),
        ("inference in it", _show(training.lifetime_inference_wh, energy)),
        ("overtaken on day", f"{_show(training.overtaking_day, _days)}  (cumulative inference "
                             f"energy reaches the training's)"),
        ("training's share", f"{_show(training.share_of_lifetime_energy, _share)}  (of "
                             f"training + lifetime inference)"),
        ("queries in it", _show(training.lifetime_queries, count)),
        ("training/query", _show(training.wh_per_query, per_query)),
        ("total per query", f"{_show(training.total_wh_per_query, per_query)}  (inference + "
                            f"training share)"),
        ("training carbon", _show(training.carbon_g, mass)),
        ("training water", _show(training.water_l, water) + "  (on-site + off-site)"),
        ("  on-site", _show(training.water_onsite_l, water)),
        ("  off-site", _show(training.water_offsite_l, water)),
    ]
    lines = ["", "Training beside inference:", *_rows(rows)]
    lines += ["", "Equivalents (the training run compared with):"]
    lines += _equivalent_lines(training.equivalents)
    return lines


def _per_user_lines(user: PerUser) -> list[str]:
    energy, count = _units(ENERGY_UNITS), _units(_COUNT_UNITS)
    currency = _units(_MONEY_UNITS, prefix="$")
    rows = [("users implied", _show(user.users, count)),
            ("energy per month", _show(user.wh_per_month, energy))]
    if user.wh_per_month_with_training is not None:
        rows.append(("  with training", _show(user.wh_per_month_with_training, energy)))
    if user.money_per_month is not None:
        rows.append(("energy cost/month", _show(user.money_per_month, currency)))
    if user.money_per_month_with_training is not None:
        rows.append(("  with training", _show(user.money_per_month_with_training, currency)))
    if user.revenue_per_month is not None:
        rows += [("revenue per month", _show(user.revenue_per_month, currency)),
                 ("cost ÷ revenue", _show(user.cost_share_of_revenue, _share))]
    if user.cost_share_of_revenue_with_training is not None:
        rows.append(("  with training", _show(user.cost_share_of_revenue_with_training,
                                               _share)))
    lines = ["", f"Per user ({_show(user.queries_per_day, lambda v: f'{v:.3g}')} queries a day; "
                 f"a month is 365/12 days):"]
    return lines + _rows(rows)


def render(estimate: Estimate, fmt: str) -> str:
    if fmt == "table":
        return _table(estimate)
    if fmt == "json":
        return json.dumps(to_json(estimate), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv(estimate)
    raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


PLOT_COUNTRIES = ("ireland", "netherlands", "sweden")


def plot(estimate: Estimate, path: str) -> None:
    """The yearly series with its band, on a log scale, against a few countries' annual
    electricity use. Needs matplotlib (`pip install 'jouleprobe[plot]'`)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'jouleprobe[plot]' (or "
                         "matplotlib>=3.7)") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    years = [row.year for row in estimate.years]
    to_twh = 1e-12
    central = [row.annual_energy_wh.central * to_twh for row in estimate.years]
    low = [row.annual_energy_wh.low * to_twh for row in estimate.years]
    high = [row.annual_energy_wh.high * to_twh for row in estimate.years]
    figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        axes.fill_between(years, low, high, alpha=0.25, color="tab:blue", linewidth=0,
                          label="low … high")
        axes.plot(years, central, marker="o", color="tab:blue",
                  label=f"estimate ({estimate.boundary} boundary)")
        countries = facts.load()["countries"]
        for index, key in enumerate(PLOT_COUNTRIES):
            country = countries[key]
            axes.axhline(country["annual_wh"] * to_twh, linestyle="--", linewidth=0.8,
                         color=f"C{index + 1}",
                         label=f"{country['label']} ({country['year']})")
        axes.set_yscale("log")
        axes.set_ylabel("TWh per year")
        axes.set_xticks(years)
        title = f"jouleprobe fleet: {estimate.mode} mode"
        if estimate.simulated:
            title += " (SIMULATED GPUs)"
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=7, loc="best")
        axes.grid(True, which="major", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path)
    finally:
        pyplot.close(figure)
