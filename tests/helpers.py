"""Builders shared by the unit tests: herds, nodes, records and places fakes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import msgspec
import trio

from herd_trio.bus import Bus
from herd_trio.config import HerdConfig
from herd_trio.links import Peer, dials
from herd_trio.log import ServerLog
from herd_trio.node import Node
from herd_trio.peerport import PeerPort
from herd_trio.places import JSON, legacy_body
from herd_trio.protocol import Iamat, Record, make_record, parse_command
from herd_trio.security import PeerSecurity, load_security
from herd_trio.store import Store, record_of

KIWI = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"

# Alpha dials Beta and Gamma, Beta dials Gamma; Delta is nobody's neighbour.
TRIANGLE: dict[str, dict[str, object]] = {
    "Alpha": {"port": 12000, "peer_port": 12100, "neighbours": ["Beta", "Gamma"]},
    "Beta": {"port": 12001, "peer_port": 12101, "neighbours": ["Gamma"]},
    "Gamma": {"port": 12002, "peer_port": 12102},
    "Delta": {"port": 12003, "peer_port": 12103},
}
PAIR: dict[str, dict[str, object]] = {
    "Bona": {"port": 12001, "peer_port": 12101},
    "Clark": {"port": 12003, "peer_port": 12103, "neighbours": ["Bona"]},
}


class NoPlaces:
    """A places source that always answers ZERO_RESULTS."""

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        await trio.lowlevel.checkpoint()
        return legacy_body([], "ZERO_RESULTS")


class Places:
    """A places source fake: answers `answer` after `delay` s, or never if it is None."""

    def __init__(self, answer: JSON | None = None, delay: float = 0) -> None:
        self.answer = answer
        self.delay = delay
        self.calls: list[tuple[Decimal, Decimal, int, int]] = []

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        self.calls.append((lat, lon, radius_m, bound))
        await trio.sleep(self.delay)
        if self.answer is None:
            await trio.sleep_forever()
        assert self.answer is not None
        return self.answer


def herd_config(
    servers: dict[str, dict[str, object]] | None = None, **settings: object
) -> HerdConfig:
    """A validated herd of `servers` (default: TRIANGLE) with `[herd]` settings."""
    return msgspec.convert(
        {"herd": settings, "servers": TRIANGLE if servers is None else servers}, HerdConfig
    )


def make_node(
    name: str,
    herd: HerdConfig,
    *,
    log: Path | None = None,
    now_ns: int | None = None,
    store: Store | None = None,
) -> Node:
    """The Node that serve() would build for server `name`, without any I/O."""
    return Node(
        name,
        herd.herd,
        Store() if store is None else store,
        Bus(),
        ServerLog(log, name),
        time.time_ns if now_ns is None else (lambda: now_ns),
    )


def security_of(herd: HerdConfig, name: str) -> PeerSecurity:
    """The peer keyring and TLS contexts of server `name`, as __main__ builds them."""
    return load_security(herd, [name])[name]


def peer_of(herd: HerdConfig, name: str) -> Peer:
    """Where a link dials server `name`."""
    return Peer(name, herd.servers[name].host, herd.servers[name].peer_port)


def peer_port(node: Node, herd: HerdConfig) -> PeerPort:
    """The accepting side of `node`'s links, as serve() builds it."""
    dialers = frozenset(n for n in herd.neighbours(node.name) if dials(n, node.name))
    return PeerPort(node, security_of(herd, node.name), dialers)


def record(origin: str, line: bytes, received_ns: int = 2_000_000_000) -> Record:
    """The record server `origin` makes of IAMAT `line` received at `received_ns`."""
    command = parse_command(line)
    assert isinstance(command, Iamat)
    return make_record(origin.encode(), received_ns, command)


def publish(bus: Bus, record: Record, source: str | None = None) -> None:
    """Publish `record` as the store's hot paths do: its client and AT line."""
    bus.publish([(record.client, record.at_line)], source)


class Recording:
    """A bus subscriber that keeps what it is given (a neighbour's link, in tests)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.deliveries = 0  # deliver() calls: a publisher's batches
        self.closed = False

    def deliver(self, kept: Sequence[tuple[bytes, bytes]]) -> bool:
        self.deliveries += 1
        for client, line in kept:
            record = record_of(line)
            assert record.client == client
            self.records.append(record)
        return False

    def push(self) -> None:
        pass

    def handoff_mark(self) -> int | None:
        return None

    def handed_off(self, mark: int) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def kept_by(node: Node) -> list[Record]:
    """A list that will hold every record `node`'s store keeps from now on."""
    kept: list[Record] = []
    node.store.on_change(lambda client, line: kept.append(record_of(line)))
    return kept
