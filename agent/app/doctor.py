"""`jouleprobe doctor`: what this node can measure, and why not, in plain words."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

from agent.app import annotated
from agent.app.workloads import readers
from agent.config import Config
from agent.devices.base import GpuInfo, ProcessSource, SourceUnavailable
from agent.devices.host import probe_rapl
from agent.devices.nvml import NvmlGpuReport, NvmlGpuSource, probe
from agent.intake.discovery import GpuResolver, local_port
from agent.intake.otlp import PodGpus
from agent.intake.scrapers.kinds import KINDS, describe
from agent.sim.gpus import SimulatedGpuSource, parse_spec
from agent.workloads.observer import Refreshed, WorkloadObserver

UNRESOLVED_HINTS = {
    "vanished": "not found under workloads.proc_root: in a container, mount the host's /proc "
                "(e.g. at /host/proc) and set workloads.proc_root to it, since NVML lists "
                "host PIDs",
    "no_permission": "their /proc files are not readable by the agent's user",
    "unreadable": "their cgroup files could not be read",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _gpu_lines(gpu: NvmlGpuReport) -> list[str]:
    limit = f"{gpu.power_limit_w:.0f} W" if gpu.power_limit_w else "unknown"
    lines = [
        f"  GPU {gpu.index}: {gpu.name or '?'} ({gpu.uuid or 'uuid unreadable'})",
        f"    energy counter (nvmlDeviceGetTotalEnergyConsumption): {_yes(gpu.energy_counter)}"
        f"  -> energy_source={gpu.energy_source}",
        f"    power: instant field {_yes(gpu.instant_field)}, average field "
        f"{_yes(gpu.average_field)}, nvmlDeviceGetPowerUsage {_yes(gpu.power_usage)}"
        f"  -> power_field={gpu.power_field}",
        f"    MIG enabled: {_yes(gpu.mig_enabled)}"
        + ("  (measured per physical board; instances are never summed)"
           if gpu.mig_enabled else ""),
        f"    module power (Grace Hopper CPU+GPU): {_yes(gpu.module_power)}",
        f"    power limit: {limit}",
    ]
    lines += [f"    note: {reason}" for reason in gpu.reasons]
    return lines


def _request_source_lines(config: Config, infos: list[GpuInfo]) -> list[str]:
    """Which GPUs each proxy and scraper serves, or why that cannot be told."""
    sources = [*((f"proxy {t.name}", t.upstream, t.gpus) for t in config.proxy),
               *((f"scrape {t.kind}", t.url, t.gpus) for t in config.scrape)]
    lines = ["Request sources:"] if sources else []
    for what, url, spec in sources:
        try:
            port = local_port(url) if spec == "auto" else None
            line = GpuResolver(spec, infos, port).describe()
        except ValueError as exc:
            line = f"cannot resolve its GPUs: {exc}"
        lines.append(f"  {what} ({url}): {line}")
    return lines


def _scrape_metric_lines(config: Config) -> list[str]:
    """Per scraped server, the metric families its windows are read from, and those that
    are missing or declared of another type (renamed by a version): named here, since the
    windows would only lack that quantity."""
    lines = []
    for table in config.scrape:
        try:
            with urllib.request.urlopen(table.url, timeout=5) as answer:
                found = describe(KINDS[table.kind], answer.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:  # the server's words say why (llama.cpp's
            # router: "model name is missing from the request")
            said = exc.read()[:200].decode("utf-8", "replace").strip()
            found = [f"cannot read its metrics: HTTP {exc.code}: {said}"]
        except (OSError, http.client.HTTPException, ValueError) as exc:
            found = [f"cannot read its metrics: {exc}"]
        lines.append(f"  scrape {table.kind} ({table.url}) reads:")
        lines += [f"    {line}" for line in found]
    return lines


def _reader_line(what: str, refreshed: Refreshed[object] | None, off: str | None,
                 found: str) -> str:
    if refreshed is None:
        return f"  {what}: not read ({off})"
    if refreshed.get() is None:
        return f"  {what}: cannot be read: {refreshed.detail}"
    return f"  {what}: {found}"


def _workload_lines(config: Config, source: ProcessSource | None,
                    infos: list[GpuInfo]) -> list[str]:
    """Who is on each GPU, as the workload view would see it now, or why it cannot."""
    if not config.workloads.enabled:
        return ["Workloads: off (workloads.enabled = false)"]
    try:
        found = readers(config.workloads)
    except ValueError as exc:
        return [f"Workloads: cannot start: {exc}"]
    lines = ["Workloads (who owns each GPU's energy):"]
    allocations = found.allocations.get() if found.allocations else None
    held = sorted(f"{d.device} -> " + ", ".join(f"{h.namespace}/{h.pod}/{h.container}"
                                               for h in d.holders)
                  for d in (allocations or {}).values())
    lines.append(_reader_line("kubelet allocations (pod-resources)", found.allocations,
                              found.off.get("allocations"),
                              f"{len(held)} device(s) allocated" + "".join(
                                  f"\n    {line}" for line in held)))
    pods = found.pods.get() if found.pods else None
    lines.append(_reader_line("pod list (API server)", found.pods, found.off.get("pod_names"),
                              f"{len(pods.pods) if pods else 0} pod(s) on node "
                              f"{pods.node if pods else '?'}"))
    if found.pods is not None:  # as the daemon would scrape them now
        targets = annotated.plan(pods, PodGpus(infos, found.pods, found.allocations),
                                 traces={table.service for table in config.trace})
        lines += [f"  {line}" for line in annotated.describe(targets)]
    if source is None:
        lines.append("  processes: not listed (no GPU source)")
        return lines
    observer = WorkloadObserver(source, infos, history_s=1.0,
                                proc_root=config.workloads.proc_root,
                                allocations=found.allocations, pod_names=found.pods)
    observer.observe()
    status = observer.status()
    lines.append(f"  processes on the GPUs: {status.processes}, in "
                 f"{len(status.workloads)} workload(s)")
    lines += [f"    {name.workload} ({name.kind})" for name in status.workloads]
    for reason, count in sorted(status.unresolved.items()):
        lines.append(f"  {count} process(es) unresolved, {reason}: {UNRESOLVED_HINTS[reason]}")
    if status.no_utilization:
        lines.append(f"  GPU(s) {', '.join(map(str, status.no_utilization))}: per-process "
                     "utilisation unreadable (MIG mode, or unsupported): a shared GPU's "
                     "dynamic energy stays unattributed")
    return lines


def report(config: Config) -> tuple[str, bool]:
    """The doctor's text, and whether the GPUs can be measured."""
    lines = []
    if config.agent.simulate:
        models = parse_spec(config.agent.simulate)
        lines.append(f"GPUs: SIMULATED ({config.agent.simulate}); nothing here is measured")
        lines += [f"  GPU {i}: {m.nvml_name} (simulated), idle {m.idle_w:.0f} W, "
                  f"limit {m.tdp_w:.0f} W" for i, m in enumerate(models)]
        simulated = SimulatedGpuSource(models)
        infos = simulated.gpus()
        process_source: ProcessSource | None = (
            simulated if isinstance(simulated, ProcessSource) else None)
        gpus_ok = True
    else:
        nvml = probe()
        if not nvml.available:
            lines.append(f"GPUs: cannot be measured: {nvml.reason}")
        else:
            lines.append(f"GPUs: NVIDIA driver {nvml.driver_version}, NVML {nvml.nvml_version}")
            for gpu in nvml.gpus:
                lines += _gpu_lines(gpu)
        gpus_ok = nvml.available and bool(nvml.gpus)
        infos = [GpuInfo(g.index, g.uuid or "", g.name or "", g.energy_source, g.power_field)
                 for g in nvml.gpus]
        process_source = None
        if gpus_ok:
            try:
                process_source = NvmlGpuSource.open()
                infos = process_source.gpus()
            except SourceUnavailable as exc:
                lines.append(f"  processes cannot be listed: {exc}")
    lines += _request_source_lines(config, infos)
    lines += _scrape_metric_lines(config)
    lines += _workload_lines(config, process_source, infos)
    if isinstance(process_source, NvmlGpuSource):
        process_source.close()
    rapl = probe_rapl(config.host.rapl_path)
    if rapl.readable:
        lines.append(f"Host: RAPL readable at {rapl.root}: {', '.join(rapl.domains)}")
    else:
        lines.append(f"Host: RAPL not usable ({rapl.reason}); host energy will be ESTIMATED "
                     f"from CPU utilisation between {config.host.idle_watts:.0f} W and "
                     f"{config.host.max_watts:.0f} W (host.idle_watts, host.max_watts)")
    return "\n".join(lines), gpus_ok


def doctor(config: Config) -> int:
    text, gpus_ok = report(config)
    print(text)
    return 0 if gpus_ok else 1
