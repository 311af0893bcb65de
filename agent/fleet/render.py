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
from agent.fleet.estimate import Estimate
from agent.fleet.model import ENERGY_UNITS, POWER_UNITS, Span, scale

FORMATS = ("table", "json", "csv")
_MASS_UNITS = (("Mt", 1e12), ("kt", 1e9), ("t", 1e6), ("kg", 1e3), ("g", 1.0), ("mg", 1e-3))
_WATER_UNITS = (("GL", 1e9), ("ML", 1e6), ("m³", 1e3), ("L", 1.0), ("mL", 1e-3))
_MONEY_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("", 1e-3))
_COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("", 1e-3))


def _fields(estimate: Estimate) -> dict[str, Span | None]:
    """The headline figures, by their JSON names."""
    per_query = estimate.wh_per_query
    return {
        "annual_energy_wh": estimate.annual_energy_wh,
        "daily_energy_wh": estimate.daily_energy_wh,
        "average_power_w": estimate.average_power_w,
        "wh_per_query": per_query,
        "carbon_g_per_year": estimate.carbon_g,
        "water_l_per_year": estimate.water_l,
        "money_per_year": estimate.money,
        "carbon_g_per_query": _per_query(estimate, "carbon_g_per_kwh"),
        "water_l_per_query": _per_query(estimate, "water_l_per_kwh"),
        "money_per_query": _per_query(estimate, "price_per_kwh"),
        "gpus": estimate.gpus,
        "servers": estimate.servers,
    }


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
    out["equivalents"] = [
        {"label": e.label, "value": e.value.central, "low": e.value.low, "high": e.value.high,
         "share": e.share, "source": e.source, "year": e.year}
        for e in estimate.equivalents
    ]
    out["inputs"] = {
        "boundary": {"value": estimate.boundary, "origin": estimate.boundary_origin,
                     "kind": "derived"},
        **{name: {"value": i.value.central, "low": i.value.low, "high": i.value.high,
                  "origin": i.origin, "kind": i.kind}
           for name, i in sorted(estimate.inputs.items())},
    }
    out["notes"] = list(estimate.notes)
    return out


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
        ("water per year", _show(estimate.water_l, water)),
        ("water per query", _show(fields["water_l_per_query"], water)),
    ]
    if estimate.money is not None:
        rows += [("money per year", _show(estimate.money, currency)),
                 ("money per query", _show(fields["money_per_query"], lambda v: f"${v:.3g}"))]
    if estimate.gpus is not None:
        rows += [("GPUs needed", _show(estimate.gpus, count)),
                 ("servers needed", _show(estimate.servers, count))]
    lines.append("")
    lines += [f"  {name:<18}{value}" for name, value in rows]
    if len(estimate.years) > 1:
        lines += ["", "  year  annual energy"]
        lines += [f"  {row.year}  {_show(row.annual_energy_wh, energy)}"
                  for row in estimate.years]
    lines += ["", "Equivalents (annual energy compared with):"]
    for e in estimate.equivalents:
        value = _show(e.value, _share if e.share else count)
        lines.append(f"  {e.label:<48}{value}   [{e.source}; figure for {e.year}]")
    lines += ["", "Inputs:", f"  {'boundary':<18}{estimate.boundary}",
              f"  {'':<18}from {estimate.boundary_origin}"]
    for name, item in sorted(estimate.inputs.items()):
        lines.append(f"  {name:<18}{_show(item.value, lambda v: f'{v:.4g}')}")
        lines.append(f"  {'':<18}from {item.origin}")
    if estimate.notes:
        lines += ["", "Notes:", *(f"  - {note}" for note in estimate.notes)]
    return "\n".join(lines) + "\n"


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
