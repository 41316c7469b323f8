"""Peer links: one persistent TCP connection per pair of neighbours.

Of each pair, the server whose name sorts first dials and keeps the link up with a
supervised loop (`run_link`); the other accepts on its peer port (`PeerPort`). One
connection per edge means each record crosses an edge at most once each way.

On the wire, after the handshake (herd_trio/auth.py, inside TLS if configured), a link
carries AT lines exactly as the origin server produced them (the AT line holds every
field of a record), PING lines when idle, and DIGEST lines (anti-entropy, as
memberlist's push/pull): each side answers a DIGEST with the records of every bucket
where the two stores differ. The receiver keeps only records newer than its own, so
replays and duplicates are harmless and floods terminate on any graph. Writing is
the `LinkWriter`'s job (herd_trio/linkwriter.py); this module dials, accepts,
authenticates and reads.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import attrs
import trio

from herd_trio.auth import HandshakeError, accept_handshake, dial_handshake
from herd_trio.backoff import Backoff
from herd_trio.bus import OutboxClosed
from herd_trio.digests import DigestGate, DigestReplies, PeerMisbehaved
from herd_trio.errors import leaves
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.linkwriter import PING, LinkWriter, Timers
from herd_trio.log import RateLimiter
from herd_trio.net import describe, host_of, is_loopback
from herd_trio.node import Node
from herd_trio.protocol import (
    DIGEST,
    ProtocolError,
    Record,
    format_digest,
    parse_at,
    parse_digest,
    too_far_ahead,
)
from herd_trio.security import PeerSecurity
from herd_trio.silence import Silence
from herd_trio.stats import PeerStats
from herd_trio.store import BUCKETS
from herd_trio.tls import certificate_matches, wrap_accepted, wrap_dialled

DIAL_DEADLINE = 3.0  # seconds: loopback and LAN dials take milliseconds
HANDSHAKE_DEADLINE = 2.0  # seconds, as NATS gives a route to authenticate
SILENT_BEATS = 3  # a link whose peer says nothing for this many heartbeats is dead
FAILURE_LOG_EVERY = 20  # while a neighbour stays down, log every 20th failed dial
PEER_LINE_SLACK = 512  # bytes an AT line adds to the client line it came from
PEER_MIN_LINE = 8192  # bytes: a DIGEST line is 16 hex digits per bucket
BACKOFF = Backoff()
ABSENT_NOTICE = 5.0  # seconds a dialling neighbour may be absent before the log says so
ABSENT_REPEAT = 60.0  # seconds between reminders while it stays absent


class LinkError(Exception):
    """The peer broke the link protocol or went silent; the link is dropped."""

    def __init__(self, message: str, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind  # a bounded label for herd_link_drops_total


LINK_ERRORS = (
    OSError,  # ssl.SSLError included
    HandshakeError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    LinkError,
    PeerMisbehaved,
    LineTooLong,
    OutboxClosed,
)

Dial = Callable[[str, int], Awaitable[trio.abc.Stream]]
T = TypeVar("T")


@attrs.frozen
class Peer:
    """A neighbour as a link sees it: its name and where its peer port is."""

    name: str
    host: str
    port: int


def dials(me: str, peer: str) -> bool:
    """True if `me` dials `peer` (the name that sorts first dials)."""
    return me < peer


def peer_max_line(max_line: int) -> int:
    """The longest line a peer may send: an AT line built from a max_line IAMAT, or a DIGEST.

    An AT line holds the IAMAT's fields plus the time difference, which repeats the
    client time's integer digits: up to twice the IAMAT. A record the peer cannot take
    would drop the link on every digest exchange, forever.
    """
    return max(2 * max_line + PEER_LINE_SLACK, PEER_MIN_LINE)


def verdict(kept: bool, offered: bytes, standing: bytes) -> str:
    """What the store made of a peer's record, for the log: kept, duplicate or stale."""
    if kept:
        return "kept"
    return "duplicate" if offered == standing else "stale"


