"""A small OpenAI-compatible server standing in for vLLM: for the proxy's tests, `jouleprobe
demo` and bench/proxy.py.

Routes: `GET /v1/models`, `GET /health`, `GET /metrics`, `POST /v1/chat/completions`,
`/v1/completions` and `/v1/embeddings`, streaming (SSE) and not. Everything it answers
(but /metrics) is a function of the request alone: the text, the token counts, the
response id (derived from the model and prompt) and `created` (fixed), so the same
request gives the same bytes, whether sent directly or through the proxy.

Streams have OpenAI's chunk format in vLLM's flavour: a first chunk with the assistant role
and empty content, one chunk per token, a last chunk with an empty delta and the finish
reason, then, only when `stream_options.include_usage` is true, a chunk with empty `choices`
and the `usage` object (other chunks carry no `usage` key at all, as with vLLM), and
`data: [DONE]`.

Tokens: a prompt is cut into words and punctuation marks (`\\w+|[^\\w\\s]`), one token each;
a chat prompt adds one token per message (its role) and one for the reply's. A completion
is a sequence of words from a fixed vocabulary, one token each, whose length (8 to 32
tokens) and words follow from the prompt, capped by `max_tokens`/`max_completion_tokens`.

Timing follows the model's speed, `models[name]` tokens per second: the first token comes
after `prompt_tokens / (speed × prefill_speedup)` seconds, each further token `1 / speed`
seconds after the previous one. A speed of `math.inf` answers without any delay.

The hooks let a simulation follow the load: `on_start(key, model)` once a request is
accepted, `on_first_token(key)` when its first token is produced, `on_end(key)` when it is
over (answered, failed or abandoned by its client). `key` is a number unique within the app;
the response id is not, since identical requests get identical ids.

`GET /metrics` is this SIMULATED server's imitation of vLLM's Prometheus exposition, written
here after vLLM's sources, not a capture of a real server: the families and labels that the
agent's `vllm` scraper reads, with the names, help texts, labels and counting of vLLM's V1
engine as of vLLM 0.10 to 0.13 (vllm/v1/metrics/loggers.py, `PrometheusStatLogger`, and
vllm/v1/metrics/stats.py). `_VllmMetrics` says what is counted and when. Like vLLM's, it
needs no API key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from agent.sim.traces import vllm_span

CREATED = 1_700_000_000
"""`created` of every response, for responses that do not depend on when they were made."""
OWNER = "jouleprobe-fake"
SYSTEM_FINGERPRINT = "fp_jouleprobe"
EMBEDDING_DIMENSIONS = 8
MIN_COMPLETION_TOKENS = 8
MAX_COMPLETION_TOKENS = 32
"""Range of a completion's natural length, before `max_tokens`."""

_TOKEN = re.compile(r"\w+|[^\w\s]")
_VOCABULARY = (
    "joule", "watt", "energy", "token", "request", "power", "board", "counter", "sample",
    "interval", "baseline", "prefill", "decode", "batch", "cluster", "node", "rack", "grid",
    "carbon", "water", "facility", "measure", "share", "model", "answer", "stream", "idle",
    "clock", "second", "fleet", "queue", "kernel",
)

Hook = Callable[[int], None]


