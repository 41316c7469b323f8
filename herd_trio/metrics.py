"""/metrics: Prometheus text from a custom collector that reads a server's state at scrape time.

Its own CollectorRegistry (no process-wide default registry, no threaded server); the
families are built from `Stats` and the store when scraped, so counting costs the hot
paths nothing but an int add. Names follow the Prometheus rules: one `herd_` prefix,
base units (seconds), `_total` on counters, and no client ids as labels (unbounded).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from herd_trio.stats import Histogram
from herd_trio.view import ServerView


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.buckets(), sum_value=histogram.total)


class HerdCollector(Collector):
    """Every herd_ family of one server, read live."""

    def __init__(self, view: ServerView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        """The families, in a stable order."""
        yield from self._links()
        yield from self._server()

    def _links(self) -> Iterator[Metric]:
        view, peers = self.view, self.view.stats.peers
        up = GaugeMetricFamily("herd_link_up", "1 while the link is up", labels=["peer"])
        drops = CounterMetricFamily(
            "herd_link_drops", "Links dropped or failed, by reason", labels=["peer", "reason"]
        )
        sent = CounterMetricFamily("herd_records_sent", "Records sent to a peer", labels=["peer"])
        received = CounterMetricFamily(
            "herd_records_received",
            "Records received from a peer, by the store's verdict",
            labels=["peer", "verdict"],
        )
        depth = GaugeMetricFamily(
            "herd_link_outbox_records", "Records waiting to be sent to a peer", labels=["peer"]
        )
        digests = CounterMetricFamily(
            "herd_digests", "Anti-entropy digests, by direction", labels=["peer", "direction"]
        )
        resent = CounterMetricFamily(
            "herd_antientropy_records_resent",
            "Records queued to answer a peer's digest",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "herd_link_rtt_seconds",
            "Round-trip time of the latest heartbeat (PING to PONG) on the link",
            labels=["peer"],
        )
        for peer in view.neighbours:
            link = peers.get(peer)
            up.add_metric([peer], 1.0 if link is not None and link.live is not None else 0.0)
            if link is None:
                continue
            for reason, count in sorted(link.drops.items()):
                drops.add_metric([peer, reason], count)
            sent.add_metric([peer], link.records_sent)
            for verdict in ("kept", "stale", "duplicate"):
                received.add_metric([peer, verdict], getattr(link, verdict))
            depth.add_metric([peer], link.depth)
            digests.add_metric([peer, "received"], link.digests_received)
            digests.add_metric([peer, "sent"], link.digests_sent)
            resent.add_metric([peer], link.resent)
            if link.rtt is not None:
                rtt.add_metric([peer], link.rtt)
        yield from (up, drops, sent, received, depth, digests, resent, rtt)

    def _server(self) -> Iterator[Metric]:
        view, stats = self.view, self.view.stats
        info = InfoMetricFamily("herd_build", "The running version")
        info.add_metric([], {"version": view.version, "server": view.name})
        yield info
        yield GaugeMetricFamily(
            "herd_start_time_seconds", "Start time, Unix seconds", value=stats.started_ns / 1e9
        )
        yield GaugeMetricFamily(
            "herd_store_records", "Records (clients) held", value=len(view.store)
        )
        yield GaugeMetricFamily(
            "herd_client_connections_open", "Open client connections", value=stats.clients_open
        )
        yield CounterMetricFamily(
            "herd_client_connections", "Client connections admitted", value=stats.clients_total
        )
        yield CounterMetricFamily(
            "herd_client_refusals", "Client connections refused", value=stats.client_refusals
        )
        commands = CounterMetricFamily("herd_commands", "Client lines by kind", labels=["kind"])
        for kind in ("iamat", "whatsat", "invalid"):
            commands.add_metric([kind], getattr(stats, kind))
        yield commands
        yield _histogram(
            "herd_request_duration_seconds", "Time to answer a client line", stats.requests
        )
        yield CounterMetricFamily("herd_places_calls", "Places calls", value=stats.places_calls)
        yield CounterMetricFamily(
            "herd_places_errors", "Places calls that failed or timed out", value=stats.places_errors
        )
        yield _histogram("herd_places_duration_seconds", "Places call time", stats.places)
        refusals = CounterMetricFamily(
            "herd_auth_refusals", "Peer connections refused, by kind", labels=["kind"]
        )
        for kind, count in sorted(stats.auth_refusals.items()):
            refusals.add_metric([kind], count)
        yield refusals


def metrics_registry(view: ServerView) -> CollectorRegistry:
    """A registry holding only the herd collector of `view`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HerdCollector(view))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)
