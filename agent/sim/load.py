"""A simulated inference load whose energy per request is known exactly.

`RequestLoad` is a `LoadModel` for `SimulatedGpuSource`: the power of each simulated board
is its idle power plus what the inference requests running on it add. Because the load
knows which request added what, it can say exactly how much energy each request cost
(`truth_j`), which is what the accuracy benchmark (bench/accuracy.py) compares the
attribution engine against, and what the demo shows next to the engine's figures.

The model, and why it is enough:

- A request is in prefill from its start to its first token, then in decode until its end.
  Alone on a board it adds a fixed dynamic power per phase (`ModelProfile`): prefill is
  compute-bound and draws more than memory-bound decode, and a larger model draws more
  than a smaller one. Powers are fractions of the board's headroom (TDP − idle) so that a
  profile means the same thing on any board model.
- Batching: requests that share a board do not add their powers linearly; the weight reads
  of a decode step are shared and the board saturates at its TDP. With S the sum of the
  nominal powers of the active requests, the board's dynamic power is
  `D = H × (1 − exp(−S / H))` (H the headroom): linear for one light request, concave, and
  never above TDP. Each request's own power is its nominal power × D / S, so contributions
  stay additive and the truth stays exact.
- Ground truth of a request: its own dynamic energy (the integral of its own power) plus its
  share of the idle baseline, split equally among the requests active at each instant. The
  sum over requests is the board's energy minus the idle energy of the stretches when no
  request runs, which is what the engine counts as unattributed.

Power is piecewise constant between events, so every integral is analytical: no numerical
stepping, no tolerance. `synthetic_trace` builds a whole workload up front (for the
benchmark); `begin`, `first_token` and `finish` drive the load live (for the demo).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.numeric import CompensatedSum
from agent.requests import Request
from agent.sim.gpus import GpuModel


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """How one served model loads a board, for one request running alone.

    Token rates are those of an H100-class board; the simulation does not scale them by
    board model, only powers (through the headroom fractions).
    """

    name: str
    prefill_fraction: float
    """Dynamic power while in prefill, as a fraction of the board's TDP − idle."""
    decode_fraction: float
    """Dynamic power while in decode, as a fraction of the board's TDP − idle."""
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    """Per-request generation speed with nothing else running."""
    decode_halving_batch: float
    """Batch size at which one request's decode speed is halved: a decode step takes longer
    as the batch grows, slowly while the step is memory-bound."""

    def decode_rate(self, batch: float) -> float:
        """Tokens per second that one request decodes at in a batch of `batch` requests."""
        return self.decode_tokens_per_s / (1 + max(batch - 1, 0) / self.decode_halving_batch)


