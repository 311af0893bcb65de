"""Property-based tests of the config loader: any file or environment gives a Config or a
ConfigError that names the key, never another exception.

Cases per run (max_examples, all with deadline=None): 1,500 single keys, 600 tables,
800 whole documents, 600 environments and 800 files of arbitrary bytes: 4,300.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.config import ENV_PREFIX, TABLES, Config, ConfigError, load

SECTIONS: dict[str, dict[str, str]] = {
    f.name: {key.name: str(key.type) for key in dataclasses.fields(f.default_factory)}
    for f in dataclasses.fields(Config) if f.name not in TABLES  # type: ignore[misc]
}
"""Every section's keys and their declared types ("str", "float", "GpuSpec", ...)."""
TABLE_KEYS = {name: {key.name: str(key.type) for key in dataclasses.fields(cls)}
              for name, cls in TABLES.items()}
VALID_TABLES = {
    "proxy": {"name": "vllm", "listen": "127.0.0.1:8001", "upstream": "http://127.0.0.1:8000",
              "gpus": [0]},
    "scrape": {"kind": "vllm", "url": "http://127.0.0.1:8000/metrics", "gpus": "auto"},
    "trace": {"service": "vllm-llama", "gpus": [0]},
}

# --- TOML values and their text ------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**30), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.datetimes(timezones=st.sampled_from([None, datetime.UTC])),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
plausible = {
    "str": st.sampled_from([
        "127.0.0.1:0", "0.0.0.0:29400", "[::1]:29401", "localhost:99999", ":80", "127.0.0.1:²",
        "http://127.0.0.1:8000", "ftp://x", "tokens", "equal", "debug", "loud", "vllm", "triton",
        "2xH100", "", "/tmp/x.db",
    ]),
    "float": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**20)
    | st.sampled_from([0, 0.0, 1, 1.0, 10**400, 1e-320]),
    "int": st.integers(-5, 2**70) | st.sampled_from([0, 1, 1.0, 10**400]),
    "GpuSpec": st.sampled_from(["auto", [0], [0, 1], ["GPU-abc"], [], [-1], [True], [" "], "0"]),
    "PrefillWeight": st.sampled_from(["auto", "heavy", 0, 0.02, -1, "1e999", 10**400, True])
    | st.floats(allow_nan=True, allow_infinity=True),
}


def quote(text: str) -> str:
    """A TOML basic string: JSON's escapes, plus DEL, which TOML wants escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml(value: Any) -> str:
    """`value` as TOML text (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0x{value:x}" if value > 10**4000 else str(value)  # Python's repr stops there
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else (
            "-inf" if value == -math.inf else repr(value))
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{quote(key)} = {toml(item)}" for key, item in value.items()) + "}"


def document(entries: dict[str, Any]) -> str:
    return "".join(f"{quote(key)} = {toml(value)}\n" for key, value in entries.items())


def named(message: str, name: str) -> bool:
    """The message names `name`, as is or as Python writes it between quotes."""
    return name in message or repr(name)[1:-1] in message


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config") / "jouleprobe.toml"


def load_text(path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> Config:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return load(path, environ=environ or {})


def expected(kind: str, value: Any) -> Any:
    """What the Config holds for an accepted `value` of a key declared `kind`."""
    if isinstance(value, list):
        return tuple(value)
    if kind in ("float", "PrefillWeight") and value != "auto":
        return float(value)
    return value


@st.composite
def entries(draw: st.DrawFn) -> tuple[str, str, str, Any]:
    """(section, key, declared type or "", value): a known key or not, a value of about the
    right type or anything at all."""
    section = draw(st.sampled_from(sorted(SECTIONS)))
    key = draw(st.sampled_from(sorted(SECTIONS[section])) | st.text(max_size=12))
    kind = SECTIONS[section].get(key, "")
    value = draw(plausible.get(kind, toml_values) | toml_values)
    return section, key, kind, value


@settings(max_examples=1500, deadline=None)
@given(entries())
@example(("agent", "sample_interval", "float", 10**400))
@example(("agent", "timeline_seconds", "float", math.inf))
@example(("attribution", "prefill_weight", "PrefillWeight", 10**400))
@example(("ingest", "listen", "str", "127.0.0.1:²"))
def test_one_key_is_taken_or_named(path: Path, entry: tuple[str, str, str, Any]) -> None:
    section, key, kind, value = entry
    try:
        config = load_text(path, document({section: {key: value}}))
    except ConfigError as exc:
        assert named(str(exc), f"{section}.{key}"), str(exc)
        return
    assert kind, f"unknown key {section}.{key} accepted"
    taken = getattr(getattr(config, section), key)
    assert taken == expected(kind, value)
    if isinstance(taken, float):
        assert math.isfinite(taken)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(TABLES)), st.data())
