"""`jouleprobe fleet`: measured inputs (store, agent), modes, errors, outputs and the plot."""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fleet_cli import fleet, fleet_json
from scripted import require_module, serve_http

from agent import report
from agent.fleet import Span, estimate, from_records
from agent.fleet.inputs import summary_measurement
from agent.requests import Request, RequestEnergy
from agent.store import RecordStore, StoredRequest

PUE = 1.2


def _record(i: int, it_j: float, *, gpu: int = 0, tokens: int | None = 100,
            simulated: bool = False) -> StoredRequest:
    dynamic, static, host = it_j * 0.6, it_j * 0.3, it_j * 0.1
    return StoredRequest(
        id=f"r{i}", model="m", source="ingest", gpus=(gpu,), status="ok",
        start=1000.0 + i, end=1001.0 + i, first_token=None,
        prompt_tokens=None if tokens is None else tokens // 4,
        completion_tokens=None if tokens is None else tokens - tokens // 4,
        gpu_dynamic_j=dynamic, gpu_static_j=static, host_j=host,
        facility_j=it_j * (PUE - 1), pue=PUE, late=False, simulated=simulated,
    )


RECORDS = [_record(i, 360.0 + 72.0 * (i % 5), gpu=i % 2) for i in range(50)]
MEAN_IT_WH = sum(r.it_j for r in RECORDS) / len(RECORDS) / 3600




def _write_store(path: Path, *, simulated: bool) -> str:
    """RECORDS in a store written as an agent on (simulated or real) GPUs writes them."""
    writer = RecordStore(path, pue=PUE, simulated=simulated, wall_offset=0.0,
                         retention_days=None)
    writer.submit([
        RequestEnergy(Request(r.id, r.model, r.source, r.gpus, r.start, r.end,
                              prompt_tokens=r.prompt_tokens,
                              completion_tokens=r.completion_tokens),
                      r.gpu_dynamic_j, r.gpu_static_j, r.host_j, r.facility_j)
        for r in RECORDS
    ])
    writer.close()
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> str:
    """The records of an agent on simulated GPUs, as the demo writes them."""
    return _write_store(tmp_path / "records.db", simulated=True)


def test_measured_wh_per_query_has_a_bootstrap_interval_around_the_mean() -> None:
    measured = from_records(RECORDS, "test")
    it = measured.wh_per_query["it"]
    assert it.central == pytest.approx(MEAN_IT_WH)
    assert it.low < it.central < it.high
    assert it.high - it.low < 0.2 * it.central  # 50 records of ±20 %: a narrow interval
    assert measured.wh_per_query["facility"].central == pytest.approx(MEAN_IT_WH * PUE)
    assert measured.pue is not None and measured.pue.central == pytest.approx(PUE)
    tokens = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in RECORDS)
    assert measured.j_per_token is not None
    assert measured.j_per_token["it"].central == pytest.approx(
        sum(r.it_j for r in RECORDS) / tokens)
    # 50 requests over [1000, 1050] s on 2 GPUs.
    assert measured.queries_per_gpu_second == Span.exact(50 / (2 * 50.0))
    # Same records, same interval: the bootstrap is seeded.
    assert from_records(RECORDS, "test").wh_per_query == measured.wh_per_query


def test_one_record_gives_its_value_without_an_interval() -> None:
    measured = from_records(RECORDS[:1], "test")
    assert not measured.wh_per_query["it"].is_range


def test_records_say_whether_their_gpus_were_simulated() -> None:
    assert from_records(RECORDS, "test").simulated is False
    one_simulated = [*RECORDS, _record(50, 400.0, simulated=True)]
    assert from_records(one_simulated, "test").simulated is True
    # An expired record (no end) is not used, so its flag is not either.
    expired = replace(_record(51, 400.0, simulated=True), end=None)
    assert from_records([*RECORDS, expired], "test").simulated is False


