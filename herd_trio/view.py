"""What the admin port shows of one server: read from live state when asked, as JSON.

`ServerView` holds references to the server's live objects (stats, store) and the
herd's static layout; every method reads them at call time, so nothing is cached and
nothing on the hot path is touched.
"""

from __future__ import annotations

import time
from hashlib import blake2b

import attrs

from herd_trio.config import HerdConfig, location_degrees
from herd_trio.places import readiness
from herd_trio.stats import Stats
from herd_trio.store import Store

JSONObject = dict[str, object]
CLIENTS_LIMIT = 10_000  # records /clients lists at most: the map is a picture, not a dump


def admin_url(host: str, port: int) -> str:
    """The URL of an admin listener (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def herd_layout(herd: HerdConfig) -> list[JSONObject]:
    """Every server of the herd: name, location, admin URL, neighbours (for the map)."""
    layout: list[JSONObject] = []
    for name, cfg in herd.servers.items():
        where = location_degrees(cfg.location) if cfg.location is not None else None
        layout.append(
            {
                "name": name,
                "location": list(where) if where is not None else None,
                "admin": admin_url(cfg.admin_host, cfg.admin_port) if cfg.admin_port else None,
                "neighbours": herd.neighbours(name),
            }
        )
    return layout


def store_digest(store: Store) -> str:
    """A short hash of the store's digest: equal on servers that hold the same records."""
    data = b"".join(bucket.to_bytes(8, "big") for bucket in store.digest())
    return blake2b(data, digest_size=8).hexdigest()


def rtt_ms(seconds: float | None) -> float | None:
    """A round-trip time in milliseconds, to the microsecond, or None if never measured."""
    return None if seconds is None else round(seconds * 1000, 3)


def iso(ns: int | None) -> str | None:
    """A wall-clock time in nanoseconds as ISO 8601 UTC, or None."""
    if ns is None:
        return None
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 10**9 // 10**6:03d}Z"
    )


@attrs.define(eq=False)
class ServerView:
    """One server as its admin port sees it (a reload replaces neighbours and layout)."""

    name: str
    version: str
    stats: Stats
    store: Store
    neighbours: tuple[str, ...]
    layout: tuple[JSONObject, ...] = ()
    places: object = None  # the places source; see places.readiness

    def links_up(self) -> int:
        """How many configured links are up now."""
        return sum(1 for peer in self.neighbours if self._up(peer))

    def _up(self, peer: str) -> bool:
        stats = self.stats.peers.get(peer)
        return stats is not None and stats.live is not None

    def readiness(self, all_links: bool) -> tuple[bool, JSONObject]:
        """Whether the server is ready (and, with `all_links`, every link up), and why."""
        up, total = self.links_up(), len(self.neighbours)
        listening, loaded = self.stats.listening, self.stats.state_loaded
        places_ready, places_error = readiness(self.places)
        ready = listening and loaded and places_ready and (up == total or not all_links)
        body: JSONObject = {
            "ready": ready,
            "state_loaded": loaded,
            "places_ready": places_ready,  # offline: the index is loaded
            "listeners_up": listening,
            "links_up": up,
            "links_total": total,
        }
        if places_error is not None:
            body["places_error"] = places_error
        return ready, body

    def state(self) -> JSONObject:
        """Name, version, uptime, links, records, digest, clients, and the herd's layout."""
        stats = self.stats
        links: list[JSONObject] = []
        for peer in self.neighbours:
            link = stats.peers.get(peer)
            links.append(
                {
                    "peer": peer,
                    "direction": link.direction if link else ("out" if self.name < peer else "in"),
                    "up": link is not None and link.live is not None,
                    "up_since": iso(link.up_since_ns) if link else None,
                    "last_error": link.last_error if link else "",
                    "rtt_ms": rtt_ms(link.rtt) if link else None,
                    "outbox": link.depth if link else 0,
                    "records_in": (link.kept + link.stale + link.duplicate) if link else 0,
                    # flooded and sent by reconciliation (the latter also on its own)
                    "records_out": link.records_sent + link.sync_records_sent if link else 0,
                    "sync_records_out": link.sync_records_sent if link else 0,
                }
            )
        return {
            "name": self.name,
            "version": self.version,
            "uptime_s": round((time.time_ns() - stats.started_ns) / 1e9, 3),
            "links": links,
            "records": len(self.store),
            "digest": store_digest(self.store),
            "clients": stats.clients_open,
            "herd": list(self.layout),
        }

    def clients(self) -> JSONObject:
        """The newest position of each client (at most CLIENTS_LIMIT), for the map."""
        out: list[JSONObject] = []
        for record in self.store:
            if len(out) >= CLIENTS_LIMIT:
                break
            lat, lon = record.lat_lon
            client = record.client.decode("utf-8", "backslashreplace")
            out.append(
                {
                    "id": client,
                    "origin": record.origin.decode("ascii", "replace"),
                    "lat": float(lat),
                    "lon": float(lon),
                }
            )
        return {"clients": out, "truncated": len(self.store) > len(out)}