PROFILES: dict[str, ModelProfile] = {
    profile.name: profile
    for profile in (
        # An 8B model in BF16: prefill near the compute roof (~15k tokens/s, most of the
        # headroom), decode memory-bound (16 GB of weights read per token at ~3 TB/s).
        ModelProfile("small-8b", 0.75, 0.30, 15_000.0, 150.0, 64.0),
        # A 70B model in FP8 on one board: slower in both phases and heavier on power.
        ModelProfile("large-70b", 0.90, 0.45, 4_000.0, 40.0, 32.0),
    )
}


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a synthetic trace, with every time and count known in advance."""

    id: str
    model: str
    gpu: int
    start: float
    first_token: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    arrival: float | None = None
    """When it reached the server, where it then waited in the queue until `start` (when
    the server began on it); None: it began at once."""

    @property
    def arrived(self) -> float:
        return self.start if self.arrival is None else self.arrival

    def to_request(self, source: str = "simulated") -> Request:
        """The completed request as an intake path would report it to the engine."""
        return Request(
            id=self.id, model=self.model, source=source, gpus=(self.gpu,), start=self.start,
            end=self.end, first_token=self.first_token, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


@dataclass(slots=True, eq=False)
class _Running:
    """A request as the load knows it: where it runs, what it draws, when its phases change."""

    id: str
    gpu: int
    prefill_w: float
    decode_w: float
    start: float
    first_token: float | None = None
    end: float | None = None


@dataclass(frozen=True, slots=True)
class _Pieces:
    """One board's power as constant pieces [times[i], times[i + 1]), with running integrals.

    Before `times[0]` the board is idle; the last piece extends forever. `scaled[i]`,
    `idle_share[i]` and `energy[i]` are the integrals from `times[0]` to `times[i]` of the
    batching scale D/S, of idle/N while N > 0 requests run, and of board power.
    """

    times: list[float]
    scale: list[float]
    share_w: list[float]
    power_w: list[float]
    scaled: list[float]
    idle_share: list[float]
    energy: list[float]


class RequestLoad:
    """Board power = idle + what the running requests add; exact energy per request.

    Requests are scheduled in advance (`schedule`, e.g. a `synthetic_trace`) or driven live
    (`begin`, `first_token`, `finish`). Every method is safe to call from any thread. The
    `LoadModel` contract holds: once `power_w` has answered for a time on a board, nothing
    that is added later changes the answer, because a scheduled request may not start in
    that past and a live event that arrives late takes effect at the latest time already
    read (each live method returns the time it took effect at).
    """

    def __init__(
        self, gpus: Sequence[GpuModel], profiles: Mapping[str, ModelProfile] = PROFILES
    ) -> None:
        if not gpus:
            raise ValueError("a request load needs at least one GPU")
        self.gpus = tuple(gpus)
        self.profiles = dict(profiles)
        self._requests: dict[str, _Running] = {}
        self._on_gpu: list[list[_Running]] = [[] for _ in self.gpus]
        self._pieces: list[_Pieces | None] = [None] * len(self.gpus)
        """Compiled lazily after a change, per board."""
        self._read_until = [-math.inf] * len(self.gpus)
        """Latest time `power_w` has answered for, per board: the past that may not change."""
        self._lock = threading.Lock()

    # --- LoadModel ---------------------------------------------------------------------

    def power_w(self, index: int, t: float) -> float:
        with self._lock:
            if t > self._read_until[index]:
                self._read_until[index] = t
            pieces = self._compiled(index)
        i = bisect.bisect_right(pieces.times, t) - 1
        return self.gpus[index].idle_w if i < 0 else pieces.power_w[i]

    # --- requests known in advance -----------------------------------------------------

    def schedule(self, trace: Iterable[TraceRequest]) -> None:
        """Add complete requests. Raises ValueError for an unknown model or GPU, a duplicate
        id, inconsistent times, or a request that starts where a board was already read."""
        with self._lock:
            for request in trace:
                if not request.start <= request.first_token <= request.end:
                    raise ValueError(f"request {request.id!r}: times out of order")
                running = self._new(request.id, request.gpu, request.model, request.start)
                if request.start < self._read_until[request.gpu]:
                    raise ValueError(
                        f"request {request.id!r} starts at {request.start}, before time "
                        f"{self._read_until[request.gpu]} that GPU {request.gpu} was already "
                        "read at: the past cannot change"
                    )
                running.first_token, running.end = request.first_token, request.end
                self._add(running)

    # --- requests driven live ----------------------------------------------------------

    def begin(self, request_id: str, gpu: int, model: str, at: float) -> float:
        """A request starts (in prefill) on `gpu`; returns the time it took effect."""
        with self._lock:
            running = self._new(request_id, gpu, model, at)
            running.start = self._effective(gpu, at)
            self._add(running)
            return running.start

    def first_token(self, request_id: str, at: float) -> float:
        """The request's first token: it moves from prefill to decode."""
        with self._lock:
            running = self._running(request_id)
            if running.first_token is not None:
                raise ValueError(f"request {request_id!r} already has its first token")
            running.first_token = max(self._effective(running.gpu, at), running.start)
            self._pieces[running.gpu] = None
            return running.first_token

    def finish(self, request_id: str, at: float) -> float:
        """The request ends (whatever phase it is in) and stops adding power."""
        with self._lock:
            running = self._running(request_id)
            latest = running.start if running.first_token is None else running.first_token
            running.end = max(self._effective(running.gpu, at), latest)
            self._pieces[running.gpu] = None
            return running.end

    # --- ground truth ------------------------------------------------------------------

    def truth_j(self, request_id: str) -> float:
        """The request's true GPU energy: its own dynamic energy plus its equal share of
        the idle baseline while it ran. Raises KeyError for an unknown request and
        ValueError for one that has not finished."""
        dynamic, static = self.truth_parts_j(request_id)
        return dynamic + static

    def truth_parts_j(self, request_id: str) -> tuple[float, float]:
        """(dynamic, static) parts of `truth_j`, at the boundaries of docs/design.md §3."""
        with self._lock:
            running = self._requests[request_id]
            if running.end is None:
                raise ValueError(f"request {request_id!r} has not finished")
            pieces = self._compiled(running.gpu)
        split = running.end if running.first_token is None else running.first_token
        start_scaled = _integral(pieces, pieces.scaled, pieces.scale, running.start)
        split_scaled = _integral(pieces, pieces.scaled, pieces.scale, split)
        end_scaled = _integral(pieces, pieces.scaled, pieces.scale, running.end)
        dynamic = (running.prefill_w * (split_scaled - start_scaled)
                   + running.decode_w * (end_scaled - split_scaled))
        static = (_integral(pieces, pieces.idle_share, pieces.share_w, running.end)
                  - _integral(pieces, pieces.idle_share, pieces.share_w, running.start))
        return dynamic, static

    def energy_j(self, index: int, t0: float, t1: float) -> float:
        """The board's exact energy over [t0, t1]."""
        with self._lock:
            pieces = self._compiled(index)
        idle = self.gpus[index].idle_w
        return _board_integral(pieces, idle, t1) - _board_integral(pieces, idle, t0)

    # --- internals ---------------------------------------------------------------------

    def _new(self, request_id: str, gpu: int, model: str, start: float) -> _Running:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already exists")
        if not 0 <= gpu < len(self.gpus):
            raise ValueError(f"request {request_id!r}: no GPU {gpu} (have {len(self.gpus)})")
        profile = self.profiles.get(model)
        if profile is None:
            raise ValueError(f"request {request_id!r}: unknown model {model!r} "
                             f"(known: {', '.join(self.profiles)})")
        headroom = self.gpus[gpu].tdp_w - self.gpus[gpu].idle_w
        return _Running(request_id, gpu, profile.prefill_fraction * headroom,
                        profile.decode_fraction * headroom, start)

    def _add(self, running: _Running) -> None:
        self._requests[running.id] = running
        self._on_gpu[running.gpu].append(running)
        self._pieces[running.gpu] = None

    def _running(self, request_id: str) -> _Running:
        running = self._requests.get(request_id)
        if running is None:
            raise ValueError(f"no request {request_id!r}")
        if running.end is not None:
            raise ValueError(f"request {request_id!r} has already finished")
        return running

    def _effective(self, gpu: int, at: float) -> float:
        """When a live event at `at` takes effect: not before what was already read."""
        return max(at, self._read_until[gpu])

    def _compiled(self, index: int) -> _Pieces:
        pieces = self._pieces[index]
        if pieces is None:
            pieces = self._pieces[index] = self._compile(index)
        return pieces

    def _compile(self, index: int) -> _Pieces:
        """Sweep the board's events in time order into constant pieces."""
        events: list[tuple[float, float, int]] = []  # (time, Δ nominal power, Δ count)
        for r in self._on_gpu[index]:
            # A first token at the very end leaves no decode phase.
            split = None if r.first_token is None or r.first_token == r.end else r.first_token
            events.append((r.start, r.prefill_w, 1))
            if split is not None:
                events.append((split, r.decode_w - r.prefill_w, 0))
            if r.end is not None:
                events.append((r.end, -(r.prefill_w if split is None else r.decode_w), -1))
        events.sort(key=lambda event: event[0])
        model = self.gpus[index]
        headroom = model.tdp_w - model.idle_w
        pieces = _Pieces([], [], [], [], [], [], [])
        nominal, count = CompensatedSum(), 0
        i = 0
        while i < len(events):
            time = events[i][0]
            while i < len(events) and events[i][0] == time:
                nominal.add(events[i][1])
                count += events[i][2]
                i += 1
            total = nominal.value if count else 0.0
            if count == 0:
                nominal.clear()
            dynamic = headroom * -math.expm1(-total / headroom) if total > 0 else 0.0
            if pieces.times:
                dt = time - pieces.times[-1]
                pieces.scaled.append(pieces.scaled[-1] + pieces.scale[-1] * dt)
                pieces.idle_share.append(pieces.idle_share[-1] + pieces.share_w[-1] * dt)
                pieces.energy.append(pieces.energy[-1] + pieces.power_w[-1] * dt)
            else:
                pieces.scaled.append(0.0)
                pieces.idle_share.append(0.0)
                pieces.energy.append(0.0)
            pieces.times.append(time)
            pieces.scale.append(dynamic / total if total > 0 else 1.0)
            pieces.share_w.append(model.idle_w / count if count else 0.0)
            pieces.power_w.append(model.idle_w + dynamic)
        return pieces


