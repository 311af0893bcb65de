"""Configuration: a TOML file, then `JOULEPROBE_<SECTION>_<KEY>` environment variables, then flags.

Every key is declared once, in the dataclasses below, with its type, default, check and
one line of documentation; the README's table is written from the same declarations
(`python -m agent.config` prints it). A wrong key or value stops the agent with a message
that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

from agent.units import pue_problem

ENV_PREFIX = "JOULEPROBE_"
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
Policy = Literal["equal", "tokens"]
"""How concurrent requests share an interval's energy (DESIGN: docs/design.md)."""
ScrapeKind = Literal["vllm", "sglang", "tgi", "triton", "llamacpp"]
SCRAPE_KINDS: tuple[ScrapeKind, ...] = get_args(ScrapeKind)
"""The servers a `[[scrape]]` table can read, named here for the config check (config is
below intake); `agent.intake.scrapers.kinds.KINDS` says how to read each."""


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not what was expected."""


Check = Callable[[Any], str | None]
"""Returns None when the value is acceptable, else what was expected."""


def _show(value: Any) -> str:
    """A value in a message: its repr, cut short. TOML integers have no size limit, and
    Python refuses the repr of one longer than 4300 digits."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def _positive(value: float) -> str | None:
    return None if value > 0 else "a number > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "a number >= 0"


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda value: None if value in choices else "one of " + ", ".join(choices)


def _host_port(value: str) -> str | None:
    """HOST:PORT with a port in 0..65535 ([::1]:PORT for IPv6)."""
    host, sep, port = value.rpartition(":")
    # isascii: str.isdigit() also holds for "²", which int() refuses.
    if sep and host and port.isascii() and port.isdigit() and int(port) <= 65535:
        return None
    return "HOST:PORT, e.g. 127.0.0.1:29400"


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


REQUIRED: Any = dataclasses.MISSING
"""Default of a key that has none: a table that lacks it is an error naming the key."""

GpuSpec = tuple[int | str, ...] | str
"""The GPUs a request source serves: indices and/or UUIDs, or "auto" (discovered)."""


def _gpu_spec(name: str, value: Any) -> GpuSpec:
    if value == "auto":
        return "auto"
    if isinstance(value, list) and value and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        or (isinstance(v, str) and v.strip()) for v in value
    ):
        return tuple(value)
    raise ConfigError(f'{name}: expected "auto" or a non-empty list of GPU indices or UUIDs, '
                      f"got {_show(value)}")


PrefillWeight = float | Literal["auto"]
"""A number >= 0, or "auto" (learned per GPU)."""


def _prefill_weight(name: str, value: Any) -> PrefillWeight:
    if value == "auto":
        return "auto"
    try:
        weight = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past 1e308
        weight = -1.0
    if 0 <= weight < math.inf:
        return weight
    raise ConfigError(f'{name}: expected "auto" or a finite number >= 0, got {_show(value)}')


def _url(value: str) -> str | None:
    return None if value.startswith(("http://", "https://")) else "an http:// or https:// URL"


def _key(default: Any, doc: str, check: Check | None = None) -> Any:
    if default is REQUIRED:
        return field(metadata={"doc": doc, "check": check})
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class AgentSection:
    listen: str = _key("0.0.0.0:29400", "metrics listener (/metrics, /healthz, /api/v1/...)",
                       _host_port)
    sample_interval: float = _key(0.1, "seconds between two reads of each GPU", _positive)
    stale_after: float = _key(5.0, "/healthz fails for a GPU with no energy reading this long (s)",
                              _positive)
    timeline_seconds: float = _key(600.0, "seconds of samples kept per GPU for attribution",
                                   _positive)
    log_level: LogLevel = _key("info", "debug, info, warning or error")
    simulate: str = _key("", "simulated GPUs, e.g. 2xH100 (demos and tests; labelled simulated)")


@dataclass(frozen=True)
class HostSection:
    rapl_path: str = _key("/sys/class/powercap", "where RAPL energy counters are read")
    idle_watts: float = _key(100.0, "host power at idle, for the estimate where RAPL is unreadable",
                             _positive)
    max_watts: float = _key(400.0, "host CPU+DRAM power at full load, for the same estimate",
                            _positive)


@dataclass(frozen=True)
class SiteSection:
    pue: float = _key(1.2, "power usage effectiveness of the site (facility energy / IT energy)",
                      pue_problem)


@dataclass(frozen=True)
class AttributionSection:
    policy: Policy = _key("tokens",
                                 "how concurrent requests share an interval: tokens or equal")
    prefill_weight: PrefillWeight = _key("auto", "weight of one prompt token against one "
                                         "completion token (tokens policy): auto measures it "
                                         "per GPU, or a number >= 0")
    idle_watts: float = _key(0.0, "GPU idle baseline in watts; 0 learns it from idle intervals",
                             _non_negative)
    settle: float = _key(2.0, "seconds an interval waits for late request reports before it "
                         "is shared", _non_negative)
    max_age: float = _key(300.0, "seconds after which a request never reported ended is "
                          "finalised with what is known", _positive)
    max_pending: int = _key(10000, "requests held open at most; beyond, new ones are refused",
                            _positive)


