"""The record store's own health as Prometheus metrics: what its writer has queued,
written, dropped and pruned, and whether its writes fail now.

Read from `RecordStore.stats()` once per scrape, as a `FamilyProducer` for `NodeCollector`
(the store keeps the counters; copying them into client metrics would be a second source
of truth). A record is a request record or a scrape window. Records dropped mean figures
missing from the report and the summary API, while the node's metrics go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.sampler import NodeSnapshot
from agent.store import StoreStats


class StoreMetrics:
    """The store's counters and gauges; `families` is the `FamilyProducer` to give
    `NodeCollector.add`."""

    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        """`stats`: the store's counters, read once per scrape (`store.stats`)."""
        self._stats = stats

    def families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "jouleprobe_store_records_pending",
            "Records queued for the record store and not yet committed.",
            value=stats.pending,
        )
        yield CounterMetricFamily(
            "jouleprobe_store_records_written",
            "Records committed to the record store.",
            value=stats.written_total,
        )
        yield CounterMetricFamily(
            "jouleprobe_store_records_dropped",
            "Records lost: refused while the queue was full, or in a batch that could not "
            "be written.",
            value=stats.dropped_total,
        )
        yield CounterMetricFamily(
            "jouleprobe_store_records_pruned",
            "Records deleted by retention.",
            value=stats.pruned_total,
        )
        yield CounterMetricFamily(
            "jouleprobe_store_write_errors",
            "Flushes of the record store that failed (a batch kept for retry counts each "
            "time it fails).",
            value=stats.write_errors_total,
        )
        yield GaugeMetricFamily(
            "jouleprobe_store_write_errors_since_commit",
            "Flushes that failed since the latest one that committed; above 0, the store "
            "cannot write now and /healthz answers 503 (degraded).",
            value=stats.write_errors_since_commit,
        )
