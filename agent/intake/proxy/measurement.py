"""One measured request while it runs: what its answer says of its tokens and of the
server's own timing, whatever the server's dialect.

What servers report, and where:
- OpenAI `usage` (`prompt_tokens`, `completion_tokens`): a non-streamed body, the
  usage-only chunk of a stream (empty `choices`), or a chunk that finishes a choice. A
  `usage` on a content chunk is not final (Ollama's `/v1/completions` puts zeros on every
  one) and is not taken.
- llama.cpp `timings`, on the finish chunk unasked and on any whole answer: `prompt_n`
  (tokens evaluated) + `cache_n` (tokens taken from the prompt cache) = the prompt,
  `predicted_n` = the completion; `prompt_ms` + `predicted_ms` the time the server spent.
- Ollama's native API (`/api/chat`, `/api/generate`), on its final object (`done: true`):
  `prompt_eval_count`, `eval_count`, and `load_duration` + `prompt_eval_duration` +
  `eval_duration` in nanoseconds. Each is left out when zero (Go's `omitempty`): a prompt
  taken whole from the cache has no `prompt_eval_count`.

Counts, best first: `usage`; the server's other figures (`timings`, Ollama's); else the
content chunks counted, an estimate (one chunk may carry several tokens) that the record
marks as such.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from agent.intake.validate import token_count_problem

Counts = tuple[int | None, int | None]
"""(prompt tokens, completion tokens)."""

_OLLAMA_DURATIONS = ("load_duration", "prompt_eval_duration", "eval_duration")
"""Ollama's durations of the server's work on a request (total_duration also holds the
time the request waited for a runner)."""


class Measurement:
    """What the answer to one request has said so far."""

    __slots__ = ("_reported", "_spent_s", "_usage", "accepted", "completion_chunks", "done",
                 "error", "first_token", "id", "start")

    def __init__(self, request_id: str, start: float) -> None:
        self.id = request_id
        self.start = start
        self.accepted = False
        self.first_token: float | None = None
        self.completion_chunks = 0
        """Content-carrying choices seen (a token each at least)."""
        self.error = False
        """The answer reported an error in its body (an `error` event in a 200 stream)."""
        self.done = False
        """The stream reached its end: `[DONE]`, a choice's finish_reason, Ollama's
        `done: true`."""
        self._usage: Counts | None = None
        self._reported: tuple[int, int] | None = None
        self._spent_s: float | None = None

    def take_usage(self, usage: Any) -> None:
        """Takes a final OpenAI `usage` object."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _count(prompt):
            # Embeddings have no completion tokens; their usage says only prompt and total.
            self._usage = (prompt, completion if _count(completion) else 0)
        elif _count(completion):
            self._usage = (None, completion)

    def take_timings(self, timings: Any) -> None:
        """Takes llama.cpp's `timings` object."""
        if not isinstance(timings, dict):
            return
        prompt, cached, predicted = (timings.get(name) for name in
                                     ("prompt_n", "cache_n", "predicted_n"))
        cached = 0 if cached is None else cached  # older builds have no prompt cache
        if _count(prompt) and _count(cached) and _count(predicted) and _count(prompt + cached):
            self._reported = (prompt + cached, predicted)
        spent: list[Any] = [timings.get(name) for name in ("prompt_ms", "predicted_ms")]
        if all(_duration(ms) for ms in spent):
            self._spent_s = sum(spent) / 1e3

    def take_ollama(self, final: dict[str, Any]) -> None:
        """Takes the final object of an Ollama native answer (`done: true`)."""
        self.done = True
        prompt, completion = (final.get(name, 0) for name in ("prompt_eval_count", "eval_count"))
        if _count(prompt) and _count(completion):
            self._reported = (prompt, completion)
        spent: list[Any] = [final.get(name, 0) for name in _OLLAMA_DURATIONS]
        if all(_duration(ns) for ns in spent) and any(spent):
            self._spent_s = sum(spent) / 1e9

    def take_answer(self, document: dict[str, Any] | None) -> None:
        """Takes a whole (non-streamed) JSON answer."""
        if document is None:
            return
        self.take_usage(document.get("usage"))
        self.take_timings(document.get("timings"))
        if document.get("done") is True:
            self.take_ollama(document)
        self.error = self.error or "error" in document

    def saw_token(self, chunks: int, now: float) -> None:
        """`chunks` content-carrying choices arrived at `now`."""
        if chunks:
            self.completion_chunks += chunks
            if self.first_token is None:
                self.first_token = now

    @property
    def reported(self) -> bool:
        """The answer carried the server's own counts."""
        return self._usage is not None or self._reported is not None

    def counts(self) -> tuple[int | None, int | None, bool]:
        """Prompt tokens, completion tokens, and whether these are estimates."""
        if self._usage is not None:
            return (*self._usage, False)
        if self._reported is not None:
            return (*self._reported, False)
        if self.completion_chunks:
            return None, self.completion_chunks, True
        return None, None, False

    def scheduled(self, end: float) -> float | None:
        """When the server began on the request, where the answer said how long it worked
        on it: that long before `end`, kept within [start, first token]."""
        if self._spent_s is None:
            return None
        latest = end if self.first_token is None else self.first_token
        return min(max(end - self._spent_s, self.start), latest)


def _count(value: Any) -> TypeGuard[int]:
    return token_count_problem(value) is None


def _duration(value: Any) -> bool:
    """A duration a server may report: a non-negative number below 1e18 (of its unit: a
    larger one is nonsense, and too large an int would not convert to a float)."""
    return type(value) in (int, float) and 0 <= value < 1e18
