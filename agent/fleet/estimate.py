"""From inputs (flags, a preset, a measurement, defaults) to one fleet estimate.

Which inputs count, in order: a flag beats a measurement, which beats a preset, which beats
a default. So a preset's volume can be priced at the operator's own measured Wh/query
("what would Google-search volume cost on our stack?"), and any single figure of a preset
can be replaced by a flag.

The mode follows from what was given (`choose_mode`): the figures that define a mode
(Wh/query → query; J/token or tokens/day → token; servers, GPUs or kW → server; queries
per GPU-second → capacity) are looked for among the flags first, then the measurement
(whose intensity needs a volume to use), then the preset. Two modes asked for at the same
level is a contradiction, reported with the flags that caused it; a mode with missing
inputs is reported with what it needs.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.fleet import facts, model
from agent.fleet.facts import Equivalent, Preset
from agent.fleet.inputs import Measurement
from agent.fleet.model import BOUNDARIES, Boundary, Span

Mode = Literal["query", "token", "server", "capacity"]
MODES: tuple[Mode, ...] = ("query", "token", "server", "capacity")
Kind = Literal["flag", "measured", "preset", "default"]

NUMERIC_INPUTS = (
    "wh_per_query", "queries_per_day", "j_per_token", "tokens_per_day", "servers",
    "server_kw", "gpus", "gpu_watts", "utilization", "pue", "carbon_g_per_kwh",
    "water_l_per_kwh", "grid_water_l_per_kwh", "price_per_kwh", "growth", "efficiency_gain",
    "queries_per_gpu_second", "gpus_per_server", "training_carbon_g_per_kwh",
    "queries_per_user_per_day", "revenue_per_user",
)
"""Every plain number the command takes; each accepts `LOW:HIGH`."""
UNIT_INPUTS: Mapping[str, Callable[[str], Span]] = {
    "training_energy": model.parse_energy_span,
    "lifetime": model.parse_duration_span,
}
"""Quantities written with their unit (`50GWh`, `1y`), kept in Wh and days; each accepts
`LOW:HIGH` too."""
ALL_INPUTS = (*NUMERIC_INPUTS, *UNIT_INPUTS)
TRAINING_INPUTS = ("training_energy", "lifetime", "training_carbon_g_per_kwh")
USER_INPUTS = ("queries_per_user_per_day", "revenue_per_user")
_POSITIVE = ("training_energy", "lifetime", "queries_per_user_per_day", "revenue_per_user")
"""Inputs that must be > 0; every other input but --growth must be ≥ 0."""
DEFAULT_LIFETIME_DAYS = float(model.DAYS_PER_YEAR)


def parse_input(name: str, text: str) -> Span:
    """One input's text (a flag's or a preset's) → its quantity."""
    return UNIT_INPUTS.get(name, model.parse_span)(text)

_DEFINES: Mapping[Mode, tuple[str, ...]] = {
    "query": ("wh_per_query",),
    "token": ("j_per_token", "tokens_per_day"),
    "server": ("servers", "server_kw", "gpus"),
    "capacity": ("queries_per_gpu_second",),
}
_MODE_ONLY: Mapping[Mode, tuple[str, ...]] = {
    "query": ("wh_per_query",),
    "token": ("j_per_token", "tokens_per_day"),
    "server": ("servers", "server_kw", "utilization"),
    "capacity": ("queries_per_gpu_second", "gpus_per_server"),
}
"""Inputs that only their mode reads: a preset's of another mode are left out of the
estimate (and of its list of inputs used) when a measurement or flags choose the mode."""
DEFAULT_GPUS_PER_SERVER = 8


@dataclass(frozen=True, slots=True)
class Input:
    value: Span
    origin: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class YearRow:
    year: int
    annual_energy_wh: Span


