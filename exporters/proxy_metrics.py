"""The reverse proxies' own counters, as Prometheus families (labelled by proxy name)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.intake.proxy import ProxyStats
from agent.sampler import NodeSnapshot


class ProxyMetrics:
    """Renders each proxy's `ProxyStats`; `families` is a `FamilyProducer`."""

    def __init__(self, stats: Mapping[str, ProxyStats]) -> None:
        self._stats = dict(stats)

    def families(self, _snapshot: NodeSnapshot) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "jouleprobe_proxy_requests",
            "Measured requests that ended, by proxy and status (ok, failed, cancelled).",
            labels=("proxy", "status"),
        )
        running = GaugeMetricFamily(
            "jouleprobe_proxy_requests_running", "Measured requests not yet ended.",
            labels=("proxy",),
        )
        refused = CounterMetricFamily(
            "jouleprobe_proxy_requests_refused",
            "Measured requests that attribution did not accept (proxied all the same).",
            labels=("proxy",),
        )
        busy = CounterMetricFamily(
            "jouleprobe_proxy_requests_busy",
            "Requests answered 503 at once because max_concurrent were being handled.",
            labels=("proxy",),
        )
        upstream = CounterMetricFamily(
            "jouleprobe_proxy_upstream_errors",
            "Upstream failures: unreachable (502) or timeout (504, or cut off mid-answer).",
            labels=("proxy", "kind"),
        )
        restarts = CounterMetricFamily(
            "jouleprobe_proxy_worker_restarts",
            "Times a worker process of the proxy died and was started again.",
            labels=("proxy",),
        )
        asks = GaugeMetricFamily(
            "jouleprobe_proxy_asks_for_usage",
            "1 where the proxy asks the upstream for include_usage on streams that did not "
            "(learnt: the upstream's streams report no token counts unasked), 0 where it "
            "learnt that they do; absent until the first such stream has ended.",
            labels=("proxy", "endpoint"),
        )
        for name, stats in sorted(self._stats.items()):
            for status in ("ok", "failed", "cancelled"):
                requests.add_metric([name, status], getattr(stats, status))
            running.add_metric([name], stats.running)
            refused.add_metric([name], stats.refused)
            busy.add_metric([name], stats.busy)
            upstream.add_metric([name, "unreachable"], stats.upstream_unreachable)
            upstream.add_metric([name, "timeout"], stats.upstream_timeouts)
            restarts.add_metric([name], stats.worker_restarts)
            for endpoint, reported in sorted(stats.counts_unasked.items()):
                asks.add_metric([name, endpoint], 0 if reported else 1)
        yield from (requests, running, refused, busy, upstream, restarts, asks)
