"""Who may report requests: the listeners that take reports (the ingest API, the OTLP
receiver) take them from local processes, or, off loopback, from holders of a bearer token.

Anyone who can report requests can skew every per-request figure of the node; on loopback
that is only local processes, which is the trust boundary of the node itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat

from aiohttp import web

from agent.config import parse_listen

log = logging.getLogger(__name__)


def load_token(path: str, key: str) -> str | None:
    """The bearer token held in `path` (surrounding whitespace removed); None for no path.
    `key` names the config key in messages.

    Raises ValueError if the file cannot be read or holds no token: an agent configured
    for a token must never fall back to running without one.
    """
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {key} {path}: {exc}") from None
    if not token:
        raise ValueError(f"{key} {path} is empty")
    if mode & stat.S_IROTH:
        log.warning("%s %s is readable by every user of this host", key, path)
    return token


def check_listen_access(listen: str, token: str | None, what: str, key: str) -> None:
    """Refuses a listener (`what`, configured by `key`) reachable from other hosts unless a
    bearer token protects it."""
    host, _ = parse_listen(listen)
    if token is None and not _loopback(host):
        raise ValueError(
            f"{what} on {listen} listens off loopback without a token_file: anyone who can "
            f"reach it could report requests; set {key} or listen on 127.0.0.1"
        )


def refused(request: web.Request, token: str | None, body: bytes, content_type: str
            ) -> web.Response | None:
    """The 401 answer (with `body`) when `token` is set and the request lacks it; else None."""
    if token is None:
        return None
    header = request.headers.get("Authorization", "")
    if bearer_matches(header, token):
        return None
    challenge = 'Bearer realm="jouleprobe"'
    if _bearer(header) is not None:
        challenge += ', error="invalid_token"'
    return web.Response(body=body, status=401, content_type=content_type,
                        headers={"WWW-Authenticate": challenge})


def bearer_matches(header: str, token: str) -> bool:
    """Whether the Authorization `header` (HTTP's, or gRPC's `authorization` metadata)
    carries `token` as a bearer token."""
    given = _bearer(header)
    # compare_digest takes the same time wherever the first difference lies.
    return given is not None and hmac.compare_digest(given, token.encode())


def _bearer(header: str) -> bytes | None:
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip().encode("utf-8", "replace")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: where it resolves to cannot be vouched for
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
