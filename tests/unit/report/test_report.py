"""The per-model report: statistics against hand-computed values, formats, --since, run_report;
and the scrape windows' figures beside the requests'."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import statistics
import time
from pathlib import Path

import pytest

from agent.intake.scrapers import GpuWindowEnergy, Usage, split_window
from agent.report import (
    BOUNDARIES,
    SIMULATED_LINE,
    NodeTotals,
    Report,
    build_report,
    parse_since,
    percentile,
    render,
    run_report,
    summary,
)
from agent.requests import Request, RequestEnergy
from agent.store import ModelWindows, RecordStore, SourceWindows, StoredRequest, WindowTotals

NOW = 1_750_000_000.0


def stored(request_id: str, model: str, dynamic: float, static: float, host: float,
           facility: float, prompt: int | None = None, completion: int | None = None,
           status: str = "ok", simulated: bool = False) -> StoredRequest:
    return StoredRequest(request_id, model, "ingest", (0,), status, NOW - 10, NOW - 5,  # type: ignore[arg-type]
                         None, prompt, completion, dynamic, static, host, facility, 1.1,
                         late=False, simulated=simulated)


# Model "a", in joules chosen so that Wh are round: per request (gpu_dynamic, gpu, it,
# facility) in Wh = r1 (1, 1.5, 2, 2.2), r2 (2, 3, 4, 4.4), r3 (0, 1, 1, 1.1).
RECORDS = [
    stored("r1", "a", 3600, 1800, 1800, 720, prompt=100, completion=200),
    stored("r2", "a", 7200, 3600, 3600, 1440, status="cancelled"),  # no token counts
    stored("r3", "a", 0, 3600, 0, 360, prompt=10, completion=0, status="failed"),
    stored("b1", "b", 360, 0, 0, 0, prompt=0, completion=0),
]


def report(**kwargs: object) -> Report:
    return build_report(RECORDS, generated=NOW, **kwargs)  # type: ignore[arg-type]


def test_percentile_by_linear_interpolation_against_hand_computed_values() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 0.5) == 2.5  # h = 1.5
    assert percentile(values, 0.9) == pytest.approx(3.7)  # h = 2.7: 3 + 0.7 × (4 − 3)
    assert percentile(values, 0.99) == pytest.approx(3.97)  # h = 2.97
    assert percentile(values, 1.0) == 4.0
    assert percentile([10.0, 20.0], 0.25) == 12.5
    assert percentile([5.0], 0.99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_percentile_agrees_with_the_standard_librarys_inclusive_method() -> None:
    rng = random.Random(7)
    for size in (2, 3, 10, 101):
        values = sorted(rng.uniform(0, 5) for _ in range(size))
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        for k in (10, 50, 90, 99):
            assert percentile(values, k / 100) == pytest.approx(cuts[k - 1], rel=1e-12)


def test_statistics_per_model_and_boundary_against_hand_computed_values() -> None:
    a, b = report().models
    assert (a.model, b.model) == ("a", "b")
    assert a.requests == 3
    assert dict(a.by_status) == {"ok": 1, "cancelled": 1, "failed": 1}
    expected = {  # sorted values → mean, median, p90 = x1 + 0.8(x2 − x1), p99 = x1 + 0.98(…)
        "gpu_dynamic": (1.0, 1.0, 1.8, 1.98),  # [0, 1, 2]
        "gpu": (5.5 / 3, 1.5, 2.7, 2.97),  # [1, 1.5, 3]
        "it": (7 / 3, 2.0, 3.6, 3.96),  # [1, 2, 4]
        "facility": (7.7 / 3, 2.2, 3.96, 4.356),  # [1.1, 2.2, 4.4]: it × PUE 1.1
    }
    for boundary, (mean, median, p90, p99) in expected.items():
        dist = a.wh_per_query[boundary]  # type: ignore[index]
        assert (dist.mean, dist.median, dist.p90, dist.p99) == pytest.approx(
            (mean, median, p90, p99), rel=1e-12), boundary
    # Tokens: r1 and r3 reported them; IT energy 7200 + 3600 J over 200 completion tokens,
    # and over 110 + 200 tokens in all. r2 (no counts) is in neither ratio.
    assert (a.requests_with_tokens, a.prompt_tokens, a.completion_tokens) == (2, 110, 200)
    assert a.it_j_per_completion_token == pytest.approx(54.0)
    assert a.it_j_per_token_all == pytest.approx(10800 / 310)
    assert b.requests_with_tokens == 1
    assert b.it_j_per_completion_token is None and b.it_j_per_token_all is None


def test_estimated_counts_are_left_out_of_the_joules_per_token() -> None:
    estimated = dataclasses.replace(stored("r4", "a", 3600, 0, 0, 0, prompt=5, completion=9),
                                    tokens_estimated=True)
    (a, _) = build_report([*RECORDS, estimated], generated=NOW).models
    assert a.requests == 4
    assert (a.requests_with_tokens, a.prompt_tokens, a.completion_tokens) == (2, 110, 200)


def test_json_parses_back_with_every_figure() -> None:
    data = json.loads(render(report(since=NOW - 3600), "json"))
    assert data["since"] == "2025-06-15T14:06:40Z" and data["generated"] == "2025-06-15T15:06:40Z"
    assert data["unattributed_share"] is None and data["simulated"] is False
    a = data["models"][0]
    assert a["requests_by_status"] == {"ok": 1, "cancelled": 1, "failed": 1}
    assert set(a["wh_per_query"]) == set(BOUNDARIES)
    assert a["wh_per_query"]["it"]["p90"] == pytest.approx(3.6)
    assert a["it_j_per_completion_token"] == pytest.approx(54.0)
    assert data["models"][1]["it_j_per_token_all"] is None


def test_csv_parses_back_one_row_per_model() -> None:
    rows = list(csv.DictReader(io.StringIO(render(report(), "csv"))))
    assert [row["model"] for row in rows] == ["a", "b"]
    a = rows[0]
    assert (a["requests"], a["requests_cancelled"], a["prompt_tokens"]) == ("3", "1", "110")
    assert float(a["facility_wh_p99"]) == pytest.approx(4.356)
    assert float(a["gpu_wh_mean"]) == pytest.approx(5.5 / 3)
    assert float(a["it_j_per_token_all"]) == pytest.approx(10800 / 310)
    assert a["unattributed_share"] == "" and rows[1]["it_j_per_completion_token"] == ""
    assert [row["simulated"] for row in rows] == ["false", "false"]


def test_table_has_units_in_headers_and_aligned_columns() -> None:
    text = render(report(), "table")
    lines = text.splitlines()
    for header in ("mean Wh", "median Wh", "p90 Wh", "p99 Wh", "J/completion token",
                   "J/token (all)"):
        assert header in text
    start = next(i for i, line in enumerate(lines) if line.startswith("model") and "p99 Wh" in line)
    energy = lines[start:start + 1 + 4 * 2]  # header, then four boundaries for each model
    assert [line.split()[-5] for line in energy[1:5]] == list(BOUNDARIES)
    assert energy[1].split()[:2] == ["a", "gpu_dynamic"]
    assert len({len(line) for line in energy}) == 1, "right-aligned numbers line up"
    assert energy[3].split()[-4:] == ["2.3333", "2.0000", "3.6000", "3.9600"]  # it of model a
    assert "Unattributed" not in text
    assert lines[0].startswith("jouleprobe report:") and "SIMULATED" not in text


def test_records_of_simulated_gpus_are_labelled_in_every_format() -> None:
    # One simulated record of model "b" makes "b" simulated, and so the whole report.
    built = build_report([*RECORDS, stored("b2", "b", 360, 0, 0, 0, simulated=True)],
                         generated=NOW)
    assert built.simulated and [m.simulated for m in built.models] == [False, True]
    assert render(built, "table").splitlines()[0] == SIMULATED_LINE
    data = json.loads(render(built, "json"))
    assert data["simulated"] is True
    assert [m["simulated"] for m in data["models"]] == [False, True]
    rows = list(csv.DictReader(io.StringIO(render(built, "csv"))))
    assert [row["simulated"] for row in rows] == ["false", "true"]
    assert summary(built, 3600.0)["simulated"] is True
    assert summary(report(), 3600.0)["simulated"] is False


def test_node_totals_give_the_unattributed_share() -> None:
    totals = NodeTotals(gpu_j=36000.0, unattributed_gpu_j=9000.0)
    with_totals = report(node_totals=totals)
    assert json.loads(render(with_totals, "json"))["unattributed_share"] == 0.25
    assert "Unattributed GPU energy (node): 25.0% of 10 Wh" in render(with_totals, "table")
    rows = list(csv.DictReader(io.StringIO(render(with_totals, "csv"))))
    assert {row["unattributed_share"] for row in rows} == {"0.25"}
    with pytest.raises(ValueError, match="GPU energy"):
        NodeTotals(gpu_j=0.0, unattributed_gpu_j=0.0)
    with pytest.raises(ValueError, match="unattributed"):
        NodeTotals(gpu_j=10.0, unattributed_gpu_j=11.0)


def test_render_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="--format"):
        render(report(), "xml")


@pytest.mark.parametrize(("text", "seconds_back"), [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400), ("2d", 172800), ("1w", 604800),
    (" 2d ", 172800),
])
def test_since_as_a_duration(text: str, seconds_back: float) -> None:
    assert parse_since(text, NOW) == NOW - seconds_back


@pytest.mark.parametrize("text", [
    "2025-06-01T12:00:00Z", "2025-06-01T12:00:00", "2025-06-01 12:00", "2025-06-01T14:00+02:00",
])
def test_since_as_an_iso_time_naive_meaning_utc(text: str, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # a local time zone that is not UTC
    time.tzset()
    try:
        assert parse_since(text, NOW) == 1_748_779_200.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(("text", "reason"), [
    ("", "expected a duration"), ("abc", "expected a duration"), ("1y", "expected a duration"),
    ("-1h", "expected a duration"), ("1H", "expected a duration"), ("0h", "longer than 0"),
    ("2999-01-01", "in the future"), ("99999999w", "before 1970"),
])
def test_since_errors_name_the_argument(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^--since: .*{reason}"):
        parse_since(text, NOW)


def _write_store(path: Path, *, simulated: bool) -> Path:
    """Requests of model "a" that ended 2 h and 10 min ago, and "b" 5 min ago."""
    now = time.monotonic()
    store = RecordStore(path, pue=1.2, simulated=simulated, flush_interval_s=3600.0)
    try:
        store.submit([
            RequestEnergy(Request(rid, model, "ingest", (0,), now - ago - 1, now - ago),
                          3600.0, 0.0, 0.0, 720.0)
            for rid, model, ago in (("old", "a", 7200), ("new", "a", 600), ("b", "b", 300))
        ])
    finally:
        store.close()
    return path


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A store of real GPUs (`_write_store`)."""
    return _write_store(tmp_path / "records.db", simulated=False)


