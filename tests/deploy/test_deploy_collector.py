"""deploy/otel-collector/collector.yaml fans traces out to the agent as the agent takes them."""

from __future__ import annotations

import yaml
from scripted import ROOT

from agent.config import OtlpSection, TraceTable
from agent.intake.otlp.http_service import TRACES_PATH


def test_the_collector_sends_every_trace_to_the_agents_receiver_with_a_queue() -> None:
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector" / "collector.yaml")
                               .read_text())
    exporter = collector["exporters"]["otlphttp/jouleprobe"]
    assert exporter["traces_endpoint"] == f"http://{OtlpSection().listen}{TRACES_PATH}"
    assert exporter["sending_queue"]["enabled"] is True
    assert exporter["compression"] in ("gzip", "none")  # what the receiver decodes
    (pipeline,) = collector["service"]["pipelines"].values()
    assert "otlphttp/jouleprobe" in pipeline["exporters"] and len(pipeline["exporters"]) == 2
    # Spans wait for the server's own batch (the SDK's 5 s) and the collector's: less, in
    # all, than the agent waits for them.
    timeout_s = float(collector["processors"]["batch"]["timeout"].removesuffix("s"))
    assert 5.0 + timeout_s < TraceTable(service="vllm", gpus=(0,)).settle
    # The collector's own OTLP/HTTP port is not the agent's.
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"] != OtlpSection().listen