async def carry(node: Node, peer: str, stream: trio.abc.Stream, reader: LineReader) -> NoReturn:
    """Exchange records with `peer` over an established link until the link fails.

    Raises one of LINK_ERRORS (inside an ExceptionGroup) when the peer closes, goes
    silent, breaks the protocol or stops reading.
    """
    settings = node.settings
    writer = LinkWriter(stream, settings.write_deadline, node.bus.progress)
    timers = Timers(
        settings.heartbeat_interval, settings.sync_interval, next_sync=trio.current_time()
    )
    counts = node.stats.link_up(peer, "out" if dials(node.name, peer) else "in", writer)

    def digest() -> bytes:
        counts.digests_sent += 1
        return format_digest(node.store.digest())

    quiet = SILENT_BEATS * settings.heartbeat_interval
    silence = Silence(quiet, lambda: LinkError(f"no word from {peer} for {quiet:g} s", "silent"))
    try:
        with node.bus.subscribe(peer, writer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run, timers, digest)
                nursery.start_soon(silence.watch)
                await read_peer(node, peer, reader, writer, silence)
    finally:
        node.stats.link_down(peer, writer)
    raise AssertionError("unreachable")  # pragma: no cover


async def read_peer(
    node: Node, peer: str, reader: LineReader, writer: LinkWriter, silence: Silence
) -> NoReturn:
    """Take records from `peer`, keep the newer ones and flood those on.

    A DIGEST from the peer is answered by queueing, for this link's writer, every
    record of each bucket where the two stores differ; the peer does the same with
    ours, and each side keeps what is newer, so the pair converges without resending
    what both already hold. At most one DIGEST is answered per half sync_interval
    (herd_trio/digests.py); a peer that keeps asking loses the link (PeerMisbehaved).
    """
    counts = node.stats.peer(peer)
    gate = DigestGate(node.settings.sync_interval / 2)
    digests = DigestReplies(node.store, writer.queue, node.log.write, peer, gate)
    ahead = RateLimiter()
    max_skew = node.settings.max_future_skew
    while True:
        silence.waiting()
        lines = await reader.receive_lines()
        silence.heard()
        if not lines:
            raise LinkError(f"{peer} closed the link", "closed")
        if len(lines) > 1 or lines[0] != PING:
            writer.note_traffic()
        for line in lines:
            if line == PING:
                continue
            if line.startswith(DIGEST):
                theirs = _parse(peer, line, lambda ln: parse_digest(ln, BUCKETS))
                counts.digests_received += 1
                counts.resent += await digests.reply(theirs)
                continue
            if max_skew is None and _is_stored(node, line):  # an echo of the flood
                counts.duplicate += 1
                node.log.peer_line(peer, line, "duplicate")
                continue
            record = _parse(peer, line, parse_at)
            if max_skew is not None and too_far_ahead(record.sent, node.now_ns(), max_skew):
                _refuse_ahead(node, peer, ahead, line)
                continue
            _take(node, peer, record, counts)


def _is_stored(node: Node, line: bytes) -> bool:
    """True if `line` is byte for byte the AT line stored for its client.

    On a graph with cycles most record lines a server receives are such echoes of a
    flood (4 of the 8 per update in the default herd); what parse_at and the store
    would make of one is known without asking them: a duplicate. A line that is not
    in canonical form never equals a stored line, which parse_at accepted.
    """
    fields = line.split(b" ", 4)
    if len(fields) != 5:
        return False
    held = node.store.get(fields[3])
    return held is not None and held.at_line == line


def _parse(peer: str, line: bytes, parse: Callable[[bytes], T]) -> T:
    try:
        return parse(line)
    except ProtocolError as exc:
        raise LinkError(f"{peer} sent a bad line {line[:80]!r}: {exc}") from exc


def _take(node: Node, peer: str, record: Record, counts: PeerStats) -> None:
    """Offer a peer's record to the store, log the verdict, flood it on if it stands."""
    standing = node.store.offer(record)
    line = record.at_line
    said = verdict(standing is record, line, standing.at_line)
    node.log.peer_line(peer, line, said)
    if standing is record:
        counts.kept += 1
        node.bus.publish(record, source=peer)
    elif said == "stale":
        counts.stale += 1
    else:
        counts.duplicate += 1


def _refuse_ahead(node: Node, peer: str, limiter: RateLimiter, line: bytes) -> None:
    """Log (at most once per RateLimiter.interval) a record dropped by max_future_skew."""
    skew = node.settings.max_future_skew
    limiter.write(
        "ahead",
        node.log.write,
        f"peer {peer} sent a record more than {skew:g} s ahead of this server's clock,"
        f" dropped: {line[:200]!r}",
    )


