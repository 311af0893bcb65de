"""The facts file (`facts.toml`): presets and the figures that results are compared with.

Every figure in the file keeps its source and year; this module only reads them and turns
an annual energy into equivalents, so that no figure lives in code without its source.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from agent.fleet.model import DAYS_PER_YEAR, HOURS_PER_YEAR, Span

PRESET_INPUTS = (
    "wh_per_query", "queries_per_day", "j_per_token", "tokens_per_day", "servers",
    "server_kw", "gpus", "gpu_watts", "utilization", "pue", "boundary", "carbon_g_per_kwh",
    "water_l_per_kwh", "grid_water_l_per_kwh", "training_energy", "lifetime",
    "training_carbon_g_per_kwh",
)
PRESET_MODES = ("query", "token", "server", "capacity", "training")
"""A `training` preset gives a training run only: its `boundary` is the training energy's,
and the inference it is amortised over comes from flags or a measurement."""


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    source: str
    year: int
    mode: str
    note: str
    inputs: Mapping[str, str]
    """Flag name (underscores) → its text, as on the command line ("6.5:10.2", "9B")."""
    published: Mapping[str, float]
    """What the source states, for the tests and for `--list-presets`."""


@dataclass(frozen=True, slots=True)
class Equivalent:
    """`value` units of `label` (a count, or a share when `share` is true)."""

    label: str
    value: Span
    share: bool
    source: str
    year: int


@cache
def load() -> dict[str, Any]:
    """The parsed facts file shipped in this package."""
    text = resources.files("agent.fleet").joinpath("facts.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def presets() -> dict[str, Preset]:
    out = {}
    for name, entry in load()["presets"].items():
        unknown = set(entry["inputs"]) - set(PRESET_INPUTS)
        if unknown:
            raise ValueError(f"facts.toml: preset {name}: unknown inputs {sorted(unknown)}")
        if entry["mode"] not in PRESET_MODES:
            raise ValueError(f"facts.toml: preset {name}: unknown mode {entry['mode']!r}")
        out[name] = Preset(
            name=name, title=entry["title"], source=entry["source"], year=entry["year"],
            mode=entry["mode"], note=entry["note"], inputs=dict(entry["inputs"]),
            published=dict(entry["published"]),
        )
    return out


def preset(name: str) -> Preset:
    known = presets()
    if name not in known:
        raise ValueError(f"--preset: unknown preset {name!r}; known: {', '.join(known)} "
                         f"(--list-presets describes them)")
    return known[name]


def default_carbon() -> tuple[Span, str]:
    grid = load()["grid"]
    return Span.exact(grid["g_per_kwh"]), f"default: {grid['label']} ({grid['source']}, " \
                                          f"{grid['year']})"


def default_water() -> tuple[Span, str]:
    water = load()["water"]
    return (Span.between(water["l_per_kwh_low"], water["l_per_kwh_high"]),
            f"default: {water['label']} ({water['source']}, {water['year']})")


def default_grid_water() -> tuple[Span, str]:
    grid = load()["grid_water"]
    return Span.exact(grid["l_per_kwh"]), f"default: {grid['label']} ({grid['source']}, " \
                                          f"{grid['year']})"


def bottle_l() -> float:
    """The bottle that per-query water is counted in (`queries_per_bottle`)."""
    return float(load()["bottle"]["l"])


def _entry(label: str, value: Span, share: bool, fact: Mapping[str, Any]) -> Equivalent:
    return Equivalent(label, value, share, fact["source"], fact["year"])


def equivalents(annual_wh: Span, wh_per_query: Span | None) -> list[Equivalent]:
    """What an annual energy compares with: shares of countries' and of the world's
    electricity, households, 1 GW reactors, phone charges; and, per query, 2009 Google
    searches."""
    facts = load()
    out = [
        _entry(f"share of the electricity use of {c['label']}", annual_wh / c["annual_wh"], True, c)
        for c in facts["countries"].values()
    ]
    world = facts["world"]
    world_wh = Span.between(world["annual_wh_low"], world["annual_wh_high"])
    out.append(_entry(f"share of {world['label']}", annual_wh / world_wh, True, world))
    centres = facts["data_centres"]
    out.append(_entry(f"share of {centres['label']}", annual_wh / centres["annual_wh"], True,
                      centres))
    for household in facts["households"].values():
        out.append(_entry(household["label"], annual_wh / household["annual_wh"], False,
                          household))
    reactor = facts["reactor"]
    reactor_wh = reactor["power_w"] * reactor["capacity_factor"] * HOURS_PER_YEAR
    out.append(_entry(reactor["label"], annual_wh / reactor_wh, False, reactor))
    phone = facts["phone_charge"]
    out.append(_entry(f"{phone['label']} a year", annual_wh / phone["wh"], False, phone))
    if wh_per_query is not None:
        search = facts["google_search_2009"]
        out.append(_entry(f"{search['label']} per query", wh_per_query / search["wh"], False,
                          search))
    return out


def training_equivalents(training_wh: Span) -> list[Equivalent]:
    """What one training run compares with: phone charges, households for a year, and days
    of a city's electricity."""
    facts = load()
    phone = facts["phone_charge"]
    out = [_entry(phone["label"], training_wh / phone["wh"], False, phone)]
    for household in facts["households"].values():
        out.append(_entry(f"{household['label']} for a year", training_wh / household["annual_wh"],
                          False, household))
    city = facts["city"]
    city_day = Span.between(city["annual_wh_low"], city["annual_wh_high"]) / DAYS_PER_YEAR
    out.append(_entry(f"days of {city['label']}'s electricity", training_wh / city_day, False,
                      city))
    return out
