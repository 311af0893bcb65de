"""The OpenAI-compatible reverse proxy (docs/design.md §6), in front of vLLM, SGLang, TGI,
Triton's OpenAI frontend, llama.cpp or Ollama.

Measured: `POST` to any path ending in `/chat/completions`, `/completions` or `/embeddings`
(`/v1/...` or under another prefix). Each is one `Request` of source `proxy:<name>`, added to
the attribution engine when it starts and ended when it ends:

- start: when its handler starts, i.e. once the request line and headers have arrived, the
  first bytes of the request; end: once the last byte of the response is handed to the
  socket (or the client has gone, or the upstream has failed);
- model: `table.model` when set, else the body's `model` (a non-empty string of at most
  `MAX_MODEL_LENGTH` characters, valid Unicode: it becomes a label value), else "unknown";
- tokens: the response's `usage` (counts up to `MAX_TOKENS`). In a stream, the first token
  is the first chunk whose choices carry content (`delta.content`,
  `delta.reasoning_content`, `delta.tool_calls` or `text`); the proxy asks the upstream for
  `stream_options.include_usage` when the client plainly did not (no `stream_options`, or
  `include_usage: false`), and drops the usage-only chunk (empty `choices`, a `usage`
  object) that this adds, so the client gets what the upstream would have sent it. Other
  `stream_options` are left as they are: servers disagree on what `{}` means (vLLM long
  took it for `include_usage: true`), and a client that asked for usage itself gets every
  chunk untouched;
- status: "ok" for a 2xx answer delivered whole, "failed" for any other upstream status,
  an unreachable upstream (answered 502) or one that timed out (answered 504: no byte for
  `table.timeout` seconds, while connecting, waiting for the answer or between two of its
  chunks; an answer already begun is cut off instead, so that the client cannot take it
  for a whole one), "cancelled" when the client disconnected first. When a stream
  ends without usage (client gone, upstream cut off), the completion tokens recorded are
  the chunks whose choices carried content, summed over choices: one per token on vLLM,
  SGLang and TGI, fewer where a chunk carries several tokens (speculative decoding); the
  prompt tokens stay unknown.

Measured responses carry `X-Jouleprobe-Request-Id`; everything else passes through
untouched (`relay` says which headers do not).

`app` is the aiohttp app and its bounds, `relay` the forwarding to the upstream, `openai`
what is read of OpenAI bodies and streams.
"""

from agent.intake.proxy.app import (
    PROXY_STATS,
    REQUEST_ID_HEADER,
    RUNNER_OPTIONS,
    ProxyStats,
    proxy_app,
)

__all__ = ["PROXY_STATS", "REQUEST_ID_HEADER", "RUNNER_OPTIONS", "ProxyStats", "proxy_app"]