def count_tokens(text: str) -> int:
    """Tokens of `text` in the fake's tokenisation: one per word or punctuation mark."""
    return len(_TOKEN.findall(text))


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class _Job:
    """What one generation request asks for, worked out before any delay."""

    kind: str
    """"chat" or "completion"."""
    id: str
    model: str
    speed: float
    prompt_tokens: int
    tokens: tuple[str, ...]
    finish_reason: str
    stream: bool
    include_usage: bool

    def usage(self) -> dict[str, int]:
        completion = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _error(status: int, message: str, param: str | None = None,
           code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(body=_dumps(body), status=status, content_type="application/json")


def _text_of(content: Any, param: str) -> str:
    """A message's content: a string, or a list of parts whose text parts count."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise _BadRequest(f"{param}: expected a string or a list of content parts", param)


def _chat_prompt(body: dict[str, Any]) -> tuple[str, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages: expected a non-empty list", "messages")
    texts = []
    tokens = 1  # the reply's role
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"messages[{i}]: expected an object", "messages")
        text = _text_of(message.get("content"), f"messages[{i}].content")
        texts.append(f"{message.get('role', '')}: {text}")
        tokens += 1 + count_tokens(text)
    return "\n".join(texts), tokens


def _inputs(value: Any, param: str) -> list[tuple[str, int]]:
    """A prompt or embedding input as (text, tokens) items: a string, a list of strings, a
    list of token ids, or a list of lists of token ids."""
    def one(item: Any) -> tuple[str, int]:
        if isinstance(item, str):
            return item, count_tokens(item)
        if isinstance(item, list) and all(type(t) is int for t in item):
            return " ".join(map(str, item)), len(item)
        raise _BadRequest(f"{param}: expected a string, a list of strings or token ids", param)

    if isinstance(value, list) and value and not all(type(t) is int for t in value):
        return [one(item) for item in value]
    if value == [] or value is None:
        raise _BadRequest(f"{param}: required", param)
    return [one(value)]


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise _BadRequest(f"{name}: expected an integer >= 1", name)
        return value
    return None


def _completion(prompt: str, limit: int | None) -> tuple[tuple[str, ...], str]:
    """The deterministic completion of `prompt`: its tokens and finish reason."""
    seed = zlib.crc32(prompt.encode())
    natural = MIN_COMPLETION_TOKENS + seed % (MAX_COMPLETION_TOKENS - MIN_COMPLETION_TOKENS + 1)
    count = natural if limit is None else min(natural, limit)
    words = [_VOCABULARY[(seed + 7 * i) % len(_VOCABULARY)] for i in range(count)]
    tokens = tuple(word if i == 0 else " " + word for i, word in enumerate(words))
    return tokens, "length" if count < natural else "stop"


def _embedding(text: str) -> list[float]:
    """Deterministic float32 values in [-1, 1)."""
    seed = zlib.crc32(text.encode())
    raw = [((seed * (2 * k + 1) * 2654435761) % 2**32) / 2**31 - 1.0
           for k in range(EMBEDDING_DIMENSIONS)]
    packed = struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *raw)
    return list(struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", packed))


ENGINE = "0"
"""The `engine` label of every series: vLLM's index of its engine core, "0" with one."""
FINISHED_REASONS = ("stop", "length", "abort")
"""vLLM's `FinishReason` values, each a `finished_reason` series from the start."""


class _VllmMetrics:
    """The SIMULATED server's imitation of vLLM's /metrics (not a capture of a real one):
    vLLM V1's names, help texts and labels (`model_name`, `engine`), one series per model
    of the app, each listed (at 0) from the start, as vLLM lists its own at startup.

    When each is counted, as vLLM's engine counts (vllm/v1/metrics/stats.py):
    - `vllm:prompt_tokens_total`: a request's prompt tokens once its prefill is done, when
      its first token is produced, even if its client leaves afterwards; a request cut off
      before then counts none.
    - `vllm:generation_tokens_total`: tokens as they are produced, the first with the end
      of the prefill. A streamed token counts when it is produced, before it is written; a
      non-streamed answer's tokens count by the clock of its generation (one at the first
      token, then one every `1 / speed` seconds), brought up to date at each scrape and at
      the request's end, so a scrape mid-request sees the tokens produced so far and a
      request cut off counts those produced before the cut.
    - `vllm:request_success_total{finished_reason}`: once, when the request's last token is
      produced (vLLM's engine finishes a request with its last token): "length" where the
      answer was cut by max_tokens, else "stop". A request that fails or whose client
      leaves before its end is not counted: vLLM lists a `finished_reason="abort"` series
      but, up to 0.13 at least, never increments it (its abort path bypasses the stats,
      vllm-project/vllm#31503), so here it stays 0 too.
    - Embeddings are counted as vLLM's pooling requests: prompt tokens and a "stop" success
      when their prefill is done (a pooling request finishes with its prefill), no
      generation tokens.
    - `vllm:num_requests_running` / `vllm:num_requests_waiting` (gauges): completions that
      hold a slot of the batch (`max_batch`) / wait in the queue for one; embeddings, which
      the batch does not limit, count as running while they are computed.
    """

    def __init__(self, models: Mapping[str, float]) -> None:
        self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        self.running = Gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.", labels,
                             registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.", labels,
                             registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         registry=self.registry)
        self.success = Counter("vllm:request_success",
                               "Count of successfully processed requests.",
                               (*labels, "finished_reason"), registry=self.registry)
        for model in models:
            for family in (self.running, self.waiting, self.prompt_tokens,
                           self.generation_tokens):
                family.labels(model, ENGINE)
            for reason in FINISHED_REASONS:
                self.success.labels(model, ENGINE, reason)
        self.live: set[_Tally] = set()
        """Requests whose generation tokens count by the clock, to bring up to date."""

    def render(self) -> bytes:
        for tally in list(self.live):
            tally.catch_up()
        return generate_latest(self.registry)


