"""`jouleprobe report --workloads`: the node's GPU energy by workload group, the rest
unattributed, from the workload stretches in the store (`agent.store.workloads`).

Every GPU joule the agent measured over the period is in one row: a group (`--by`:
workload, namespace, pod, kind or GPU) or `unattributed` (energy of a GPU on which no
process was seen). Rows sum to `measured` in all three formats. Then the node's energy
split into inference (the workloads that served requests) and other work (training, batch,
notebooks: those that served none), and, for the inference servers where they had their
GPUs to themselves, their requests' energy and the rest: their idle and overhead. Figures
are at the GPU boundary (the GPUs' own energy, idle included); the per-request view's host
and facility shares are not in it.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from typing import Any

from agent.report.model import iso_utc
from agent.report.render import FORMATS, SIMULATED_LINE
from agent.store import StoredWorkloads, WorkloadGroup
from agent.units import JOULES_PER_WH, flag_text

DEFINITION = (
    "GPU energy (the GPUs' own, idle included) of the stretches that ended in the period, "
    "by workload group; a GPU shared by several workloads is split: dynamic energy by SM "
    "utilisation, static by presence; a GPU the kubelet allocated goes whole to its "
    "container. unattributed: GPU energy while no process was on the GPU."
)
SPLIT_DEFINITION = (
    "inference: the workloads that served requests (they held a GPU alone, or were its only "
    "busy workload, while requests ran); other work: those that served none. Requests and "
    "idle and overhead: of the inference servers' energy while each had its GPU to itself "
    "(allocated, or alone on it), what the per-request view gave their requests, and the "
    "rest."
)
UNATTRIBUTED_ROW = "(unattributed)"
NO_NAMESPACE = "(none)"
"""The key of stretches outside any namespace (processes and units off Kubernetes)."""
_CSV_HEADER = ["by", "group", "kinds", "gpu_kwh", "share", "gpu_hours", "mean_w", "peak_w",
               "inference", "stretches", "simulated"]


def render_workloads(totals: StoredWorkloads, fmt: str, *, since: float | None) -> str:
    """The workload report in `fmt` (table, json or csv)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return json.dumps(to_json(totals, since=since), indent=2) + "\n"
    if fmt == "csv":
        return _csv(totals)
    return _table(totals, since=since)


def to_json(totals: StoredWorkloads, *, since: float | None) -> dict[str, Any]:
    return {
        "by": totals.by,
        "since": iso_utc(since) if since is not None else None,
        "start": _time(totals.start), "end": _time(totals.end),
        "simulated": totals.simulated,
        "definition": DEFINITION,
        "measured_gpu_j": totals.measured_j,
        "unattributed_gpu_j": totals.unattributed_j,
        "inference_gpu_j": totals.inference_j,
        "other_work_gpu_j": totals.other_j,
        "serving_alone_gpu_j": totals.serving_alone_j,
        "requests_gpu_j": totals.requests_j,
        "idle_and_overhead_gpu_j": totals.overhead_j,
        "groups": [
            {"group": group.key, "kinds": list(group.kinds), "gpu_j": group.energy_j,
             "share": _share(group.energy_j, totals), "gpu_seconds": group.gpu_seconds,
             "mean_w": group.mean_w, "peak_w": group.peak_w, "inference": group.inference,
             "stretches": group.stretches}
            for group in totals.groups
        ],
    }


