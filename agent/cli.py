"""The `jouleprobe` command line: run, demo, doctor, report and fleet."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.config import Config, ConfigError, load
from agent.devices.base import SourceUnavailable
from agent.store import GROUPINGS, RecordStoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jouleprobe",
        description="Measures the energy of inference requests on GPU nodes.",
    )
    parser.add_argument("--version", action="version", version=f"jouleprobe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the agent: sample energy and serve metrics")
    run.add_argument("--config", metavar="FILE", help="TOML file (see deploy/jouleprobe.toml)")
    run.add_argument("--listen", metavar="HOST:PORT", help="metrics listener (0.0.0.0:29400)")
    run.add_argument("--simulate", metavar="SPEC", help="simulated GPUs, e.g. 2xH100 (demo only)")
    run.add_argument("--sample-interval", metavar="SECONDS", help="seconds between reads (0.1)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    doctor = commands.add_parser("doctor", help="what this node can measure, and why not")
    doctor.add_argument("--config", metavar="FILE", help="TOML config file")
    doctor.add_argument("--simulate", metavar="SPEC", help="describe simulated GPUs instead")

    demo = commands.add_parser(
        "demo", help="the whole pipeline on simulated GPUs with a synthetic inference load"
    )
    demo.add_argument("--seconds", type=float, default=20.0, help="length of the load (20)")
    demo.add_argument("--simulate", metavar="SPEC", default="2xH100", help="GPUs (2xH100)")
    demo.add_argument("--store", metavar="PATH", default="jouleprobe-demo.db",
                      help="SQLite file for the demo's records (jouleprobe-demo.db, replaced)")
    demo.add_argument("--queries-per-day", type=float, default=1e9,
                      help="volume for the closing fleet figure (1e9)")

    report = commands.add_parser("report", help="per-model Wh/query and J/token from the records")
    report.add_argument("--config", metavar="FILE", help="TOML config file (for records.path)")
    report.add_argument("--store", metavar="PATH", help="SQLite records (default records.path)")
    report.add_argument("--since", metavar="WHEN", help="30m, 6h, 2d or an ISO time (default all)")
    report.add_argument("--model", help="only this model")
    report.add_argument("--format", default="table", choices=("table", "json", "csv"))
    report.add_argument("--explain", action="store_true",
                        help="what drives each model's energy: a fit of J on prompt and "
                             "completion tokens, and Wh/query by length, status, concurrency")
    report.add_argument("--predict", metavar="prompt=N,completion=N[,concurrency=N]",
                        help="the expected energy of such a request, per model")
    report.add_argument("--workloads", action="store_true",
                        help="GPU energy by workload (pods, units, processes) and unattributed, "
                             "instead of per model")
    report.add_argument("--by", choices=GROUPINGS,
                        help="with --workloads: group by workload (default), namespace, pod, "
                             "kind or gpu")

    from agent.fleet.command import add_arguments

    add_arguments(commands.add_parser(
        "fleet", help="extrapolate measured Wh/query to fleet-scale energy, carbon, water, money"
    ))
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    flags = {"listen": "agent.listen", "simulate": "agent.simulate",
             "sample_interval": "agent.sample_interval", "log_level": "agent.log_level"}
    return {key: getattr(args, flag) for flag, key in flags.items()
            if getattr(args, flag, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(getattr(args, "config", None), overrides=_overrides(args))
    except ConfigError as exc:
        print(f"jouleprobe: config: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.agent.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args, config)
    except (ValueError, OSError, RecordStoreError) as exc:
        print(f"jouleprobe {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, config: Config) -> int:
    from agent.app.daemon import open_gpu_source, serve

    try:
        gpu_source = open_gpu_source(config)
    except (SourceUnavailable, ValueError) as exc:
        print(f"jouleprobe: cannot measure GPUs: {exc}", file=sys.stderr)
        print("jouleprobe: run `jouleprobe doctor` for details, or `--simulate 2xH100` for a "
              "simulated node (demo only).", file=sys.stderr)
        return 2
    asyncio.run(serve(config, gpu_source))
    return 0


def _doctor(args: argparse.Namespace, config: Config) -> int:
    from agent.app.doctor import doctor

    return doctor(config)


def _demo(args: argparse.Namespace, config: Config) -> int:
    from agent.app.demo import run_demo

    return run_demo(args.simulate, seconds=args.seconds, store=args.store,
                    queries_per_day=args.queries_per_day)


def _report(args: argparse.Namespace, config: Config) -> int:
    from agent.report import run_report

    if args.by is not None and not args.workloads:
        raise ValueError("--by: applies to --workloads only")
    print(run_report(args.store or config.records.path, args.since, args.format, args.model,
                     explain=args.explain, predict=args.predict,
                     workloads_by=(args.by or "workload") if args.workloads else None), end="")
    return 0


def _fleet(args: argparse.Namespace, config: Config) -> int:
    from agent.fleet.command import run

    output, _ = run(args)
    print(output, end="")
    return 0


COMMANDS = {"run": _run, "doctor": _doctor, "demo": _demo, "report": _report, "fleet": _fleet}


if __name__ == "__main__":
    raise SystemExit(main())
