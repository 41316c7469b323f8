"""Counters a server keeps about itself, for the admin port (herd_trio/admin.py).

The hot paths (client lines, peer records) only add 1 to a plain int attribute: no
locks (one thread), no label lookups, no clock reads beyond the one the request-duration
histogram needs. Everything is turned into Prometheus families and JSON at scrape time
(herd_trio/metrics.py, herd_trio/admin.py), never here. No trio, no I/O.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Protocol

import attrs

# Request and places durations (seconds): IAMATs take microseconds, WHATSATs up to
# places_timeout (5 s by default).
DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0)

Event = dict[str, object]  # one change, as the map's /events stream sends it


@attrs.define(eq=False)
class Histogram:
    """Cumulative-at-read-time bucket counts, a sum and a count."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0
    count: int = 0

    @counts.default
    def _counts(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def observe_run(self, began: float, count: int) -> int:
        """Count `count` things done one after another since perf_counter() was
        `began`, each at their mean duration (the sum stays exact); 0, for the caller's
        next run."""
        if count:
            took = time.perf_counter() - began
            self.counts[bisect_left(self.bounds, took / count)] += count
            self.total += took
            self.count += count
        return 0

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus `(le, cumulative count)` pairs, +Inf last."""
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class LiveLink(Protocol):
    """What the stats read from a link's writer while the link is up."""

    @property
    def records_sent(self) -> int:
        """Records written to the peer on this connection."""

    def depth(self) -> int:
        """Records waiting in the link's outbox."""


@attrs.define(eq=False)
class PeerStats:
    """One neighbour's link, across reconnections (counters never go back)."""

    direction: str  # "out": this server dials it; "in": it dials this server
    up_since_ns: int | None = None  # wall clock; None while down
    last_error: str = ""
    drops: dict[str, int] = attrs.field(factory=dict)  # by reason kind
    kept: int = 0
    stale: int = 0
    duplicate: int = 0
    rounds_received: int = 0  # sync rounds the peer started that were answered
    rounds_sent: int = 0  # sync rounds this server started
    sync_records_sent: int = 0  # records sent by reconciliation (not by the flood)
    sync_ignored: int = 0  # the peer's sync lines ignored (reply budget spent)
    sent_before: int = 0  # records sent on connections that ended
    rtt: float | None = None  # seconds, PING to PONG, the latest measured (kept while down)
    live: LiveLink | None = None

    @property
    def records_sent(self) -> int:
        """Records sent to this neighbour in all."""
        return self.sent_before + (self.live.records_sent if self.live is not None else 0)

    @property
    def depth(self) -> int:
        """Records waiting for this neighbour now (0 while down)."""
        return self.live.depth() if self.live is not None else 0


@attrs.define(eq=False)
class Stats:
    """One server's counters; held by its Node."""

    started_ns: int = attrs.field(factory=time.time_ns)
    listening: bool = False  # serve() set it once the client and peer ports accept
    state_loaded: bool = True  # False while the state file is being loaded
    peers: dict[str, PeerStats] = attrs.field(factory=dict)
    clients_open: int = 0
    clients_total: int = 0
    client_refusals: int = 0
    iamat: int = 0
    whatsat: int = 0
    invalid: int = 0
    requests: Histogram = attrs.field(factory=Histogram)
    places_calls: int = 0
    places_errors: int = 0
    places: Histogram = attrs.field(factory=Histogram)
    auth_refusals: dict[str, int] = attrs.field(factory=dict)  # by kind
    watchers: list[Callable[[Event], None]] = attrs.field(factory=list)  # sync, never raise

    def peer(self, name: str, direction: str = "out") -> PeerStats:
        """The stats of neighbour `name`, created on first use."""
        if (stats := self.peers.get(name)) is None:
            stats = self.peers[name] = PeerStats(direction)
        return stats

    def link_up(self, name: str, direction: str, live: LiveLink) -> PeerStats:
        """A link to `name` is carrying records now."""
        stats = self.peer(name, direction)
        stats.direction, stats.live, stats.up_since_ns = direction, live, time.time_ns()
        self._emit({"type": "link", "peer": name, "up": True})
        return stats

    def link_down(self, name: str, live: LiveLink) -> None:
        """The link to `name` that `live` wrote ended (a replaced link's end is ignored)."""
        stats = self.peer(name)
        if stats.live is not live:
            return
        stats.sent_before += live.records_sent
        stats.live, stats.up_since_ns = None, None
        self._emit({"type": "link", "peer": name, "up": False})

    def link_dropped(self, name: str, kind: str, reason: str) -> None:
        """Why the link to `name` dropped or failed: a kind for the counter, a text for /state."""
        stats = self.peer(name)
        stats.drops[kind] = stats.drops.get(kind, 0) + 1
        stats.last_error = reason

    def refused(self, kind: str) -> None:
        """A peer connection failed the handshake or the loopback rule."""
        self.auth_refusals[kind] = self.auth_refusals.get(kind, 0) + 1

    def _emit(self, event: Event) -> None:
        for watcher in self.watchers:
            watcher(event)
