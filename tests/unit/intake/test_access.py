"""Who may report requests: loopback, or the holders of a bearer token."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.intake.access import check_listen_access, load_token


@pytest.mark.parametrize("listen", [
    "127.0.0.1:29401", "127.8.9.10:1", "[::1]:29401", "localhost:29401",
    "[::ffff:127.0.0.1]:29401",
])
def test_loopback_listeners_need_no_token(listen: str) -> None:
    check_listen_access(listen, None, "the ingest API", "ingest.token_file")


@pytest.mark.parametrize("listen", ["0.0.0.0:29401", "[::]:29401", "10.0.0.5:29401",
                                    "node7.example:29401", ":29401"])
def test_listeners_off_loopback_need_a_token(listen: str) -> None:
    with pytest.raises(ValueError, match="listens off loopback without a token_file"):
        check_listen_access(listen, None, "the ingest API", "ingest.token_file")
    check_listen_access(listen, "a-token", "the ingest API", "ingest.token_file")


def test_load_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    assert load_token(str(path), "ingest.token_file") == "s3cret"
    assert load_token("", "ingest.token_file") is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_token(str(path), "ingest.token_file")
    with pytest.raises(ValueError, match="cannot read"):
        load_token(str(tmp_path / "missing"), "ingest.token_file")
