"""`WindowScraper`: scrapes one inference server's /metrics and turns each pair of
consecutive scrapes into a window of per-model requests, tokens and GPU energy.

Each settled window goes to the window metrics and, where the agent keeps a record store,
into it (`WindowSink`), so that `jouleprobe report` and /api/v1/summary show it too.

A window [previous scrape, this scrape] is settled (its energy computed) once the sampler
has read every one of its GPUs past the window's end, which in practice is at the next
scrape: energy of the last ~0.1 s before a scrape is not yet sampled when the scrape
answers, and settling later keeps consecutive windows from leaving it out of both. A
window still waiting after `max_settle_s` is settled with what was measured.

Failures are never fatal: an unreachable server, a timeout, an error status or a body that
is not this server's metrics is a failed scrape, counted by kind and logged once per
outage (and once when it ends). The previous successful scrape stays the baseline, so the
next success covers the whole outage as one window. A window whose GPU set cannot be
resolved is dropped whole (its requests and tokens too), so that ratios stay honest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp

from agent.intake.scrapers.kinds import KINDS, NotServerMetrics, SeriesKey, read_counts
from agent.intake.scrapers.window import (
    CounterDeltas,
    GpuWindowEnergy,
    Usage,
    WindowFigures,
    gpu_window_energy,
    split_window,
)
from agent.intake.validate import UNKNOWN_MODEL
from agent.timeline import Timeline

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0

ErrorKind = str
"""`connect`, `timeout`, `http_status`, `not_server_metrics`, `parse`, `gpus`."""


@dataclass(slots=True)
class _Window:
    start: float
    end: float
    gpus: tuple[int, ...]
    usage: dict[str, Usage]


class ScrapeObserver(Protocol):
    """What counts scrapes and shows settled windows (`exporters.window_metrics.WindowMetrics`
    is one, handed in by the wiring layer). Called on the event loop."""

    def scraped(self, source: str) -> None: ...

    def scrape_failed(self, source: str, kind: ErrorKind) -> None: ...

    def observe(self, source: str, figures: WindowFigures) -> None: ...


class WindowSink(Protocol):
    """Where settled windows are kept (`agent.store.RecordStore` is one). Called on the
    event loop, so it must not wait on the disk."""

    def submit_windows(self, source: str, figures: Sequence[WindowFigures],
                       trace_source: str | None = None) -> None: ...


class ScrapeError(Exception):
    """A failed scrape; `kind` is its label in jouleprobe_scrape_errors_total."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WindowScraper:
    """One `[[scrape]]` table at work. Call `scrape_once()` every `interval` seconds."""

    def __init__(
        self,
        kind: str,
        url: str,
        *,
        gpus: Callable[[], tuple[int, ...]],
        timelines: dict[int, Timeline],
        idle_power_w: Callable[[int], float | None],
        metrics: ScrapeObserver,
        store: WindowSink | None = None,
        model: str | None = None,
        source: str | None = None,
        trace_source: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_settle_s: float = 60.0,
        prefill_weight: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`gpus`: the GPU set now (`GpuResolver.current`; raises ValueError when unknown).
        `timelines`: the sampler's, and `idle_power_w` the engine's baseline per GPU.
        `store`: keeps the settled windows, if given (the metrics always get them).
        `model`: the model name of a server whose metrics carry none (TGI, llama.cpp);
        by default the `model` of the URL's query (llama.cpp's router mode serves the
        metrics of one of its models per `?model=ID`), else the first id of its OpenAI
        /v1/models. `trace_source`: where the same server exports its request spans
        (`trace:SERVICE`), kept with its windows for the report's coverage. `clock` stamps
        window bounds and must be the sampler's (time.monotonic)."""
        if kind not in KINDS:
            raise ValueError(f"unknown scrape kind {kind!r} (known: {', '.join(KINDS)})")
        self.kind = KINDS[kind]
        self.url = url
        self.source = source or f"scrape:{kind}"
        self.trace_source = trace_source
        self._gpus = gpus
        self._timelines = timelines
        self._idle_power_w = idle_power_w
        self._metrics = metrics
        self._store = store
        queried = parse_qs(urlsplit(url).query).get("model")
        self._model = model or (queried[0] if queried else None)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_settle_s = max_settle_s
        self.prefill_weight = prefill_weight
        self._clock = clock
        self._deltas = CounterDeltas(self.kind.significant_digits)
        self._pending: deque[_Window] = deque()
        self._failing: ErrorKind | None = None
        self._session: aiohttp.ClientSession | None = None

    async def scrape_once(self) -> list[WindowFigures]:
        """One scrape; returns the windows settled by it (already given to the metrics
        and the store)."""
        now = self._clock()
        self._metrics.scraped(self.source)
        try:
            counts = await self._fetch_counts()
        except ScrapeError as exc:
            self._failed(exc)
        else:
            self._recovered()
            await self._open_window(counts, now)
        return self._settle(self._clock())

    async def run(self, interval_s: float) -> None:
        """Scrape every `interval_s` until cancelled."""
        try:
            while True:
                await self.scrape_once()
                await asyncio.sleep(interval_s)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- fetching -----------------------------------------------------------------------

    async def _fetch_counts(self) -> dict[SeriesKey, float]:
        text = await self._get_text(self.url)
        model = self._model
        if self.kind.model_label is None and model is None:
            model = await self._served_model()
        try:
            return read_counts(self.kind, text, model or UNKNOWN_MODEL)
        except NotServerMetrics as exc:
            raise ScrapeError("not_server_metrics", str(exc)) from None
        except ValueError as exc:
            raise ScrapeError("parse", f"not Prometheus text exposition: {exc}") from None

    async def _get_text(self, url: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(url) as response:
                if response.status != 200:  # the server's words say why (llama.cpp's
                    # router: "model name is missing from the request")
                    said = (await response.text(errors="replace"))[:200].strip()
                    raise ScrapeError("http_status", f"HTTP {response.status} from {url}: "
                                                     f"{said} ({self.kind.hint})")
                return await response.text()
        except TimeoutError:
            raise ScrapeError("timeout", f"no answer from {url} in time") from None
        except aiohttp.ClientError as exc:
            raise ScrapeError("connect", f"cannot reach {url}: {exc}") from None

    async def _served_model(self) -> str | None:
        """The first model id of the server's OpenAI /v1/models, remembered once read."""
        parts = urlsplit(self.url)
        url = urlunsplit((parts.scheme, parts.netloc, "/v1/models", "", ""))
        try:
            listing = json.loads(await self._get_text(url))
            self._model = str(listing["data"][0]["id"])
        except (ScrapeError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.debug("%s: model name from %s unavailable: %s", self.source, url, exc)
        return self._model

    # -- windows ------------------------------------------------------------------------

    async def _open_window(self, counts: dict[SeriesKey, float], now: float) -> None:
        window = self._deltas.update(counts, now)
        if window is None:
            return
        try:  # off the loop: a GPU set not yet discovered may wait for its discovery
            gpus = await asyncio.to_thread(self._gpus)
        except ValueError as exc:
            self._metrics.scrape_failed(self.source, "gpus")
            log.warning("%s: window of %.1f s dropped, its GPUs are unknown: %s",
                        self.source, window.end - window.start, exc)
            return
        self._pending.append(_Window(window.start, window.end, gpus, window.usage))

    def _settle(self, now: float) -> list[WindowFigures]:
        settled = []
        while self._pending and self._ready(self._pending[0], now):
            window = self._pending.popleft()
            energy = {
                gpu: self._energy(gpu, window.start, window.end) for gpu in window.gpus
            }
            figures = split_window(window.usage, energy, window.start, window.end,
                                   prefill_weight=self.prefill_weight)
            self._metrics.observe(self.source, figures)
            settled.append(figures)
        if settled and self._store is not None:
            self._store.submit_windows(self.source, settled, self.trace_source)
        return settled

    def _ready(self, window: _Window, now: float) -> bool:
        if now - window.end >= self.max_settle_s:
            return True
        for gpu in window.gpus:
            latest = self._timelines[gpu].latest()
            if latest is None or latest.time < window.end:
                return False
        return True

    def _energy(self, gpu: int, start: float, end: float) -> GpuWindowEnergy:
        # Every point, so that the one at or before `start` is there to interpolate from:
        # a timeline is bounded (timeline_seconds / sample_interval points).
        points = self._timelines[gpu].after(float("-inf"))
        return gpu_window_energy(points, start, end, self._idle_power_w(gpu))

    # -- failures -----------------------------------------------------------------------

    def _failed(self, exc: ScrapeError) -> None:
        self._metrics.scrape_failed(self.source, exc.kind)
        if self._failing is None:
            log.warning("%s: scrape failed (%s): %s; counted in "
                        "jouleprobe_scrape_errors_total until it recovers",
                        self.source, exc.kind, exc)
        self._failing = exc.kind

    def _recovered(self) -> None:
        if self._failing is not None:
            log.info("%s: scraping %s again", self.source, self.url)
            self._failing = None