@dataclass(frozen=True)
class IngestSection:
    listen: str = _key("127.0.0.1:29401", "ingest API listener (POST /api/v1/events); off "
                       "loopback it needs token_file", _host_port)
    token_file: str = _key("", "file holding the bearer token that clients must send")
    max_body_bytes: int = _key(1048576, "largest request body accepted", _positive)
    max_concurrent: int = _key(32, "POSTs handled at once; more get 503 with Retry-After",
                               _positive)


@dataclass(frozen=True)
class OtlpSection:
    listen: str = _key("127.0.0.1:4318", "OTLP/HTTP trace receiver (POST /v1/traces), started "
                       "when a [[trace]] table exists; off loopback it needs token_file",
                       _host_port)
    grpc_listen: str = _key("127.0.0.1:4317", "OTLP/gRPC trace receiver (TraceService/Export, "
                            "vLLM's default protocol), started with the HTTP one; '' for none",
                            lambda v: None if v == "" else _host_port(v))
    token_file: str = _key("", "file holding the bearer token that exporters must send")
    max_body_bytes: int = _key(16777216, "largest export accepted, once decompressed",
                               _positive)
    max_concurrent: int = _key(16, "exports handled at once; more get 503 with Retry-After "
                               "(over gRPC, RESOURCE_EXHAUSTED)", _positive)


@dataclass(frozen=True)
class RecordsSection:
    path: str = _key("jouleprobe.db", "SQLite file of request records and scrape windows (WAL)")
    flush_interval: float = _key(1.0, "seconds between two batched writes", _positive)
    retention_days: float = _key(30.0, "records older than this are deleted", _positive)


KubernetesMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class WorkloadsSection:
    enabled: bool = _key(True, "split each GPU's energy among the workloads on it (pods, "
                         "containers, units, processes); false: the per-request view only")
    period: float = _key(1.0, "seconds between two reads of the GPUs' processes and their "
                         "utilisation", _positive)
    proc_root: str = _key("/proc", "the host's /proc, where each GPU process's cgroup is read "
                          "(in a container: the host's /proc mounted, e.g. /host/proc)")
    pod_resources: str = _key("auto", "the kubelet's pod-resources socket (which "
                                       "container holds which GPU): auto, '' for none, or a "
                                       "path")
    kubernetes: KubernetesMode = _key("auto", "list this node's pods from the API server (names "
                                      "of pods, annotated servers to scrape): auto (in a "
                                      "pod), on or off")
    refresh: float = _key(10.0, "seconds between two reads of the allocations and of the pod "
                          "list", _positive)
    gone_after: float = _key(300.0, "seconds after which a workload no longer seen is closed "
                             "in the records and leaves the metrics", _positive)
    max_series: int = _key(200, "workloads exported with series of their own; later ones "
                           "are summed under workload=\"other\"", _positive)
    record_period: float = _key(3600.0, "seconds of a long-running workload per record",
                                _positive)


@dataclass(frozen=True)
class ProxyTable:
    """One `[[proxy]]` table: an OpenAI-compatible reverse proxy in front of a server."""

    name: str = _key(REQUIRED, "name of the proxied server; requests' source is proxy:NAME")
    listen: str = _key(REQUIRED, "where clients connect, e.g. 127.0.0.1:8001", _host_port)
    upstream: str = _key(REQUIRED, "the server, e.g. http://127.0.0.1:8000", _url)
    gpus: GpuSpec = _key(REQUIRED, 'GPUs serving it: [0, 1], UUIDs, or "auto"')
    model: str = _key("", "model name to record instead of the one in each request body")
    timeout: float = _key(600.0, "seconds to wait for the upstream before answering 504",
                          _positive)
    max_concurrent: int = _key(1024, "requests handled at once; more get 503 with Retry-After",
                               _positive)
    workers: int = _key(1, "worker processes that serve it, on one port (0: inside the "
                        "agent's own process, where its work competes with the proxy's)",
                        _non_negative)


@dataclass(frozen=True)
class ScrapeTable:
    """One `[[scrape]]` table: an inference server's own Prometheus endpoint."""

    kind: ScrapeKind = _key(REQUIRED, f"{', '.join(SCRAPE_KINDS[:-1])} or {SCRAPE_KINDS[-1]}")
    url: str = _key(REQUIRED, "its metrics URL, e.g. http://127.0.0.1:8000/metrics", _url)
    gpus: GpuSpec = _key(REQUIRED, 'GPUs serving it: [0, 1], UUIDs, or "auto"')
    interval: float = _key(15.0, "seconds between two scrapes (one attribution window)",
                           _positive)
    trace: str = _key("", "the [[trace]] service of the same server: its windows then say "
                      "what share of its requests and tokens arrived as spans")


