"""The OTLP trace receiver's own counters, as Prometheus families."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.intake.otlp import TraceStats
from agent.intake.otlp.coverage import Coverage
from agent.sampler import NodeSnapshot


class OtlpMetrics:
    """Renders the receiver's `TraceStats` and, where trace sources are also scraped, their
    coverage; `families` is a `FamilyProducer`."""

    def __init__(self, stats: TraceStats, coverage: Coverage | None = None) -> None:
        self._stats = stats
        self._coverage = coverage

    def families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        spans = CounterMetricFamily(
            "jouleprobe_otlp_spans",
            "Spans received: accepted (reason = the trace source), ignored (not a request, "
            "or sent again) or rejected (a request span that could not be used), by reason.",
            labels=("outcome", "reason"),
        )
        for (outcome, reason), count in sorted(self._stats.spans.items()):
            spans.add_metric([outcome, reason], count)
        exports = CounterMetricFamily(
            "jouleprobe_otlp_exports",
            "Export requests answered, by transport (http, grpc) and status code.",
            labels=("transport", "code"),
        )
        for (transport, code), count in sorted(self._stats.exports.items()):
            exports.add_metric([transport, code], count)
        yield from (spans, exports)
        if self._coverage is None:
            return
        coverage = GaugeMetricFamily(
            "jouleprobe_otlp_coverage_ratio",
            "Of the requests (completion tokens) that a traced server's own counters say it "
            "finished in its latest compared scrape window, the share whose spans arrived.",
            labels=("source", "quantity"),
        )
        for source, figures in sorted(self._coverage.latest.items()):
            for quantity in ("requests", "completion_tokens"):
                ratio = getattr(figures, quantity)
                if ratio is not None:
                    coverage.add_metric([source, quantity], ratio)
        yield coverage
