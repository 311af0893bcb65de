"""The servers that export their request spans to the agent (`[[trace]]` tables): each
known by its spans' `service.name`, with its GPUs (a list, or those of the process its
spans' resource names) and, optionally, its model."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from agent.devices.base import GpuInfo
from agent.intake.discovery import GpuResolver


@dataclass(frozen=True, slots=True)
class TraceSource:
    """One `[[trace]]` table: the server whose resource has this `service.name`."""

    service: str
    gpus: Callable[[Mapping[str, Any]], tuple[int, ...]]
    """The GPUs serving it, given its spans' resource attributes (`ProcessGpus` reads the
    process there); raises ValueError while they are not known (`StillResolving`: ask
    again shortly)."""
    model: str = ""
    """The model to record; by default the span's own, else the service name."""

    @property
    def name(self) -> str:
        """`Request.source` of its requests."""
        return f"trace:{self.service}"


def fixed(gpus: tuple[int, ...]) -> Callable[[Mapping[str, Any]], tuple[int, ...]]:
    """The GPUs of a trace source configured with a list: whatever its spans' resource."""
    return lambda _resource: gpus


PROCESS_ATTRIBUTES = ("vllm.process_id", "process.pid")
"""Resource attributes that name the exporting process: vLLM's (a string), OpenTelemetry's
semantic convention (an int)."""


class ProcessGpus:
    """`gpus = "auto"` for a trace source: the GPUs that NVML lists the process of the
    spans' resource (or its descendants: vLLM's workers) on, through the discovery that
    the proxy and the scrapers use (`GpuResolver`), one per process, refreshed in the
    background so that the event loop never waits for NVML."""

    MAX_PROCESSES = 256

    def __init__(self, gpus: Sequence[GpuInfo], nvml_module: ModuleType | None = None) -> None:
        self._gpus = list(gpus)
        self._nvml_module = nvml_module
        self._resolvers: OrderedDict[int, GpuResolver] = OrderedDict()

    def __call__(self, resource: Mapping[str, Any]) -> tuple[int, ...]:
        pid = _process(resource)
        if pid is None:
            raise ValueError("its resource names no process (vllm.process_id, process.pid) "
                             'for gpus = "auto": give the GPUs in its [[trace]] table')
        resolver = self._resolvers.get(pid)
        if resolver is None:
            resolver = GpuResolver("auto", self._gpus, None, self._nvml_module, wait_s=0.0,
                                   pid=pid)
            self._resolvers[pid] = resolver
            if len(self._resolvers) > self.MAX_PROCESSES:
                self._resolvers.popitem(last=False)
        return resolver.current()


def _process(resource: Mapping[str, Any]) -> int | None:
    for key in PROCESS_ATTRIBUTES:
        value = resource.get(key)
        if type(value) is int and value > 0:
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit() and value != "0":
            return int(value)
    return None
