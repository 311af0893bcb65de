"""An iteration-level continuous-batching server, in vLLM's style, whose energy per request
is known exactly: the second simulator of bench/accuracy.py (issue 20).

`agent.sim.load.RequestLoad` runs whole requests side by side, each drawing a power of its
own. A serving engine does not work that way: it runs *steps* (iterations), and in each
step every sequence of its batch advances together. This module simulates that server, one
per GPU, deterministically for a seed.

Scheduler (`BatchingServer`), one step after another while there is work:

- The batch holds at most `max_batch` (16) sequences. A step's token budget,
  `max_num_batched_tokens` (2048), is shared, decodes first (vLLM's chunked-prefill
  policy: a running decode is never starved): one token per decoding sequence, then a
  chunk for each running sequence still in prefill (in admission order), then, first come
  first served, requests from the queue while the batch has room and budget is left, each
  with a first chunk of its prompt (chunked prefill: a long prompt takes several steps).
  A request that arrives during a step waits for the next step's scheduling.
- A request's first token comes at the end of the step that finishes its prefill; after
  that it decodes one token per step; it ends at the end of the step that produces its last
  token (a request of n completion tokens decodes in n − 1 steps after its prefill).
- With nothing running and nothing queued the GPU idles until the next arrival.

Step cost (`StepCost`), from the step's work: P prefill tokens, D decoding sequences and
C context tokens read (the KV cache of each decoding sequence: its prompt plus the tokens
generated so far, summed):

    duration = t0 + a·P + b·D + c·C
    energy   = idle_w·duration + e_p·P + e_d·D + e_c·C

rounded to whole milliseconds (at least 1), the integration step of `SimulatedGpuSource`,
so that its numerical integral of the power is exact. Power is capped at `POWER_CAP_W`
(700 W, the H100 SXM's TDP): a step whose power would exceed it is stretched (clocks drop)
until its power is 700 W, its energy unchanged, so the longer step's idle energy comes
out of its dynamic energy, which is scaled by the cap's factor k = (energy − idle_w ×
stretched duration) / dynamic < 1.

Coefficients, for an H100 SXM (≈3.35 TB/s HBM3, 989 TFLOPS dense BF16, 1979 FP8):

- small-8b, Llama-3.1-8B in BF16: t0 = 6.0 ms (16 GB of weights read per step at ~3 TB/s
  effective, plus ~0.7 ms of launch and scheduling); a = 55 µs per prefill token (16
  GFLOP a token at ~290 TFLOPS, ~18k tokens/s, what vLLM's prefill reaches on this board);
  b = 40 µs per decoding sequence (sampling, per-sequence kernels); c = 44 ns per context
  token (128 KiB of KV cache a token, 32 layers × 8 KV heads × 128 × K,V × 2 bytes, at
  ~3 TB/s). e_p = 0.037 J per prefill token (a full 2048-token chunk draws ~700 W: the
  compute roof, where real boards meet their power limit); e_d = 0.18 J per decode token (a
  batch of 16 decodes at ~500 W, a single stream at ~110 W); e_c = 10 µJ per context token
  (HBM reads at ~4 pJ/bit plus the SM and L2 work of attention: a KV-bound step draws
  e_c/c ≈ 230 W above idle).
- large-70b, Llama-3.1-70B in FP8 (weights and KV cache) on one board: t0 = 24 ms (70 GB
  a step); a = 160 µs (140 GFLOP a token at ~875 TFLOPS, ~6k tokens/s); b = 100 µs;
  c = 55 ns (160 KiB of KV a token: 80 layers, FP8); e_p = 0.11 J (again ~700 W for a
  full chunk); e_d = 0.6 J (a batch of 16 at ~450 W); e_c = 12.5 µJ (same energy per byte
  as the 8B's). The KV cache's capacity is not modelled (on an 80 GB board the 70B model
  leaves little room for it; on an H200 it fits).

What the linear model leaves out: a step's fixed dynamic cost (reading the weights once
per step, shared by the batch) has no term, so a single decode stream draws less than a
real board does (~110 W against 200–300 W measured); the marginal cost of a token, which
is what the split is about, is right at the batch sizes that matter. Prefill attention
(quadratic in the prompt) is folded into a. Under these coefficients a prompt token costs
≈ 0.2 of a completion token's dynamic energy (`simulated_ratio`), against 0.01–0.025 in
`RequestLoad`, where every decoding request draws its own power.

Truth (`BatchedRequest.truth_j`): each request's marginal share of every step it ran in —
k·(e_p × its prefill tokens in the step + e_d × its decode token + e_c × its context
read), k the cap's factor (1 below the cap) — plus an equal share of the step's idle
energy (idle_w × duration) among the sequences in the step's batch. Queue time gets
nothing (the GPU was working for others, or idle). Between steps with nothing running the
GPU idles and that energy is nobody's (the engine's "unattributed"). So, per GPU, Σ truth +
idle_w × (time with no step) = the board's energy exactly (`BatchingLoad.accounted_j`).

Power: `BatchingLoad.power_w(index, t)` is piecewise constant, one piece per step (its
energy ÷ its duration) and idle_w between steps: a `LoadModel` for `SimulatedGpuSource`,
read through the real counter and sampler path exactly as `RequestLoad` is.

Arrivals (`BatchingLoad.serve`): closed-loop clients, as `agent.sim.load.synthetic_trace`:
each client sends a request, waits for its last token, thinks for an exponential time of
mean 0.2 s and sends the next; clients start spread over one mean request lifetime; prompt
and completion lengths are log-normal around 400 and 180 tokens (σ 1.0 and 0.9), clipped to
[8, 8192] and [4, 2048]; times in whole milliseconds. Per request it gives the arrival, the
scheduled time (the start of the first step it ran in), the first token, the end, its
token counts, its GPU and its truth.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.sim.gpus import GpuModel
from agent.sim.load import TraceRequest

POWER_CAP_W = 700.0
MAX_BATCH = 16
MAX_NUM_BATCHED_TOKENS = 2048
IDLE_RANGE_W = (72.0, 86.0)
"""Idle power of a board holding a model and its CUDA context, drawn per GPU and seed."""
THINK_S = 0.2
PROMPT_MEDIAN = 400.0
COMPLETION_MEDIAN = 180.0


@dataclass(frozen=True, slots=True)
class StepCost:
    """What one step of a served model costs on one board (the module docstring's
    coefficients: t0, a, b, c in seconds, e_p, e_d, e_c in joules)."""

    name: str
    base_s: float
    prefill_s: float
    """Per prefill token."""
    decode_s: float
    """Per decoding sequence."""
    context_s: float
    """Per context token read by a decoding sequence."""
    prefill_j: float
    decode_j: float
    context_j: float

    def duration_s(self, prefill: int, decode: int, context: int) -> float:
        return (self.base_s + self.prefill_s * prefill + self.decode_s * decode
                + self.context_s * context)

    def dynamic_j(self, prefill: int, decode: int, context: int) -> float:
        return self.prefill_j * prefill + self.decode_j * decode + self.context_j * context


COSTS: dict[str, StepCost] = {
    cost.name: cost
    for cost in (
        StepCost("small-8b", 6.0e-3, 55e-6, 40e-6, 44e-9, 0.037, 0.18, 10e-6),
        StepCost("large-70b", 24e-3, 160e-6, 100e-6, 55e-9, 0.11, 0.6, 12.5e-6),
    )
}


@dataclass(slots=True, eq=False)
class _Sequence:
    """A request inside the server: its progress and the truth it has accrued."""

    id: str
    client: int
    arrival_ms: int
    prompt: int
    completion: int
    scheduled_ms: int | None = None
    first_ms: int | None = None
    end_ms: int | None = None
    prefilled: int = 0
    generated: int = 0
    static_j: float = 0.0
    prefill_j: float = 0.0
    decode_j: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchedRequest:
    """A finished request: its times as the server knows them and its true GPU energy."""

    trace: TraceRequest
    """Times and counts: `start` is the scheduled time (the first step it ran in),
    `arrival` when it reached the queue (None where it was scheduled at once)."""
    static_j: float
    """Its equal shares of the idle energy of the steps it ran in."""
    prefill_j: float
    """Its dynamic energy of prefill (its chunks)."""
    decode_j: float
    """Its dynamic energy of decode (its decode tokens and their context reads)."""

    @property
    def truth_j(self) -> float:
        return self.static_j + self.prefill_j + self.decode_j


@dataclass(slots=True)
class PhaseStats:
    """What one `serve` call's steps did on one board."""

    steps: int = 0
    capped_steps: int = 0
    busy_s: float = 0.0
    batch_s: float = 0.0
    """∫ batch size over the busy time (÷ busy_s: the time-averaged batch)."""
    energy_j: float = 0.0
    """Energy of the steps (idle between them excluded)."""
    max_power_w: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.batch_s / self.busy_s if self.busy_s else 0.0

    @property
    def busy_power_w(self) -> float:
        return self.energy_j / self.busy_s if self.busy_s else 0.0