async def run_link(
    node: Node,
    peer: Peer,
    security: PeerSecurity,
    *,
    dial: Dial = trio.open_tcp_stream,
    backoff: Backoff = BACKOFF,
) -> NoReturn:
    """Keep the link to `peer` up until cancelled; redial with capped, jittered backoff."""
    # A neighbour that takes longer than a dead link's silence to answer a dial or a
    # handshake is treated as dead too, so a healed partition relinks within about
    # 3 heartbeats plus one backoff instead of waiting out the fixed deadlines.
    silence = SILENT_BEATS * node.settings.heartbeat_interval
    dial_deadline = min(DIAL_DEADLINE, silence)
    failures = 0
    while True:
        up_since = math.inf
        try:
            with trio.fail_after(dial_deadline):
                transport = await dial(peer.host, peer.port)
            async with transport:  # closing the transport also ends a TLS session on it
                with trio.fail_after(min(HANDSHAKE_DEADLINE, silence)):
                    stream, reader = await _introduce(node, peer, security, transport)
                up_since = trio.current_time()
                node.log.write(f"link to {peer.name} up ({peer.host}:{peer.port})")
                await carry(node, peer.name, stream, reader)
        except* LINK_ERRORS as group:
            reason = "; ".join(_describe(exc) for exc in leaves(group))
            node.stats.link_dropped(peer.name, drop_kind(group), reason)
            if up_since < math.inf:
                node.log.write(f"link to {peer.name} dropped: {reason}")
            elif failures % FAILURE_LOG_EVERY == 0:
                node.log.write(
                    f"link to {peer.name} failed (attempt {failures + 1}): {reason}"
                    f" (while it stays down, 1 failure in {FAILURE_LOG_EVERY} is logged)"
                )
        if trio.current_time() - up_since >= backoff.stable_after:
            failures = 0
        await trio.sleep(backoff.delay(failures))
        failures += 1


async def _introduce(
    node: Node, peer: Peer, security: PeerSecurity, transport: trio.abc.Stream
) -> tuple[trio.abc.Stream, LineReader]:
    """TLS (if configured) and the handshake on a dialled connection; the link's stream."""
    stream = transport
    try:
        if security.tls is not None:
            stream = await wrap_dialled(transport, security.tls.dialling, peer.name)
        reader = LineReader(stream, peer_max_line(node.settings.max_line))
        await dial_handshake(
            stream, reader, me=node.wire_name, peer=peer.name.encode(), keyring=security.keyring
        )
    except (trio.BrokenResourceError, OSError) as exc:
        if security.tls is None:
            raise
        # TLS 1.3 checks our certificate after our side of the TLS handshake is
        # done: a refusal arrives as a reset or an EOF.
        raise LinkError(
            f"TLS session failed: {_describe(exc)} (did the peer refuse our certificate?)"
        ) from exc
    return stream, reader