@dataclass(frozen=True, slots=True)
class Training:
    """A training run beside the inference it serves, over the model's lifetime."""

    energy_wh: Span
    boundary: str
    """Of the training energy (after the PUE, where one applies)."""
    given_wh: Span
    given_boundary: str
    """The training energy as given (flag or preset), before any PUE."""
    lifetime_days: Span
    lifetime_inference_wh: Span
    """Inference energy over the lifetime, at the start year's daily energy."""
    overtaking_day: Span
    """Day of service on which cumulative inference energy reaches the training energy."""
    share_of_lifetime_energy: Span
    lifetime_queries: Span | None
    wh_per_query: Span | None
    """Training energy amortised over the lifetime's queries."""
    total_wh_per_query: Span | None
    """Inference + training share, per query."""
    carbon_g: Span
    water_onsite_l: Span
    water_offsite_l: Span
    equivalents: tuple[Equivalent, ...]

    @property
    def water_l(self) -> Span:
        return self.water_onsite_l + self.water_offsite_l


@dataclass(frozen=True, slots=True)
class PerUser:
    """One user's month (365/12 days) of queries."""

    queries_per_day: Span
    users: Span | None
    """Users that the volume implies (queries a day ÷ queries a user a day)."""
    wh_per_month: Span
    wh_per_month_with_training: Span | None
    money_per_month: Span | None
    money_per_month_with_training: Span | None
    revenue_per_month: Span | None
    cost_share_of_revenue: Span | None
    cost_share_of_revenue_with_training: Span | None


@dataclass(frozen=True, slots=True)
class Estimate:
    mode: Mode
    boundary: str
    """Of the energy figures: gpu, it, facility, or "gpu × PUE"."""
    boundary_origin: str
    """Why that boundary: a flag, a preset, or the rule that chose it."""
    inputs: Mapping[str, Input]
    """Every input used, with its origin."""
    annual_energy_wh: Span
    daily_energy_wh: Span
    average_power_w: Span
    wh_per_query: Span | None
    carbon_g: Span
    water_l: Span
    """On-site + off-site water a year."""
    water_onsite_l: Span
    water_offsite_l: Span
    water_onsite_l_per_query: Span | None
    water_offsite_l_per_query: Span | None
    money: Span | None
    gpus: Span | None
    """Capacity mode: GPUs needed."""
    servers: Span | None
    years: tuple[YearRow, ...]
    equivalents: tuple[Equivalent, ...]
    simulated: bool | None
    """True: a measured input came from simulated GPUs; None: unknown (an agent or
    Prometheus that reports no GPU); False: real GPUs, or no measurement."""
    training: Training | None = None
    per_user: PerUser | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def water_l_per_query(self) -> Span | None:
        if self.water_onsite_l_per_query is None or self.water_offsite_l_per_query is None:
            return None
        return self.water_onsite_l_per_query + self.water_offsite_l_per_query

    @property
    def has_range(self) -> bool:
        return self.annual_energy_wh.is_range or any(
            row.annual_energy_wh.is_range for row in self.years
        )


def parse_years(text: str) -> tuple[int, int]:
    """`2025:2030` or `2025`."""
    start, sep, end = text.partition(":")
    try:
        first, last = int(start), int(end) if sep else int(start)
    except ValueError:
        raise ValueError(f"--years: expected START:END such as 2025:2030, got {text!r}") from None
    if not 1900 <= first <= last <= 2200:
        raise ValueError(f"--years: expected START ≤ END, got {text!r}")
    return first, last


def gather(flags: Mapping[str, Span], preset: Preset | None) -> dict[str, Input]:
    """The preset's inputs, replaced by the flags given."""
    inputs: dict[str, Input] = {}
    if preset is not None:
        for name, text in preset.inputs.items():
            if name != "boundary":
                inputs[name] = Input(parse_input(name, text), f"preset {preset.name} "
                                     f"({preset.source}, {preset.year})", "preset")
    for name, value in flags.items():
        if name not in ALL_INPUTS:
            raise ValueError(f"unknown input {name!r}")
        flag = "--" + name.replace("_", "-")
        if name in _POSITIVE and not value.low > 0:
            raise ValueError(f"{flag}: must be > 0, got {_text(value)}")
        if name != "growth" and value.low < 0:
            raise ValueError(f"{flag}: must be ≥ 0, got {_text(value)}")
        inputs[name] = Input(value, flag, "flag")
    return inputs