@dataclass(slots=True)
class _Pieces:
    """A board's power as constant pieces from `times[i]` (seconds) to the next; idle before
    the first; `energy[i]` is the exact integral from times[0] to times[i]."""

    times: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    hint: int = 0
    """The piece of the last lookup: reads come mostly in time order."""


class BatchingServer:
    """One board's continuous-batching scheduler (the module docstring's rules)."""

    def __init__(self, index: int, gpu: GpuModel, cost: StepCost, *,
                 max_batch: int = MAX_BATCH,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 power_cap_w: float = POWER_CAP_W, record_steps: bool = False) -> None:
        if max_batch < 1 or max_num_batched_tokens < max_batch:
            raise ValueError("need max_batch >= 1 and max_num_batched_tokens >= max_batch")
        self.index = index
        self.gpu = gpu
        self.cost = cost
        self.max_batch = max_batch
        self.max_tokens = max_num_batched_tokens
        self.power_cap_w = min(power_cap_w, gpu.tdp_w)
        self.pieces = _Pieces()
        self.busy_s = 0.0
        """Total duration of every step so far."""
        self.free_ms = 0
        """End of the last step: a new phase may not start before it."""
        self.requests: list[BatchedRequest] = []
        self._idle_marker = False
        """The last piece is the idle one that follows a step."""
        self.step_log: list[tuple[int, int, int, int, float]] | None = (
            [] if record_steps else None)
        """With `record_steps`: (start ms, end ms, prefill tokens, decoding sequences,
        dynamic energy) of every step."""

    def mean_life_s(self, batch: int) -> float:
        """A rough lifetime of a median request at a batch of `batch` decoding sequences."""
        cost = self.cost
        context = batch * (PROMPT_MEDIAN + COMPLETION_MEDIAN / 2)
        prefill = cost.duration_s(round(PROMPT_MEDIAN), 0, 0)
        return prefill + COMPLETION_MEDIAN * cost.duration_s(0, batch, round(context))

    def serve(self, concurrency: int, start: float, duration_s: float, rng: random.Random,
              name: str) -> tuple[list[BatchedRequest], PhaseStats]:
        """Closed-loop clients send from `start` for `duration_s`; a request sent before the
        end runs to completion. Returns the finished requests (in order of their end) and
        the steps' figures. Ids are `name` + "-<n>", n counting in order of arrival."""
        if concurrency < 1 or duration_s <= 0:
            raise ValueError("need concurrency >= 1 and duration_s > 0")
        start_ms, stop_ms = _ms(start), _ms(start + duration_s)
        if start_ms < self.free_ms:
            raise ValueError(f"GPU {self.index} is busy until {self.free_ms / 1000} s")
        life_ms = self.mean_life_s(min(concurrency, self.max_batch)) * 1000
        sends = [(start_ms + round(rng.uniform(0, life_ms)), client)
                 for client in range(concurrency)]
        sends = [send for send in sends if send[0] < stop_ms]
        heapq.heapify(sends)
        queue: deque[_Sequence] = deque()
        running: list[_Sequence] = []
        finished: list[BatchedRequest] = []
        stats = PhaseStats()
        number = 0
        t = start_ms
        while True:
            while sends and sends[0][0] <= t:
                sent, client = heapq.heappop(sends)
                prompt = _clipped_lognormal(rng, PROMPT_MEDIAN, 1.0, 8, 8192)
                completion = _clipped_lognormal(rng, COMPLETION_MEDIAN, 0.9, 4, 2048)
                queue.append(_Sequence(f"{name}-{number}", client, sent, prompt, completion))
                number += 1
            if not running and not queue:
                if not sends:
                    break
                t = sends[0][0]
                continue
            ended = self._step(t, running, queue, stats)
            t = self.free_ms
            for seq in ended:
                finished.append(self._finish(seq))
                send = t + round(rng.expovariate(1 / THINK_S) * 1000)
                if send < stop_ms:
                    heapq.heappush(sends, (send, seq.client))
        self.requests.extend(finished)
        return finished, stats

    def _step(self, t: int, running: list[_Sequence], queue: deque[_Sequence],
              stats: PhaseStats) -> list[_Sequence]:
        """Run one step from `t` (ms); return the sequences it finished."""
        budget = self.max_tokens
        decoding = [seq for seq in running if seq.prefilled == seq.prompt]
        budget -= len(decoding)
        chunks: list[tuple[_Sequence, int]] = []
        for seq in running:
            if seq.prefilled < seq.prompt:
                chunk = min(seq.prompt - seq.prefilled, budget)
                budget -= chunk
                chunks.append((seq, chunk))
        while queue and len(running) < self.max_batch and budget > 0:
            seq = queue.popleft()
            seq.scheduled_ms = t
            chunk = min(seq.prompt, budget)
            budget -= chunk
            running.append(seq)
            chunks.append((seq, chunk))
        contexts = [seq.prompt + seq.generated for seq in decoding]
        prefill, decode, context = sum(c for _, c in chunks), len(decoding), sum(contexts)

        cost, idle_w = self.cost, self.gpu.idle_w
        duration_ms = max(1, round(cost.duration_s(prefill, decode, context) * 1000))
        dynamic = cost.dynamic_j(prefill, decode, context)
        energy = idle_w * duration_ms / 1000 + dynamic
        scale = 1.0
        if energy > self.power_cap_w * duration_ms / 1000:
            duration_ms = math.ceil(energy / self.power_cap_w * 1000)
            scale = (energy - idle_w * duration_ms / 1000) / dynamic
            stats.capped_steps += 1
        seconds = duration_ms / 1000
        static = idle_w * seconds / len(running)
        for seq in running:
            seq.static_j += static
        for seq, chunk in chunks:
            seq.prefill_j += scale * cost.prefill_j * chunk
        for seq, ctx in zip(decoding, contexts, strict=True):
            seq.decode_j += scale * (cost.decode_j + cost.context_j * ctx)
        power = idle_w + scale * dynamic / seconds
        self._piece(t, t + duration_ms, power)
        if self.step_log is not None:
            self.step_log.append((t, t + duration_ms, prefill, decode, scale * dynamic))
        stats.steps += 1
        stats.busy_s += seconds
        stats.batch_s += len(running) * seconds
        stats.energy_j += power * seconds
        stats.max_power_w = max(stats.max_power_w, power)

        end = t + duration_ms
        ended: list[_Sequence] = []
        for seq, chunk in chunks:
            seq.prefilled += chunk
            if chunk and seq.prefilled == seq.prompt:
                seq.first_ms, seq.generated = end, 1
        for seq in decoding:
            seq.generated += 1
        for seq in running:
            if seq.generated == seq.completion:
                seq.end_ms = end
                ended.append(seq)
        if ended:
            running[:] = [seq for seq in running if seq.end_ms is None]
        return ended

    def _piece(self, start_ms: int, end_ms: int, power_w: float) -> None:
        """A step's constant power from start to end, and idle after it until the next."""
        pieces, start = self.pieces, start_ms / 1000
        if self._idle_marker and pieces.times[-1] == start:
            pieces.times.pop()  # the step follows the last one at once: no idle between
            pieces.power_w.pop()
            pieces.energy.pop()
        for at, watts in ((start, power_w), (end_ms / 1000, self.gpu.idle_w)):
            if pieces.times:
                pieces.energy.append(pieces.energy[-1]
                                     + pieces.power_w[-1] * (at - pieces.times[-1]))
            else:
                pieces.energy.append(0.0)
            pieces.times.append(at)
            pieces.power_w.append(watts)
        self._idle_marker = True
        self.busy_s += (end_ms - start_ms) / 1000
        self.free_ms = end_ms

    def _finish(self, seq: _Sequence) -> BatchedRequest:
        assert seq.scheduled_ms is not None and seq.first_ms is not None
        assert seq.end_ms is not None
        scheduled = seq.scheduled_ms / 1000
        trace = TraceRequest(
            seq.id, self.cost.name, self.index, scheduled, seq.first_ms / 1000,
            seq.end_ms / 1000, seq.prompt, seq.completion,
            None if seq.scheduled_ms == seq.arrival_ms else seq.arrival_ms / 1000)
        return BatchedRequest(trace, seq.static_j, seq.prefill_j, seq.decode_j)


