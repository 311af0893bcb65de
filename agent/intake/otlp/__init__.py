"""Per-request energy with nothing in the data path: the agent as an OpenTelemetry trace
receiver (docs/design.md §6). `spans` says which spans are requests and what they say,
`sources` which server each comes from, `receiver` takes them into the attribution engine,
over OTLP/HTTP (`http_service`) and OTLP/gRPC (`grpc_service`); `coverage` compares them
with a scrape of the same server."""

from agent.intake.otlp.http_service import RUNNER_OPTIONS, otlp_app
from agent.intake.otlp.receiver import TraceReceiver, TraceStats
from agent.intake.otlp.sources import PodGpus, ProcessGpus, TraceSource, fixed

__all__ = ["RUNNER_OPTIONS", "PodGpus", "ProcessGpus", "TraceReceiver", "TraceSource",
           "TraceStats", "fixed", "otlp_app"]