def _text(value: Span) -> str:
    return f"{value.low:g}" if not value.is_range else f"{value.low:g}:{value.high:g}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choose_mode(inputs: Mapping[str, Input], measurement: Measurement | None,
                preset: Preset | None, forced: Mode | None) -> Mode:
    if forced is not None:
        if forced not in MODES:
            raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {forced!r}")
        return forced
    asked = {mode: [n for n in names if n in inputs and inputs[n].kind == "flag"]
             for mode, names in _DEFINES.items()}
    asked = {mode: names for mode, names in asked.items() if names}
    if len(asked) > 1:
        named = "; ".join(f"{mode}: {', '.join('--' + n.replace('_', '-') for n in names)}"
                          for mode, names in asked.items())
        raise ValueError(f"contradictory inputs: they describe different modes ({named}); "
                         f"give the inputs of one mode, or choose with --mode")
    if asked:
        return next(iter(asked))
    if measurement is not None:
        volumes = [mode for mode, volume in (("query", "queries_per_day"),
                                             ("token", "tokens_per_day"))
                   if volume in inputs]
        if volumes == ["token"] and measurement.j_per_token is not None:
            return "token"
        if "query" in volumes:
            return "query"
        if measurement.queries_per_day is not None:
            return "query"
    if preset is not None:
        if preset.mode == "training":
            raise ValueError(
                f"insufficient inputs: preset {preset.name} gives a training run, not the "
                f"inference it serves: add it, e.g. --wh-per-query 0.3 --queries-per-day 10M, "
                f"or a measurement (--from-store, --from-agent, --from-prometheus)")
        return preset.mode  # type: ignore[return-value]
    raise ValueError(
        "insufficient inputs: give a volume and what one unit costs, e.g. --queries-per-day "
        "with --wh-per-query (or a measurement: --from-store, --from-agent, "
        "--from-prometheus), --tokens-per-day with --j-per-token, --servers with "
        "--server-kw, --gpus with --gpu-watts, or a --preset (--list-presets)"
    )


def _require(mode: Mode, inputs: Mapping[str, Input], names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in inputs]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(f"insufficient inputs for the {mode} mode: missing {flags}")


def _measured(inputs: dict[str, Input], name: str, value: Span | None,
              measurement: Measurement | None) -> None:
    """A measured figure, unless a flag gave it."""
    if measurement is None or value is None:
        return
    if name in inputs and inputs[name].kind == "flag":
        return
    hardware = " on SIMULATED GPUs" if measurement.simulated else ""
    inputs[name] = Input(value, f"measured{hardware}: {measurement.origin}", "measured")


def _boundary(flag: Boundary | None, preset: Preset | None, inputs: Mapping[str, Input],
              mode: Mode, intensity_kind: Kind | None) -> tuple[Boundary, str]:
    if flag is not None:
        return flag, "--boundary"
    if preset is not None and intensity_kind == "preset" and "boundary" in preset.inputs:
        return preset.inputs["boundary"], f"preset {preset.name}"  # type: ignore[return-value]
    if mode == "server":
        if "gpus" in inputs:
            return "gpu", "GPUs × W: the GPU boundary"
        return "it", "servers × kW: the IT boundary"
    if mode == "capacity":
        return "gpu", "GPUs × measured GPU power: the GPU boundary"
    if "pue" in inputs:
        return "it", "default with a PUE: the figure is taken as IT energy"
    if intensity_kind == "measured":
        return "facility", "default for measurements: IT × the measured site PUE"
    return "facility", "default: the figure is taken as including the building (--boundary)"