@dataclass(frozen=True)
class TraceTable:
    """One `[[trace]]` table: a server that exports its request spans to the receiver."""

    service: str = _key(REQUIRED, "the service.name of its spans' resource (OTEL_SERVICE_NAME); "
                        "requests' source is trace:SERVICE")
    gpus: GpuSpec = _key(REQUIRED, 'GPUs serving it: [0, 1], UUIDs, or "auto" (those of the '
                         "process its spans' resource names: vllm.process_id, process.pid)")
    model: str = _key("", "model name to record; by default the span's own, else the service")
    settle: float = _key(60.0, "seconds its GPUs' intervals wait for its spans (every GPU's, "
                         'with gpus = "auto"): a span comes after its request ends and the '
                         "exporter's batch delay (5 s), so this bounds its requests' length",
                         _non_negative)


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    host: HostSection = field(default_factory=HostSection)
    site: SiteSection = field(default_factory=SiteSection)
    attribution: AttributionSection = field(default_factory=AttributionSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    otlp: OtlpSection = field(default_factory=OtlpSection)
    records: RecordsSection = field(default_factory=RecordsSection)
    workloads: WorkloadsSection = field(default_factory=WorkloadsSection)
    proxy: tuple[ProxyTable, ...] = ()
    scrape: tuple[ScrapeTable, ...] = ()
    trace: tuple[TraceTable, ...] = ()


TABLES: dict[str, type] = {"proxy": ProxyTable, "scrape": ScrapeTable, "trace": TraceTable}
"""Arrays of tables (`[[proxy]]`): set in the file only, not by environment or flags."""


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
            if f.name not in TABLES}


_BOOLEANS = {"true": True, "false": False}


def _coerce(name: str, kind: type, value: Any) -> Any:
    """Checks `value` against the declared type; strings (env, flags) are parsed."""
    if isinstance(value, str) and kind is bool:
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"{name}: expected true or false, got {_show(value)}")
        value = _BOOLEANS[value.lower()]
    if isinstance(value, str) and kind is not str:
        try:
            value = {"float": float, "int": int}[kind.__name__](value)
        except (KeyError, ValueError):
            raise ConfigError(f"{name}: expected {kind.__name__}, got {_show(value)}") from None
    given = value
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {_show(value)}")
    if kind is float and isinstance(value, int):
        value = float(value) if abs(value) <= sys.float_info.max else math.inf
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {_show(value)}")
    if kind is float and not math.isfinite(cast(float, value)):
        # Every float key is a duration, a power or a ratio: inf and nan mean nothing there,
        # and would fail later, far from the key (int(inf) sizing the timelines).
        raise ConfigError(f"{name}: expected a finite number, got {_show(given)}")
    return value


_PARSERS: dict[object, Callable[[str, Any], Any]] = {
    GpuSpec: _gpu_spec, PrefillWeight: _prefill_weight,
}
"""Parsers of the key types that are not one plain type, keyed by the type itself."""


def _build(section_name: str, cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of the section or table `cls` from `values`, each parsed and checked as
    its field's declared type says: a plain str/float/int/bool, a Literal (one of its
    values), or a type in `_PARSERS`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{section_name}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {name!r} (known: {', '.join(sorted(fields))})")
        declared = types[key]
        parse = _PARSERS.get(declared)
        if parse is not None:
            kwargs[key] = parse(name, value)
            continue
        literal = get_origin(declared) is Literal
        kind = str if literal else declared
        value = _coerce(name, kind, value)
        check = _one_of(get_args(declared)) if literal else fields[key].metadata.get("check")
        expected = check(value) if check else None
        if expected:
            raise ConfigError(f"{name}: expected {expected}, got {_show(value)}")
        kwargs[key] = value
    missing = [f.name for f in fields.values() if f.default is REQUIRED and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{section_name}: missing key {missing[0]!r}")
    return cls(**kwargs)


def _tables(name: str, cls: type, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    return tuple(_build(f"{name}[{i}]", cls, table) for i, table in enumerate(value))


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Reads the file, applies the environment, then `overrides` ({"agent.listen": ...})."""
    layered: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    tables: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except ValueError as exc:
            # TOMLDecodeError; UnicodeDecodeError (TOML is UTF-8); and the ValueError that
            # tomllib lets out for an integer of more than 4300 digits.
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in document.items():
            if section in TABLES:
                tables[section] = _tables(section, TABLES[section], values)
                continue
            if section not in layered:
                known = ", ".join([*sorted(layered), *(f"[{t}]" for t in TABLES)])
                raise ConfigError(f"unknown section [{section}] (known: {known})")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a table [{section}], got {_show(values)}")
            layered[section].update(values)
    environ = os.environ if environ is None else environ
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        section, _, key = variable.removeprefix(ENV_PREFIX).lower().partition("_")
        if section not in layered or not key:
            raise ConfigError(f"environment variable {variable}: no such config key")
        layered[section][key] = value
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        layered[section][key] = value
    sections = _sections()
    built: dict[str, Any] = {name: _build(name, sections[name], layered[name]) for name in sections}
    return Config(**built, **tables)


def reference() -> str:
    """The documented keys as a Markdown table (for the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in [*_sections().items(), *((f"[[{t}]]", c) for t, c in TABLES.items())]:
        for f in dataclasses.fields(cls):
            default = "required" if f.default is REQUIRED else f"`{f.default!r}`"
            rows.append(f"| `{section}.{f.name}` | {default} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference())
