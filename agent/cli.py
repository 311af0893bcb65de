"""The `jouleprobe` command line: run, doctor (and, as they land, demo, report, fleet)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.config import ConfigError, load
from agent.sources.base import SourceUnavailable


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
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    flags = {"listen": "agent.listen", "simulate": "agent.simulate",
             "sample_interval": "agent.sample_interval", "log_level": "agent.log_level"}
    return {key: getattr(args, flag) for flag, key in flags.items()
            if getattr(args, flag, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"jouleprobe: config: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.agent.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "doctor":
        from agent.doctor import doctor

        return doctor(config)
    from agent.daemon import open_gpu_source, serve

    try:
        gpu_source = open_gpu_source(config)
    except (SourceUnavailable, ValueError) as exc:
        print(f"jouleprobe: cannot measure GPUs: {exc}", file=sys.stderr)
        print("jouleprobe: run `jouleprobe doctor` for details, or `--simulate 2xH100` for a "
              "simulated node (demo only).", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, gpu_source))
    except OSError as exc:
        print(f"jouleprobe: cannot listen on {config.agent.listen}: {exc.strerror}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
