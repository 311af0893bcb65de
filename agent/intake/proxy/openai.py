"""What the proxy reads of OpenAI requests and answers: the model of a request body, and the
token counts of a JSON answer or of a stream of server-sent events.

Content encoding. To read `usage`, a measured request asks the upstream only for codings
the proxy can decode with the standard library: a stream for `identity` (SSE is rarely
compressed, as compression would hold back tokens; the proxy needs to see, and sometimes
drop, events), a non-streaming answer for the client's own choice among gzip, deflate and
identity; a copy of that body (at most `MAX_PARSE_BYTES`) is decompressed for parsing only.

Bounds. A measured request body is parsed only up to `MAX_PARSE_BYTES`; a larger or
compressed one passes through unparsed (model from the table or "unknown", no usage asked
for). A stream is handled chunk by chunk, each passed on as it arrives and parsed on the
side; only while the usage chunk is to be dropped are events passed on whole, an event's
incomplete end waiting for the rest of its bytes. Either way at most one incomplete event
(`MAX_EVENT_BYTES`) is held, and its bytes are scanned once, however finely the upstream
cuts them. Prompts and completions are never logged or stored; only their sizes are
logged, at debug level.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp

from agent.intake.encoding import DECODABLE, decoded
from agent.intake.proxy.measurement import Measurement
from agent.intake.proxy.members import Span, appended, members, without
from agent.intake.validate import MAX_MODEL_LENGTH, UNKNOWN_MODEL, label_text_problem
from agent.requests import Sampling, sampling_of

log = logging.getLogger(__name__)

MAX_PARSE_BYTES = 16 * 2**20
"""Largest request or non-streaming response body parsed; larger ones pass unparsed."""
MAX_EVENT_BYTES = 2**20
"""Largest SSE event parsed; past it, the rest of the stream passes through unparsed."""

_EVENT_END = re.compile(rb"(?:\r\n|\r(?=[^\n])|\n)(?:\r\n|\r(?=[^\n])|\n)")
"""The blank line that ends an SSE event, whatever the line endings. A `\r` that ends the
bytes received so far may be the first half of a `\r\n`: it ends a line only once the
next byte is known."""
_LINE_END = re.compile(rb"\r\n|\r|\n")
_ONE_DATA_LINE = re.compile(rb"(?P<head>data: ?)(?P<data>[^\r\n]*)(?P<end>(?:\r\n|\r|\n){2})",
                            re.DOTALL)
_DECODER = json.JSONDecoder()


class EventStream:
    """Reads a stream of server-sent events as it passes: the first token, the counts,
    errors; with `rewrites` (the proxy asked for usage on the client's behalf), takes out
    of the stream what that request added, so that the client receives what the server
    sends unasked.

    What asking adds: the usage-only chunk at the end, which is dropped, but whose other
    members (llama.cpp moves its `timings` there from the finishing chunk) are put back on
    the chunk that finished the last choice, at its end, as the server writes them unasked;
    and a `usage` object on content chunks (Ollama's `/v1/completions` puts zeros on each),
    which is removed. A `"usage": null` stays: TGI writes it on every chunk, asked or not.
    So while rewriting, a chunk that finishes a choice is held until the next event shows
    whether a usage-only chunk follows. Edits are made in the event's own bytes
    (`agent.intake.proxy.members`); all else passes byte for byte.

    Without `rewrites`, every chunk is returned as received and parsed on the side. With
    it, the complete events of each chunk are returned (edited as above) and an incomplete
    last event waits for the rest of its bytes.

    An incomplete event is held in a growing buffer, and only the bytes that a chunk adds
    are searched for the event's end: an event that arrives in many small chunks costs its
    length once, not once per chunk (a 1 MiB event in 1 KiB chunks held the event loop
    for seconds when the whole of it was copied and searched again at each chunk).
    """

    __slots__ = ("_clock", "_held", "_measurement", "_parsing", "_tail", "rewrites")

    def __init__(self, rewrites: bool, measurement: Measurement,
                 clock: Callable[[], float]) -> None:
        self.rewrites = rewrites
        self._measurement = measurement
        self._clock = clock
        self._tail = bytearray()
        self._parsing = True
        self._held: _Held | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Takes a chunk from the upstream; returns the bytes to send on now."""
        if not self._parsing:
            return chunk
        held = len(self._tail)
        buffer: bytes | bytearray = chunk
        if held:
            self._tail += chunk
            buffer = self._tail
        position = 0
        kept: list[bytes] = []
        # The blank line that ends an event may have begun in the last 3 bytes held
        # ("\r\n\r", waiting to know whether "\n" follows); no earlier held byte can be
        # part of one.
        for match in _EVENT_END.finditer(buffer, max(held - 3, 0)):
            event = bytes(buffer[position:match.end()])
            position = match.end()
            self._read(event, kept)
        if held:
            del self._tail[:position]
        else:
            self._tail += chunk[position:]
        if len(self._tail) > MAX_EVENT_BYTES:
            log.warning("an SSE event exceeds %d bytes: the rest of the stream passes "
                        "through unparsed", MAX_EVENT_BYTES)
            self._parsing = False
            tail = self._take_tail()
            if not self.rewrites:
                return chunk
            self._release(kept)
            kept.append(tail)
        if not self.rewrites:
            return chunk
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def finish(self) -> bytes:
        """The end of the stream: what is held back, passed on as it is; but a usage-only
        event that only the end shows complete (its blank line a CR, which might have been
        the first half of a CRLF) is taken out like any other."""
        tail = self._take_tail()
        kept: list[bytes] = []
        if tail and self._parsing and tail.endswith((b"\r\r", b"\n\r")):
            self._read(tail, kept)
        elif tail:
            if self._parsing:
                self._observe(tail)  # an unfinished event: read, and passed on unchanged
            self._release(kept)
            kept.append(tail)
        self._release(kept)
        return b"".join(kept) if self.rewrites else b""

    def settle(self) -> None:
        """Nothing more will come (the stream ended, or was cut off)."""
        self._tail = bytearray()
        self._held = None

    def _take_tail(self) -> bytes:
        tail = bytes(self._tail)
        self._tail = bytearray()
        return tail

    def _release(self, kept: list[bytes]) -> None:
        if self._held is not None:
            kept.append(self._held.event)
            self._held = None

    def _read(self, event: bytes, kept: list[bytes]) -> None:
        """Reads one complete event; while rewriting, appends to `kept` what is to be sent
        on now."""
        chunk = self._observe(event)
        if not self.rewrites:
            return
        if chunk is None:
            self._release(kept)
            kept.append(event)
            return
        document, text = chunk
        choices = document.get("choices")
        if choices == [] and isinstance(document.get("usage"), dict):
            self._drop_usage_chunk(text, kept)
            return
        self._release(kept)
        if isinstance(choices, list) and choices and isinstance(document.get("usage"), dict):
            event = _edited(event, text, lambda t, spans: without(t, spans, "usage")) or event
        if _finishes(choices):
            self._held = _Held(event, frozenset(document))
        else:
            kept.append(event)

    def _observe(self, event: bytes) -> tuple[dict[str, Any], str] | None:
        """Takes what the event says into the measurement; returns its JSON object and
        that object's text, None where it holds none."""
        measurement = self._measurement
        if _is_error_event(event):
            measurement.error = True
        data = _event_data(event)
        if data == b"[DONE]":
            measurement.done = True
        chunk = None if data is None or data == b"[DONE]" else _chunk(data)
        if chunk is None:
            return None
        document = chunk[0]
        if "error" in document:
            measurement.error = True
        choices = document.get("choices")
        finishing = _finishes(choices)
        if not isinstance(choices, list) or not choices or finishing:
            measurement.take_usage(document.get("usage"))
        measurement.take_timings(document.get("timings"))
        measurement.done = measurement.done or finishing
        if isinstance(choices, list):
            carrying = sum(1 for choice in choices if _carries_token(choice))
            if carrying:
                measurement.saw_token(carrying, self._clock())
        return chunk

    def _drop_usage_chunk(self, text: str, kept: list[bytes]) -> None:
        """Drops the usage-only chunk; its members that the held finishing chunk lacks go
        onto that chunk's end."""
        held, self._held = self._held, None
        if held is None:
            return
        spans = members(text) or []
        extra = [text[start:end] for key, start, end in spans
                 if key != "usage" and key not in held.keys]
        if extra:
            held.event = _edited(held.event, None,
                                 lambda t, own: appended(t, own, extra)) or held.event
        kept.append(held.event)


class _Held:
    """A chunk that finished a choice, held until the next event is known."""

    __slots__ = ("event", "keys")

    def __init__(self, event: bytes, keys: frozenset[str]) -> None:
        self.event = event
        self.keys = keys


def _finishes(choices: Any) -> bool:
    """A chunk's choices finish one of them (the last chunk of that choice)."""
    return isinstance(choices, list) and any(
        isinstance(choice, dict) and choice.get("finish_reason") is not None
        for choice in choices)


def _chunk(data: bytes) -> tuple[dict[str, Any], str] | None:
    """The JSON object of an event's data, and its text; None where it is not one."""
    try:
        text = data.decode()  # SSE is UTF-8: json.loads would guess
        document = _DECODER.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return (document, text) if isinstance(document, dict) else None


def _is_error_event(event: bytes) -> bool:
    """An SSE event whose `event` field is `error` (as some servers name failures). Most
    events have no `event` field: they are not split into lines at all."""
    return b"event:" in event and any(line.startswith(b"event:") and line[6:].strip() == b"error"
                                      for line in _LINE_END.split(event))


def _edited(event: bytes, text: str | None,
            edit: Callable[[str, list[Span]], str]) -> bytes | None:
    """The event with its JSON object edited in place, where the event is one `data` line
    holding one object (the form every server sends); else None, and it passes as it is."""
    match = _ONE_DATA_LINE.fullmatch(event)
    if match is None:
        return None
    try:
        own = match["data"].decode() if text is None else text
    except UnicodeDecodeError:
        return None
    spans = members(own)
    if spans is None:
        return None
    return match["head"] + edit(own, spans).encode() + match["end"]


class BodyCopy:
    """A bounded copy of a non-streaming answer, decoded for parsing only."""

    __slots__ = ("_encoding", "_parts", "_size")

    def __init__(self, content_encoding: str) -> None:
        self._encoding = content_encoding.strip().lower()
        self._parts: list[bytes] | None = [] if self._encoding in DECODABLE else None
        self._size = 0

    def add(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > MAX_PARSE_BYTES:
            self._parts = None  # too large to parse: usage unknown
        else:
            self._parts.append(chunk)

    def document(self) -> dict[str, Any] | None:
        """The answer's JSON object, where it was one and small enough to parse."""
        if self._parts is None:
            return None
        body = b"".join(self._parts)
        self._parts = None
        try:
            return _json_object(decoded(body, self._encoding, MAX_PARSE_BYTES))
        except ValueError:  # TooLarge among them
            return None


async def read_request(content: aiohttp.StreamReader, content_encoding: str | None
                       ) -> tuple[bytes, bool, dict[str, Any] | None]:
    """The start of a request body (about `MAX_PARSE_BYTES` at most), whether that is the
    whole body, and the JSON object it holds where it is whole and not encoded."""
    prefix, whole = await _read_prefix(content, MAX_PARSE_BYTES)
    document = _json_object(prefix) if whole and not content_encoding else None
    return prefix, whole, document


def request_model(document: dict[str, Any] | None) -> str:
    """The body's `model` where it can be a label value, else `UNKNOWN_MODEL`."""
    model = None if document is None else document.get("model")
    if isinstance(model, str) and label_text_problem(model, MAX_MODEL_LENGTH) is None:
        return model
    return UNKNOWN_MODEL


def request_sampling(document: dict[str, Any] | None) -> Sampling | None:
    """The generation parameters of a request body: OpenAI's (`max_tokens`, or the newer
    `max_completion_tokens`; `temperature`, `top_p`, `n`) or Ollama's native `options`
    (`num_predict`, `temperature`, `top_p`). A value the server would refuse is left out:
    the proxy records what it sees and judges nothing."""
    if document is None:
        return None
    options = document.get("options")
    if isinstance(options, dict):  # Ollama's /api/chat and /api/generate
        return sampling_of({"max_tokens": options.get("num_predict"),
                            "temperature": options.get("temperature"),
                            "top_p": options.get("top_p")})
    limit = document.get("max_completion_tokens", document.get("max_tokens"))
    return sampling_of({"max_tokens": limit, "temperature": document.get("temperature"),
                        "top_p": document.get("top_p"), "n": document.get("n")})


def wants_no_usage(document: dict[str, Any]) -> bool:
    """A streaming request that plainly did not ask for usage: no `stream_options`, or
    `include_usage: false`. (What `{}` or a value of another type means depends on the
    server; such a request is passed as it is.)"""
    options = document.get("stream_options")
    return options is None or (
        isinstance(options, dict) and options.get("include_usage") is False)


def with_usage(document: dict[str, Any]) -> bytes:
    """The request body `document`, asking for `stream_options.include_usage`."""
    options = document.get("stream_options") or {}
    changed = {**document, "stream_options": {**options, "include_usage": True}}
    text = json.dumps(changed, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON can escape: escape it again
        return json.dumps(changed, separators=(",", ":")).encode()


def decodable(accept_encoding: str) -> str:
    """The client's Accept-Encoding, restricted to codings `BodyCopy` can decode."""
    items = [item for item in accept_encoding.split(",") if item.strip()]
    kept = [item for item in items
            if item.split(";", 1)[0].strip().lower() in DECODABLE]
    if len(kept) == len(items):
        return accept_encoding
    return ",".join(kept).strip() or "identity"


def _carries_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(
        delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        or delta.get("tool_calls")
    )


def _event_data(event: bytes) -> bytes | None:
    """The `data` of one SSE event (its data lines joined), or None if it has none."""
    if event.startswith(b"data: "):
        data = event[6:].rstrip(b"\r\n")
        if b"\n" not in data and b"\r" not in data:
            return data  # the usual event: one data line
    lines = [line[5:].removeprefix(b" ") for line in _LINE_END.split(event)
             if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return document if isinstance(document, dict) else None


async def _read_prefix(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to about `limit` bytes of a body, and whether that is the whole body."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False