@attrs.define(eq=False)
class PeerPort:
    """The accepting side of the links: neighbours that dial this server connect here.

    A peer must be a configured neighbour that dials this server and pass the
    handshake within HANDSHAKE_DEADLINE: HMAC challenge-response with a secret
    configured, mutual TLS with certificates configured, and with neither, only
    loopback peers are accepted. A neighbour that connects again replaces its old link
    (it was restarted, or the old one is dead). Refusals are logged at most once per
    address and kind every RateLimiter.interval, so a flood cannot fill the disk.
    """

    node: Node
    security: PeerSecurity
    dialers: frozenset[str]  # the neighbours that dial this server
    _accepted: dict[str, trio.CancelScope] = attrs.field(factory=dict, init=False)
    _refusals: RateLimiter = attrs.field(factory=RateLimiter, init=False)

    @property
    def linked(self) -> frozenset[str]:
        """The neighbours whose links to this port are up."""
        return frozenset(self._accepted)

    async def handle(self, transport: trio.abc.Stream) -> None:
        """Authenticate one connection to the peer port and carry its link until it ends."""
        who = describe(transport)
        try:
            with trio.fail_after(HANDSHAKE_DEADLINE):
                peer, stream, reader = await self._authenticate(transport)
        except LINK_ERRORS as exc:
            self._refuse(who, type(exc).__name__, _describe(exc))
            return
        if (old := self._accepted.get(peer)) is not None:
            old.cancel()
        with trio.CancelScope() as scope:
            self._accepted[peer] = scope
            self.node.log.write(f"link from {peer} up ({who})")
            try:
                await carry(self.node, peer, stream, reader)
            except* LINK_ERRORS as group:
                if not scope.cancel_called:  # a replaced link's errors are its replacement's
                    errors = list(leaves(group))
                    reason = "; ".join(_describe(exc) for exc in errors)
                    self.node.stats.link_dropped(peer, drop_kind(group), reason)
                    self._dropped(peer, who, errors)
            finally:
                if self._accepted.get(peer) is scope:
                    del self._accepted[peer]
        if scope.cancelled_caught:
            self.node.log.write(f"link from {peer} replaced by a new connection")

    async def _authenticate(
        self, transport: trio.abc.Stream
    ) -> tuple[str, trio.abc.Stream, LineReader]:
        security = self.security
        if security.keyring is None and security.tls is None and not is_loopback(transport):
            raise HandshakeError("not loopback, and no secret or TLS configured")
        stream = transport
        tls = None
        if security.tls is not None:
            stream = tls = await wrap_accepted(transport, security.tls.accepting)
        dialers = {name.encode() for name in self.dialers}

        def allowed(name: bytes) -> bool:
            if name in dialers and tls is not None and not certificate_matches(tls, name):
                shown = name.decode("ascii", "backslashreplace")
                raise HandshakeError(f"its TLS certificate does not name {shown}")
            return name in dialers

        reader = LineReader(stream, peer_max_line(self.node.settings.max_line))
        sender = await accept_handshake(
            stream, reader, me=self.node.wire_name, allowed=allowed, keyring=security.keyring
        )
        return sender.decode("ascii"), stream, reader  # allowed() matched a configured name

    async def report_absent(self) -> NoReturn:
        """Log the neighbours that dial this server while their links are down.

        The dialling side logs its failures; without this, the accepting side's log
        would say nothing at all about a neighbour that never comes. Said after
        ABSENT_NOTICE seconds of absence, then every ABSENT_REPEAT seconds.
        """
        since = dict.fromkeys(self.dialers, trio.current_time())
        said: dict[str, float] = {}
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for name in sorted(self.dialers):
                if name in self._accepted:
                    since[name] = now
                    said.pop(name, None)
                elif now - since[name] >= ABSENT_NOTICE and now - said.get(name, -math.inf) >= (
                    ABSENT_REPEAT
                ):
                    said[name] = now
                    self.node.log.write(
                        f"no link from {name} for {now - since[name]:.0f} s"
                        " (it dials this server; waiting for it)"
                    )

    def _dropped(self, peer: str, who: str, errors: list[BaseException]) -> None:
        """Log a dropped link; rate-limited like a refusal if the peer misbehaved.

        A neighbour's key in hand, an attacker could otherwise reconnect and misbehave
        in a loop and write a line per connection.
        """
        text = f"link from {peer} dropped: " + "; ".join(_describe(exc) for exc in errors)
        if not any(isinstance(exc, PeerMisbehaved) for exc in errors):
            self.node.log.write(text)
        else:
            self._refusals.write(f"{host_of(who)} misbehaved", self.node.log.write, text)

    def _refuse(self, who: str, kind: str, reason: str) -> None:
        self.node.stats.refused(kind)
        text = f"refused peer connection from {who}: {reason}"
        self._refusals.write(f"{host_of(who)} {kind}", self.node.log.write, text)


def drop_kind(group: BaseException) -> str:
    """A bounded label for why a link ended (the first leaf of the group decides)."""
    exc = next(leaves(group), group)
    kinds: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        (trio.TooSlowError, "timeout"),
        (HandshakeError, "handshake"),
        (LineTooLong, "line_too_long"),
        (OutboxClosed, "outbox_closed"),
        ((trio.BrokenResourceError, trio.ClosedResourceError), "broken"),
        (OSError, "os_error"),
    ]
    if isinstance(exc, LinkError):
        return exc.kind
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), "other")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if not str(exc) and exc.__cause__ is not None:  # a failed TLS handshake says why here
        return f"{type(exc).__name__}: {_describe(exc.__cause__)}"
    return str(exc) or repr(exc)
