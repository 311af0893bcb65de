"""A client of the ingest API for inference servers written in Python; standard library only.

    tracker = Tracker("http://127.0.0.1:29401")
    with tracker.request(model="llama-8b", gpus=[0]) as r:
        ...
        r.first_token()
        ...
        r.tokens(prompt=12, completion=80)
    tracker.close()  # sends what is still queued

The serving code path only takes a clock reading and appends to a bounded in-memory queue:
it never blocks on the network and never raises. A background thread sends the queue in
batches. When the queue is full, new events are dropped and counted; a failed send is
retried a bounded number of times, then its events are dropped and counted. Losing a few
reports costs some attribution accuracy, whereas blocking or failing a user's request
would cost the service.

A request's start is reported as soon as it begins, because the agent holds back sharing
the energy of an interval only while it knows of a running request in it. A request that
ends before its start has been sent goes out as one "request" event instead of two.
"""

from __future__ import annotations

import atexit
import http.client
import itertools
import json
import logging
import operator
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

log = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/events"
"""Where the agent's ingest API takes events."""

Clock = Literal["monotonic", "wall"]


@dataclass(frozen=True, slots=True)
class TrackerStats:
    """Event counts since the tracker was made."""

    accepted: int
    """Taken by the agent."""
    rejected: int
    """Refused by the agent as invalid (it logs why); resending them would not help."""
    dropped: int
    """Never sent: the queue was full, the tracker was closed, or every retry failed."""
    queued: int
    """Waiting to be sent."""


class TrackedRequest:
    """One request being served. A context manager; `end()` may also be called directly.

    An exception that leaves the `with` block marks the request "failed"; a cancellation
    (`asyncio.CancelledError`, `GeneratorExit` of a closed stream, `KeyboardInterrupt`)
    marks it "cancelled". The exception itself is never swallowed.
    """

    __slots__ = ("_completion", "_event", "_first_token", "_generation", "_prompt",
                 "_tracker", "id")

    def __init__(self, tracker: Tracker, request_id: str, event: dict[str, Any] | None,
                 generation: int) -> None:
        self._tracker = tracker
        self.id = request_id
        self._event = event
        """The start event while queued; None once the start was dropped or the end sent."""
        self._generation = generation
        self._first_token: float | None = None
        self._prompt: int | None = None
        self._completion: int | None = None

    def first_token(self) -> None:
        """Marks now as the time of the first generated token (the first call counts)."""
        if self._first_token is None:
            self._first_token = self._tracker._now()

    def tokens(self, *, prompt: int | None = None, completion: int | None = None) -> None:
        """Sets the token counts; either may be given alone."""
        if prompt is not None:
            self._prompt = prompt
        if completion is not None:
            self._completion = completion

    def end(self, status: Literal["ok", "cancelled", "failed"] = "ok") -> None:
        """Reports the end; later calls do nothing."""
        event, self._event = self._event, None
        if event is None:
            return
        fields: dict[str, Any] = {"status": status}
        if self._first_token is not None:
            fields["first_token_time"] = self._first_token
        if self._prompt is not None:
            fields["prompt_tokens"] = self._prompt
        if self._completion is not None:
            fields["completion_tokens"] = self._completion
        self._tracker._finish(event, self._generation, fields)

    def __enter__(self) -> TrackedRequest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.end("ok")
        elif issubclass(exc_type, Exception):
            self.end("failed")
        else:
            self.end("cancelled")