class _Tally:
    """What one request has added to the counters so far (`_VllmMetrics`)."""

    def __init__(self, metrics: _VllmMetrics, model: str, speed: float) -> None:
        self._metrics = metrics
        self._model = model
        self._speed = speed
        self._produced = 0
        self._clock: tuple[float, int] | None = None
        """(when its first token came, its tokens) for tokens counted by the clock."""
        self._finished = False

    def prefilled(self, prompt_tokens: int, *, first_token: bool = True) -> None:
        """The prefill is done: its prompt tokens count, and its first token (if any)."""
        self._metrics.prompt_tokens.labels(self._model, ENGINE).inc(prompt_tokens)
        if first_token:
            self.produced(1)

    def clocked(self, tokens: int) -> None:
        """From now on its `tokens` count by the clock, the first of them now."""
        self._clock = (time.monotonic(), tokens)
        self._metrics.live.add(self)
        self.catch_up()

    def produced(self, tokens: int) -> None:
        """It has produced `tokens` tokens in all."""
        if tokens > self._produced:
            self._metrics.generation_tokens.labels(self._model, ENGINE).inc(
                tokens - self._produced)
            self._produced = tokens

    def catch_up(self) -> None:
        if self._clock is None:
            return
        start, tokens = self._clock
        if math.isfinite(self._speed):
            tokens = min(tokens, 1 + math.floor((time.monotonic() - start) * self._speed))
        self.produced(tokens)

    def finished(self, tokens: int, reason: str) -> None:
        """Its last token is produced: it has `tokens` tokens, and finished for `reason`."""
        self._clock = None
        self._metrics.live.discard(self)
        self.produced(tokens)
        if not self._finished:
            self._finished = True
            self._metrics.success.labels(self._model, ENGINE, reason).inc()

    def close(self) -> None:
        """The request is over, finished or not: tokens by the clock count up to now."""
        self.catch_up()
        self._clock = None
        self._metrics.live.discard(self)


