"""Request-level Prometheus metrics: what requests cost, and where the rest of the energy went.

Two kinds of figures, both rendered as a `FamilyProducer` for `NodeCollector`:

- Per model, from the final figures of each request (`RequestMetrics.observe`): request
  count, energy per boundary component, tokens, and a histogram of IT energy per request
  whose buckets carry the id of their latest request as an exemplar (ids never become
  labels). Facility energy is not a component: it is IT energy × (PUE − 1), derivable in
  PromQL from `jouleprobe_site_pue_ratio`, and exporting it would double-count in any sum
  over components.
- Per GPU and for the host, from the attribution engine's running totals: attributed and
  unattributed energy, the idle baseline in use, and the engine's request counters
  (pending, rejected, late, expired). On scraped metrics alone, per GPU,
  `attributed (gpu_dynamic + gpu_static) + unattributed` equals the energy attribution
  has processed: with every request final, `jouleprobe_gpu_energy_joules_total`.

Memory is bounded by the number of models, not of requests: each model keeps a fixed set
of counters and one exemplar per bucket. The number of models is capped (`max_models`,
default `DEFAULT_MAX_MODELS`); requests of any further model are counted under
`model="other"` (a model really named "other" shares those series), and a warning is
logged once. Model names come from clients, so without a cap one client could create
series without bound on every node.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar

from agent.attribution import AttributionTotals
from agent.numeric import CumulativeHistogram
from agent.requests import RequestEnergy
from agent.sampler import NodeSnapshot
from exporters.prometheus import GPU_LABELS, bucket_bounds

ENERGY_BUCKETS_J: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0,
)
"""Upper bounds (J) of the IT-energy-per-request histogram; +Inf is implied. A 1-2.5-5
series from a short completion of a small model on one GPU (~0.1 J) to a long generation
on a multi-GPU node (~100 kJ, 28 Wh); Google's 0.24 Wh median prompt is 864 J."""

DEFAULT_MAX_MODELS = 100
"""Models with their own series; each costs 28 series (22 of them histogram). Enough for a
node serving many LoRA adapters, small enough that a client inventing model names cannot
swamp Prometheus (100 nodes × 100 models × 28 = 280,000 series at worst)."""

OTHER_MODEL = "other"
"""The `model` label of requests of models past the cap."""

EXEMPLAR_LABEL = "request_id"

_EXEMPLAR_MAX_CHARS = 128
"""OpenMetrics: an exemplar's label names and values together hold at most 128 characters.
A request whose id is longer gets no exemplar rather than a truncated, misleading id."""

_COMPONENTS = ("gpu_dynamic", "gpu_static", "host")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _ModelState:
    """Running figures of one model."""

    requests: int = 0
    gpu_dynamic_j: float = 0.0
    gpu_static_j: float = 0.0
    host_j: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    it_energy: CumulativeHistogram = field(
        default_factory=lambda: CumulativeHistogram(ENERGY_BUCKETS_J)
    )
    exemplars: list[Exemplar | None] = field(
        default_factory=lambda: [None] * (len(ENERGY_BUCKETS_J) + 1)
    )