def _table(totals: StoredWorkloads, *, since: float | None) -> str:
    lines = [SIMULATED_LINE] if totals.simulated else []
    period = (f"{_time(totals.start)} to {_time(totals.end)} (UTC)" if totals.start is not None
              else "no workload stretches in the store" + (
                  f" since {iso_utc(since)}" if since is not None else ""))
    lines += [f"GPU energy by {totals.by}: {period}", ""]
    header = f"{totals.by:<44} {'kinds':<14} {'GPU kWh':>10} {'share':>7} {'GPU h':>8} " \
             f"{'mean W':>7} {'peak W':>7}  inference"
    lines += [header, "-" * len(header)]
    for group in totals.groups:
        lines.append(_row(_label(group, totals.by), ",".join(group.kinds), group.energy_j,
                          _share(group.energy_j, totals), group.gpu_seconds, group.mean_w,
                          group.peak_w, "yes" if group.inference else "no"))
    lines.append(_row(UNATTRIBUTED_ROW, "", totals.unattributed_j,
                      _share(totals.unattributed_j, totals), None, None, None, ""))
    lines.append(_row("measured", "", totals.measured_j, 1.0 if totals.measured_j else None,
                      None, None, None, ""))
    lines += ["", "Inference versus other work (by workload, whatever --by):"]
    for name, depth, joules in _split(totals):
        label = "  " * depth + (name if depth else f"({name})")
        lines.append(f"  {label:<42} {joules / JOULES_PER_WH / 1000:>10.4f} kWh "
                     f"{_number(_share(joules, totals), '.1%'):>7}")
    lines += ["", textwrap.fill(f"Definition: {DEFINITION}", width=90),
              textwrap.fill(SPLIT_DEFINITION, width=90)]
    return "\n".join(lines) + "\n"


def _row(label: str, kinds: str, energy_j: float, share: float | None,
         gpu_seconds: float | None, mean_w: float | None, peak_w: float | None,
         inference: str) -> str:
    return (f"{label[:44]:<44} {kinds[:14]:<14} {energy_j / JOULES_PER_WH / 1000:>10.4f} "
            f"{_number(share, '.1%'):>7} {_number(_hours(gpu_seconds), '.2f'):>8} "
            f"{_number(mean_w, '.0f'):>7} {_number(peak_w, '.0f'):>7}  {inference}").rstrip()


def _csv(totals: StoredWorkloads) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, _CSV_HEADER, restval="", lineterminator="\n")
    writer.writeheader()
    simulated = flag_text(totals.simulated)
    for group in totals.groups:
        writer.writerow({
            "by": totals.by, "group": group.key, "kinds": ",".join(group.kinds),
            "gpu_kwh": group.energy_j / JOULES_PER_WH / 1000,
            "share": _share(group.energy_j, totals), "gpu_hours": group.gpu_seconds / 3600,
            "mean_w": group.mean_w, "peak_w": group.peak_w,
            "inference": flag_text(group.inference), "stretches": group.stretches,
            "simulated": simulated,
        })
    split = [(f"({name})", joules) for name, _, joules in _split(totals)
             if name != "unattributed"]
    for label, joules in ((UNATTRIBUTED_ROW, totals.unattributed_j),
                          ("measured", totals.measured_j), *split):
        writer.writerow({"by": totals.by, "group": label,
                         "gpu_kwh": joules / JOULES_PER_WH / 1000,
                         "share": _share(joules, totals), "simulated": simulated})
    return out.getvalue()


def _split(totals: StoredWorkloads) -> list[tuple[str, int, float]]:
    """The node's energy, (name, depth, joules): inference (and, where its servers had their
    GPUs to themselves, their requests' and the rest), other work, unattributed."""
    return [("inference", 0, totals.inference_j),
            ("with their GPU to themselves", 1, totals.serving_alone_j),
            ("their requests", 2, totals.requests_j),
            ("their idle and overhead", 2, totals.overhead_j),
            ("other work", 0, totals.other_j),
            ("unattributed", 0, totals.unattributed_j)]


def _label(group: WorkloadGroup, by: str) -> str:
    if by == "namespace" and not group.key:
        return NO_NAMESPACE
    return f"GPU {group.key}" if by == "gpu" else group.key


def _share(joules: float, totals: StoredWorkloads) -> float | None:
    return joules / totals.measured_j if totals.measured_j > 0 else None


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _time(epoch: float | None) -> str | None:
    return iso_utc(epoch) if epoch is not None else None
