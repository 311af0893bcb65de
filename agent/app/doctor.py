"""`jouleprobe doctor`: what this node can measure, and why not, in plain words."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

from agent.config import Config
from agent.devices.base import GpuInfo
from agent.devices.host import probe_rapl
from agent.devices.nvml import NvmlGpuReport, probe
from agent.intake.discovery import GpuResolver, local_port
from agent.intake.scrapers.kinds import KINDS, describe
from agent.sim.gpus import SimulatedGpuSource, parse_spec


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


def report(config: Config) -> tuple[str, bool]:
    """The doctor's text, and whether the GPUs can be measured."""
    lines = []
    if config.agent.simulate:
        models = parse_spec(config.agent.simulate)
        lines.append(f"GPUs: SIMULATED ({config.agent.simulate}); nothing here is measured")
        lines += [f"  GPU {i}: {m.nvml_name} (simulated), idle {m.idle_w:.0f} W, "
                  f"limit {m.tdp_w:.0f} W" for i, m in enumerate(models)]
        infos = SimulatedGpuSource(models).gpus()
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
    lines += _request_source_lines(config, infos)
    lines += _scrape_metric_lines(config)
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