def estimate(
    flags: Mapping[str, Span],
    *,
    preset: Preset | None = None,
    measurement: Measurement | None = None,
    boundary: Boundary | None = None,
    mode: Mode | None = None,
    years: tuple[int, int] | None = None,
) -> Estimate:
    """The fleet estimate. Raises ValueError for insufficient or contradictory inputs."""
    if boundary is not None and boundary not in BOUNDARIES:
        raise ValueError(f"--boundary: expected one of {', '.join(BOUNDARIES)}, got {boundary!r}")
    inputs = gather(flags, preset)
    chosen = choose_mode(inputs, measurement, preset, mode)
    unread = {name for other, names in _MODE_ONLY.items() if other != chosen for name in names}
    for name in [n for n, given in inputs.items() if given.kind == "preset" and n in unread]:
        del inputs[name]
    notes: list[str] = list(measurement.notes) if measurement else []
    if measurement is not None and "queries_per_day" not in inputs \
            and measurement.queries_per_day is not None and chosen in ("query", "capacity"):
        _measured(inputs, "queries_per_day", measurement.queries_per_day, measurement)

    intensity = {"query": "wh_per_query", "token": "j_per_token"}.get(chosen)
    measured_figures = None
    if measurement is not None and intensity is not None:
        measured_figures = measurement.wh_per_query if chosen == "query" \
            else measurement.j_per_token
    intensity_kind: Kind | None = None
    if intensity is not None:
        if intensity in inputs and inputs[intensity].kind == "flag":
            intensity_kind = "flag"
        elif measured_figures is not None:
            intensity_kind = "measured"
        elif intensity in inputs:
            intensity_kind = inputs[intensity].kind
    where, why = _boundary(boundary, preset, inputs, chosen, intensity_kind)
    if intensity_kind == "measured" and measured_figures is not None:
        if "pue" in inputs and where == "facility":
            raise ValueError("--pue: the measured facility figure already holds the site's "
                             "PUE; give --boundary it to apply another")
        _measured(inputs, intensity, measured_figures[where], measurement)  # type: ignore[arg-type]
    if chosen == "capacity" and measurement is not None:
        notes += measurement.capacity_notes
        _measured(inputs, "queries_per_gpu_second", measurement.queries_per_gpu_second,
                  measurement)
        _measured(inputs, "gpu_watts", measurement.gpu_watts, measurement)

    if preset is not None and chosen == "query" and "queries_per_day" not in inputs:
        raise ValueError(f"insufficient inputs: preset {preset.name} gives energy per query "
                         f"but publishes no volume: add --queries-per-day (e.g. 9B, the "
                         f"Google searches a day of the google-search-ai preset)")
    pue = inputs["pue"].value if "pue" in inputs else None
    at_where, gpus, servers, per_query = _energy(chosen, inputs, where)
    annual, boundary_out = model.facility_energy(at_where, where, pue)
    per_query_at_where = per_query
    if per_query is not None and chosen == "query" and pue is not None:
        per_query = per_query * pue
    elif per_query is None and "queries_per_day" in inputs:
        per_query = model.per_query(annual, inputs["queries_per_day"].value)
    if pue is None and boundary_out != "facility":
        notes.append(f"energy at the {boundary_out} boundary: no PUE applied (--pue), so the "
                     f"building's overhead is not counted")
    used = dict(inputs)

    carbon = _with_default(used, "carbon_g_per_kwh", facts.default_carbon())
    wue = _with_default(used, "water_l_per_kwh", facts.default_water())
    ewif = _with_default(used, "grid_water_l_per_kwh", facts.default_grid_water())
    # On-site water counts IT energy (WUE's definition), off-site the electricity drawn.
    site_pue = measurement.pue if (measurement is not None and pue is None
                                   and intensity_kind == "measured"
                                   and boundary_out == "facility") else None
    it_annual, grid_annual = _it_and_grid(at_where, annual, pue, site_pue)
    water_onsite = model.water_onsite_l(it_annual, wue)
    water_offsite = model.water_offsite_l(grid_annual, ewif)
    onsite_per_query = offsite_per_query = None
    if per_query is not None:
        if chosen == "query" and per_query_at_where is not None:
            it_query, grid_query = _it_and_grid(per_query_at_where, per_query, pue, site_pue)
        else:
            it_query = model.per_query(it_annual, inputs["queries_per_day"].value)
            grid_query = per_query
        onsite_per_query = model.water_onsite_l(it_query, wue)
        offsite_per_query = model.water_offsite_l(grid_query, ewif)
    if boundary_out == "facility" and pue is None and site_pue is None:
        notes.append("on-site water: WUE counts IT energy, but no PUE is known to take the "
                     "building out of this facility figure, so WUE × facility energy is an "
                     "upper bound (give an IT figure with --boundary it and --pue)")
    rows = _years(annual, used, years, preset)
    training = _training(used, preset, where, pue, model.daily(annual),
                         inputs.get("queries_per_day"), per_query, wue, ewif, notes,
                         len(rows) > 1)
    per_user = _per_user(used, per_query, training)
    is_simulated = bool(measurement and measurement.simulated)
    known = measurement is None or measurement.simulated is not None
    return Estimate(
        mode=chosen, boundary=boundary_out, boundary_origin=why, inputs=used,
        annual_energy_wh=annual, daily_energy_wh=model.daily(annual),
        average_power_w=model.average_power_w(annual), wh_per_query=per_query,
        carbon_g=model.carbon_g(annual, carbon), water_l=water_onsite + water_offsite,
        water_onsite_l=water_onsite, water_offsite_l=water_offsite,
        water_onsite_l_per_query=onsite_per_query, water_offsite_l_per_query=offsite_per_query,
        money=model.money(annual, used["price_per_kwh"].value)
        if "price_per_kwh" in used else None,
        gpus=gpus, servers=servers, years=rows,
        equivalents=tuple(facts.equivalents(annual, per_query)),
        simulated=is_simulated if known else None, training=training, per_user=per_user,
        notes=tuple(notes),
    )