class Tracker:
    """Reports requests to a jouleprobe agent's ingest API from a background thread.

    `url` is the agent's ingest listener, e.g. "http://127.0.0.1:29401". Times are this
    host's `time.monotonic()`, which the agent shares when it runs on the same host; a
    tracker on another host must use `clock="wall"` (and the agent a token, since its
    listener is then off loopback). Thread-safe; usable from asyncio code as is.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        flush_interval: float = 0.2,
        max_queue: int = 100_000,
        max_batch: int = 1000,
        retries: int = 3,
        timeout: float = 5.0,
        clock: Clock = "monotonic",
    ) -> None:
        if flush_interval <= 0 or max_queue < 1 or max_batch < 1 or retries < 0 or timeout <= 0:
            raise ValueError("flush_interval > 0, max_queue >= 1, max_batch >= 1, "
                             "retries >= 0 and timeout > 0 are required")
        if clock not in ("monotonic", "wall"):
            raise ValueError(f"clock must be monotonic or wall, not {clock!r}")
        self.url = url.rstrip("/") + EVENTS_PATH
        self._now = time.monotonic if clock == "monotonic" else time.time
        self._clock = clock
        self._headers = {"Content-Type": "application/json"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.retries = retries
        self.timeout = timeout
        # Proxies are for the outside world; the agent is on this host or this network.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queue: deque[dict[str, Any]] = deque()
        self._generation = 0
        """Incremented whenever the sender takes the queue: tells whether a start is still
        queued, and so can become a single "request" event."""
        self._closing = False
        self._wake = threading.Event()
        self._accepted = self._rejected = self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="jouleprobe-tracker", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # what is queued at exit is sent, not lost

    def request(
        self, *, model: str, gpus: Sequence[int | str], request_id: str | None = None
    ) -> TrackedRequest:
        """Starts tracking a request now. `gpus`: the indices or UUIDs of the GPUs serving it.

        `request_id` lets the agent's records be matched with the server's own; it must be
        unique among the requests the agent has not yet finalised.
        """
        if request_id is None:
            request_id = f"{self._prefix}-{next(self._ids)}"
        event = {"type": "start", "id": request_id, "model": model, "gpus": list(gpus),
                 "time": self._now()}
        with self._lock:
            if self._closing or len(self._queue) >= self.max_queue:
                self._dropped += 1
                return TrackedRequest(self, request_id, None, -1)
            self._queue.append(event)
            generation = self._generation
        return TrackedRequest(self, request_id, event, generation)

    def stats(self) -> TrackerStats:
        with self._lock:
            return TrackerStats(self._accepted, self._rejected, self._dropped, len(self._queue))

    def flush(self) -> None:
        """Asks the sender to send now instead of at its next interval; does not wait."""
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Sends what is queued (waiting at most `timeout` seconds), then stops the thread."""
        atexit.unregister(self.close)
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _finish(self, start: dict[str, Any], generation: int, fields: dict[str, Any]) -> None:
        end = self._now()
        with self._lock:
            if generation == self._generation:
                # The start is still queued: the same dict becomes one "request" event.
                start["type"] = "request"
                start["start"] = start.pop("time")
                start["end"] = end
                start.update(fields)
                return
            if self._closing or len(self._queue) >= self.max_queue:
                self._dropped += 1
                return
            self._queue.append({"type": "end", "id": start["id"], "time": end, **fields})

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            self._generation += 1
            count = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            with self._lock:
                closing = self._closing
            while batch := self._take():
                try:
                    self._send(batch)
                except Exception:  # a bug here must not stop reporting for good
                    log.exception("jouleprobe: %d events dropped", len(batch))
                    self._count(dropped=len(batch))
                if len(batch) < self.max_batch:
                    break
            if closing:
                with self._lock:
                    if not self._queue:
                        return

    def _send(self, batch: list[dict[str, Any]]) -> None:
        """Sends one batch with bounded retries; never raises (it runs on our own thread)."""
        try:
            body = self._encode(batch)
        except (TypeError, ValueError) as exc:
            log.warning("jouleprobe: %d events could not be encoded, dropped: %s", len(batch), exc)
            self._count(dropped=len(batch))
            return
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.1 * 2**attempt, 2.0))
            try:
                status, answer, retry_after = self._post(body)
            except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError: OSError
                log.debug("jouleprobe: sending %d events failed: %s", len(batch), exc)
                continue
            accepted = answer.get("accepted", 0)
            if status == 429:
                # The agent is full: what precedes `retry_from` was handled, the rest waits.
                retry_from = answer.get("retry_from", accepted)
                self._count(accepted=accepted, rejected=retry_from - accepted)
                batch = batch[retry_from:]
                body = self._encode(batch)
                time.sleep(min(retry_after, 5.0))
                continue
            if status in (200, 400) and "accepted" in answer:
                self._count(accepted=accepted, rejected=len(batch) - accepted)
                for error in answer.get("errors", [])[:3]:
                    log.warning("jouleprobe: event refused: %s", error)
                return
            log.warning("jouleprobe: the agent answered %d: %s", status, answer)
            if status < 500:
                break  # authentication or size: a retry would get the same answer
        log.warning("jouleprobe: %d events dropped after failed sends", len(batch))
        self._count(dropped=len(batch))

    def _encode(self, batch: list[dict[str, Any]]) -> bytes:
        return json.dumps({"clock": self._clock, "events": batch}, default=_plain).encode()

    def _post(self, body: bytes) -> tuple[int, dict[str, Any], float]:
        request = urllib.request.Request(self.url, data=body, headers=self._headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, _answer(response.read()), 0.0
        except urllib.error.HTTPError as error:
            with error:
                body = error.read()
            retry_after = error.headers.get("Retry-After", "1")
            return (error.code, _answer(body),
                    float(retry_after) if retry_after.isdigit() else 1.0)

    def _count(self, *, accepted: int = 0, rejected: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self._accepted += accepted
            self._rejected += rejected
            self._dropped += dropped


def _answer(body: bytes) -> dict[str, Any]:
    """The agent's JSON answer; empty where something else answered."""
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _plain(value: Any) -> Any:
    """JSON for what servers commonly pass: numpy or torch integers as ints; anything else
    as its text, which the agent then refuses with a message naming the field."""
    try:
        return operator.index(value)
    except TypeError:
        return str(value)
