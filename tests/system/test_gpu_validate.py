"""`bench/gpu_validate.py --cpu`: the GPU validation command, run whole on the scripted pynvml
so that it keeps working while no GPU is at hand (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scripted import ROOT


def test_the_validation_command_runs_whole_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "validation.md"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_validate.py"), "--cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()
    assert report["cpu"] is True and "SIMULATED" in text.splitlines()[0]
    steps = report["steps"]
    assert len(steps) == 4
    board, integration, generation, sampler = steps.values()
    assert "skipped" not in board and "skipped" not in integration and "skipped" not in sampler
    assert "skipped" not in generation, generation

    assert "GPU 0: NVIDIA H100 80GB HBM3" in board["doctor"]
    assert [gpu["energy_counter"] for gpu in board["gpus"]] == [True, True]
    assert all(gpu["counter_update_period_s"] is not None for gpu in board["gpus"])

    # The scripted boards' counter is the exact integral of their trace: integrating the
    # instant field at 100 Hz lands near it (a unit slip, mW for W, would be 1000× off).
    assert integration["counter_j"] > 0
    assert abs(integration["instant_100hz_vs_counter"]) < 0.25
    assert sampler["gpus"] == 2 and sampler["sampler_samples"] > 0

    # Real generation behind the proxy: every level recorded, and every joule owned.
    assert [level["level"] for level in generation["levels"]] == [
        "concurrency-1", "concurrency-8", "concurrency-32"]
    assert all(level["requests"] > 0 and level["wh_per_query_it_mean"] > 0
               for level in generation["levels"])
    assert generation["conservation_rel_error"] < 1e-9
