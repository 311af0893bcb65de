"""Unit conversions shared across the agent."""

JOULES_PER_WH = 3600.0
