"""Per-request energy with nothing in the data path: the agent as an OpenTelemetry trace
receiver (docs/design.md §6). `spans` says which spans are requests and what they say,
`receiver` is the OTLP/HTTP endpoint that takes them into the attribution engine."""

from agent.intake.otlp.receiver import (
    RUNNER_OPTIONS,
    ProcessGpus,
    TraceReceiver,
    TraceSource,
    TraceStats,
    fixed,
    otlp_app,
)

__all__ = ["RUNNER_OPTIONS", "ProcessGpus", "TraceReceiver", "TraceSource", "TraceStats",
           "fixed", "otlp_app"]