class _FakeUpstream:
    def __init__(
        self,
        models: Mapping[str, float],
        prefill_speedup: float,
        api_key: str | None,
        on_start: Callable[[int, str], None] | None,
        on_first_token: Hook | None,
        on_end: Hook | None,
        max_batch: int | None = None,
        traces: TracerProvider | None = None,
    ) -> None:
        if not models:
            raise ValueError("the fake upstream needs at least one model")
        if any(not speed > 0 for speed in models.values()) or not prefill_speedup > 0:
            raise ValueError("model speeds and prefill_speedup must be > 0 (math.inf: no delay)")
        self.models = dict(models)
        self.prefill_speedup = prefill_speedup
        self.api_key = api_key
        self.on_start = on_start
        self.on_first_token = on_first_token
        self.on_end = on_end
        self._keys = itertools.count(1)
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._batch = None if max_batch is None else asyncio.Semaphore(max_batch)
        self._traces = traces
        self._metrics = _VllmMetrics(self.models)

    # --- routes ------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        if refusal := self._check_key(request):
            return refusal
        data = [{"id": name, "object": "model", "created": CREATED, "owned_by": OWNER}
                for name in self.models]
        return web.Response(body=_dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        """vLLM's exposition, imitated (`_VllmMetrics`); no API key, as with vLLM."""
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        if refusal := self._check_key(request):
            return refusal
        raw = await request.read()
        try:
            body, model, speed = self._parse(raw)
            inputs = _inputs(body.get("input"), "input")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise _BadRequest("encoding_format: expected float or base64", "encoding_format")
        except _BadRequest as exc:
            return _error(exc.status, exc.message, exc.param, exc.code)
        prompt_tokens = sum(tokens for _, tokens in inputs)
        key = self._start(model)
        running = self._metrics.running.labels(model, ENGINE)
        running.inc()
        try:
            await self._sleep(prompt_tokens / (speed * self.prefill_speedup))
            tally = _Tally(self._metrics, model, speed)  # a pooling request: done with its
            tally.prefilled(prompt_tokens, first_token=False)  # prefill, nothing generated
            tally.finished(0, "stop")
            self._first_token(key)
            data = []
            for index, (text, _) in enumerate(inputs):
                vector: Any = _embedding(text)
                if encoding == "base64":
                    vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": vector})
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            document = {"object": "list", "data": data, "model": model, "usage": usage}
            return web.Response(body=_dumps(document), content_type="application/json")
        finally:
            running.dec()
            self._end(key)

    # --- generation ----------------------------------------------------------------------

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        if refusal := self._check_key(request):
            return refusal
        raw = await request.read()
        try:
            job = self._job(raw, kind)
        except _BadRequest as exc:
            return _error(exc.status, exc.message, exc.param, exc.code)
        arrival = time.time()
        async with self._scheduled(job.model):
            scheduled = time.time()
            key = self._start(job.model)
            first_token: list[float] = []
            finished = False
            tally = _Tally(self._metrics, job.model, job.speed)
            try:
                if job.stream:
                    response, finished = await self._stream(request, job, key, first_token,
                                                            tally)
                    return response
                await self._produce(job, key, first_token, tally)
                finished = True
                return web.Response(body=_dumps(self._whole(job)),
                                    content_type="application/json")
            finally:
                tally.close()
                self._end(key)
                if self._traces is not None and finished:
                    vllm_span(self._traces, f"{job.id}-{key}", arrival,
                              queue=scheduled - arrival, ttft=first_token[0] - arrival,
                              e2e=time.time() - arrival, prompt=job.prompt_tokens,
                              completion=len(job.tokens))

    @contextlib.asynccontextmanager
    async def _scheduled(self, model: str) -> AsyncIterator[None]:
        """Holds a slot of the batch (with `max_batch`), counted as waiting until it has
        one, then as running."""
        waiting = self._metrics.waiting.labels(model, ENGINE)
        running = self._metrics.running.labels(model, ENGINE)
        waiting.inc()
        admitted = False
        try:
            async with self._batch or contextlib.nullcontext():
                admitted = True
                waiting.dec()
                running.inc()
                try:
                    yield
                finally:
                    running.dec()
        finally:
            if not admitted:
                waiting.dec()

    def _job(self, raw: bytes, kind: str) -> _Job:
        body, model, speed = self._parse(raw)
        if kind == "chat":
            prompt, prompt_tokens = _chat_prompt(body)
        else:
            items = _inputs(body.get("prompt"), "prompt")
            prompt = "\n".join(text for text, _ in items)
            prompt_tokens = sum(tokens for _, tokens in items)
        tokens, finish_reason = _completion(prompt, _max_tokens(body))
        stream = body.get("stream") is True
        options = body.get("stream_options")
        if options is not None and not (stream and isinstance(options, dict)):
            raise _BadRequest("stream_options: only allowed as an object when stream is true",
                              "stream_options")
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return _Job(
            kind=kind, id=f"{prefix}{zlib.crc32(f'{model}|{prompt}'.encode()):08x}",
            model=model, speed=speed,
            prompt_tokens=prompt_tokens, tokens=tokens, finish_reason=finish_reason,
            stream=stream, include_usage=bool(options and options.get("include_usage") is True),
        )

    def _parse(self, raw: bytes) -> tuple[dict[str, Any], str, float]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models:
            raise _BadRequest(f"The model `{model}` does not exist.", "model", 404,
                              "model_not_found")
        return body, model, self.models[model]

    async def _produce(self, job: _Job, key: int, first_token: list[float],
                       tally: _Tally) -> None:
        """Waits as long as the whole generation takes (non-streaming answers)."""
        await self._sleep(self._prefill_s(job))
        tally.prefilled(job.prompt_tokens)
        tally.clocked(len(job.tokens))
        self._first_token(key, first_token)
        await self._sleep((len(job.tokens) - 1) / job.speed)
        tally.finished(len(job.tokens), job.finish_reason)

    async def _stream(self, request: web.Request, job: _Job, key: int,
                      first_token: list[float], tally: _Tally,
                      ) -> tuple[web.StreamResponse, bool]:
        """The streamed answer, and whether it was sent whole."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await self._sleep(self._prefill_s(job))
            tally.prefilled(job.prompt_tokens)  # the first token, produced with the prefill
            await response.write(self._event(job, self._choice(job, role=True)))
            for i, token in enumerate(job.tokens):
                if i:
                    await self._sleep(1 / job.speed)
                    tally.produced(i + 1)
                else:
                    self._first_token(key, first_token)
                if i == len(job.tokens) - 1:
                    tally.finished(len(job.tokens), job.finish_reason)
                await response.write(self._event(job, self._choice(job, text=token)))
            await response.write(self._event(job, self._choice(job, finish=True)))
            if job.include_usage:
                await response.write(self._event(job, [], usage=job.usage()))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client has gone: generation stops, as vLLM
            return response, False    # aborts the request
        return response, True

    def _prefill_s(self, job: _Job) -> float:
        return job.prompt_tokens / (job.speed * self.prefill_speedup)

    def _choice(self, job: _Job, *, role: bool = False, text: str = "",
                finish: bool = False) -> list[dict[str, Any]]:
        reason = job.finish_reason if finish else None
        if job.kind == "completion":
            return [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif not finish:
            delta = {"content": text}
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

    def _event(self, job: _Job, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": job.id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": CREATED, "model": job.model,
        }
        if job.kind == "chat":
            chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
        chunk["choices"] = choices
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + _dumps(chunk) + b"\n\n"

    def _whole(self, job: _Job) -> dict[str, Any]:
        text = "".join(job.tokens)
        if job.kind == "completion":
            return {"id": job.id, "object": "text_completion", "created": CREATED,
                    "model": job.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": job.finish_reason}],
                    "usage": job.usage()}
        return {"id": job.id, "object": "chat.completion", "created": CREATED,
                "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": job.usage()}

    # --- helpers -------------------------------------------------------------------------

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        if request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "Incorrect API key provided.", code="invalid_api_key")

    @staticmethod
    async def _sleep(seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            await asyncio.sleep(seconds)

    def _start(self, model: str) -> int:
        key = next(self._keys)
        if self.on_start is not None:
            self.on_start(key, model)
        return key

    def _first_token(self, key: int, when: list[float] | None = None) -> None:
        if when is not None:
            when.append(time.time())
        if self.on_first_token is not None:
            self.on_first_token(key)

    def _end(self, key: int) -> None:
        if self.on_end is not None:
            self.on_end(key)


def fake_upstream_app(
    *,
    models: Mapping[str, float],
    prefill_speedup: float = 50.0,
    api_key: str | None = None,
    on_start: Callable[[int, str], None] | None = None,
    on_first_token: Hook | None = None,
    on_end: Hook | None = None,
    max_batch: int | None = None,
    traces: TracerProvider | None = None,
) -> web.Application:
    """An OpenAI-compatible server for `models` ({name: decode tokens per second}).

    Prefill runs `prefill_speedup` times faster than decoding. With `api_key` set, every
    `/v1/...` request must carry `Authorization: Bearer <api_key>` (else 401). With
    `max_batch`, at most that many completions run at once and the others wait in a queue,
    as in a server's batch. With `traces`, each finished completion is exported as vLLM's
    `llm_request` span (`agent.sim.traces`). `GET /metrics` imitates vLLM's Prometheus
    exposition, per app (`_VllmMetrics`). See the module docstring for the answers, the
    timing and the hooks.
    """
    fake = _FakeUpstream(models, prefill_speedup, api_key, on_start, on_first_token, on_end,
                         max_batch, traces)
    app = web.Application()
    app.router.add_get("/health", fake.health)
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_get("/v1/models", fake.list_models)
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_post("/v1/completions", fake.completions)
    app.router.add_post("/v1/embeddings", fake.embeddings)
    return app