class BatchingLoad:
    """Several boards, each with its own `BatchingServer`: a `LoadModel` (`power_w`) for
    `SimulatedGpuSource`, with the exact energy of each board and of each request.

    Serve every phase (`serve`) before the source reads the boards: the power of a time
    must not change once read, and a phase adds steps after the boards' last ones only."""

    def __init__(self, gpus: Sequence[GpuModel], models: Sequence[str], *,
                 max_batch: int = MAX_BATCH,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 record_steps: bool = False) -> None:
        if not gpus or len(models) != len(gpus):
            raise ValueError("need one model name per GPU, and at least one GPU")
        self.gpus = tuple(gpus)
        self.servers = [
            BatchingServer(index, gpu, COSTS[model], max_batch=max_batch,
                           max_num_batched_tokens=max_num_batched_tokens,
                           record_steps=record_steps)
            for index, (gpu, model) in enumerate(zip(gpus, models, strict=True))
        ]
        self._truth: dict[str, BatchedRequest] = {}

    def serve(self, concurrency: int, start: float, duration_s: float, seed: str,
              prefix: str = "") -> tuple[list[TraceRequest], list[PhaseStats]]:
        """Every board serves `concurrency` clients from `start` for `duration_s` (each its
        own random stream, from `seed`); returns the requests, sorted by arrival, and each
        board's figures."""
        trace: list[TraceRequest] = []
        stats: list[PhaseStats] = []
        for server in self.servers:
            rng = random.Random(f"{seed}/gpu{server.index}")
            done, figures = server.serve(concurrency, start, duration_s, rng,
                                         f"{prefix}{server.cost.name}")
            for request in done:
                self._truth[request.trace.id] = request
                trace.append(request.trace)
            stats.append(figures)
        trace.sort(key=lambda r: (r.arrived, r.gpu, r.id))
        return trace, stats

    def power_w(self, index: int, t: float) -> float:
        pieces = self.servers[index].pieces
        times, i = pieces.times, pieces.hint
        last = len(times) - 1
        if not (i <= last and times[i] <= t and (i == last or t < times[i + 1])):
            i = bisect.bisect_right(times, t) - 1
            if i < 0:
                return self.gpus[index].idle_w
            pieces.hint = i
        return pieces.power_w[i]

    def energy_j(self, index: int, t0: float, t1: float) -> float:
        """The board's exact energy over [t0, t1], from its pieces."""
        return self._board(index, t1) - self._board(index, t0)

    def _board(self, index: int, t: float) -> float:
        pieces, idle = self.servers[index].pieces, self.gpus[index].idle_w
        if not pieces.times or t < pieces.times[0]:
            return idle * (t - (pieces.times[0] if pieces.times else 0.0))
        i = bisect.bisect_right(pieces.times, t) - 1
        return pieces.energy[i] + pieces.power_w[i] * (t - pieces.times[i])

    def request(self, request_id: str) -> BatchedRequest:
        return self._truth[request_id]

    def truth_j(self, request_id: str) -> float:
        return self._truth[request_id].truth_j

    def accounted_j(self, index: int, until: float) -> float:
        """Σ truth of the board's requests + idle_w × the time in [0, until] with no step:
        the board's energy from 0 to `until` by the truth's books (`until` at or after the
        board's last step)."""
        server = self.servers[index]
        if until * 1000 < server.free_ms - 1e-6:
            raise ValueError("the books close only after the board's last step")
        truth = math.fsum(r.truth_j for r in server.requests)
        return truth + self.gpus[index].idle_w * (until - server.busy_s)

    def simulated_ratio(self, trace: Sequence[TraceRequest]) -> list[float]:
        """Per GPU, over `trace`: dynamic energy per prompt token ÷ dynamic energy per
        completion token, as the engine's prefill weight counts them (completion tokens are
        spread over [first token, end), so the first token's count is in the divisor)."""
        ratios = []
        for index in range(len(self.gpus)):
            mine = [self._truth[r.id] for r in trace if r.gpu == index]
            prompt = sum(r.trace.prompt_tokens for r in mine)
            completion = sum(r.trace.completion_tokens for r in mine)
            prefill = math.fsum(r.prefill_j for r in mine)
            decode = math.fsum(r.decode_j for r in mine)
            ratios.append((prefill / prompt) / (decode / completion)
                          if prompt and decode else math.nan)
        return ratios