def _it_and_grid(at_boundary: Span, out: Span, pue: Span | None, site_pue: Span | None
                 ) -> tuple[Span, Span]:
    """IT energy (for the on-site WUE) and the electricity drawn from the grid (for the
    off-site water): the figure before and after the PUE applied here; or, for a measured
    facility figure, that figure ÷ the measured site PUE and the figure itself; or, with no
    PUE known, the figure for both (at the IT or GPU boundary the grid's share is then
    under-counted, as the note on the missing PUE says)."""
    if pue is not None:
        return at_boundary, out
    if site_pue is not None:
        return out / site_pue, out
    return out, out


def _training(inputs: dict[str, Input], preset: Preset | None, where: Boundary,
              pue: Span | None, daily_wh: Span, queries_per_day: Input | None,
              wh_per_query: Span | None, wue: Span, ewif: Span, notes: list[str],
              series: bool) -> Training | None:
    """Training energy amortised over the model's lifetime (inputs: --training-energy,
    --lifetime, --training-carbon-g-per-kwh)."""
    if "training_energy" not in inputs:
        for name in ("lifetime", "training_carbon_g_per_kwh"):
            if name in inputs:
                raise ValueError(f"{_flag(name)}: goes with a training run: give "
                                 f"--training-energy (or a training preset)")
        return None
    given = inputs["training_energy"]
    boundary: Boundary = where
    published = (given.kind == "preset" and preset is not None and preset.mode == "training"
                 and "boundary" in preset.inputs)
    if published and preset is not None:
        boundary = preset.inputs["boundary"]  # type: ignore[assignment]
        notes.append(f"training energy at the {boundary} boundary as preset {preset.name} "
                     "publishes it: the site's PUE is not applied to a run trained "
                     "elsewhere, and the inference's figures are compared with it as given")
    at_boundary = given.value
    energy, out_boundary = at_boundary, str(boundary)
    # A training energy given with the inference's (--training-energy) is at its boundary
    # and in its building: the same PUE applies. A published one keeps its own.
    applied = pue if boundary != "facility" and not published else None
    if applied is not None:
        energy, out_boundary = model.facility_energy(at_boundary, boundary, applied)
    if not daily_wh.low > 0:
        raise ValueError("--training-energy: the inference energy a day reaches 0, so it "
                         "never overtakes the training")
    lifetime = _with_default(inputs, "lifetime", (Span.exact(DEFAULT_LIFETIME_DAYS),
                                                  "default: 1 year (--lifetime)"))
    carbon = _with_default(inputs, "training_carbon_g_per_kwh", (
        inputs["carbon_g_per_kwh"].value,
        f"default: the inference's grid ({inputs['carbon_g_per_kwh'].origin})"))
    lifetime_inference = daily_wh * lifetime
    lifetime_queries = per_query = total = None
    if queries_per_day is not None:
        lifetime_queries = queries_per_day.value * lifetime
        per_query = energy / lifetime_queries
        if wh_per_query is not None:
            total = wh_per_query + per_query
    else:
        notes.append("training per query: give --queries-per-day to amortise the training "
                     "over the lifetime's queries")
    if series:
        notes.append("training: the overtaking day and the lifetime figures hold the start "
                     "year's daily inference energy constant (no --growth, no "
                     "--efficiency-gain)")
    it_energy, grid_energy = _it_and_grid(at_boundary, energy, applied, None)
    if applied is None and out_boundary == "facility":
        notes.append("training water on-site: WUE × the training's facility energy (no PUE "
                     "to take the building out), an upper bound")
    elif applied is None:
        notes.append(f"training carbon and water from its {out_boundary} energy alone (no "
                     "PUE applied): the building's share is left out, an undercount")
    return Training(
        energy_wh=energy, boundary=out_boundary, given_wh=at_boundary, given_boundary=boundary,
        lifetime_days=lifetime,
        lifetime_inference_wh=lifetime_inference,
        overtaking_day=model.overtaking_day(energy, daily_wh),
        share_of_lifetime_energy=model.training_share(energy, lifetime_inference),
        lifetime_queries=lifetime_queries, wh_per_query=per_query, total_wh_per_query=total,
        carbon_g=model.carbon_g(grid_energy, carbon),
        water_onsite_l=model.water_onsite_l(it_energy, wue),
        water_offsite_l=model.water_offsite_l(grid_energy, ewif),
        equivalents=tuple(facts.training_equivalents(energy)),
    )


