"""Generates jouleprobe's Grafana dashboards from one description.

    python deploy/grafana/generate.py           # writes the dashboards and their ConfigMap
    python deploy/grafana/generate.py --check   # exits 1 if a committed file differs

Why code and not hand-edited JSON: every query is written once, here, against the metric
names of the agent and of the recording rules (deploy/prometheus/*.yml), and a test checks
each name it uses against what the agent exposes and what the rules record, so a renamed
metric cannot leave a dashboard silently empty. The JSON is committed so that operators
can import it as it is; a test checks that it equals this script's output.

Outputs: deploy/grafana/jouleprobe-{node,model,fleet}.json, and
deploy/kubernetes/grafana-dashboards.yaml, the same dashboards in a ConfigMap labelled
`grafana_dashboard: "1"` for Grafana's dashboard sidecar (kube-prometheus-stack).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGMAP = HERE.parent / "kubernetes" / "grafana-dashboards.yaml"

SCHEMA_VERSION = 39
"""Grafana 10.4 / 11: what the JSON is written for; older Grafanas migrate it on import."""

WIDTH = 24
"""Grafana's grid is 24 columns wide."""

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

JOULES_PER_WH = 3600
JOULES_PER_KWH = 3_600_000

# Selectors: every query filters on the dashboard's variables through these.
NODE = 'instance=~"$instance"'
GPU = 'instance=~"$instance", gpu=~"$gpu"'
MODEL = 'instance=~"$instance", model=~"$model"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str
    kind: str = "timeseries"
    """timeseries, stat or heatmap."""
    width: int = 12
    height: int = 8
    stack: bool = False
    decimals: int | None = None


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str = ""
    """label_values(...) for a query variable; the default value for a textbox."""
    kind: str = "query"
    """query (multi-select from Prometheus, "All" by default) or textbox."""
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...] = field(default_factory=tuple)

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


INSTANCE = Variable(
    "instance", "Node", "label_values(jouleprobe_build_info, instance)",
    description="Agents (one per GPU node) to show.",
)
GPU_VAR = Variable(
    "gpu", "GPU", 'label_values(jouleprobe_gpu_info{instance=~"$instance"}, gpu)',
    description="GPU indices, as the agent labels them.",
)
MODEL_VAR = Variable(
    "model", "Model", 'label_values(jouleprobe_requests_total{instance=~"$instance"}, model)',
    description="Models, as the serving stack reports them.",
)
CARBON = Variable(
    "carbon_intensity", "Grid g CO2e/kWh", "475", kind="textbox",
    description="Carbon intensity of the electricity (world average 475 g CO2e/kWh).",
)
PRICE = Variable(
    "price", "$ per kWh", "0.10", kind="textbox",
    description="Price of one kWh of electricity, facility side.",
)


def _per_request(numerator: str, by: str) -> str:
    """J per request: a per-model energy rate over the same model's request rate."""
    return (
        f"sum by (model, {by}) ({numerator})\n"
        f"  / ignoring ({by}) group_left ()\n"
        f"(sum by (model) (instance_model:jouleprobe_requests:rate5m{{{MODEL}}}) > 0)"
    )


def _or_zero(expr: str, by: str) -> str:
    """`expr`, or 0 per agent where it has no series: an error counter that never fired
    shows as 0, not as "No data"."""
    return f"{expr}\nor sum by ({by}) (0 * jouleprobe_build_info{{{NODE}}})"


UNATTRIBUTED = "(unattributed)"
"""The legend of GPU energy that no workload owns, beside the workloads' (whose names never
have parentheses: agent.workloads.naming)."""
NO_NAMESPACE = "(no namespace)"
"""The legend of workloads with no namespace: off Kubernetes, pods whose names the agent
could not read, and workload="other"."""


def _empty_as(expr: str, label: str, text: str) -> str:
    """`expr` with `label` set to `text` on the series where it is empty (absent)."""
    return f'label_replace(\n  {expr},\n  "{label}", "{text}", "{label}", ""\n)'


def _with_unattributed(expr: str, unattributed: str, label: str) -> str:
    """The workloads' `expr`, and the energy no workload owns as one more `label` value:
    stacked, they add up to the GPU energy split so far. A node with no workload (yet) still
    shows its GPUs' energy, as unattributed."""
    return f"{expr}\nor {_empty_as(unattributed, label, UNATTRIBUTED)}"


