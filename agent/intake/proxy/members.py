"""Editing one JSON object's top-level members in its own bytes, so that everything the
edit does not touch stays byte for byte as the server wrote it (key order, spacing, number
spelling, escapes): re-serialising a parsed chunk would change all of these.
"""

from __future__ import annotations

import json
import re

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()

Span = tuple[str, int, int]
"""A member: its key, where its key's opening quote is, and where its value ends."""


def members(text: str) -> list[Span] | None:
    """The top-level members of the JSON object `text`, in order; None if `text` is not
    one object (with nothing after it but white space)."""
    try:
        return _members(text)
    except (ValueError, IndexError, RecursionError):
        return None


def _members(text: str) -> list[Span] | None:
    at = _SPACE.match(text).end()  # type: ignore[union-attr]
    if text[at] != "{":
        return None
    at = _skip(text, at + 1)
    found: list[Span] = []
    if text[at] == "}":
        return found if _skip(text, at + 1) == len(text) else None
    while True:
        if text[at] != '"':
            return None
        key, after = _DECODER.raw_decode(text, at)
        colon = _skip(text, after)
        if text[colon] != ":":
            return None
        _, end = _DECODER.raw_decode(text, _skip(text, colon + 1))
        found.append((key, at, end))
        at = _skip(text, end)
        if text[at] == "}":
            return found if _skip(text, at + 1) == len(text) else None
        if text[at] != ",":
            return None
        at = _skip(text, at + 1)


def _skip(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()  # type: ignore[union-attr]


def without(text: str, spans: list[Span], key: str) -> str:
    """`text` without its member `key` (and the comma that joined it to a neighbour)."""
    for index, (name, start, end) in enumerate(spans):
        if name != key:
            continue
        if index + 1 < len(spans):
            return text[:start] + text[spans[index + 1][1]:]
        if index:
            return text[:spans[index - 1][2]] + text[end:]
        return text[:start] + text[end:]  # the only member: "{}" remains
    return text


def appended(text: str, spans: list[Span], extra: list[str]) -> str:
    """`text` with the members `extra` (each `"key":value` as written) added at its end,
    joined by commas as a compact serialiser joins them."""
    if not extra:
        return text
    close = text.rindex("}")
    joined = ",".join(extra)
    return text[:close] + ("," if spans else "") + joined + text[close:]
