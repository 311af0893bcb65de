"""A small OpenAI-compatible server of real generation, for `bench/gpu_validate.py` step 3.

A decoder-only transformer with random weights (nothing can be downloaded on the GPU
machine): on CUDA, a Llama-shaped model of about 1 B parameters built from a config with
`transformers`; without CUDA, a tiny two-layer transformer in numpy on the CPU. Either way
it really computes every token, so the energy the agent attributes is that of real work.

The server batches: one loop takes every running request, runs one forward step for all
of them together, and hands each its next token, as continuous batching does. Requests
join and leave the batch between steps. `POST /v1/chat/completions` answers whole or as an
SSE stream (with the usage chunk when `stream_options.include_usage` asks for it), with
`usage` counted in the model's own tokens (bytes of the prompt, modulo the vocabulary).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_BATCH = 32


class NumpyModel:
    """Two transformer layers, width 64, vocabulary 256, random weights, greedy decoding."""

    name = "tiny-numpy-transformer (CPU, random weights)"

    def __init__(self, seed: int = 0, width: int = 64, layers: int = 2, vocab: int = 256):
        import numpy as np

        self.np = np
        rng = np.random.default_rng(seed)
        scale = 1 / np.sqrt(width)
        self.vocab = vocab
        self.embed = rng.normal(0, 1, (vocab, width)).astype(np.float32)
        self.layers = [{k: rng.normal(0, scale, shape).astype(np.float32) for k, shape in
                        {"q": (width, width), "k": (width, width), "v": (width, width),
                         "o": (width, width), "up": (width, 4 * width),
                         "down": (4 * width, width)}.items()} for _ in range(layers)]

    def next_tokens(self, sequences: list[list[int]]) -> list[int]:
        np = self.np
        length = max(len(s) for s in sequences)
        ids = np.zeros((len(sequences), length), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq):] = seq  # left-padded: the last position is real
        x = self.embed[ids]
        causal = np.triu(np.full((length, length), -1e9, dtype=np.float32), 1)
        for w in self.layers:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            x = x + (scores / scores.sum(-1, keepdims=True)) @ v @ w["o"]
            x = x + np.maximum(x @ w["up"], 0) @ w["down"]
        logits = x[:, -1] @ self.embed.T
        return [int(t) for t in logits.argmax(-1)]


class TorchModel:
    """A Llama-shaped decoder of about 1 B parameters, random weights, fp16 on CUDA."""

    name = "Llama-shaped 1.1 B (transformers, random weights, fp16, CUDA)"

    def __init__(self) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        self.torch = torch
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, max_position_embeddings=2048)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config).half().cuda().eval()
        self.vocab = config.vocab_size

    def next_tokens(self, sequences: list[list[int]]) -> list[int]:
        torch = self.torch
        length = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), length), dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq):] = torch.tensor(seq)
            mask[row, length - len(seq):] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
        return [int(t) for t in logits[:, -1].argmax(-1).tolist()]


def build_model(cuda: bool) -> NumpyModel | TorchModel:
    return TorchModel() if cuda else NumpyModel()


@dataclass
class _Sequence:
    tokens: list[int]
    prompt_tokens: int
    max_tokens: int
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_tokens


class BatchingServer:
    """The model behind `POST /v1/chat/completions`, one batched forward step at a time."""

    def __init__(self, model: NumpyModel | TorchModel) -> None:
        self.model = model
        self._waiting: list[_Sequence] = []
        self._wake = asyncio.Event()
        self.steps = 0
        self.batch_sizes: list[int] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self._loop = asyncio.create_task(self._run())

    async def _stop(self, _app: web.Application) -> None:
        self._loop.cancel()

    async def _run(self) -> None:
        running: list[_Sequence] = []
        while True:
            if not running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            room = MAX_BATCH - len(running)
            running += self._waiting[:room]
            del self._waiting[:room]
            batch = [s.tokens for s in running]
            tokens = await asyncio.to_thread(self.model.next_tokens, batch)
            self.steps += 1
            self.batch_sizes.append(len(batch))
            for seq, token in zip(running, tokens, strict=True):
                seq.tokens.append(token)
                seq.out.put_nowait(token)
                if seq.generated >= seq.max_tokens:
                    seq.out.put_nowait(None)
            running = [s for s in running if s.generated < s.max_tokens]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        text = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        prompt = [b % self.model.vocab for b in text.encode()] or [0]
        seq = _Sequence(prompt, len(prompt), int(body.get("max_tokens") or 16))
        self._waiting.append(seq)
        self._wake.set()
        model = str(body.get("model", "model"))
        rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def usage() -> dict[str, int]:
            return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.generated,
                    "total_tokens": len(seq.tokens)}

        if not body.get("stream"):
            while await seq.out.get() is not None:
                pass
            return web.json_response({
                "id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": usage(),
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant",
                                         "content": _text(seq.tokens[seq.prompt_tokens:])}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(chunk: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        while (token := await seq.out.get()) is not None:
            await send(chunk({"content": _text([token])}, None))
        await send(chunk({}, "length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"id": rid, "object": "chat.completion.chunk", "model": model,
                        "choices": [], "usage": usage()})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _text(tokens: list[int]) -> str:
    return "".join(chr(32 + t % 95) for t in tokens)