NODE_VIEW = Dashboard(
    uid="jouleprobe-node",
    title="jouleprobe / Node",
    description="GPU power, energy and attribution of each node, and the health of its "
                "measurement.",
    variables=(INSTANCE, GPU_VAR),
    panels=(
        Panel(
            "GPU power", "Board power of each GPU at the agent's latest read (W).",
            (Query(f"jouleprobe_gpu_power_watts{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
            "watt",
        ),
        Panel(
            "Node power (5 m average)",
            "GPUs and host CPU + DRAM, from the energy counters; facility = IT × the "
            "node's PUE.",
            (
                Query(f"instance:jouleprobe_gpu_energy_joules:rate5m{{{NODE}}}",
                      "{{instance}} GPUs"),
                Query(f"instance:jouleprobe_host_energy_joules:rate5m{{{NODE}}}",
                      "{{instance}} host"),
                Query(f'instance_boundary:jouleprobe_energy_joules:rate5m{{{NODE}, '
                      f'boundary="facility"}}', "{{instance}} facility"),
            ),
            "watt",
        ),
        Panel(
            "GPU energy in the time range",
            "Energy each GPU used over the dashboard's time range.",
            (Query(f"increase(jouleprobe_gpu_energy_joules_total{{{GPU}}}[$__range]) "
                   f"/ {JOULES_PER_WH}", "{{instance}} GPU {{gpu}}"),),
            "watth", kind="stat", width=8, decimals=1,
        ),
        Panel(
            "Unattributed share of GPU energy (5 m)",
            "Energy spent while no request was active, over all energy: idle GPUs, or "
            "requests not reported to the agent.",
            (Query(f"instance:jouleprobe_gpu_unattributed_energy_joules:ratio_rate5m"
                   f"{{{NODE}}}", "{{instance}}"),),
            "percentunit", kind="stat", width=8, decimals=1,
        ),
        Panel(
            "Idle baseline and power limit",
            "Idle power used to split static from dynamic energy, and the enforced limit.",
            (
                Query(f"jouleprobe_gpu_idle_power_watts{{{GPU}}}",
                      "{{instance}} GPU {{gpu}} idle"),
                Query(f"jouleprobe_gpu_power_limit_watts{{{GPU}}}",
                      "{{instance}} GPU {{gpu}} limit"),
            ),
            "watt", width=8,
        ),
        Panel(
            "Attributed vs idle power per GPU",
            "Energy rate credited to requests (dynamic above the idle baseline, static "
            "share of it) and spent with no request active. Stacked, it is the GPU's power.",
            (
                Query(f"sum by (instance, gpu, component) (rate("
                      f"jouleprobe_gpu_attributed_energy_joules_total{{{GPU}}}"
                      f"[$__rate_interval]))", "{{instance}} GPU {{gpu}} {{component}}"),
                Query(f"sum by (instance, gpu) (rate("
                      f"jouleprobe_gpu_unattributed_energy_joules_total{{{GPU}}}"
                      f"[$__rate_interval]))", "{{instance}} GPU {{gpu}} unattributed"),
            ),
            "watt", width=24, stack=True,
        ),
        Panel(
            "GPU power by workload",
            "GPU energy rate (5 m) credited to each workload (pod container, container, "
            "systemd unit or process) over all the GPUs it uses, and the rate that no "
            "workload owns. Stacked, the GPUs' power split so far. A workload gone for "
            "workloads.gone_after leaves the graph; workload=\"other\" is those past "
            "workloads.max_series.",
            (Query(_with_unattributed(
                f"sum by (instance, workload) (instance_workload:"
                f"jouleprobe_workload_gpu_energy_joules:rate5m{{{NODE}}})",
                f"sum by (instance) (instance:jouleprobe_workload_unattributed_gpu_energy"
                f"_joules:rate5m{{{NODE}}})", "workload"), "{{instance}} {{workload}}"),),
            "watt", width=16, stack=True,
        ),
        Panel(
            "Unattributed GPU power",
            "GPU energy rate (5 m) that no workload owns (the workload view's, not the "
            "request view's unattributed): no process on the GPU, no SM activity sampled, "
            "or processes whose workload is unknown (jouleprobe_workload_unresolved_processes "
            "says why).",
            (Query(f"instance:jouleprobe_workload_unattributed_gpu_energy_joules:rate5m"
                   f"{{{NODE}}}", "{{instance}}"),),
            "watt", width=8,
        ),
        Panel(
            "GPU energy by namespace (kWh/day)",
            "GPU energy of each namespace's workloads over the last 24 h (increase(), so "
            "workloads that have since gone still count), and the energy of those 24 h "
            "that no workload owns. Stacked, the GPUs' energy of the day split so far.",
            (Query(_with_unattributed(
                _empty_as(f"sum by (instance, namespace) (instance_namespace:"
                          f"jouleprobe_workload_gpu_energy_kilowatt_hours:increase1d"
                          f"{{{NODE}}})", "namespace", NO_NAMESPACE),
                f"sum by (instance) (instance:jouleprobe_workload_unattributed_gpu_energy"
                f"_kilowatt_hours:increase1d{{{NODE}}})", "namespace"),
                "{{instance}} {{namespace}}"),),
            "kwatth", width=24, stack=True, decimals=2,
        ),
        Panel(
            "GPU utilisation", "Share of time a kernel ran, at the latest read.",
            (Query(f"jouleprobe_gpu_utilization_ratio{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
            "percentunit", width=8,
        ),
        Panel(
            "GPU temperature", "Die temperature at the latest read.",
            (Query(f"jouleprobe_gpu_temperature_celsius{{{GPU}}}",
                   "{{instance}} GPU {{gpu}}"),),
            "celsius", width=8,
        ),
        Panel(
            "GPU memory used", "Memory in use over memory in total.",
            (Query(f"jouleprobe_gpu_memory_used_bytes{{{GPU}}}\n"
                   f"  / jouleprobe_gpu_memory_total_bytes{{{GPU}}}",
                   "{{instance}} GPU {{gpu}}"),),
            "percentunit", width=8,
        ),
        Panel(
            "Energy reading age",
            "Seconds since each GPU's latest energy reading; /healthz fails past "
            "agent.stale_after.",
            (Query(f"jouleprobe_gpu_sample_age_seconds{{{GPU}}}",
                   "{{instance}} GPU {{gpu}}"),),
            "s",
        ),
        Panel(
            "NVML errors and energy gaps",
            "Failed NVML calls per second by call and kind, and intervals whose energy is "
            "unknown (counter reset, implausible jump).",
            (
                Query(_or_zero(f"sum by (instance, call, kind) (rate("
                               f"jouleprobe_nvml_errors_total{{{GPU}}}[$__rate_interval]))",
                               "instance"),
                      "{{instance}} {{call}} {{kind}}"),
                Query(f"sum by (instance) (rate(jouleprobe_gpu_energy_gaps_total{{{GPU}}}"
                      f"[$__rate_interval]))", "{{instance}} gaps"),
            ),
            "ops",
        ),
    ),
)

MODEL_VIEW = Dashboard(
    uid="jouleprobe-model",
    title="jouleprobe / Model",
    description="What one request of each model costs in energy, at each boundary, and "
                "per token.",
    variables=(INSTANCE, MODEL_VAR),
    panels=(
        Panel(
            "Wh per request by component (5 m)",
            "Mean energy of one request: GPU above idle (gpu_dynamic), its share of GPU "
            "idle power (gpu_static), host CPU + DRAM (host), and the building's overhead "
            "(facility = IT × (PUE − 1)). Stacked, the facility boundary.",
            (Query(_per_request(
                f"instance_model_component:jouleprobe_request_energy_joules:rate5m{{{MODEL}}}",
                "component") + f" / {JOULES_PER_WH}", "{{model}} {{component}}"),),
            "watth", width=16, stack=True,
        ),
        Panel(
            "Wh per request at each boundary (5 m)",
            "gpu = gpu_dynamic + gpu_static; it = gpu + host; facility = it × PUE.",
            (Query(_per_request(
                f"instance_model_boundary:jouleprobe_request_energy_joules:rate5m{{{MODEL}}}",
                "boundary") + f" / {JOULES_PER_WH}", "{{model}} {{boundary}}"),),
            "watth", kind="stat", width=8, decimals=3,
        ),
        Panel(
            "IT energy per token, prompt vs completion (5 m)",
            "A model's IT energy over its prompt tokens, and over its completion tokens: "
            "two views of one energy, not a split of it.",
            (Query(f'sum by (model) (instance_model_boundary:jouleprobe_request_energy_joules'
                   f':rate5m{{{MODEL}, boundary="it"}})\n'
                   f"  / on (model) group_right ()\n"
                   f"(sum by (model, kind) (instance_model_kind:jouleprobe_request_tokens:rate5m"
                   f"{{{MODEL}}}) > 0)", "{{model}} per {{kind}} token"),),
            "joule",
        ),
        Panel(
            "Request rate (5 m)", "Requests whose energy became final, per second.",
            (Query(f"sum by (model) (instance_model:jouleprobe_requests:rate5m{{{MODEL}}})",
                   "{{model}}"),),
            "reqps",
        ),
        Panel(
            "IT energy per request, distribution",
            "How many requests fell in each IT-energy bucket (J), per second; exemplars "
            "carry request ids.",
            (Query(f"sum by (le) (rate(jouleprobe_request_it_energy_joules_bucket{{{MODEL}}}"
                   f"[$__rate_interval]))", "{{le}}"),),
            "short", kind="heatmap", width=16,
        ),
        Panel(
            "Token rate by kind (5 m)", "Prompt and completion tokens per second.",
            (Query(f"sum by (model, kind) (instance_model_kind:jouleprobe_request_tokens:rate5m"
                   f"{{{MODEL}}})", "{{model}} {{kind}}"),),
            "short", width=8,
        ),
        Panel(
            "Median and p90 IT energy per request",
            "From the histogram's buckets (interpolated within a bucket).",
            tuple(
                Query(f"histogram_quantile({q}, sum by (model, le) (rate("
                      f"jouleprobe_request_it_energy_joules_bucket{{{MODEL}}}[$__rate_interval])))",
                      f"{{{{model}}}} p{round(q * 100)}")
                for q in (0.5, 0.9)
            ),
            "joule", width=24,
        ),
    ),
)

FLEET_VIEW = Dashboard(
    uid="jouleprobe-fleet",
    title="jouleprobe / Fleet",
    description="The whole fleet: power, a year of energy at the current rate, its carbon "
                "and its cost. Set the grid's carbon intensity and the price of a kWh in "
                "the variables.",
    variables=(MODEL_VAR, CARBON, PRICE),
    panels=(
        Panel(
            "Fleet power (5 m)", "IT (GPUs + hosts) and facility (IT × each node's PUE).",
            (
                Query("job_boundary:jouleprobe_energy_joules:rate5m",
                      "{{job}} {{boundary}}"),
                Query("job:jouleprobe_gpu_energy_joules:rate5m", "{{job}} GPUs"),
            ),
            "watt", width=12,
        ),
        Panel(
            "Annual energy at the current rate",
            "Facility energy of a year (8760 h) at the last 5 m's power.",
            (Query(f'sum(job_boundary:jouleprobe_energy_joules:annualised_rate5m'
                   f'{{boundary="facility"}}) / {JOULES_PER_WH}', "facility"),),
            "watth", kind="stat", width=4, decimals=1,
        ),
        Panel(
            "Carbon a year",
            "Annual facility energy × the grid's carbon intensity (tonnes CO2e).",
            (Query(f'sum(job_boundary:jouleprobe_energy_joules:annualised_rate5m'
                   f'{{boundary="facility"}}) / {JOULES_PER_KWH} * $carbon_intensity / 1e6',
                   "t CO2e"),),
            "suffix: t CO2e", kind="stat", width=4, decimals=1,
        ),
        Panel(
            "Cost a year", "Annual facility energy × the price of a kWh.",
            (Query(f'sum(job_boundary:jouleprobe_energy_joules:annualised_rate5m'
                   f'{{boundary="facility"}}) / {JOULES_PER_KWH} * $price', "cost"),),
            "currencyUSD", kind="stat", width=4, decimals=0,
        ),
        Panel(
            "Query rate (5 m)", "Requests per second, whole fleet and per model.",
            (
                Query("job:jouleprobe_requests:rate5m", "{{job}}"),
                Query('job_model:jouleprobe_requests:rate5m{model=~"$model"}', "{{model}}"),
            ),
            "reqps",
        ),
        Panel(
            "Wh per request, facility boundary (5 m)",
            "Per model and for the whole fleet.",
            (
                Query(f'job_model_boundary:jouleprobe_request_energy_joules_per_request'
                      f':ratio_rate5m{{model=~"$model", boundary="facility"}} / {JOULES_PER_WH}',
                      "{{model}}"),
                Query(f'job_boundary:jouleprobe_request_energy_joules_per_request'
                      f':ratio_rate5m{{boundary="facility"}} / {JOULES_PER_WH}', "fleet"),
            ),
            "watth",
        ),
        Panel(
            "Carbon per request (5 m)", "Facility Wh per request × the grid's intensity.",
            (Query(f'job_model_boundary:jouleprobe_request_energy_joules_per_request'
                   f':ratio_rate5m{{model=~"$model", boundary="facility"}}'
                   f' / {JOULES_PER_KWH} * $carbon_intensity', "{{model}}"),),
            "suffix: g CO2e",
        ),
        Panel(
            "Unattributed share of GPU energy (5 m)", "Fleet-wide.",
            (Query("job:jouleprobe_gpu_unattributed_energy_joules:ratio_rate5m", "{{job}}"),),
            "percentunit",
        ),
        Panel(
            "GPUs measured",
            "GPUs in the fleet, and how many are simulated (not measurements).",
            (
                Query("sum(job:jouleprobe_gpus:count)", "GPUs"),
                Query("sum(job:jouleprobe_gpus_simulated:count) or vector(0)", "simulated"),
            ),
            "short", kind="stat", width=12, decimals=0,
        ),
        Panel(
            "IT energy per token (5 m)", "Per model: IT energy over all tokens.",
            (Query('job_model:jouleprobe_request_energy_joules_per_token:ratio_rate5m'
                   '{model=~"$model"}', "{{model}}"),),
            "joule",
        ),
        Panel(
            "GPU energy by namespace (kWh/day)",
            "GPU energy of each namespace's workloads over the last 24 h, all nodes "
            "together (increase(), so workloads that have since gone still count), and the "
            "energy of those 24 h that no workload owns. Stacked, the fleet's GPU energy of "
            "the day split so far.",
            (Query(_with_unattributed(
                _empty_as("sum by (namespace) (job_namespace:jouleprobe_workload_gpu_energy"
                          "_kilowatt_hours:increase1d)", "namespace", NO_NAMESPACE),
                "sum(instance:jouleprobe_workload_unattributed_gpu_energy_kilowatt_hours"
                ":increase1d)", "namespace"), "{{namespace}}"),),
            "kwatth", width=24, stack=True, decimals=2,
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (NODE_VIEW, MODEL_VIEW, FLEET_VIEW)


def _variable(variable: Variable) -> dict[str, Any]:
    if variable.kind == "textbox":
        current = {"text": variable.query, "value": variable.query}
        return {
            "name": variable.name, "label": variable.label, "type": "textbox",
            "description": variable.description, "query": variable.query,
            "current": current, "options": [current], "hide": 0,
        }
    return {
        "name": variable.name, "label": variable.label, "type": "query",
        "description": variable.description, "datasource": DATASOURCE,
        "query": {"query": variable.query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": variable.query, "refresh": 2, "sort": 3,
        "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "hide": 0,
    }


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource", "label": "Data source", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 30 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "showPoints": "never",
        }
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "none", "graphMode": "area", "textMode": "value_and_name"}
    elif panel.kind == "heatmap":
        options = {"calculate": False, "yAxis": {"unit": "joule"},
                   "cellValues": {"unit": "reqps"}, "color": {"scheme": "Oranges",
                                                              "mode": "scheme"},
                   "exemplars": {"color": "rgba(255,0,255,0.7)"}}
    else:
        raise ValueError(f"{panel.title}: unknown panel kind {panel.kind!r}")
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + index), "datasource": DATASOURCE, "expr": query.expr,
            "legendFormat": query.legend or "__auto", "range": True, "instant": False,
        }
        if panel.kind == "heatmap":
            target |= {"format": "heatmap", "exemplar": True}
        targets.append(target)
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options, "targets": targets,
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard's Grafana JSON model; panels fill rows of 24 columns left to right."""
    panels, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": ["jouleprobe", "energy", "gpu"], "editable": True, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [_datasource_variable(),
                                *(_variable(v) for v in dashboard.variables)]},
        "annotations": {"list": []}, "links": [
            {"title": "jouleprobe", "type": "dashboards", "tags": ["jouleprobe"],
             "asDropdown": True},
        ],
        "panels": panels,
    }


def dashboard_json(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def configmap_yaml() -> str:
    """The ConfigMap that Grafana's sidecar loads (label grafana_dashboard: "1"). Written
    by hand rather than by a YAML library: each dashboard is a literal block of its JSON."""
    lines = [
        "# Generated by deploy/grafana/generate.py from its dashboard description: edit that.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: jouleprobe-dashboards",
        "  labels:",
        "    app.kubernetes.io/name: jouleprobe",
        '    grafana_dashboard: "1"',
        "  annotations:",
        "    # Grafana's sidecar puts the dashboards in this folder (kube-prometheus-stack:",
        "    # sidecar.dashboards.folderAnnotation: grafana_folder).",
        "    grafana_folder: jouleprobe",
        "data:",
    ]
    for dashboard in DASHBOARDS:
        lines.append(f"  {dashboard.filename}: |")
        lines.extend(f"    {line}" if line else "" for line in
                     dashboard_json(dashboard).splitlines())
    return "\n".join(lines) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {HERE / d.filename: dashboard_json(d) for d in DASHBOARDS}
    files[CONFIGMAP] = configmap_yaml()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a committed file is not up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, content in outputs().items():
        if path.exists() and path.read_text() == content:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(content)
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{verb}: {path}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
