"""The OpenAI-compatible reverse proxy (docs/design.md §6), in front of vLLM, SGLang, TGI,
Triton's OpenAI frontend, llama.cpp or Ollama.

Measured: `POST` to any path ending in `/chat/completions`, `/completions` or `/embeddings`
(`/v1/...` or under another prefix), and Ollama's native `/api/chat` and `/api/generate`.
Each is one `Request` of source `proxy:<name>`, added to the attribution engine when it
starts and ended when it ends:

- start: when its handler starts, i.e. once the request line and headers have arrived, the
  first bytes of the request; end: once the last byte of the response is handed to the
  socket (or the client has gone, or the upstream has failed);
- model: `table.model` when set, else the body's `model` (a non-empty string of at most
  `MAX_MODEL_LENGTH` characters, valid Unicode: it becomes a label value), else "unknown";
- tokens and timing: what the answer says (`measurement`: `usage`, llama.cpp's `timings`,
  Ollama's counts and durations), else the content chunks counted (`tokens_estimated`). In
  a stream the first token is the first chunk whose choices carry content. The client gets
  what the server sends it unasked: the proxy asks for `stream_options.include_usage` only
  on an endpoint whose streams it has learnt carry no counts unasked, for a request that
  plainly did not ask (no `stream_options`, or `include_usage: false`), and then takes out
  what asking added (`openai.EventStream`). Other `stream_options` are left as they are:
  servers disagree on what `{}` means (vLLM long took it for `include_usage: true`);
- status: "ok" for a 2xx answer delivered whole with no error in its body, "failed" for any
  other upstream status, an error event inside a 200 stream, an unreachable upstream
  (answered 502) or one that timed out (answered 504: no byte for `table.timeout` seconds,
  while connecting, waiting for the answer or between two of its chunks; an answer already
  begun is cut off instead, so that the client cannot take it for a whole one),
  "cancelled" when the client disconnected first.

Measured responses carry `X-Jouleprobe-Request-Id`; everything else passes through
untouched (`relay` says which headers do not).

`app` is the aiohttp app and its bounds, `relay` the forwarding to the upstream,
`measurement` what an answer says of its tokens and timing, `openai` what is read of (and
taken out of) OpenAI bodies and streams, `members` the in-place JSON edits, `ollama` what is
read of Ollama's native answers.
"""

from agent.intake.proxy.app import (
    PROXY_STATS,
    REQUEST_ID_HEADER,
    RUNNER_OPTIONS,
    ProxyStats,
    RequestSink,
    proxy_app,
)

__all__ = ["PROXY_STATS", "REQUEST_ID_HEADER", "RUNNER_OPTIONS", "ProxyStats", "RequestSink",
           "proxy_app"]