def _integral(pieces: _Pieces, cumulative: list[float], rate: list[float], t: float) -> float:
    """A running integral of `rate` (0 before the first piece) at time t."""
    i = bisect.bisect_right(pieces.times, t) - 1
    return 0.0 if i < 0 else cumulative[i] + rate[i] * (t - pieces.times[i])


def _board_integral(pieces: _Pieces, idle_w: float, t: float) -> float:
    """Board energy from times[0] at time t (negative before it: idle back to t)."""
    if not pieces.times or t < pieces.times[0]:
        return idle_w * (t - (pieces.times[0] if pieces.times else 0.0))
    return _integral(pieces, pieces.energy, pieces.power_w, t)


# --- synthetic workloads ---------------------------------------------------------------


def synthetic_trace(
    gpu_count: int,
    *,
    concurrency: int,
    duration_s: float,
    models: Sequence[str] = ("small-8b", "large-70b"),
    profiles: Mapping[str, ModelProfile] = PROFILES,
    start: float = 0.0,
    think_s: float = 0.2,
    prompt_median: float = 400.0,
    completion_median: float = 180.0,
    seed: int = 0,
    max_batch: int | None = None,
) -> list[TraceRequest]:
    """A deterministic inference workload for `gpu_count` boards, sorted by arrival.

    - Board i serves `models[i % len(models)]` (one model replica per board, as a serving
      engine is usually deployed).
    - Concurrency is closed-loop, as load generators define it (genai-perf `--concurrency`,
      vLLM's `--max-concurrency`): each board has `concurrency` clients, each of which sends
      a request, waits for its last token, pauses for an exponential time of mean `think_s`
      and sends the next, so arrivals are Poisson-like and about `concurrency` requests are
      in flight per board (a little fewer: the pauses). Clients start spread over one mean
      request lifetime, so there is no synchronised burst.
    - Clients send from `start` to `start + duration_s`; a request sent before the end runs
      to completion, so the trace ends a little later.
    - Prompt and completion lengths are log-normal around the medians (σ 1.0 and 0.9, the
      long tails of chat workloads), clipped to [8, 8192] and [4, 2048] tokens.
    - With `max_batch`, a board runs at most that many requests at once; a request that
      arrives while they run waits in a first-come-first-served queue (its `arrival` is
      when it came, its `start` when a slot freed), as a serving engine's scheduler holds
      requests beyond its batch. Without, every request starts when it arrives.
    - Prefill lasts prompt / prefill rate; decode lasts completion / the decode rate at a
      batch of `concurrency` (or `max_batch`, if smaller; `ModelProfile.decode_rate`).
    - Times are rounded to whole milliseconds, the integration step of
      `SimulatedGpuSource`, so that its numerical integral of the load is exact too.

    Ids are "<model>-<n>", n counting from 0 in order of start.
    """
    if gpu_count < 1 or concurrency < 1 or duration_s <= 0 or think_s < 0 or (
            max_batch is not None and max_batch < 1):
        raise ValueError("need gpu_count >= 1, concurrency >= 1, duration_s > 0, "
                         "think_s >= 0, max_batch >= 1")
    batch = concurrency if max_batch is None else min(concurrency, max_batch)
    if unknown := [name for name in models if name not in profiles]:
        raise ValueError(f"unknown model(s) {unknown} (known: {', '.join(profiles)})")
    rng = random.Random(seed)
    stop = start + duration_s

    def lengths() -> tuple[int, int]:
        prompt = _clipped_lognormal(rng, prompt_median, 1.0, 8, 8192)
        return prompt, _clipped_lognormal(rng, completion_median, 0.9, 4, 2048)

    def phases(profile: ModelProfile, prompt: int, completion: int) -> tuple[float, float]:
        prefill = max(_ms(prompt / profile.prefill_tokens_per_s), 0.001)
        return prefill, max(_ms(completion / profile.decode_rate(batch)), 0.001)

    # Each client's next send time, in one heap, so that requests come out in time order.
    sends: list[tuple[float, int, int]] = []  # (time, client, gpu)
    for gpu in range(gpu_count):
        profile = profiles[models[gpu % len(models)]]
        mean_life = (prompt_median / profile.prefill_tokens_per_s
                     + completion_median / profile.decode_rate(batch))
        for _ in range(concurrency):
            client = len(sends)
            heapq.heappush(sends, (_ms(start + rng.uniform(0, mean_life)), client, gpu))

    trace: list[TraceRequest] = []
    counters: dict[str, int] = {}
    running: list[list[float]] = [[] for _ in range(gpu_count)]  # per board, ends (a heap)
    while sends and sends[0][0] < stop:
        sent, client, gpu = heapq.heappop(sends)
        name = models[gpu % len(models)]
        profile = profiles[name]
        prompt, completion = lengths()
        prefill, decode = phases(profile, prompt, completion)
        slots = running[gpu]
        while slots and slots[0] <= sent:
            heapq.heappop(slots)
        begin = sent if max_batch is None or len(slots) < max_batch else heapq.heappop(slots)
        first = _ms(begin + prefill)
        end = _ms(first + decode)
        heapq.heappush(slots, end)
        number = counters.get(name, 0)
        counters[name] = number + 1
        trace.append(TraceRequest(f"{name}-{number}", name, gpu, begin, first, end,
                                  prompt, completion, None if begin == sent else sent))
        heapq.heappush(sends, (_ms(end + rng.expovariate(1 / think_s) if think_s else end),
                               client, gpu))
    return trace


def _clipped_lognormal(rng: random.Random, median: float, sigma: float, low: int,
                       high: int) -> int:
    return min(high, max(low, round(median * math.exp(rng.gauss(0.0, sigma)))))


def _ms(t: float) -> float:
    return round(t, 3)
