"""What each inference server exports about its work, and how to read it from /metrics.

Each server kind names, per quantity (finished requests, prompt tokens, completion tokens),
the metric family that counts it and the type that family must declare in its `# TYPE`
line. Types are read, never guessed from names: a family whose declared type differs is
not used (a server that changed a counter into a gauge must not be read as a counter).
Exposition is parsed with prometheus_client's text parser, which reports a counter family
under its name without `_total` and its sample as `<family>_total`, and a histogram's
samples as `_bucket`, `_sum` and `_count`.

Per kind: requests; prompt tokens; completion tokens; the model label.
- vllm: `vllm:request_success_total` (every finished_reason); `vllm:prompt_tokens_total`;
  `vllm:generation_tokens_total`; model_name.
- sglang: `sglang:num_requests_total`; `sglang:prompt_tokens_total`;
  `sglang:generation_tokens_total`; model_name.
- tgi: `tgi_request_success`; `tgi_request_input_length_sum`;
  `tgi_request_generated_tokens_sum` (histograms); no model label.
- triton: `nv_inference_request_success`; `nv_llm_input_token_len_sum`;
  `nv_llm_output_token_len_sum` (histograms); model (its `version` is summed over).
- llamacpp: no request counter; `llamacpp:prompt_tokens_total`;
  `llamacpp:tokens_predicted_total`; no model label.

Notes per server:
- vLLM counts a request in `request_success` whatever its finished_reason (stop, length,
  abort): a cancelled request spent energy too. Series of every `engine` are summed.
- SGLang exports these only when started with `--enable-metrics`.
- TGI's input-length histogram is observed when a request is validated, its
  generated-tokens histogram when it succeeds; failed requests count tokens in but not out.
- Triton's token histograms come from LLM backends (TensorRT-LLM, vLLM, Python LLM
  backends); other models count requests only. Each model of an ensemble is a model of its
  own here, as in Triton's metrics.
- llama.cpp exports these only with `--metrics`, and no request counter: its windows
  have J/token but no Wh/query. It reports prompt tokens excluding cached ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

Quantity = Literal["requests", "prompt_tokens", "completion_tokens"]


@dataclass(frozen=True, slots=True)
class Series:
    """Where one quantity is read: a family of a declared type, and its sample name."""

    family: str
    """The family name as the parser reports it (a counter's without `_total`)."""
    type: Literal["counter", "histogram"]
    sample: str
    """A counter's `<family>_total`; a histogram's `_count` (events) or `_sum` (amounts)."""


def _counter(family: str) -> Series:
    return Series(family, "counter", f"{family}_total")


def _histogram_sum(family: str) -> Series:
    return Series(family, "histogram", f"{family}_sum")


@dataclass(frozen=True, slots=True)
class ServerKind:
    name: str
    prefix: str
    """Every family of this server starts with it: a body with none is not its metrics."""
    model_label: str | None
    """The label naming the model; None where the server serves one unnamed model."""
    series: dict[Quantity, Series]
    """Quantities the server exports; a missing key is a quantity it does not count."""
    hint: str
    """What to check when the endpoint answers without this server's metrics."""


KINDS: dict[str, ServerKind] = {  # keyed by agent.config.SCRAPE_KINDS, in its order
    "vllm": ServerKind(
        "vllm", "vllm:", "model_name",
        {
            "requests": _counter("vllm:request_success"),
            "prompt_tokens": _counter("vllm:prompt_tokens"),
            "completion_tokens": _counter("vllm:generation_tokens"),
        },
        "is this vLLM's OpenAI server (vllm serve), and its /metrics URL?",
    ),
    "sglang": ServerKind(
        "sglang", "sglang:", "model_name",
        {
            "requests": _counter("sglang:num_requests"),
            "prompt_tokens": _counter("sglang:prompt_tokens"),
            "completion_tokens": _counter("sglang:generation_tokens"),
        },
        "SGLang exports metrics only when launched with --enable-metrics",
    ),
    "tgi": ServerKind(
        "tgi", "tgi_", None,
        {
            "requests": _counter("tgi_request_success"),
            "prompt_tokens": _histogram_sum("tgi_request_input_length"),
            "completion_tokens": _histogram_sum("tgi_request_generated_tokens"),
        },
        "is this text-generation-inference's router port and /metrics path?",
    ),
    "triton": ServerKind(
        "triton", "nv_", "model",
        {
            "requests": _counter("nv_inference_request_success"),
            "prompt_tokens": _histogram_sum("nv_llm_input_token_len"),
            "completion_tokens": _histogram_sum("nv_llm_output_token_len"),
        },
        "Triton serves metrics on its metrics port (default 8002), not its HTTP port",
    ),
    "llamacpp": ServerKind(
        "llamacpp", "llamacpp:", None,
        {
            "prompt_tokens": _counter("llamacpp:prompt_tokens"),
            "completion_tokens": _counter("llamacpp:tokens_predicted"),
        },
        "llama-server exports metrics only when started with --metrics",
    ),
}


class NotServerMetrics(ValueError):
    """The exposition holds no family of the expected server kind."""


SeriesKey = tuple[Quantity, str, tuple[tuple[str, str], ...]]
"""(quantity, model, all labels sorted): one cumulative series of the server."""


def read_counts(kind: ServerKind, text: str, model: str) -> dict[SeriesKey, float]:
    """The cumulative value of every series that counts a quantity of `kind`.

    `model` names the model of a server whose metrics carry no model label. Raises
    ValueError where `text` is not valid exposition, NotServerMetrics where it holds no
    family of this server at all. A family that is present with another declared type is
    left out, as if absent.
    """
    wanted = {series.family: (quantity, series) for quantity, series in kind.series.items()}
    counts: dict[SeriesKey, float] = {}
    seen_prefix = False
    for family in text_string_to_metric_families(text):
        seen_prefix = seen_prefix or family.name.startswith(kind.prefix)
        entry = wanted.get(family.name)
        if entry is None or family.type != entry[1].type:
            continue
        quantity, series = entry
        for sample in family.samples:
            if sample.name != series.sample:
                continue
            name = sample.labels.get(kind.model_label, "") if kind.model_label else model
            key = (quantity, name or model, tuple(sorted(sample.labels.items())))
            counts[key] = float(sample.value)
    if not seen_prefix:
        raise NotServerMetrics(f"no {kind.prefix}* metric in the answer: {kind.hint}")
    return counts
