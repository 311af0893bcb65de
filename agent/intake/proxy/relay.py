"""Forwarding to the upstream: the pooled client session, the headers that pass, and bodies
streamed through in both directions.

Everything the proxy does not measure (other paths and methods, status codes, error bodies,
headers including `Authorization`) passes through untouched, streamed in both directions.
Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and those it names, `Keep-Alive`,
`Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`) are not forwarded, nor `Host`
(the upstream's is sent) or `Expect` (this hop has answered it). (aiohttp adds `Date` and
`Server` to an answer that lacks them, and `Content-Type: application/octet-stream` to one
with a body and no type.)

The client session does not decompress, so bodies pass byte for byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from agent.config import ProxyTable

POOL_SIZE = 1024
"""Upstream connections at most: far above 64 concurrent clients, below fd limits."""
KEEPALIVE_S = 4.0
"""Idle upstream connections are closed after this: below uvicorn's 5 s (vLLM, SGLang), so
that the proxy never sends a request on a connection the upstream is closing."""

_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Transfer-Encoding", "Upgrade",
))
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "expect"}
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp's client would add; the proxy sends only the client's."""


def default_session() -> aiohttp.ClientSession:
    """One pooled session per proxy: no decompression, no cookie jar (the proxy is shared by
    many clients: a cookie set for one must never reach another), no auto headers."""
    connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=0,
                                     keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )


class Upstream:
    """The server behind one proxy (`table.upstream`), reached through one session."""

    def __init__(self, table: ProxyTable) -> None:
        self.table = table
        self.base = table.upstream.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=table.timeout,
                                             sock_read=table.timeout)
        self.session: aiohttp.ClientSession | None = None
        """Set on the app's event loop when the app starts."""

    async def send(self, request: web.Request, headers: CIMultiDict[str],
                   body: bytes | AsyncIterator[bytes] | None) -> aiohttp.ClientResponse:
        """The upstream's answer to `request`, sent on with `headers` and `body`; raises
        UpstreamError where there is none."""
        assert self.session is not None, "the proxy app has not been started"
        url = URL(self.base + request.raw_path, encoded=True)
        try:
            return await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
                timeout=self.timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError.of(exc, self.table) from None


class UpstreamError(Exception):
    """The upstream could not be reached (502) or did not answer in time (504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @classmethod
    def of(cls, exc: BaseException, table: ProxyTable) -> UpstreamError:
        if isinstance(exc, TimeoutError):
            return cls(504, f"upstream {table.upstream} sent nothing for {table.timeout:g} s "
                            "(proxy timeout)")
        return cls(502, f"upstream {table.upstream} unreachable: {exc.__class__.__name__}: "
                        f"{exc}")

    def response(self) -> web.Response:
        kind = "upstream_timeout" if self.status == 504 else "upstream_unreachable"
        body = {"error": {"message": self.message, "type": kind, "param": None,
                          "code": self.status}}
        return web.json_response(body, status=self.status)


class _WholeAnswer(web.StreamResponse):
    """An answer of known length: its headers leave with its first bytes of body, in one
    send instead of two. (A stream's headers leave at once, as the upstream sent them.)"""

    _send_headers_immediately = False


def relayed(upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]) -> web.StreamResponse:
    """The response that passes the upstream's answer on to the client, with `headers`."""
    kind = _WholeAnswer if hdrs.CONTENT_LENGTH in headers else web.StreamResponse
    return kind(status=upstream.status, reason=upstream.reason, headers=headers)


def forward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """A client's request headers that go on to the upstream."""
    return _end_to_end(headers, _NOT_FORWARDED)


def backward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's answer headers that go back to the client."""
    return _end_to_end(headers, _HOP_BY_HOP)


def _end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    named = {name.strip().lower() for value in headers.getall(hdrs.CONNECTION, ())
             for name in value.split(",")}
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in drop and name.lower() not in named)


async def relay(prefix: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body that is sent upstream as it arrives: `prefix` (already read), then the rest."""
    if prefix:
        yield prefix
    async for chunk in content.iter_any():
        yield chunk


def abort(request: web.Request) -> None:
    """Cuts the client's connection, so that a truncated answer cannot pass for a whole one."""
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
