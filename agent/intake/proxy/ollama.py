"""What the proxy reads of Ollama's native API (`/api/chat`, `/api/generate`): its
answers stream as NDJSON (`application/x-ndjson`, one JSON object per line; `stream`
defaults to true), the last object `done: true` with the server's counts and durations
(`Measurement.take_ollama`). A failure after the answer has begun is one more line,
`{"error": "..."}`, in the 200 answer.

The proxy never changes these answers: it reads each line as it passes, holding at most
one incomplete line (`MAX_EVENT_BYTES`); past that, the rest passes unread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from agent.intake.proxy import openai
from agent.intake.proxy.measurement import Measurement

log = logging.getLogger(__name__)

NATIVE_SUFFIXES = ("/api/chat", "/api/generate")
NDJSON = "application/x-ndjson"
_DECODER = json.JSONDecoder()


class LineStream:
    """Reads an NDJSON answer as it passes into `measurement`; never changes it."""

    __slots__ = ("_clock", "_measurement", "_parsing", "_tail")

    rewrites = False

    def __init__(self, measurement: Measurement, clock: Callable[[], float]) -> None:
        self._measurement = measurement
        self._clock = clock
        self._tail = bytearray()
        self._parsing = True

    def feed(self, chunk: bytes) -> bytes:
        """Takes a chunk from the upstream; returns it, to be sent on unchanged."""
        if not self._parsing:
            return chunk
        start = len(self._tail)
        self._tail += chunk
        # Only the bytes this chunk added can hold a new line end.
        end = self._tail.rfind(b"\n", start)
        if end >= 0:
            for line in bytes(self._tail[:end]).split(b"\n"):
                self._read(line)
            del self._tail[:end + 1]
        if len(self._tail) > openai.MAX_EVENT_BYTES:
            log.warning("an NDJSON line exceeds %d bytes: the rest of the answer passes "
                        "through unread", openai.MAX_EVENT_BYTES)
            self._parsing = False
            self._tail = bytearray()
        return chunk

    def finish(self) -> bytes:
        """The end of the answer: a last line without its line end is read too."""
        if self._parsing and self._tail:
            self._read(bytes(self._tail))
        self._tail = bytearray()
        return b""

    def settle(self) -> None:
        self._tail = bytearray()

    def _read(self, line: bytes) -> None:
        document = _object(line)
        if document is None:
            return
        measurement = self._measurement
        if "error" in document:
            measurement.error = True
        if _carries_token(document):
            measurement.saw_token(1, self._clock())
        if document.get("done") is True:
            measurement.take_ollama(document)


def _object(line: bytes) -> dict[str, Any] | None:
    try:
        document = _DECODER.decode(line.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return document if isinstance(document, dict) else None


def _carries_token(document: dict[str, Any]) -> bool:
    """A line of generated text: `/api/generate`'s `response` or `thinking`, `/api/chat`'s
    `message.content`, `message.thinking` or `message.tool_calls`."""
    if document.get("response") or document.get("thinking"):
        return True
    message = document.get("message")
    return isinstance(message, dict) and bool(
        message.get("content") or message.get("thinking") or message.get("tool_calls"))