def test_a_table_key_is_taken_or_named(path: Path, table: str, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(TABLE_KEYS[table])) | st.text(max_size=8))
    kind = TABLE_KEYS[table].get(key, "")
    entry = dict(VALID_TABLES[table])
    if data.draw(st.integers(0, 5)) == 0:
        entry.pop(key, None)
    else:
        entry[key] = data.draw(plausible.get(kind, toml_values) | toml_values)
    text = document({table: [VALID_TABLES[table], entry]})
    try:
        config = load_text(path, text)
    except ConfigError as exc:
        message = str(exc)
        assert named(message, f"{table}[1].{key}") or message.startswith(
            f"{table}[1]: missing key {key!r}"), message
        return
    assert kind or key not in entry, f"unknown key {table}[1].{key} accepted"
    tables = getattr(config, table)
    assert len(tables) == 2
    if key in entry:
        assert getattr(tables[1], key) == expected(kind, entry[key])


def paths(value: Any, prefix: str = "") -> Iterator[str]:
    """Every section and dotted key of a document, as the loader would name them."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else key
            yield name
            yield from paths(item, name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, f"{prefix}[{index}]")


@settings(max_examples=800, deadline=None)
@given(st.dictionaries(
    st.sampled_from([*SECTIONS, *TABLES]) | st.text(max_size=6),
    st.dictionaries(st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys}))
                    | st.text(max_size=6), toml_values, max_size=4)
    | st.lists(st.dictionaries(st.text(max_size=6), toml_values, max_size=3), max_size=2)
    | toml_values,
    max_size=4,
))
def test_any_document_gives_a_config_or_names_what_is_wrong(
    path: Path, doc: dict[str, Any]
) -> None:
    try:
        load_text(path, document(doc))
    except ConfigError as exc:
        message = str(exc)
        assert any(named(message, name) for name in paths(doc)), message


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(
    st.builds(lambda section, key: f"{ENV_PREFIX}{section}_{key}".upper(),
              st.sampled_from([*SECTIONS, "proxy", "nope", ""]),
              st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys}))
              | st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", max_size=8)),
    st.text(max_size=12) | st.sampled_from(["1e999", "nan", "-1", "0", "1_0", "²", " 2 "]),
    max_size=3,
))
def test_any_environment_gives_a_config_or_names_the_variable(
    path: Path, environ: dict[str, str]
) -> None:
    try:
        config = load_text(path, "", environ)
    except ConfigError as exc:
        message = str(exc)
        assert any(
            named(message, variable)
            or named(message, variable.removeprefix(ENV_PREFIX).lower().replace("_", ".", 1))
            for variable in environ
        ), message
        return
    for variable, value in environ.items():
        section, _, key = variable.removeprefix(ENV_PREFIX).lower().partition("_")
        taken = getattr(getattr(config, section), key)
        if isinstance(taken, float):
            assert math.isfinite(taken) and taken == float(value)


@pytest.mark.parametrize(("text", "message"), [
    (b"\xff\xfe", "is not valid TOML: 'utf-8' codec can't decode"),
    (b"x = " + b"9" * 5000, "is not valid TOML: Exceeds the limit (4300 digits)"),
    (f"[agent]\nlisten = 0x{16**5000:x}".encode(), "agent.listen: expected str, got an integer"),
    (b"[agent]\nsample_interval = 1" + b"0" * 400, "agent.sample_interval: expected a finite"),
    (b"[agent]\ntimeline_seconds = inf", "agent.timeline_seconds: expected a finite number"),
    (b"[site]\npue = nan", "site.pue: expected a finite number"),
    (b"[attribution]\nprefill_weight = 1" + b"0" * 400, "attribution.prefill_weight: expected"),
    (b"[attribution]\nprefill_weight = inf", "attribution.prefill_weight: expected"),
    ('[ingest]\nlisten = "127.0.0.1:²"'.encode(), "ingest.listen: expected HOST:PORT"),
    (b"agent = 1", "agent: expected a table [agent], got 1"),
])
def test_what_fuzzing_found_is_a_config_error(path: Path, text: bytes, message: str) -> None:
    """Each of these raised something else than a ConfigError (UnicodeDecodeError,
    ValueError, OverflowError), or was accepted and failed later (inf), or named no key."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_text(path, text)


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=120) | st.binary(max_size=30).map(lambda b: b'[agent]\nlisten = "' + b))
@example(b"\xff\xfe")
@example(b"x = " + b"9" * 5000)
def test_any_bytes_give_a_config_or_a_config_error(path: Path, raw: bytes) -> None:
    try:
        load_text(path, raw)
    except ConfigError as exc:
        message = str(exc)
        try:
            doc = tomllib.loads(raw.decode())
        except ValueError:  # not UTF-8, not TOML, or an integer too long for Python
            assert message.startswith(f"config file {path} is not valid TOML: "), message
        else:
            assert any(named(message, name) for name in paths(doc)), message