def _per_user(inputs: Mapping[str, Input], wh_per_query: Span | None,
              training: Training | None) -> PerUser | None:
    """Energy and its cost for one user's month (--queries-per-user-per-day,
    --price-per-kwh), beside what the user pays (--revenue-per-user)."""
    if "queries_per_user_per_day" not in inputs:
        if "revenue_per_user" in inputs:
            raise ValueError("--revenue-per-user: compares a user's energy cost with what "
                             "they pay: give --queries-per-user-per-day and --price-per-kwh")
        return None
    if wh_per_query is None:
        raise ValueError("--queries-per-user-per-day: needs the energy per query: give "
                         "--queries-per-day (the server and token modes give energy per "
                         "query only with a volume)")
    if "revenue_per_user" in inputs and "price_per_kwh" not in inputs:
        raise ValueError("--revenue-per-user: needs --price-per-kwh to put a cost on the "
                         "user's energy")
    per_user = inputs["queries_per_user_per_day"].value
    users = None
    if "queries_per_day" in inputs:
        users = inputs["queries_per_day"].value / per_user
    energy = model.per_user_per_month(wh_per_query, per_user)
    with_training = None
    if training is not None and training.total_wh_per_query is not None:
        with_training = model.per_user_per_month(training.total_wh_per_query, per_user)
    price = inputs["price_per_kwh"].value if "price_per_kwh" in inputs else None
    revenue = inputs["revenue_per_user"].value if "revenue_per_user" in inputs else None
    cost = model.money(energy, price) if price is not None else None
    cost_training = model.money(with_training, price) \
        if price is not None and with_training is not None else None
    return PerUser(
        queries_per_day=per_user, users=users, wh_per_month=energy,
        wh_per_month_with_training=with_training, money_per_month=cost,
        money_per_month_with_training=cost_training, revenue_per_month=revenue,
        cost_share_of_revenue=cost / revenue if cost is not None and revenue is not None
        else None,
        cost_share_of_revenue_with_training=cost_training / revenue
        if cost_training is not None and revenue is not None else None,
    )


