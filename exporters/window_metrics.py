"""Window-level Prometheus metrics: what scraped servers did, per model, and its GPU energy.

Scrapers of inference servers' own /metrics (`agent.intake.scrapers`) learn per-model
requests and tokens per scrape window, not per request; their figures go into metrics of
their own, labelled with the `source` (`scrape:vllm`, ...), never into the per-request
`jouleprobe_request_*` families. A server whose GPUs are also covered by the proxy or the
ingest API would otherwise be counted twice in any per-model sum.

Per-window ratios are computed in PromQL from these counters, e.g. Wh per query:
`increase(jouleprobe_window_energy_joules_total[1h])` summed over components
÷ `increase(jouleprobe_window_requests_total[1h])` ÷ 3600. Sources whose server counts no
requests (llama.cpp) or no tokens (Triton models outside LLM backends) have no series for
that quantity rather than a zero.

Models are capped as in `exporters.request_metrics`: past `max_models`, further models are
counted as model="other", with one warning. Sources come and go with the annotated pods of a
Kubernetes node (`scrape:vllm:<namespace>/<pod>`): a source whose scraper stopped for good
is `retire`d, and its series leave `retire_after_s` later (time for Prometheus to read its
last increments), unless it is scraped again meanwhile; so a rollout's new pods do not
grow the series without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric

from agent.intake.scrapers.window import WindowFigures
from agent.sampler import NodeSnapshot
from exporters.request_metrics import DEFAULT_MAX_MODELS, OTHER_MODEL

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _ModelState:
    requests: float | None = None
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    gpu_dynamic_j: float = 0.0
    gpu_static_j: float = 0.0


def _add(total: float | None, value: float | None) -> float | None:
    if value is None:
        return total
    return (total or 0.0) + value


RETIRE_AFTER_S = 600.0
"""How long a retired source's series stay: several Prometheus scrape intervals."""


class WindowMetrics:
    """Running per-(source, model) totals of settled windows, and scrape counters.

    Scrapers call `scraped`, `scrape_failed` and `observe` from the event loop; `families`
    is the `FamilyProducer` to give `NodeCollector.add`."""

    def __init__(self, *, max_models: int = DEFAULT_MAX_MODELS,
                 retire_after_s: float = RETIRE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self._retire_after_s = retire_after_s
        self._clock = clock
        self._retired: dict[str, float] = {}
        """Source → when its scraper stopped for good."""
        self._models: dict[tuple[str, str], _ModelState] = {}
        self._own: set[str] = set()
        """Models with series of their own."""
        self._folded = False
        self._unattributed: defaultdict[str, float] = defaultdict(float)
        self._scrapes: Counter[str] = Counter()
        self._errors: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def scraped(self, source: str) -> None:
        """One scrape attempted, whatever its outcome."""
        with self._lock:
            self._scrapes[source] += 1
            self._retired.pop(source, None)

    def retire(self, source: str) -> None:
        """`source`'s scraper stopped for good (its pod is gone): its series leave
        `retire_after_s` from now, unless it is scraped again before."""
        with self._lock:
            self._retired[source] = self._clock()

    def _drop_retired(self) -> None:
        """Under the lock: the series of sources retired long enough ago leave."""
        cutoff = self._clock() - self._retire_after_s
        gone = {source for source, at in self._retired.items() if at <= cutoff}
        if not gone:
            return
        for key in [key for key in self._models if key[0] in gone]:
            del self._models[key]
        for key in [key for key in self._errors if key[0] in gone]:
            del self._errors[key]
        for source in gone:
            self._unattributed.pop(source, None)
            self._scrapes.pop(source, None)
            del self._retired[source]

    def scrape_failed(self, source: str, kind: str) -> None:
        with self._lock:
            self._errors[(source, kind)] += 1

    def observe(self, source: str, figures: WindowFigures) -> None:
        with self._lock:
            self._unattributed[source] += figures.unattributed_j
            for window in figures.models.values():
                state = self._state(source, window.model)
                state.requests = _add(state.requests, window.usage.requests)
                state.prompt_tokens = _add(state.prompt_tokens, window.usage.prompt_tokens)
                state.completion_tokens = _add(
                    state.completion_tokens, window.usage.completion_tokens
                )
                state.gpu_dynamic_j += window.gpu_dynamic_j
                state.gpu_static_j += window.gpu_static_j

    def _state(self, source: str, model: str) -> _ModelState:
        if model not in self._own:
            if len(self._own) < self.max_models:
                self._own.add(model)
            else:
                if not self._folded:
                    self._folded = True
                    log.warning("more than %d models in scraped windows: model %r and any "
                                "further model are counted under model=%r",
                                self.max_models, model, OTHER_MODEL)
                model = OTHER_MODEL
        return self._models.setdefault((source, model), _ModelState())

    def families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "jouleprobe_window_requests",
            "Requests finished in settled scrape windows, as counted by the server.",
            labels=["model", "source"],
        )
        energy = CounterMetricFamily(
            "jouleprobe_window_energy_joules",
            "GPU energy of settled scrape windows on the source's GPUs, shared among its "
            "models by tokens; no host component.",
            labels=["model", "source", "component"], unit="joules",
        )
        tokens = CounterMetricFamily(
            "jouleprobe_window_tokens",
            "Tokens processed in settled scrape windows, as counted by the server.",
            labels=["model", "source", "kind"],
        )
        unattributed = CounterMetricFamily(
            "jouleprobe_window_unattributed_energy_joules",
            "GPU energy of scrape windows in which the source's server did no work.",
            labels=["source"], unit="joules",
        )
        scrapes = CounterMetricFamily(
            "jouleprobe_scrapes", "Scrapes of inference servers' metrics attempted.",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "jouleprobe_scrape_errors",
            "Failed scrapes by kind: connect, timeout, http_status, not_server_metrics, "
            "parse; gpus counts windows dropped because their GPU set was unknown.",
            labels=["source", "kind"],
        )
        with self._lock:
            self._drop_retired()
            for (source, model), state in sorted(self._models.items()):
                if state.requests is not None:
                    requests.add_metric([model, source], state.requests)
                energy.add_metric([model, source, "gpu_dynamic"], state.gpu_dynamic_j)
                energy.add_metric([model, source, "gpu_static"], state.gpu_static_j)
                if state.prompt_tokens is not None:
                    tokens.add_metric([model, source, "prompt"], state.prompt_tokens)
                if state.completion_tokens is not None:
                    tokens.add_metric([model, source, "completion"], state.completion_tokens)
            for source, joules in sorted(self._unattributed.items()):
                unattributed.add_metric([source], joules)
            for source, count in sorted(self._scrapes.items()):
                scrapes.add_metric([source], count)
            for (source, kind), count in sorted(self._errors.items()):
                errors.add_metric([source, kind], count)
        yield from (requests, energy, tokens, unattributed, scrapes, errors)
