"""Configuration: a TOML file, then `JOULEPROBE_<SECTION>_<KEY>` environment variables, then flags.

Every key is declared once, in the dataclasses below, with its type, default, check and
one line of documentation; the README's table is written from the same declarations
(`python -m agent.config` prints it). A wrong key or value stops the agent with a message
that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "JOULEPROBE_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not what was expected."""


Check = Callable[[Any], str | None]
"""Returns None when the value is acceptable, else what was expected."""


def _positive(value: float) -> str | None:
    return None if value > 0 else "a number > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "a number >= 0"


def _at_least_one(value: float) -> str | None:
    return None if value >= 1 else "a number >= 1"


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else "one of " + ", ".join(choices)


def _host_port(value: str) -> str | None:
    """HOST:PORT with a port in 0..65535 ([::1]:PORT for IPv6)."""
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit() and int(port) <= 65535:
        return None
    return "HOST:PORT, e.g. 127.0.0.1:29400"


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _key(default: Any, doc: str, check: Check | None = None) -> Any:
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
    log_level: str = _key("info", "debug, info, warning or error", _one_of(*LOG_LEVELS))
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
                      _at_least_one)


@dataclass(frozen=True)
class AttributionSection:
    policy: str = _key("tokens", "how concurrent requests share an interval: tokens or equal",
                       _one_of("tokens", "equal"))
    prefill_weight: float = _key(1.0, "weight of one prompt token against one completion token "
                                 "(tokens policy)", _positive)
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


@dataclass(frozen=True)
class RecordsSection:
    path: str = _key("jouleprobe.db", "SQLite file of per-request records (WAL)")
    flush_interval: float = _key(1.0, "seconds between two batched writes", _positive)
    retention_days: float = _key(30.0, "records older than this are deleted", _positive)


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    host: HostSection = field(default_factory=HostSection)
    site: SiteSection = field(default_factory=SiteSection)
    attribution: AttributionSection = field(default_factory=AttributionSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    records: RecordsSection = field(default_factory=RecordsSection)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _coerce(name: str, kind: type, value: Any) -> Any:
    """Checks `value` against the declared type; strings (env, flags) are parsed."""
    if isinstance(value, str) and kind is not str:
        try:
            value = {"float": float, "int": int}[kind.__name__](value)
        except (KeyError, ValueError):
            raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _build(section_name: str, cls: type, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{section_name}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {name!r} (known: {', '.join(sorted(fields))})")
        kind = {"str": str, "float": float, "int": int, "bool": bool}[str(fields[key].type)]
        value = _coerce(name, kind, value)
        check = fields[key].metadata.get("check")
        expected = check(value) if check else None
        if expected:
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Reads the file, applies the environment, then `overrides` ({"agent.listen": ...})."""
    layered: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in document.items():
            if section not in layered or not isinstance(values, dict):
                raise ConfigError(
                    f"unknown section [{section}] (known: {', '.join(sorted(layered))})"
                )
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
    return Config(**{name: _build(name, sections[name], layered[name]) for name in sections})


def reference() -> str:
    """The documented keys as a Markdown table (for the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            rows.append(f"| `{section}.{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference())
