"""Listening sockets and the aiohttp sites on them, for every listener of the agent."""

from __future__ import annotations

import logging
import socket
from typing import Any

from aiohttp import web

from agent.config import parse_listen

log = logging.getLogger(__name__)


def bind(listen: str) -> socket.socket:
    """A listening socket for HOST:PORT; binding it ourselves tells us the port when it was 0."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def start_site(
    app: web.Application, listen: str | socket.socket, what: str, **runner_options: Any
) -> web.AppRunner:
    """`app` served on `listen`: HOST:PORT, or a socket already bound (whose port is
    known before the app is built)."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    sock = listen if isinstance(listen, socket.socket) else bind(listen)
    await web.SockSite(runner, sock).start()
    log.info("serving %s on http://%s:%d", what, *sock.getsockname()[:2])
    return runner