def decode_count_fit(server: BatchingServer, trace: Sequence[TraceRequest], t0: float,
                     t1: float, sample_s: float = 1.0) -> tuple[float, float, float]:
    """What spreading tokens uniformly does to a fit of the prefill weight, on the board's
    recorded steps (`record_steps`) in [t0, t1), cut into `sample_s` samples.

    Returns a/b of the least-squares fit E ≈ a·P + b·D of each sample's dynamic energy
    (i) on the prefill tokens and decode tokens the steps really processed in it and (ii) on
    the tokens each request's counts give when spread uniformly, its prompt over [start, first
    token) and its completion over [first token, end), as the engine spreads them; and the
    correlation of (ii)'s decode error with its prompt tokens. A step's work and energy are
    shared among the samples it overlaps in proportion to the overlap."""
    if server.step_log is None:
        raise ValueError("the server did not record its steps")
    samples = max(1, math.ceil((t1 - t0) / sample_s))
    energy, prefill, decode = [0.0] * samples, [0.0] * samples, [0.0] * samples
    spread_p, spread_d = [0.0] * samples, [0.0] * samples

    def share(a: float, b: float, amount: float, into: list[float]) -> None:
        if b <= a:
            return
        rate = amount / (b - a)
        first = max(0, int((a - t0) // sample_s))
        for i in range(first, min(samples, int((b - t0) // sample_s) + 1)):
            lo, hi = max(a, t0 + i * sample_s), min(b, t0 + (i + 1) * sample_s)
            if hi > lo:
                into[i] += rate * (hi - lo)

    for start_ms, end_ms, p, d, dynamic_j in server.step_log:
        a, b = start_ms / 1000, end_ms / 1000
        if b > t0 and a < t1:
            share(a, b, dynamic_j, energy)
            share(a, b, p, prefill)
            share(a, b, d, decode)
    for r in trace:
        if r.gpu == server.index:
            share(r.start, r.first_token, r.prompt_tokens, spread_p)
            share(r.first_token, r.end, r.completion_tokens, spread_d)
    used = [i for i in range(samples) if decode[i] > 0 and spread_d[i] > 0]

    def ratio(ps: list[float], ds: list[float]) -> float:
        pp = sum(ps[i] ** 2 for i in used)
        dd = sum(ds[i] ** 2 for i in used)
        pd = sum(ps[i] * ds[i] for i in used)
        pe = sum(ps[i] * energy[i] for i in used)
        de = sum(ds[i] * energy[i] for i in used)
        det = pp * dd - pd * pd
        return (dd * pe - pd * de) / (pp * de - pd * pe) if det > 0 else math.nan

    errors = [spread_d[i] - decode[i] for i in used]
    prompts = [spread_p[i] for i in used]
    return (ratio(prefill, decode), ratio(spread_p, spread_d),
            statistics.correlation(prompts, errors) if len(used) > 2 else math.nan)


def _clipped_lognormal(rng: random.Random, median: float, sigma: float, low: int,
                       high: int) -> int:
    return min(high, max(low, round(median * math.exp(rng.gauss(0.0, sigma)))))


def _ms(t: float) -> int:
    return round(t * 1000)


def main() -> None:
    """The simulator's own figures at each concurrency, for one seed: what its steps did,
    the latencies it gives, the check of its books, and what a prefill-weight fit makes of
    its 1 s samples (`decode_count_fit`; no engine involved)."""
    from dataclasses import replace

    from agent.sim.gpus import MODELS

    draw = random.Random("batching/0/idle")
    gpus = [replace(MODELS["H100"], idle_w=round(draw.uniform(*IDLE_RANGE_W), 1))
            for _ in range(2)]
    print("continuous batching, 2 x H100 (small-8b, large-70b), 90 s of clients per level")
    for concurrency in (1, 8, 32, 64):
        load = BatchingLoad(gpus, ["small-8b", "large-70b"], record_steps=True)
        trace, stats = load.serve(concurrency, 10.0, 90.0, "batching/0/level")
        last = max(r.end for r in trace)
        for index, steps in enumerate(stats):
            mine = [r for r in trace if r.gpu == index]
            ttft = sorted(r.first_token - r.arrived for r in mine)[len(mine) // 2]
            itl = sorted((r.end - r.first_token) / max(r.completion_tokens - 1, 1)
                         for r in mine)[len(mine) // 2]
            queue = sum(r.start - r.arrived for r in mine) / len(mine)
            books = load.accounted_j(index, last)
            exact = load.energy_j(index, 0.0, last)
            print(f"concurrency {concurrency:>2}, GPU {index} ({load.servers[index].cost.name}, "
                  f"idle {gpus[index].idle_w} W): {len(mine)} requests, {steps.steps} steps, "
                  f"batch {steps.mean_batch:.1f}, {steps.busy_power_w:.0f} W busy, "
                  f"{steps.capped_steps / steps.steps:.1%} capped, queue {queue:.2f} s, "
                  f"TTFT {ttft * 1000:.0f} ms, ITL {itl * 1000:.1f} ms, ratio "
                  f"{load.simulated_ratio(trace)[index]:.4f}, books "
                  f"{abs(books - exact) / exact:.1e}")
            true, spread, correlation = decode_count_fit(load.servers[index], trace, 10.0,
                                                         last)
            print(f"  prefill weight fitted on 1 s samples: {true:.4f} with the tokens the "
                  f"steps processed, {spread:.4f} with the counts spread uniformly as the "
                  f"engine spreads them (their decode error correlates {correlation:+.2f} "
                  f"with the prompt tokens)")


if __name__ == "__main__":
    main()
