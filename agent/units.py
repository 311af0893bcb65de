"""Units, the physical bounds of the figures that carry them, how a flag is written as text,
and how a duration is written: shared across the agent."""

from __future__ import annotations

import re

JOULES_PER_WH = 3600.0

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)", re.ASCII)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def pue_problem(pue: float) -> str | None:
    """What is wrong with `pue` as a power usage effectiveness, or None: facility energy
    over IT energy is at least 1 (NaN is refused too)."""
    return None if pue >= 1 else "a number >= 1"


def check_pue(pue: float, field: str) -> float:
    """`pue` when it is a PUE, else ValueError naming `field` (a config key, an option)."""
    problem = pue_problem(pue)
    if problem is not None:
        raise ValueError(f"{field}: expected {problem}, got {pue}")
    return pue


def flag_text(value: bool) -> str:
    """A flag as text: "true" or "false", as Prometheus label values and CSV columns say it."""
    return "true" if value else "false"


def duration_seconds(text: str, *, plain_seconds: bool = False) -> float | None:
    """The seconds of a duration written as a number and a unit: "90s", "30m" ("m" is
    minutes), "1.5h", "2d", "1w" (space around and between them allowed), or plain seconds
    ("90") where `plain_seconds`. None when `text` is no such duration.

    The value may be 0 or infinite: each caller bounds it and words its own error."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not (match.group(2) or plain_seconds):
        return None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
