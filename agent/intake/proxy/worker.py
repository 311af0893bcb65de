"""A proxy's worker process: `python -m agent.intake.proxy.worker SPEC`, started and
supervised by the agent (`agent.app.proxies`), never by hand.

SPEC is a JSON object: `table` (the `[[proxy]]` table's keys), `socket` (the agent's
channel, `channel.ProxyChannel`), `fd` (the listening socket, inherited: every worker of a
proxy accepts on the one socket the agent bound), `log_level`. The worker serves
`proxy_app` with its requests going to the channel, on uvloop. On
SIGTERM (or SIGINT, or once the agent is gone) it stops accepting, lets the requests in
flight finish for up to `SHUTDOWN_S`, sends its last events, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import uvloop
from aiohttp import web

from agent.config import ProxyTable
from agent.intake.proxy.app import PROXY_STATS, RUNNER_OPTIONS, proxy_app
from agent.intake.proxy.channel import ChannelSink

log = logging.getLogger(__name__)

SHUTDOWN_S = 30.0
"""Seconds the requests in flight get to finish once the worker is told to stop."""
PARENT_CHECK_S = 1.0
LAST_EVENTS_S = 5.0
FIRST_ANSWER_S = 5.0
"""Seconds a worker waits for the agent's first answer before it serves."""


async def serve(table: ProxyTable, socket_path: str, fd: int) -> None:
    sink = ChannelSink(socket_path, table.name, str(os.getpid()))
    app = proxy_app(table, sink, sink.gpus, max_concurrent=table.max_concurrent)
    sink.stats = app[PROXY_STATS]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S, **RUNNER_OPTIONS)
    await runner.setup()
    sender = asyncio.create_task(sink.run())
    # Clients wait in the socket's backlog meanwhile: none is refused for want of GPUs.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sink.answered(), FIRST_ANSWER_S)
    await web.SockSite(runner, socket.socket(fileno=fd)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
    await runner.cleanup()
    sink.close()
    try:
        await asyncio.wait_for(sender, LAST_EVENTS_S)
    except TimeoutError:
        log.warning("proxy %s worker: the agent did not take its last events", table.name)


def _table(fields: dict[str, Any]) -> ProxyTable:
    gpus = fields["gpus"]
    return ProxyTable(**{**fields, "gpus": gpus if isinstance(gpus, str) else tuple(gpus)})


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    logging.basicConfig(level=spec["log_level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s proxy worker %(process)d: "
                               "%(message)s")
    uvloop.run(serve(_table(spec["table"]), spec["socket"], spec["fd"]))


if __name__ == "__main__":
    main(sys.argv)
