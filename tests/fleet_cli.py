"""`jouleprobe fleet` run in-process, as the fleet tests call it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.cli import main


def fleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `jouleprobe fleet ARGV`."""
    code = main(["fleet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fleet_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Its JSON output; the command must succeed."""
    code, out, err = fleet(capsys, *argv, "--format", "json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result