def test_run_report_labels_a_store_of_simulated_gpus(tmp_path: Path, store_path: Path) -> None:
    simulated = str(_write_store(tmp_path / "simulated.db", simulated=True))
    table = run_report(simulated, None, "table", None)
    assert table.splitlines()[0] == SIMULATED_LINE
    assert json.loads(run_report(simulated, None, "json", None))["simulated"] is True
    rows = list(csv.DictReader(io.StringIO(run_report(simulated, None, "csv", None))))
    assert [row["simulated"] for row in rows] == ["true", "true"]
    real = run_report(str(store_path), None, "table", None)
    assert real.startswith("jouleprobe report:") and "SIMULATED" not in real
    assert json.loads(run_report(str(store_path), None, "json", None))["simulated"] is False


def test_run_report_selects_by_since_and_model(store_path: Path) -> None:
    everything = json.loads(run_report(str(store_path), None, "json", None))
    assert [(m["model"], m["requests"]) for m in everything["models"]] == [("a", 2), ("b", 1)]
    last_hour = json.loads(run_report(str(store_path), "1h", "json", None))
    assert [(m["model"], m["requests"]) for m in last_hour["models"]] == [("a", 1), ("b", 1)]
    only_b = list(csv.DictReader(io.StringIO(run_report(str(store_path), "1h", "csv", "b"))))
    assert [row["model"] for row in only_b] == ["b"]
    assert float(only_b[0]["facility_wh_mean"]) == pytest.approx(1.2)
    assert "model b," in run_report(str(store_path), "1h", "table", "b")


