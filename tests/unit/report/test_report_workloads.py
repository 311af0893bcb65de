"""`jouleprobe report --workloads`: every GPU joule of the period in one row."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from agent.attribution.workloads import UNATTRIBUTED, WorkloadRecord
from agent.cli import main
from agent.report import run_report
from agent.store import RecordStore
from agent.workloads.naming import WorkloadName, pod_container

LLM = pod_container("inference", "vllm-0", "vllm")
TRAIN = pod_container("research", "trainer-0", "torch")
JUPYTER = WorkloadName("jupyter.service", "unit")


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    path = tmp_path / "records.db"
    store = RecordStore(path, pue=1.2, simulated=True, retention_days=None)
    now = store.clock() - store.wall_offset  # monotonic now: the stretches end just before it
    store.submit_workloads([
        WorkloadRecord(LLM, 0, now - 3600, now - 10, 1.8e6, 3590.0, 640.0, True, 1.8e6, 1.5e6),
        WorkloadRecord(TRAIN, 1, now - 3600, now - 10, 1.2e6, 1795.0, 700.0, False),
        WorkloadRecord(JUPYTER, 1, now - 3600, now - 10, 0.3e6, 1795.0, 150.0, False),
        WorkloadRecord(UNATTRIBUTED, 2, now - 3600, now - 10, 0.25e6, 0.0, 0.0, False),
    ])
    store.close()
    return str(path)


def test_the_table_has_every_group_unattributed_and_measured(store_path: str) -> None:
    table = run_report(store_path, "2h", "table", None, workloads_by="namespace")
    lines = table.splitlines()
    assert lines[0].startswith("SIMULATED GPUs")
    assert lines[1].startswith("GPU energy by namespace: ")
    table_end = lines.index("Inference versus other work (by workload, whatever --by):")
    rows = {line.split()[0]: line.split() for line in lines[:table_end]
            if line[:1] not in ("", "-")}
    assert rows["inference"][1:4] == ["pod", "0.5000", "50.7%"]  # 1.8 MJ of 3.55 MJ
    assert rows["research"][2] == "0.3333"
    assert rows["(none)"][1:3] == ["unit", "0.0833"]
    assert rows["(unattributed)"][1:3] == ["0.0694", "7.0%"]
    assert rows["measured"][1:3] == ["0.9861", "100.0%"]
    assert rows["inference"][-1] == "yes" and rows["research"][-1] == "no"
    split = [line.split() for line in lines[table_end + 1:table_end + 7]]
    assert split == [
        ["(inference)", "0.5000", "kWh", "50.7%"],
        ["with", "their", "GPU", "to", "themselves", "0.5000", "kWh", "50.7%"],
        ["their", "requests", "0.4167", "kWh", "42.3%"],
        ["their", "idle", "and", "overhead", "0.0833", "kWh", "8.5%"],
        ["(other", "work)", "0.4167", "kWh", "42.3%"],  # training and the notebook
        ["(unattributed)", "0.0694", "kWh", "7.0%"],
    ]


def test_json_and_csv_sum_to_what_was_measured(store_path: str) -> None:
    document = json.loads(run_report(store_path, None, "json", None, workloads_by="workload"))
    assert document["simulated"] and document["by"] == "workload"
    assert [g["group"] for g in document["groups"]] == [
        LLM.workload, TRAIN.workload, JUPYTER.workload]
    assert math.isclose(sum(g["gpu_j"] for g in document["groups"])
                        + document["unattributed_gpu_j"], document["measured_gpu_j"])
    assert document["groups"][0]["mean_w"] == pytest.approx(1.8e6 / 3590.0)
    rows = list(csv.DictReader(io.StringIO(
        run_report(store_path, None, "csv", None, workloads_by="gpu"))))
    assert [(r["group"], r["kinds"]) for r in rows[:4]] == [
        ("0", "pod"), ("1", "pod,unit"), ("(unattributed)", ""), ("measured", "")]
    assert math.isclose(sum(float(r["gpu_kwh"]) for r in rows[:3]), float(rows[3]["gpu_kwh"]))
    kwh = {r["group"]: float(r["gpu_kwh"]) for r in rows[4:]}
    assert list(kwh) == ["(inference)", "(with their GPU to themselves)", "(their requests)",
                         "(their idle and overhead)", "(other work)"]
    assert math.isclose(kwh["(inference)"] + kwh["(other work)"] + float(rows[2]["gpu_kwh"]),
                        float(rows[3]["gpu_kwh"]))
    assert document["idle_and_overhead_gpu_j"] == pytest.approx(0.3e6)


def test_a_period_without_stretches_says_so(store_path: str) -> None:
    table = run_report(store_path, "5s", "table", None, workloads_by="pod")
    assert "no workload stretches in the store since" in table


def test_request_flags_are_refused_with_workloads_and_by_without(
    store_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="--model: applies to the request report"):
        run_report(store_path, None, "table", "llama", workloads_by="workload")
    assert main(["report", "--store", store_path, "--by", "namespace"]) != 0
    assert "--by: applies to --workloads only" in capsys.readouterr().err
    assert main(["report", "--store", store_path, "--workloads", "--by", "kind"]) == 0
    assert "GPU energy by kind" in capsys.readouterr().out
