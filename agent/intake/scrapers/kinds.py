"""What each inference server exports about its work, and how to read it from /metrics.

Each server kind names, per quantity (finished requests, prompt tokens, completion tokens),
the metric families that count it, in order of preference, and the type each must declare
in its `# TYPE` line. Types are read, never guessed from names: a family whose declared
type differs is not used (a server that changed a counter into a gauge must not be read as
a counter). Per model, the first family with a series for that model is read, so that a
version that lacks the preferred family is read from the next one, and no quantity is
counted twice. Exposition is parsed with prometheus_client's text parser, which reports a
counter family under its name without `_total` and its sample as `<family>_total`, and a
histogram's samples as `_bucket`, `_sum` and `_count`. A quantity no family counts is
None in the windows, never 0, and `jouleprobe doctor` names what is missing (`describe`).

Per kind: requests; prompt tokens; completion tokens; the model label.
- vllm: `vllm:request_success_total` (every finished_reason); `vllm:prompt_tokens_total`;
  `vllm:generation_tokens_total`; model_name.
- sglang: `sglang:num_requests_total`, else `sglang:e2e_request_latency_seconds_count`;
  `sglang:prompt_tokens_total`; `sglang:generation_tokens_total`; model_name.
- tgi: `tgi_request_success`; `tgi_request_input_length_sum`;
  `tgi_request_generated_tokens_sum` (histograms); no model label.
- triton: `nv_inference_request_success`; `nv_llm_input_token_len_sum`, else
  `vllm:prompt_tokens_total`; `nv_llm_output_token_len_sum`, else
  `vllm:generation_tokens_total`; model (its `version` is summed over).
- llamacpp: no request counter; `llamacpp:prompt_tokens_total`;
  `llamacpp:tokens_predicted_total`; no model label; six significant digits.

Per server and version (read in their sources):
- vLLM's `request_success` has a series per finished_reason (stop, length, abort), all
  summed here: a cancelled request spent energy too. Up to 0.13 at least the abort series
  stays 0 (an aborted request bypasses the stats, vllm-project/vllm#31503), so aborted
  requests go uncounted while their tokens count. Series of every `engine` are summed.
- SGLang exports these only when started with `--enable-metrics`. Every release with
  metrics (0.3.5.post1 on) labels them `model_name`; `name` was the label only while the
  metrics were a pull request (sgl-project/sglang#1853), and is the function name on
  `sglang:func_latency_seconds`, so it is not read as a model. `num_requests_total` came
  in 0.4.2 (#2859); from 0.3.5.post1 to 0.4.1 finished requests are the count of the
  end-to-end latency histogram, observed once per finished request where the token
  counters are incremented (tokenizer_manager.py). Its exposition is prometheus_client's
  multiprocess one, which lists a family only once it has a series: until the first
  request the body is empty, read as nothing counted yet (`EMPTY`).
- TGI's input-length histogram is observed when a request is validated, its
  generated-tokens histogram when it succeeds; failed requests count tokens in but not out.
- Triton's token histograms come from the TensorRT-LLM backend; its vLLM backend
  (triton-inference-server/vllm_backend, src/utils/metrics.py) exports vLLM's
  `vllm:prompt_tokens_total` and `vllm:generation_tokens_total` counters with Triton's
  `model` and `version` labels instead, and no request counter of its own: its requests
  are Triton's `nv_inference_request_success`, as for every model. Other models count
  requests only. Each model of an ensemble is a model of its own here, as in Triton.
- llama.cpp exports these only with `--metrics`, and no request counter: its windows
  have J/token but no Wh/query. It reports prompt tokens excluding cached ones. It writes
  each value with a C++ stream's default six significant digits (tools/server/
  server-task.cpp, `to_metrics`), so past 999999 a counter moves in steps of 10, 100, …
  (`CounterDeltas` carries such a window on rather than report it empty). Builds from
  mid-November 2025 until ggml-org/llama.cpp#17386 sent the body as one JSON string
  (quoted, `\\n` escaped); it is decoded here. In router mode (no `-m`), /metrics wants
  `?model=ID`, and that model names the windows (`WindowScraper`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client.metrics_core import Metric
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


def _histogram_count(family: str) -> Series:
    return Series(family, "histogram", f"{family}_count")


@dataclass(frozen=True, slots=True)
class ServerKind:
    name: str
    prefix: str
    """Every family of this server starts with it: a body with none is not its metrics."""
    model_label: str | None
    """The label naming the model; None where the server serves one unnamed model."""
    series: dict[Quantity, tuple[Series, ...]]
    """Per quantity the server exports, where it is read, preferred first; a missing key
    is a quantity it does not count."""
    hint: str
    """What to check when the endpoint answers without this server's metrics."""
    significant_digits: int | None = None
    """How many significant digits the server writes its values with; None: all."""


