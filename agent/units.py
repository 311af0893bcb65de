"""Units, the physical bounds of the figures that carry them, and how a flag is written as
text: shared across the agent."""

JOULES_PER_WH = 3600.0


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