def _energy(mode: Mode, inputs: Mapping[str, Input], boundary: Boundary
            ) -> tuple[Span, Span | None, Span | None, Span | None]:
    """Annual energy at `boundary` (before any PUE), GPUs and servers (capacity), and Wh
    per query where the mode gives it directly."""
    def value(name: str) -> Span:
        return inputs[name].value

    if mode == "query":
        _require(mode, inputs, ("wh_per_query", "queries_per_day"))
        return (model.query_energy(value("wh_per_query"), value("queries_per_day")),
                None, None, value("wh_per_query"))
    if mode == "token":
        _require(mode, inputs, ("j_per_token", "tokens_per_day"))
        return model.token_energy(value("j_per_token"), value("tokens_per_day")), None, None, \
            None
    utilization = value("utilization") if "utilization" in inputs else Span.exact(1.0)
    if not (utilization.low > 0 and utilization.high <= 1):
        raise ValueError(f"--utilization: must be in (0, 1], got {utilization}")
    if mode == "server":
        if "gpus" in inputs and "servers" in inputs:
            raise ValueError("contradictory inputs: --servers and --gpus both count the fleet; "
                             "give one")
        if "gpus" in inputs:
            _require(mode, inputs, ("gpus", "gpu_watts"))
            return model.server_energy(value("gpus"), value("gpu_watts"), utilization), \
                None, None, None
        _require(mode, inputs, ("servers", "server_kw"))
        return model.server_energy(value("servers"), value("server_kw") * 1000, utilization), \
            None, None, None
    _require(mode, inputs, ("queries_per_day", "queries_per_gpu_second", "gpu_watts"))
    gpus = model.gpus_needed(value("queries_per_day"), value("queries_per_gpu_second"))
    per_server = value("gpus_per_server").central if "gpus_per_server" in inputs \
        else DEFAULT_GPUS_PER_SERVER
    return (model.capacity_energy(gpus, value("gpu_watts")), gpus,
            model.servers_needed(gpus, per_server), None)


def _with_default(inputs: dict[str, Input], name: str, default: tuple[Span, str]) -> Span:
    if name not in inputs:
        inputs[name] = Input(default[0], default[1], "default")
    return inputs[name].value


def _years(annual: Span, inputs: dict[str, Input], years: tuple[int, int] | None,
           preset: Preset | None) -> tuple[YearRow, ...]:
    if years is None:
        start = preset.year if preset is not None else datetime.date.today().year
        years = (start, start)
    growth = _with_default_value(inputs, "growth", "default: no growth of demand")
    gain = _with_default_value(inputs, "efficiency_gain", "default: no efficiency gain")
    first, last = years
    return tuple(YearRow(year, annual * model.year_factor(year - first, growth, gain))
                 for year in range(first, last + 1))


def _with_default_value(inputs: dict[str, Input], name: str, origin: str) -> Span:
    return _with_default(inputs, name, (Span.exact(0.0), origin))
