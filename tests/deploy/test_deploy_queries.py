"""The Prometheus rules and the Grafana dashboards of deploy/: every query parses, and every
metric it names is one that the agent exposes or that a recording rule produces.

promtool (Debian/Ubuntu: apt-get install prometheus) checks and unit-tests the rules and
parses the dashboards' queries; without it those tests are skipped, except under CI
(CI=true), where that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scripted import ROOT, require_binary, require_module

from agent.app.node import Node
from agent.config import load
from agent.devices.host import open_host_source
from agent.sim.gpus import SimulatedGpuSource

yaml = require_module("yaml")

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = (PROMETHEUS / "rules.yml", PROMETHEUS / "recording.yml")
OWN_RULES = PROMETHEUS / "rules.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted(GRAFANA.glob("*.json"))

GRAFANA_SUBSTITUTIONS = {
    # What Grafana puts in place of its variables, for parsing and for running a query.
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$gpu": ".*",
    "$model": ".*",
    "$carbon_intensity": "475",
    "$price": "0.10",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PROMETHEUS_OWN = frozenset({"up"})
"""Series that Prometheus itself writes for each target."""


def load_generator() -> ModuleType:
    """deploy/grafana/generate.py, which is a script and not part of the package."""
    spec = importlib.util.spec_from_file_location("jouleprobe_dashboards",
                                                  GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def substitute(expr: str) -> str:
    """A dashboard query as Grafana sends it, with every variable replaced."""
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable without a substitution in {expr!r}"
    return expr


def dashboard_targets() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) of every committed panel query."""
    for path in DASHBOARD_FILES:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads: those of jouleprobe (exposed or recorded),
    and Prometheus' own `up`. Quoted strings (label values) are left out first."""
    names = set(_NAME.findall(_STRING.sub('""', expr)))
    return {name for name in names if "jouleprobe_" in name or name in PROMETHEUS_OWN}


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in rules(path) if "record" in rule}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name the agent's registry can expose, from its families' types (a
    family with no sample yet still names itself)."""
    store = tmp_path_factory.mktemp("records") / "records.db"
    config = load(environ={}, overrides={"records.path": str(store)})
    node = Node(config, SimulatedGpuSource("1xH100"), open_host_source("/nonexistent", 100, 400))
    try:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        return {family.name + suffix for family in node.registry.collect()
                for suffix in suffixes.get(family.type, ("",))}
    finally:
        node.store.close()


def test_names_are_known_to_the_checks(exposed: set[str]) -> None:
    # The checks below would pass vacuously if these sets were empty or misread.
    assert {"jouleprobe_gpu_energy_joules_total", "jouleprobe_gpu_power_watts",
            "jouleprobe_request_it_energy_joules_bucket",
            "jouleprobe_workload_gpu_energy_joules_total",
            "jouleprobe_workload_unattributed_gpu_energy_joules_total"} <= exposed
    assert "jouleprobe_gpu_energy_joules" not in exposed
    assert "instance_model:jouleprobe_requests:rate5m" in recorded_names()
    assert metric_names('sum(rate(jouleprobe_x_total{job="jouleprobe_y"}[5m])) / up') == {
        "jouleprobe_x_total", "up"}


# The rules.


def test_rules_pass_promtool_check() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_promtool_unit_tests() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "test", "rules", *(p.name for p in RULE_TESTS)],
                            cwd=PROMETHEUS / "tests", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def _tested() -> tuple[set[str], set[str]]:
    """(names in the unit tests' promql expressions, alerts the unit tests check)."""
    exprs: set[str] = set()
    alerts: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("promql_expr_test", []):
                exprs |= metric_names(case["expr"])
            alerts |= {case["alertname"] for case in test.get("alert_rule_test", [])
                       if case["exp_alerts"]}
    return exprs, alerts


def test_every_own_rule_and_every_rule_built_on_is_unit_tested() -> None:
    own = rules(OWN_RULES)
    dashboards = set().union(*(metric_names(expr) for _, _, expr in dashboard_targets()))
    used = set().union(*(metric_names(rule["expr"]) for rule in own)) | dashboards
    theirs = {rule["record"] for rule in rules(PROMETHEUS / "recording.yml")}
    exprs, alerts = _tested()
    records = {rule["record"] for rule in own if "record" in rule} | (theirs & used)
    assert records - exprs == set(), "recording rules without a promtool unit test"
    all_alerts = {rule["alert"] for rule in own if "alert" in rule}
    assert all_alerts - alerts == set(), "alerts never shown firing by a promtool unit test"


def test_rule_files_do_not_repeat_each_other() -> None:
    seen: dict[tuple[str, str], Path] = {}
    expressions: dict[str, Path] = {}
    for path in RULE_FILES:
        for rule in rules(path):
            name = rule.get("record") or rule["alert"]
            key = (name, json.dumps(rule.get("labels", {}), sort_keys=True))
            assert key not in seen, f"{key} in both {seen.get(key)} and {path}"
            seen[key] = path
            expr = " ".join(rule["expr"].split())
            assert expr not in expressions, f"{name}: same expression in {expressions[expr]}"
            expressions[expr] = path


def test_alerts_say_what_and_why() -> None:
    for rule in rules(OWN_RULES):
        if "alert" in rule:
            assert rule["alert"].startswith("Jouleprobe"), rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def test_rules_read_only_metrics_that_exist(exposed: set[str]) -> None:
    known = exposed | recorded_names() | PROMETHEUS_OWN
    for path in RULE_FILES:
        for rule in rules(path):
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{path.name} {rule.get('record') or rule['alert']}: {unknown}"


# The dashboards.


def test_committed_dashboards_are_the_generated_ones() -> None:
    generator = load_generator()
    outputs = generator.outputs()
    assert set(DASHBOARD_FILES) == {p for p in outputs if p.suffix == ".json"}
    for path, content in outputs.items():
        assert path.read_text() == content, (
            f"{path} is out of date: run python deploy/grafana/generate.py")
    assert generator.main(["--check"]) == 0


def test_dashboards_query_only_metrics_that_exist(exposed: set[str]) -> None:
    known = exposed | recorded_names()
    queried = 0
    for name, title, expr in dashboard_targets():
        names = metric_names(expr)
        assert names, f"{name} {title!r}: queries no jouleprobe metric: {expr}"
        assert names <= known, f"{name} {title!r}: unknown {names - known}"
        queried += 1
    for path in DASHBOARD_FILES:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                assert metric_names(variable["definition"]) <= known, variable["name"]
    assert queried >= 20


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query, given to it as the expression of a recording rule."""
    promtool = require_binary("promtool")
    queries = [{"record": f"panel_{i}", "expr": substitute(expr)}
               for i, (_, _, expr) in enumerate(dashboard_targets())]
    document = tmp_path / "panels.yml"
    document.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": queries}]}))
    result = subprocess.run([promtool, "check", "rules", str(document)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout + result.stderr


def test_dashboards_are_well_formed() -> None:
    uids = set()
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        assert path.name == f"{board['uid']}.json"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        cells: set[tuple[int, int]] = set()
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            area = {(grid["x"] + dx, grid["y"] + dy)
                    for dx in range(grid["w"]) for dy in range(grid["h"])}
            assert not cells & area, f"{path.name}: {panel['title']!r} overlaps another panel"
            cells |= area
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"]))
                assert used <= set(variables) | {"__rate_interval", "__range"}, used
    assert uids == {"jouleprobe-node", "jouleprobe-model", "jouleprobe-fleet"}