def test_from_store_says_simulated_and_gives_a_band(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fleet_json(capsys, "--from-store", store, "--queries-per-day", "1B")
    assert result["simulated"] is True
    assert result["mode"] == "query" and result["boundary"] == "facility"
    assert result["wh_per_query"] == pytest.approx(MEAN_IT_WH * PUE)
    assert result["annual_energy_wh"] == pytest.approx(MEAN_IT_WH * PUE * 1e9 * 365)
    assert result["low"]["annual_energy_wh"] < result["annual_energy_wh"] \
        < result["high"]["annual_energy_wh"]
    origin = result["inputs"]["wh_per_query"]["origin"]
    assert "SIMULATED" in origin and store in origin
    assert result["inputs"]["queries_per_day"]["origin"] == "--queries-per-day"
    assert result["years"][0]["annual_energy_wh"] == result["annual_energy_wh"]
    code, table, _ = fleet(capsys, "--from-store", store, "--queries-per-day", "1B")
    assert code == 0 and "SIMULATED GPUs" in table and " … " in table


def test_a_store_of_real_gpus_is_not_labelled_simulated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _write_store(tmp_path / "real.db", simulated=False)
    result = fleet_json(capsys, "--from-store", real, "--queries-per-day", "1B")
    assert result["simulated"] is False
    assert "SIMULATED" not in result["inputs"]["wh_per_query"]["origin"]
    assert result["wh_per_query"] == pytest.approx(MEAN_IT_WH * PUE)
    code, table, _ = fleet(capsys, "--from-store", real, "--queries-per-day", "1B")
    assert code == 0 and "SIMULATED" not in table and "unknown" not in table


def test_a_pue_flag_reprices_the_measured_it_energy(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fleet_json(capsys, "--from-store", store, "--queries-per-day", "1B",
                        "--pue", "1.5")
    assert result["wh_per_query"] == pytest.approx(MEAN_IT_WH * 1.5)
    code, _, err = fleet(capsys, "--from-store", store, "--queries-per-day", "1B",
                         "--pue", "1.5", "--boundary", "facility")
    assert code == 2 and "PUE" in err


def test_token_and_capacity_modes_from_the_store(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = fleet_json(capsys, "--from-store", store, "--tokens-per-day", "1T",
                        "--boundary", "it")
    j_per_token = sum(r.it_j for r in RECORDS) / sum(
        (r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in RECORDS)
    assert tokens["mode"] == "token"
    assert tokens["annual_energy_wh"] == pytest.approx(j_per_token * 1e12 * 365 / 3600)

    capacity = fleet_json(capsys, "--from-store", store, "--mode", "capacity",
                          "--queries-per-day", "86400")
    # 0.5 queries per GPU-second → 86,400 queries a day need 2 GPUs.
    assert capacity["gpus"] == pytest.approx(2.0)
    assert capacity["servers"] == 1
    gpu_watts = sum(r.gpu_j for r in RECORDS) / (2 * 50.0)
    assert capacity["annual_energy_wh"] == pytest.approx(2 * gpu_watts * 8760)
    assert capacity["boundary"] == "gpu"


@pytest.mark.parametrize(("argv", "message"), [
    ((), "insufficient inputs"),
    (("--queries-per-day", "1B"), "--queries-per-day with --wh-per-query"),
    (("--wh-per-query", "0.3", "--servers", "10"), "contradictory inputs"),
    (("--servers", "10"), "missing --server-kw"),
    (("--gpus", "10", "--servers", "2", "--gpu-watts", "700", "--mode", "server"),
     "--servers and --gpus"),
    (("--wh-per-query", "x", "--queries-per-day", "1"), "--wh-per-query: expected a number"),
    (("--wh-per-query", "2:1", "--queries-per-day", "1"), "LOW ≤ HIGH"),
    (("--preset", "nope"), "unknown preset"),
    (("--preset", "gemini-2025"), "publishes no volume"),
    (("--servers", "1", "--server-kw", "1", "--utilization", "150%"), "--utilization"),
    (("--from-store", "/nonexistent/x.db", "--from-agent", "http://127.0.0.1:1"),
     "one of --from-store"),
])
def test_insufficient_or_contradictory_inputs_are_named(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = fleet(capsys, *argv)
    assert code == 2
    assert message in err


def test_ranges_are_never_shown_as_one_number(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "0.2:0.4", "--queries-per-day", "1B",
                        "--carbon-g-per-kwh", "100", "--water-l-per-kwh", "1",
                        "--years", "2025:2027", "--growth", "10%")
    assert (result["low"]["annual_energy_wh"], result["annual_energy_wh"],
            result["high"]["annual_energy_wh"]) == pytest.approx((0.2e9 * 365, 0.3e9 * 365,
                                                                  0.4e9 * 365))
    assert [row["year"] for row in result["years"]] == [2025, 2026, 2027]
    assert result["years"][2]["high"] == pytest.approx(0.4e9 * 365 * 1.1 ** 2)
    _, table, _ = fleet(capsys, "--wh-per-query", "0.2:0.4", "--queries-per-day", "1B")
    annual = next(line for line in table.splitlines() if "annual energy" in line)
    assert "73 GWh … 146 GWh" in annual and "central 110 GWh" in annual


def test_exact_inputs_give_no_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    result = fleet_json(capsys, "--wh-per-query", "0.3", "--queries-per-day", "1B",
                        "--water-l-per-kwh", "1")
    assert "low" not in result and "high" not in result
    assert result["daily_energy_wh"] == pytest.approx(0.3e9)
    assert result["average_power_w"] == pytest.approx(0.3e9 / 24)


def test_csv_has_one_row_per_quantity_and_year(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = fleet(capsys, "--wh-per-query", "1", "--queries-per-day", "1000",
                         "--years", "2025:2026", "--format", "csv")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "quantity,year,central,low,high"
    assert "annual_energy_wh,,365000.0,365000.0,365000.0" in lines
    assert sum(line.startswith("annual_energy_wh,202") for line in lines) == 2


def test_summary_of_an_agent_becomes_a_measurement() -> None:
    built = report.build_report(RECORDS, generated=2000.0, since=1000.0)
    summary = json.loads(json.dumps(report.summary(built, 3600.0)))
    measured = summary_measurement(summary, "agent x", model=None, simulated=True, pue=PUE)
    assert measured.wh_per_query["it"].central == pytest.approx(MEAN_IT_WH)
    assert measured.wh_per_query["facility"].central == pytest.approx(MEAN_IT_WH * PUE)
    assert measured.simulated is True


class _FakeAgent(BaseHTTPRequestHandler):
    summary: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        if self.path.startswith("/api/v1/summary"):
            body = json.dumps(self.summary).encode()
        elif self.path == "/metrics":
            body = (b'jouleprobe_gpu_info{gpu="0",uuid="u",name="H100 (simulated)",'
                    b'energy_source="counter",power_field="instant",simulated="true"} 1\n'
                    b"jouleprobe_site_pue_ratio 1.2\n")
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def agent_url() -> Iterator[str]:
    built = report.build_report(RECORDS, generated=2000.0, since=1000.0)
    _FakeAgent.summary = report.summary(built, 3600.0)
    with serve_http(_FakeAgent) as url:
        yield url


def test_from_agent_reads_its_summary_and_says_simulated(
    agent_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fleet_json(capsys, "--from-agent", agent_url, "--queries-per-day", "1M")
    assert result["simulated"] is True
    assert result["wh_per_query"] == pytest.approx(MEAN_IT_WH * PUE)
    assert result["inputs"]["wh_per_query"]["origin"].startswith(
        f"measured on SIMULATED GPUs: agent {agent_url}")


def test_plot_writes_a_png(store: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    require_module("matplotlib")
    png = tmp_path / "fleet.png"
    code, _, err = fleet(capsys, "--from-store", store, "--queries-per-day",
                         "1B", "--years", "2025:2028", "--growth", "20%:40%", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = fleet(capsys, "--wh-per-query", "1", "--queries-per-day", "1",
                         "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "matplotlib" in err and "jouleprobe[plot]" in err


def test_estimate_is_usable_as_a_library() -> None:
    result = estimate({"wh_per_query": Span.exact(0.24), "queries_per_day": Span.exact(1e9)})
    assert result.annual_energy_wh.central == pytest.approx(0.24e9 * 365)
    assert result.simulated is False
    assert math.isclose(result.average_power_w.central * 8760, result.annual_energy_wh.central)


def test_measured_water_counts_it_energy_on_site_and_facility_energy_off_site(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fleet_json(capsys, "--from-store", store, "--queries-per-day", "1B",
                        "--water-l-per-kwh", "1", "--grid-water-l-per-kwh", "2")
    # The measured facility figure ÷ the measured site PUE is the IT energy that WUE counts.
    assert result["water_onsite_l_per_query"] == pytest.approx(MEAN_IT_WH / 1000 * 1)
    assert result["water_offsite_l_per_query"] == pytest.approx(MEAN_IT_WH * PUE / 1000 * 2)
    assert result["water_onsite_l_per_year"] == pytest.approx(MEAN_IT_WH / 1000 * 1e9 * 365)
    assert result["water_l_per_year"] == pytest.approx(
        result["water_onsite_l_per_year"] + result["water_offsite_l_per_year"])
    assert not any("upper bound" in note for note in result["notes"])