def test_empty_store_says_no_requests(tmp_path: Path, store_path: Path) -> None:
    empty = tmp_path / "empty.db"
    RecordStore(empty, pue=1.2, simulated=True).close()
    assert "no requests" in run_report(str(empty), None, "table", None)
    # No records, no simulated figures: nothing to label.
    assert "SIMULATED" not in run_report(str(empty), None, "table", None)
    assert json.loads(run_report(str(empty), "1h", "json", None))["models"] == []
    assert list(csv.DictReader(io.StringIO(run_report(str(empty), None, "csv", None)))) == []
    assert "no requests" in run_report(str(store_path), "1h", "table", "unknown-model")


def test_run_report_errors_name_the_argument(tmp_path: Path, store_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--store: no record store at"):
        run_report(str(tmp_path / "missing.db"), None, "table", None)
    with pytest.raises(ValueError, match=r"^--format:"):
        run_report(str(store_path), None, "yaml", None)
    with pytest.raises(ValueError, match=r"^--since:"):
        run_report(str(store_path), "yesterday", "table", None)


# --- scrape windows ------------------------------------------------------------------------

# Sums chosen so that ratios are round: "llama" 7200 J over 4 requests and 300 tokens
# (100 prompt); "resnet" counts requests only; "idle" did nothing at all. The vllm
# source measured 9000 J, of which 1800 J fell in windows in which nothing happened.
WINDOWS = WindowTotals(
    models=(
        ModelWindows("scrape:triton", "resnet", 2, 10.0, None, None, 300.0, 60.0,
                     simulated=False),
        ModelWindows("scrape:vllm", "idle", 3, 0.0, 0.0, 0.0, 0.0, 0.0, simulated=False),
        ModelWindows("scrape:vllm", "llama", 3, 4.0, 100.0, 200.0, 5400.0, 1800.0,
                     simulated=False),
    ),
    sources=(
        SourceWindows("scrape:triton", 2, 360.0, 0.0, simulated=False),
        SourceWindows("scrape:vllm", 3, 9000.0, 1800.0, simulated=False),
    ),
)


def windowed(**kwargs: object) -> Report:
    return build_report(RECORDS, generated=NOW, windows=WINDOWS, **kwargs)  # type: ignore[arg-type]


def test_window_figures_are_ratios_of_sums_at_the_gpu_boundary() -> None:
    resnet, idle, llama = WINDOWS.models
    assert llama.gpu_j == 7200.0
    assert llama.gpu_wh_per_query == 0.5  # 7200 J ÷ 4 requests ÷ 3600
    assert llama.gpu_j_per_completion_token == 36.0  # 7200 ÷ 200
    assert llama.gpu_j_per_token_all == 24.0  # 7200 ÷ 300
    assert resnet.gpu_wh_per_query == pytest.approx(360 / 10 / 3600)
    assert resnet.gpu_j_per_completion_token is None and resnet.gpu_j_per_token_all is None
    assert (idle.gpu_wh_per_query, idle.gpu_j_per_token_all) == (None, None)
    assert [s.unattributed_share for s in WINDOWS.sources] == [0.0, 0.2]
    assert SourceWindows("x", 1, 0.0, 0.0, simulated=False).unattributed_share is None
    # Per-request records gain the same GPU-boundary ratios, for comparison: model "a"'s
    # requests with tokens (r1, r3) hold 5400 + 3600 J of GPU energy.
    a = windowed().models[0]
    assert a.gpu_j_per_completion_token == pytest.approx(9000 / 200)
    assert a.gpu_j_per_token_all == pytest.approx(9000 / 310)


def test_windows_in_json_and_summary() -> None:
    data = json.loads(render(windowed(), "json"))
    assert [s["source"] for s in data["windows"]] == ["scrape:triton", "scrape:vllm"]
    vllm = data["windows"][1]
    assert (vllm["windows"], vllm["gpu_j"], vllm["unattributed_share"]) == (3, 9000.0, 0.2)
    assert [m["model"] for m in vllm["models"]] == ["idle", "llama"]
    assert vllm["models"][1] == {
        "model": "llama", "windows": 3, "requests": 4.0, "gpu_wh_per_query": 0.5,
        "gpu_j_per_completion_token": 36.0, "gpu_j_per_token_all": 24.0,
        "prompt_tokens": 100.0, "completion_tokens": 200.0,
        "gpu_dynamic_j": 5400.0, "gpu_static_j": 1800.0, "simulated": False,
    }
    assert data["windows"][0]["models"][0]["prompt_tokens"] is None, "not counted: null"
    assert "no percentiles" in data["definitions"]["windows"]
    assert data["models"][0]["gpu_j_per_completion_token"] == pytest.approx(45.0)
    compact = summary(windowed(), 3600.0)["windows"]
    assert compact["scrape:vllm"]["unattributed_share"] == 0.2
    assert compact["scrape:vllm"]["models"]["llama"]["gpu_wh_per_query"] == 0.5
    assert json.loads(render(report(), "json"))["windows"] == []
    assert summary(report(), 3600.0)["windows"] == {}


def test_windows_in_csv_beside_the_requests_at_the_same_boundary() -> None:
    rows = list(csv.DictReader(io.StringIO(render(windowed(), "csv"))))
    assert [(r["level"], r["source"], r["model"]) for r in rows] == [
        ("request", "", "a"), ("request", "", "b"), ("window", "scrape:triton", "resnet"),
        ("window", "scrape:vllm", "idle"), ("window", "scrape:vllm", "llama"),
    ]
    a, llama, resnet = rows[0], rows[4], rows[2]
    assert float(a["gpu_j_per_completion_token"]) == pytest.approx(45.0)
    assert a["windows"] == "" and a["gpu_wh_mean"] != ""
    assert (llama["windows"], float(llama["requests"]), float(llama["gpu_wh_mean"])) == (
        "3", 4.0, 0.5)
    assert (float(llama["gpu_j_per_completion_token"]), float(llama["gpu_j_per_token_all"])
            ) == (36.0, 24.0)
    assert float(llama["unattributed_share"]) == 0.2, "the source's share"
    assert llama["simulated"] == "false"
    not_for_windows = ("requests_ok", "gpu_wh_p99", "it_wh_mean", "facility_wh_mean",
                       "it_j_per_token_all", "requests_with_tokens")
    assert all(llama[column] == "" for column in not_for_windows)
    assert resnet["prompt_tokens"] == "" and float(resnet["requests"]) == 10.0


def test_windows_in_the_table_with_what_they_are_not() -> None:
    text = render(windowed(), "table")
    section = text[text.index("Scraped windows (window-level, GPU boundary)"):]
    lines = section.splitlines()
    assert lines[1].split()[:4] == ["source", "model", "windows", "requests"]
    assert lines[2].split() == ["scrape:triton", "resnet", "2", "10", "-", "-", "0.08333",
                                "0.01667", "0.01000", "-", "-"]
    assert lines[4].split() == ["scrape:vllm", "llama", "3", "4", "100", "200", "1.50000",
                                "0.50000", "0.50000", "36.00", "24.00"]
    assert len({len(line) for line in lines[1:5]}) == 1, "right-aligned numbers line up"
    assert "scrape:vllm: 3 window(s), 2.5 Wh of GPU energy, 20.0% of it unattributed" in section
    assert "no percentiles" in section and "GPU boundary only" in section
    assert "Scraped windows" not in render(report(), "table")
    no_requests = render(build_report([], generated=NOW, windows=WINDOWS), "table")
    assert "no requests" in no_requests and "scrape:vllm" in no_requests


def test_trace_coverage_in_the_table_json_and_summary() -> None:
    """A scraped vLLM whose spans arrived for 9 of its 10 requests and 180 of its 200
    tokens; a Triton that counts no tokens."""
    from dataclasses import replace

    from agent.store import TraceCoverage

    covered = replace(WINDOWS, coverage=(
        TraceCoverage("scrape:triton", "trace:triton", 2, 3, 0.0, 4.0, None),
        TraceCoverage("scrape:vllm", "trace:vllm-a", 3, 9, 180.0, 10.0, 200.0)))
    text = render(build_report(RECORDS, generated=NOW, windows=covered), "table")
    section = text[text.index("Trace coverage"):].splitlines()
    assert section[2].split() == ["scrape:triton", "trace:triton", "2", "3", "4", "75.0%",
                                  "0", "-", "-"]
    assert section[3].split() == ["scrape:vllm", "trace:vllm-a", "3", "9", "10", "90.0%",
                                  "180", "200", "90.0%"]
    assert "never added to either figure" in text[text.index("Trace coverage"):]
    assert "Trace coverage" not in render(windowed(), "table")
    data = json.loads(render(build_report(RECORDS, generated=NOW, windows=covered), "json"))
    assert data["trace_coverage"][1] == {
        "source": "scrape:vllm", "trace_source": "trace:vllm-a", "windows": 3,
        "span_requests": 9, "requests": 10.0, "requests_share": 0.9,
        "span_completion_tokens": 180.0, "completion_tokens": 200.0,
        "completion_tokens_share": 0.9,
    }
    assert data["trace_coverage"][0]["completion_tokens_share"] is None
    assert "never added" in data["definitions"]["trace_coverage"]
    compact = summary(build_report(RECORDS, generated=NOW, windows=covered), 3600.0)
    assert compact["trace_coverage"] == data["trace_coverage"]
    assert json.loads(render(windowed(), "json"))["trace_coverage"] == []


def test_simulated_windows_are_labelled_in_every_format() -> None:
    simulated = WindowTotals(
        models=(ModelWindows("scrape:vllm", "llama", 1, 1.0, 1.0, 1.0, 1.0, 1.0,
                             simulated=True),),
        sources=(SourceWindows("scrape:vllm", 1, 2.0, 0.0, simulated=True),),
    )
    built = build_report(RECORDS, generated=NOW, windows=simulated)
    assert built.simulated
    assert render(built, "table").splitlines()[0] == SIMULATED_LINE
    data = json.loads(render(built, "json"))
    assert data["simulated"] is True and data["windows"][0]["simulated"] is True
    assert data["windows"][0]["models"][0]["simulated"] is True
    rows = list(csv.DictReader(io.StringIO(render(built, "csv"))))
    assert [row["simulated"] for row in rows] == ["false", "false", "true"]
    assert summary(built, 3600.0)["simulated"] is True


def test_run_report_shows_the_stored_windows_and_selects_them_by_model(
    tmp_path: Path
) -> None:
    path = tmp_path / "records.db"
    now = time.monotonic()
    energy = {0: GpuWindowEnergy(1000.0, 2600.0, 10.0)}
    store = RecordStore(path, pue=1.2, simulated=False, flush_interval_s=3600.0)
    store.submit_windows("scrape:vllm", [
        split_window({"llama": Usage(4, 0, 100), "qwen": Usage(1, 0, 100)}, energy,
                     now - 7200, now - 7190),
        split_window({"llama": Usage(2, 0, 50)}, energy, now - 20, now - 10),
    ])
    store.close()
    table = run_report(str(path), None, "table", None)
    assert "Scraped windows" in table and "qwen" in table
    last_hour = json.loads(run_report(str(path), "1h", "json", None))["windows"]
    assert [(m["model"], m["requests"]) for m in last_hour[0]["models"]] == [("llama", 2.0)]
    only_qwen = list(csv.DictReader(io.StringIO(run_report(str(path), None, "csv", "qwen"))))
    assert [(row["level"], row["model"], row["windows"]) for row in only_qwen] == [
        ("window", "qwen", "1")]
    assert float(only_qwen[0]["gpu_j_per_completion_token"]) == 18.0  # 3600 J ÷ 2 ÷ 100


def test_requests_whose_queue_time_is_unknown_are_counted_and_said() -> None:
    """Records without `scheduled` (here all of model "a") carry the GPU's work while they
    waited: the report counts them and says so; one with it (b1) is not counted."""
    from dataclasses import replace

    records = [*RECORDS[:3], replace(RECORDS[3], scheduled=NOW - 9)]
    built = build_report(records, generated=NOW)
    assert [m.requests_queue_unknown for m in built.models] == [3, 0]
    assert json.loads(render(built, "json"))["models"][0]["requests_queue_unknown"] == 3
    text = render(built, "table")
    assert "a: queue time unknown for 3 of 3 requests" in text
    assert "b: queue time unknown" not in text