KINDS: dict[str, ServerKind] = {  # keyed by agent.config.SCRAPE_KINDS, in its order
    "vllm": ServerKind(
        "vllm", "vllm:", "model_name",
        {
            "requests": (_counter("vllm:request_success"),),
            "prompt_tokens": (_counter("vllm:prompt_tokens"),),
            "completion_tokens": (_counter("vllm:generation_tokens"),),
        },
        "is this vLLM's OpenAI server (vllm serve), and its /metrics URL?",
    ),
    "sglang": ServerKind(
        "sglang", "sglang:", "model_name",
        {
            "requests": (_counter("sglang:num_requests"),
                         _histogram_count("sglang:e2e_request_latency_seconds")),
            "prompt_tokens": (_counter("sglang:prompt_tokens"),),
            "completion_tokens": (_counter("sglang:generation_tokens"),),
        },
        "SGLang exports metrics only when launched with --enable-metrics",
    ),
    "tgi": ServerKind(
        "tgi", "tgi_", None,
        {
            "requests": (_counter("tgi_request_success"),),
            "prompt_tokens": (_histogram_sum("tgi_request_input_length"),),
            "completion_tokens": (_histogram_sum("tgi_request_generated_tokens"),),
        },
        "is this text-generation-inference's router port and /metrics path?",
    ),
    "triton": ServerKind(
        "triton", "nv_", "model",
        {
            "requests": (_counter("nv_inference_request_success"),),
            "prompt_tokens": (_histogram_sum("nv_llm_input_token_len"),
                              _counter("vllm:prompt_tokens")),
            "completion_tokens": (_histogram_sum("nv_llm_output_token_len"),
                                  _counter("vllm:generation_tokens")),
        },
        "Triton serves metrics on its metrics port (default 8002), not its HTTP port",
    ),
    "llamacpp": ServerKind(
        "llamacpp", "llamacpp:", None,
        {
            "prompt_tokens": (_counter("llamacpp:prompt_tokens"),),
            "completion_tokens": (_counter("llamacpp:tokens_predicted"),),
        },
        "llama-server exports metrics only when started with --metrics; in router mode "
        "its URL needs ?model=ID",
        significant_digits=6,
    ),
}


class NotServerMetrics(ValueError):
    """The exposition holds no family of the expected server kind (none with its prefix,
    none that it reads)."""


SeriesKey = tuple[Quantity, str, tuple[tuple[str, str], ...]]
"""(quantity, model, all labels sorted): one cumulative series of the server."""


def read_counts(kind: ServerKind, text: str, model: str) -> dict[SeriesKey, float]:
    """The cumulative value of every series that counts a quantity of `kind`.

    `model` names the model of a server whose metrics carry no model label. Raises
    ValueError where `text` is not valid exposition, NotServerMetrics where it holds
    families but none of this server's (an empty exposition counts nothing: `EMPTY`). A
    family that is present with another declared type is left out, as if absent.
    """
    families = _families(kind, text)
    counts: dict[SeriesKey, float] = {}
    for quantity, candidates in kind.series.items():
        read: set[str] = set()  # models whose quantity a preferred family already gave
        for series in candidates:
            found = _samples(kind, families, series, model)
            counts.update({(quantity, name, labels): value
                           for (name, labels), value in found.items() if name not in read})
            read |= {name for name, _ in found}
    return counts


def describe(kind: ServerKind, text: str) -> list[str]:
    """Per quantity, the families `read_counts` reads from `text`, or why none: for
    `jouleprobe doctor`, so that a renamed or missing family is named, not read as 0.
    Raises as `read_counts` does."""
    families = _families(kind, text)
    if not families:
        return [f"no metric yet: {EMPTY}"]
    lines = []
    for quantity in get_args(Quantity):
        candidates = kind.series.get(quantity, ())
        if not candidates:
            lines.append(f"{quantity}: not exported by {kind.name}")
            continue
        present = {s: _present(families, s) for s in candidates}
        notes = [f"{s.sample} is declared {family.type}, not {s.type}"
                 for s, family in present.items() if family and family.type != s.type]
        read = [s for s in candidates if _declared(families, s)]
        if read:  # per model, the first of them that has its series
            line = f"{quantity}: {', else '.join(s.sample for s in read)}"
        else:
            line = (f"{quantity}: MISSING, none of "
                    f"{', '.join(s.sample for s in candidates)}: windows will have none")
        absent = [s.sample for s, family in present.items() if family is None]
        if read and absent:
            notes.append(f"no {', '.join(absent)}")
        lines.append("; ".join([line, *notes]))
    return lines


def _families(kind: ServerKind, text: str) -> dict[str, Metric]:
    if text.lstrip().startswith('"'):  # llama.cpp builds that sent the body as JSON text
        decoded = json.loads(text)
        if not isinstance(decoded, str):
            raise ValueError("a JSON body that is not one string")
        text = decoded
    families = {family.name: family for family in text_string_to_metric_families(text)}
    read = {series.family for candidates in kind.series.values() for series in candidates}
    if families and not any(name.startswith(kind.prefix) or name in read for name in families):
        raise NotServerMetrics(f"no {kind.prefix}* metric in the answer: {kind.hint}")
    return families


EMPTY = "nothing counted since the server started (SGLang has no metric before its first request)"
"""An answer with no metric at all: SGLang's multiprocess exposition lists a family only once a
series of it exists, so until its first request it answers an empty body, which counts 0."""


def _present(families: dict[str, Metric], series: Series) -> Metric | None:
    """The family of `series` whatever its declared type (the parser keeps a gauge's
    `_total`, which it strips from a counter's name)."""
    return families.get(series.family) or families.get(series.sample)


def _declared(families: dict[str, Metric], series: Series) -> bool:
    family = families.get(series.family)
    return family is not None and family.type == series.type


def _samples(kind: ServerKind, families: dict[str, Metric], series: Series, model: str,
             ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    if not _declared(families, series):
        return {}
    found = {}
    for sample in families[series.family].samples:
        if sample.name == series.sample:
            name = sample.labels.get(kind.model_label, "") if kind.model_label else model
            found[(name or model, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return found
