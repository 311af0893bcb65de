"""Fleet extrapolation: measured Wh per query → annual energy, carbon, water and money.

`model` holds the pure formulas, `inputs` the measured inputs (record store, agent,
Prometheus), `facts` the presets and equivalents with their sources, `estimate` the choice
of mode and inputs, `render` the outputs, `command` the `jouleprobe fleet` command.
"""

from agent.fleet.estimate import Estimate, Input, estimate
from agent.fleet.inputs import Measurement, from_agent, from_prometheus, from_records, from_store
from agent.fleet.model import Span, format_energy, parse_span

__all__ = [
    "Estimate", "Input", "Measurement", "Span", "estimate", "format_energy", "from_agent",
    "from_prometheus", "from_records", "from_store", "parse_span",
]
