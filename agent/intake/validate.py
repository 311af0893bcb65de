"""The rules that the ingest API and the proxy both apply to what clients send: which text
can become a label value, which numbers are token counts, and how many requests are handled
at once. Each `*_problem` check returns None for an acceptable value, else what is wrong
with it (the ingest API answers with that text; the proxy falls back to "unknown")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import hdrs, web

from agent.requests import MAX_TOKENS

UNKNOWN_MODEL = "unknown"
"""The model recorded where none is known: a proxied request whose body names none that
can be a label value, a scraped server without a model label whose /v1/models could not
be read."""
MAX_MODEL_LENGTH = 256
"""Longest model name accepted (it becomes a Prometheus label value)."""
BUSY_RETRY_AFTER_S = 1
"""Retry-After of a 503 for too many requests at once: a slot frees up within a second."""


def show(value: Any) -> str:
    """A client's value in an error message, cut short: it may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def label_text_problem(value: Any, limit: int) -> str | None:
    """What keeps `value` from being a label value (a model name, a request id): it must be
    a non-empty string of at most `limit` characters that UTF-8 can encode."""
    if type(value) is not str or not value or len(value) > limit:
        return f"expected a non-empty string of at most {limit} characters, got {show(value)}"
    if not value.isascii():
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no UTF-8 text can hold:
        # taken, it would fail every later write of the record store and every /metrics
        # render that carries it as a label.
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return f"not Unicode text: a lone surrogate at character {exc.start}"
    return None


def token_count_problem(value: Any) -> str | None:
    """What keeps `value` from being a token count: an int (not a bool) in [0, MAX_TOKENS]."""
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        return f"expected an integer in [0, 2**53], got {show(value)}"
    return None


class BusyLimit:
    """At most `max_concurrent` requests handled at once. One beyond is answered 503 with
    Retry-After at once (`answer`), unread, instead of waiting: what each request holds
    (its body, its buffers) times `max_concurrent` then bounds the memory a flood of
    connections can take."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self._in_flight = 0

    @property
    def full(self) -> bool:
        return self._in_flight >= self.max_concurrent

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Holds one of the `max_concurrent` places while the block runs."""
        self._in_flight += 1  # the event loop runs one handler at a time: no lock needed
        try:
            yield
        finally:
            self._in_flight -= 1

    @staticmethod
    def answer(body: dict[str, Any]) -> web.Response:
        """The 503 for a request beyond the limit, `body` as its JSON."""
        return web.json_response(body, status=503,
                                 headers={hdrs.RETRY_AFTER: str(BUSY_RETRY_AFTER_S)})
