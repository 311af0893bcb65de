"""Decoding a compressed body within a bound, so that a small bomb cannot take the memory:
the proxy's copies of answers, the OTLP receiver's requests."""

from __future__ import annotations

import zlib

DECODABLE = frozenset(("gzip", "x-gzip", "deflate", "identity", ""))
"""Content codings `decoded` takes (the empty one is no Content-Encoding)."""


class TooLarge(ValueError):
    """The decoded body would exceed the bound."""


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from `encoding` (one of `DECODABLE`), at most `limit` bytes of it.

    Raises TooLarge past `limit`, ValueError for bytes that are not of that coding (or a
    coding not in `DECODABLE`)."""
    encoding = encoding.strip().lower()
    if encoding not in DECODABLE:
        raise ValueError(f"content coding {encoding!r} is not one of gzip, deflate, identity")
    if encoding in ("", "identity"):
        if len(body) > limit:
            raise TooLarge(f"larger than {limit} bytes")
        return body
    try:
        if encoding in ("gzip", "x-gzip"):
            return _inflate(body, zlib.MAX_WBITS | 16, limit)
        try:
            return _inflate(body, zlib.MAX_WBITS, limit)
        except zlib.error:  # servers send raw deflate as often as zlib-wrapped
            return _inflate(body, -zlib.MAX_WBITS, limit)
    except zlib.error as exc:
        raise ValueError(f"not valid {encoding} data: {exc}") from None


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, limit)
    if inflater.unconsumed_tail:
        raise TooLarge(f"larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise zlib.error("the compressed data ends early")
    return out
