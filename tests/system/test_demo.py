"""`jouleprobe demo` end to end: simulated GPUs, real sampler, proxies in front of simulated
OpenAI servers, engine, records, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scripted import ROOT

from agent.report import run_report
from agent.store import RecordReader


def test_demo_runs_the_whole_pipeline_and_conserves_energy(tmp_path: Path) -> None:
    store = tmp_path / "demo.db"
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--seconds", "6", "--store", str(store)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SIMULATED" in out
    assert "Energy per query" in out and "small-8b" in out and "large-70b" in out
    conservation = [line for line in out.splitlines() if "attributed + unattributed" in line]
    assert len(conservation) == 2  # one line per simulated GPU, read back from /metrics
    assert "queries/day" in out

    report = json.loads(run_report(str(store), None, "json", None))
    assert report["simulated"] is True, "the agent marks records of simulated GPUs"
    models = {model["model"]: model for model in report["models"]}
    assert set(models) == {"small-8b", "large-70b"}
    assert all(model["requests"] > 0 for model in models.values())
    # GPU 1's server is scraped too: its windows beside its spans' records, and the share
    # of its requests that arrived as spans (all of them: the simulated server aborts none;
    # a request whose span ends just past a scrape is counted in the next window).
    (window,) = [s for s in report["windows"] if s["source"] == "scrape:vllm"]
    assert [m["model"] for m in window["models"]] == ["large-70b"]
    (coverage,) = report["trace_coverage"]
    assert (coverage["source"], coverage["trace_source"]) == ("scrape:vllm", "trace:gpu1")
    assert coverage["requests"] > 0
    assert abs(coverage["span_requests"] - coverage["requests"]) <= 2
    assert "Trace coverage" in out
    records = list(RecordReader(store).query())
    assert {r.source for r in records} == {"proxy:gpu0", "trace:gpu1"}, (
        "GPU 0's load goes through the proxy, GPU 1's server exports its spans")
    traced = [r for r in records if r.source == "trace:gpu1"]
    assert all(r.prompt_tokens and r.completion_tokens and not r.tokens_estimated
               and r.scheduled is not None and r.model == "large-70b" for r in traced)
    assert any(r.scheduled > r.start + 0.01 for r in traced), "some requests were queued"
    # The proxy read every answer's usage, streamed or not, but for the streams that began
    # before it had learnt (at the end of its first stream) that the upstream reports no
    # counts unasked: those pass untouched, their completion counted from the chunks.
    for source in ("proxy:gpu0",):
        estimated = [r for r in records if r.source == source and r.tokens_estimated]
        assert all(r.completion_tokens and r.prompt_tokens is None for r in estimated)
        if estimated:
            learnt = min(r.end for r in estimated)
            assert all(r.start <= learnt for r in estimated)
    estimated_count = sum(r.tokens_estimated for r in records)
    assert sum(m["requests"] - m["requests_with_tokens"] for m in models.values()) == (
        estimated_count) < len(records) / 2

    # The workload view, from the demo's own /metrics and records: the training job beside
    # GPU 0's server is other work, the servers inference, and each GPU balances.
    balances = [line for line in out.splitlines() if "workloads + unattributed =" in line]
    assert len(balances) == 2
    assert any("research/finetune-7b/trainer" in line and "no inference seen" in line
               for line in out.splitlines())
    workloads = RecordReader(store).workloads(by="namespace")
    assert {g.key for g in workloads.groups} == {"inference", "research"}
    assert workloads.inference_j > 0 and workloads.other_j > 0
    assert abs(sum(g.energy_j for g in workloads.groups) + workloads.unattributed_j
               - workloads.measured_j) <= 1e-9 * workloads.measured_j
