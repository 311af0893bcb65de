"""The systemd unit and the container image of deploy/: what they run, as whom, and that they
agree with the agent (its console script, its default port, its configuration keys).

Docker cannot build here, so the Dockerfile is checked by reading it; `systemd-analyze
verify` checks the unit where systemd is installed.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from scripted import ROOT

from agent.config import Config, load, parse_listen

SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "jouleprobe.service"
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
DEFAULT_PORT = parse_listen(Config().agent.listen)[1]


def unit() -> configparser.RawConfigParser:
    """The unit's settings; a key set twice keeps its last value (enough for these checks)."""
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",),
                                          comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def console_script() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        (name,) = tomllib.load(f)["project"]["scripts"]
    return str(name)


def test_the_unit_runs_the_agent_hardened_as_its_own_user() -> None:
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == console_script() and command[1] == "run"
    assert command[command.index("--config") + 1] == "/etc/jouleprobe/jouleprobe.toml"
    assert service["User"] == service["Group"] == "jouleprobe"
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "StateDirectory": "jouleprobe", "Restart": "on-failure",
        "CapabilityBoundingSet": "", "DevicePolicy": "closed", "KillSignal": "SIGTERM",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert "ProtectProc" not in service, "gpus = \"auto\" reads other processes in /proc"
    assert "PrivateDevices" not in service, "NVML needs the NVIDIA device nodes"
    assert "nvidia" in service["DeviceAllow"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_the_units_environment_is_agent_configuration() -> None:
    variable, value = unit()["Service"]["Environment"].split("=", 1)
    config = load(environ={variable: value.replace("%S", "/var/lib")})
    assert config.records.path == "/var/lib/jouleprobe/jouleprobe.db"
    assert Path(config.records.path).parent.name == unit()["Service"]["StateDirectory"]


def test_the_user_and_the_rapl_group_are_the_units() -> None:
    (user_line,) = [line for line in (SYSTEMD / "jouleprobe.sysusers").read_text().splitlines()
                    if line and not line.startswith("#")]
    kind, name, _, *_ = shlex.split(user_line)
    assert (kind, name) == ("u", unit()["Service"]["User"])
    rapl = [line.split() for line in (SYSTEMD / "jouleprobe-rapl.conf").read_text().splitlines()
            if line and not line.startswith("#")]
    assert rapl and all(entry[0] == "z" and entry[1].endswith("/energy_uj") for entry in rapl)
    assert all(entry[2] == "0440" and entry[4] == name for entry in rapl)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    script = shutil.which(console_script()) or str(ROOT / ".venv" / "bin" / console_script())
    if not Path(script).exists():
        pytest.skip(f"the {console_script()} console script is not installed")
    # verify needs ExecStart to exist: point it at this checkout's installed script.
    local = tmp_path / UNIT.name
    local.write_text(UNIT.read_text().replace("/opt/jouleprobe/bin/jouleprobe", script))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr  # warnings name the file


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


def test_the_image_runs_the_console_script_as_a_non_root_user() -> None:
    stage = dict(_final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == [console_script()]
    assert json.loads(stage["CMD"])[0] == "run"
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", stage["USER"]), "a numeric, non-root user"
    assert stage["FROM"].startswith("python:3.11-slim")


def test_the_image_exposes_the_agents_port_and_checks_its_health() -> None:
    stage = _final_stage()
    exposed = [args for op, args in stage if op == "EXPOSE"]
    assert exposed == [str(DEFAULT_PORT)]
    (healthcheck,) = [args for op, args in stage if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{DEFAULT_PORT}/healthz" in healthcheck


def test_the_image_asks_the_nvidia_runtime_for_telemetry_only() -> None:
    env = " ".join(args for op, args in _final_stage() if op == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env.split()
    assert "NVIDIA_DRIVER_CAPABILITIES=utility" in env.split()
    records = re.search(r"JOULEPROBE_RECORDS_PATH=(\S+)", env)
    assert records is not None
    volumes = [args for op, args in _final_stage() if op == "VOLUME"]
    assert volumes == [str(Path(records[1]).parent)]


def test_the_image_copies_what_exists_and_what_the_ignore_file_sends() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    sent = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for op, args in _instructions():
        if op == "COPY" and "--from" not in args:
            copied |= set(args.split()[:-1])
    assert copied, "the build copies the sources"
    for path in copied:
        assert (ROOT / path).exists(), path
        assert path.rstrip("/") in sent, f"{path} is excluded from the build context"
    # The configuration the image starts with is a valid agent configuration.
    assert load(ROOT / "deploy" / "jouleprobe.toml", environ={}) is not None
