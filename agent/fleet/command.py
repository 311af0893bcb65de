"""`jouleprobe fleet`: arguments → measurement → estimate → output (and a plot)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import UTC, datetime

from agent.fleet import facts, inputs, render
from agent.fleet.estimate import (
    ALL_INPUTS,
    TRAINING_INPUTS,
    USER_INPUTS,
    Estimate,
    estimate,
    parse_input,
    parse_years,
)
from agent.fleet.model import Span

_HELP = {
    "wh_per_query": "energy per query, Wh",
    "queries_per_day": "queries a day (9B, 195M)",
    "j_per_token": "energy per token (prompt + completion), J",
    "tokens_per_day": "tokens a day",
    "servers": "servers in the fleet",
    "server_kw": "power of one server at full load, kW",
    "gpus": "GPUs in the fleet",
    "gpu_watts": "power of one GPU, W (capacity mode: its average draw)",
    "utilization": "share of the time at full load, 0-1 or 60%% (server mode; default 1)",
    "pue": "power usage effectiveness, applied once to IT (or GPU) energy",
    "carbon_g_per_kwh": "grid carbon intensity, g CO2e/kWh (default: world average)",
    "water_l_per_kwh": "on-site water (WUE), L per kWh of IT energy (default: the range "
                       "0.2:1.8)",
    "grid_water_l_per_kwh": "off-site water of the grid's electricity (EWIF), L per kWh drawn "
                            "(default: U.S. average 3.142, Li et al. 2023)",
    "price_per_kwh": "electricity price per kWh, in your currency",
    "growth": "yearly growth of demand, e.g. 0.3 or 30%% (with --years)",
    "efficiency_gain": "yearly fall of energy per unit of demand, e.g. 10%% (with --years)",
    "queries_per_gpu_second": "throughput, queries per GPU-second (capacity mode)",
    "gpus_per_server": "GPUs per server, for servers needed (capacity mode; default 8)",
    "training_energy": "energy of the model's training run, with its unit: 50GWh, 1287MWh, "
                       "or a range 400MWh:1.3GWh; at the boundary of the inference figures "
                       "(a --pue applies to both; a training preset gives its own). Flags "
                       "and presets only for now: a training workload measured in the "
                       "record store waits for the workloads issue",
    "lifetime": "how long the model serves, over which its training is amortised: 1y, "
                "18mo, 90d, or a range 6mo:2y (default 1y)",
    "training_carbon_g_per_kwh": "grid carbon intensity where the model was trained, "
                                 "g CO2e/kWh (default: --carbon-g-per-kwh)",
    "queries_per_user_per_day": "queries one user makes a day: energy, and with "
                                "--price-per-kwh its cost, per user per month",
    "revenue_per_user": "what one user pays a month (a subscription), in the currency of "
                        "--price-per-kwh",
}
_METAVAR = {"training_energy": "ENERGY", "lifetime": "DURATION"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fleet` subcommand's arguments (agent/cli.py builds the parser)."""
    source = parser.add_argument_group("measured inputs (at most one)")
    source.add_argument("--from-store", metavar="PATH", help="SQLite request records")
    source.add_argument("--from-agent", metavar="URL", help="a running agent (its summary)")
    source.add_argument("--from-prometheus", metavar="URL",
                        help="Prometheus with deploy/prometheus/recording.yml loaded")
    source.add_argument("--model", help="only this model's requests")
    source.add_argument("--since", metavar="WHEN", help="store: records since 30m, 2d, an ISO "
                        "time (default all)")
    source.add_argument("--window", default=None, help="agent: summary window (1h); "
                        "prometheus: rule window, 5m or 1h (1h)")
    groups = (
        (parser.add_argument_group("numbers (each also LOW:HIGH; 9e9, 9B, 195M, 20%)"),
         [n for n in ALL_INPUTS if n not in TRAINING_INPUTS + USER_INPUTS]),
        (parser.add_argument_group("training beside inference (amortised over the queries "
                                   "of the model's lifetime; each also LOW:HIGH)"),
         TRAINING_INPUTS),
        (parser.add_argument_group("money per user (with --price-per-kwh; each also "
                                   "LOW:HIGH)"), USER_INPUTS),
    )
    for group, names in groups:
        for name in names:
            group.add_argument(f"--{name.replace('_', '-')}", metavar=_METAVAR.get(name, "N"),
                               help=_HELP[name])
    parser.add_argument("--boundary", choices=("gpu", "it", "facility"),
                        help="what the energy figure covers")
    parser.add_argument("--mode", choices=("query", "token", "server", "capacity"),
                        help="force a mode (default: chosen by the inputs given)")
    parser.add_argument("--preset", metavar="NAME", help="a published estimate to start from")
    parser.add_argument("--list-presets", action="store_true", help="list presets and exit")
    parser.add_argument("--years", metavar="START:END", help="one row per year, e.g. 2025:2030")
    parser.add_argument("--format", default="table", choices=render.FORMATS)
    parser.add_argument("--plot", metavar="FILE.png", help="draw the yearly series (matplotlib)")


def list_presets() -> str:
    lines = []
    for preset in facts.presets().values():
        given = ", ".join(f"{k}={v}" for k, v in preset.inputs.items())
        published = ", ".join(f"{k}={v:g}" for k, v in preset.published.items())
        lines += [f"{preset.name}: {preset.title}", f"  source: {preset.source}",
                  f"  {preset.note}", f"  inputs: {given}", f"  published: {published}", ""]
    return "\n".join(lines)


def measurement(args: argparse.Namespace) -> inputs.Measurement | None:
    given = [flag for flag in ("from_store", "from_agent", "from_prometheus")
             if getattr(args, flag)]
    if len(given) > 1:
        raise ValueError("contradictory inputs: give one of --from-store, --from-agent, "
                         "--from-prometheus")
    if args.from_store:
        since = None
        if args.since:
            from agent.report import parse_since

            since = parse_since(args.since, datetime.now(UTC).timestamp())
        return inputs.from_store(args.from_store, model=args.model, since=since)
    if args.from_agent:
        return inputs.from_agent(args.from_agent, window=args.window or "1h", model=args.model)
    if args.from_prometheus:
        return inputs.from_prometheus(args.from_prometheus, window=args.window or "1h",
                                      model=args.model)
    return None


def numbers(args: argparse.Namespace) -> dict[str, Span]:
    out = {}
    for name in ALL_INPUTS:
        text = getattr(args, name)
        if text is not None:
            try:
                out[name] = parse_input(name, text)
            except ValueError as exc:
                raise ValueError(f"--{name.replace('_', '-')}: {exc}") from None
    return out


def run(args: argparse.Namespace) -> tuple[str, Estimate | None]:
    """The rendered output, and the estimate (None for --list-presets)."""
    if args.list_presets:
        return list_presets(), None
    result = build(args, numbers(args))
    if args.plot:
        render.plot(result, args.plot)
    return render.render(result, args.format), result


def build(args: argparse.Namespace, flags: Mapping[str, Span]) -> Estimate:
    return estimate(
        flags,
        preset=facts.preset(args.preset) if args.preset else None,
        measurement=measurement(args),
        boundary=args.boundary,
        mode=args.mode,
        years=parse_years(args.years) if args.years else None,
    )