class RequestMetrics:
    """Per-model request metrics and the attribution engine's totals, as metric families.

    `observe` is called by the daemon with each batch of final requests, from any thread;
    `families` is the `FamilyProducer` to give `NodeCollector.add`.
    """

    def __init__(
        self,
        totals: Callable[[], AttributionTotals],
        *,
        max_models: int = DEFAULT_MAX_MODELS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`totals`: the engine's running totals, read once per scrape (`engine.totals`).
        `clock`: wall clock (UTC epoch seconds) that timestamps exemplars at observation."""
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self._totals = totals
        self.max_models = max_models
        self._clock = clock
        self._models: dict[str, _ModelState] = {}
        self._own = 0
        """Models with series of their own (a model named "other" counts while under the cap)."""
        self._folded = False
        self._lock = threading.Lock()

    def observe(self, energies: Iterable[RequestEnergy]) -> None:
        """Count final requests; each is counted once, whatever its status, and late or
        expired ones with the partial figures they have."""
        now = self._clock()
        with self._lock:
            for energy in energies:
                request = energy.request
                state = self._state(request.model)
                state.requests += 1
                state.gpu_dynamic_j += energy.gpu_dynamic_j
                state.gpu_static_j += energy.gpu_static_j
                state.host_j += energy.host_j
                state.prompt_tokens += request.prompt_tokens or 0
                state.completion_tokens += request.completion_tokens or 0
                it_j = energy.it_j
                bucket = state.it_energy.observe(it_j)
                if len(EXEMPLAR_LABEL) + len(request.id) <= _EXEMPLAR_MAX_CHARS:
                    state.exemplars[bucket] = Exemplar({EXEMPLAR_LABEL: request.id}, it_j, now)

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is not None:
            return state
        if self._own < self.max_models:
            self._own += 1
            state = self._models[model] = _ModelState()
            return state
        if not self._folded:
            self._folded = True
            log.warning(
                "more than %d models: requests of model %r and any further model are counted "
                "under model=%r in the Prometheus metrics (records keep the real names)",
                self.max_models, model, OTHER_MODEL,
            )
        return self._models.setdefault(OTHER_MODEL, _ModelState())

    def families(self, snapshot: NodeSnapshot) -> Iterator[Metric]:
        """Every request and attribution family; GPU uuids come from `snapshot`."""
        yield from self._model_families()
        yield from _attribution_families(self._totals(), snapshot)

    def _model_families(self) -> list[Metric]:
        requests = CounterMetricFamily(
            "jouleprobe_requests",
            "Requests whose energy is final, by model, whatever their status (models past "
            "the agent's cap are counted as model=\"other\").",
            labels=["model"],
        )
        energy = CounterMetricFamily(
            "jouleprobe_request_energy_joules",
            "Energy attributed to final requests, by boundary component; facility overhead "
            "is (sum of components) × (jouleprobe_site_pue_ratio − 1).",
            labels=["model", "component"], unit="joules",
        )
        per_request = HistogramMetricFamily(
            "jouleprobe_request_it_energy_joules",
            "IT energy (gpu_dynamic + gpu_static + host) per final request; exemplars "
            "name the latest request of each bucket.",
            labels=["model"], unit="joules",
        )
        tokens = CounterMetricFamily(
            "jouleprobe_request_tokens",
            "Tokens of final requests, where the intake path reported them.",
            labels=["model", "kind"],
        )
        bounds = bucket_bounds(ENERGY_BUCKETS_J)
        with self._lock:
            for model, state in sorted(self._models.items()):
                requests.add_metric([model], state.requests)
                for component, joules in zip(
                    _COMPONENTS, (state.gpu_dynamic_j, state.gpu_static_j, state.host_j),
                    strict=True,
                ):
                    energy.add_metric([model, component], joules)
                tokens.add_metric([model, "prompt"], state.prompt_tokens)
                tokens.add_metric([model, "completion"], state.completion_tokens)
                per_request.add_metric([model], _buckets(bounds, state), state.it_energy.sum)
        return [requests, energy, per_request, tokens]


def _buckets(
    bounds: list[str], state: _ModelState
) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
    """The histogram's cumulative buckets, each with its exemplar where it has one."""
    return [
        (bound, count) if exemplar is None else (bound, count, exemplar)
        for bound, count, exemplar in zip(
            bounds, state.it_energy.cumulative(), state.exemplars, strict=True
        )
    ]


def _attribution_families(totals: AttributionTotals, snapshot: NodeSnapshot) -> Iterator[Metric]:
    """The engine's per-GPU and host energy split, and its request counters."""
    uuids = {gpu.info.index: gpu.info.uuid for gpu in snapshot.gpus}
    attributed = CounterMetricFamily(
        "jouleprobe_gpu_attributed_energy_joules",
        "GPU energy credited to requests so far, by component. Credit lags measurement "
        "while requests run; attributed + jouleprobe_gpu_unattributed_energy_joules_total "
        "is the energy attribution has processed.",
        labels=[*GPU_LABELS, "component"], unit="joules",
    )
    unattributed = CounterMetricFamily(
        "jouleprobe_gpu_unattributed_energy_joules",
        "GPU energy of intervals in which no request was active.",
        labels=GPU_LABELS, unit="joules",
    )
    idle = GaugeMetricFamily(
        "jouleprobe_gpu_idle_power_watts",
        "Idle baseline used to split GPU energy into static and dynamic (configured or "
        "learned); absent while not yet known.",
        labels=GPU_LABELS, unit="watts",
    )
    prefill = GaugeMetricFamily(
        "jouleprobe_gpu_prefill_weight_ratio",
        "Weight of one prompt token against one completion token used by the tokens policy "
        "(configured, or measured per GPU); absent while intervals are split by time.",
        labels=GPU_LABELS, unit="ratio",
    )
    alone = GaugeMetricFamily(
        "jouleprobe_gpu_token_cost_alone_joules",
        "Dynamic energy of one prompt or completion token on requests running alone, "
        "measured per GPU; the tokens policy gives each prompt token this cost, scaled by "
        "the board's saturation, in intervals whose requests' queue exits are known. Absent "
        "until measured.",
        labels=(*GPU_LABELS, "token"), unit="joules",
    )
    for gpu, figures in sorted(totals.gpus.items()):
        labels = [str(gpu), uuids.get(gpu, "")]  # engine GPUs = sampler GPUs
        if figures.prefill_weight is not None:
            prefill.add_metric(labels, figures.prefill_weight)
        if figures.alone_costs_j is not None:
            for token, joules in zip(("prompt", "completion"), figures.alone_costs_j,
                                     strict=True):
                alone.add_metric([*labels, token], joules)
        attributed.add_metric([*labels, "gpu_dynamic"], figures.gpu_dynamic_j)
        attributed.add_metric([*labels, "gpu_static"], figures.gpu_static_j)
        unattributed.add_metric(labels, figures.unattributed_j)
        if figures.idle_power_w is not None and math.isfinite(figures.idle_power_w):
            idle.add_metric(labels, figures.idle_power_w)
    yield from (attributed, unattributed, idle, prefill, alone)

    if totals.host is not None:
        yield CounterMetricFamily(
            "jouleprobe_host_attributed_energy_joules",
            "Host CPU + DRAM energy credited to requests so far.",
            value=totals.host.attributed_j, unit="joules",
        )
        yield CounterMetricFamily(
            "jouleprobe_host_unattributed_energy_joules",
            "Host CPU + DRAM energy of intervals in which no request was active.",
            value=totals.host.unattributed_j, unit="joules",
        )

    yield GaugeMetricFamily(
        "jouleprobe_requests_pending",
        "Requests accepted by attribution and not yet final (running, or waiting for "
        "their intervals to settle).",
        value=totals.pending_requests,
    )
    rejected = CounterMetricFamily(
        "jouleprobe_requests_rejected",
        "Requests refused by attribution: unknown_gpu (named a GPU not measured on this "
        "node; check the source's GPU set), over_capacity (too many pending).",
        labels=["reason"],
    )
    rejected.add_metric(["unknown_gpu"], totals.unknown_gpu_requests)
    rejected.add_metric(["over_capacity"], totals.over_capacity_requests)
    yield rejected
    yield CounterMetricFamily(
        "jouleprobe_requests_late",
        "Requests reported after part of their lifetime had been attributed to others; "
        "their figures cover only the rest.",
        value=totals.late_requests,
    )
    yield CounterMetricFamily(
        "jouleprobe_requests_expired",
        "Requests still running at the maximum age; their figures cover only its span.",
        value=totals.expired_requests,
    )
    yield CounterMetricFamily(
        "jouleprobe_request_ends_unmatched",
        "End events that matched no running request (never started, or already expired).",
        value=totals.unmatched_ends,
    )
