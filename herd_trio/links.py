"""Peer links: one persistent TCP connection per pair of neighbours.

Of each pair, the server whose name sorts first dials and keeps the link up with a
supervised loop (`run_link`); the other accepts on its peer port (`PeerPort`). One
connection per edge means each record crosses an edge at most once each way.

On the wire, after the handshake (herd_trio/auth.py, inside TLS if configured), a link
carries AT lines exactly as the origin server produced them (the AT line holds every
field of a record), PING lines when idle, and SUMS/ITEMS/NEED lines (anti-entropy by
range-based reconciliation, herd_trio/sync.py): the two sides find the records that
differ, with traffic proportional to the differences, and send each other those.
The receiver keeps only records newer than its own, so replays and duplicates are
harmless and floods terminate on any graph. Writing is
the `LinkWriter`'s job (herd_trio/linkwriter.py); this module dials, accepts,
authenticates and reads.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import attrs
import trio

from herd_trio.auth import HandshakeError, dial_handshake
from herd_trio.backoff import Backoff
from herd_trio.bus import OutboxClosed
from herd_trio.errors import leaves
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.linkwriter import HEARTBEATS, PING, PONG, LinkWriter, Timers
from herd_trio.log import DUPLICATE, KEPT, STALE, VERDICT_TAILS, RateLimiter
from herd_trio.net import hostport
from herd_trio.node import Node
from herd_trio.protocol import (
    ProtocolError,
    Record,
    canonical_at,
    later,
    parse_at,
    too_far_ahead,
)
from herd_trio.security import PeerSecurity
from herd_trio.silence import Silence
from herd_trio.stats import PeerStats
from herd_trio.sync import PeerMisbehaved, Reconciler
from herd_trio.synclines import SYNC_PREFIXES, parse_sync
from herd_trio.tls import wrap_dialled

DIAL_DEADLINE = 3.0  # seconds: loopback and LAN dials take milliseconds
HANDSHAKE_DEADLINE = 2.0  # seconds, as NATS gives a route to authenticate
SILENT_BEATS = 3  # a link whose peer says nothing for this many heartbeats is dead
FAILURE_LOG_EVERY = 20  # while a neighbour stays down, log every 20th failed dial
PEER_LINE_SLACK = 512  # bytes an AT line adds to the client line it came from
# Lines of one batch handled between checkpoints: about a millisecond of work. Each
# part's records are flooded on with one write per link, so this is also how many
# records a relay forwards per write when its neighbour sends it large batches.
LINES_PER_CHECKPOINT = 256
PEER_MIN_LINE = 8192  # bytes: the longest sync line (ITEMS, NEED) is about 1.1 KB
BACKOFF = Backoff()


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
    """The longest line a peer may send: an AT line built from a max_line IAMAT, or a sync line.

    An AT line holds the IAMAT's fields plus the time difference, which repeats the
    client time's integer digits: up to twice the IAMAT. A record the peer cannot take
    would drop the link on every sync round, forever.
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
    # No sync before the store holds the state file: it would look as if it lacked
    # nearly everything (_sync_when_loaded starts it).
    loaded = node.restore.done
    first_sync = trio.current_time() if loaded else math.inf
    timers = Timers(settings.heartbeat_interval, settings.sync_interval, next_sync=first_sync)
    counts = node.stats.link_up(peer, "out" if dials(node.name, peer) else "in", writer)
    sync = Reconciler(
        node.store,
        writer.send_line,
        writer.send_stream,
        node.log.write,
        peer,
        counts,
        settings.sync_interval / 2,
    )
    quiet = SILENT_BEATS * settings.heartbeat_interval
    silence = Silence(quiet, lambda: LinkError(f"no word from {peer} for {quiet:g} s", "silent"))
    try:
        with node.bus.subscribe(peer, writer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run, timers, sync.start)
                nursery.start_soon(silence.watch)
                if not loaded:
                    nursery.start_soon(_sync_when_loaded, node, timers, writer)
                await read_peer(node, peer, reader, writer, sync, silence)
    finally:
        node.stats.link_down(peer, writer)
    raise AssertionError("unreachable")  # pragma: no cover


async def _sync_when_loaded(node: Node, timers: Timers, writer: LinkWriter) -> None:
    await node.restore.wait()
    timers.next_sync = trio.current_time()
    writer.outbox.wake()


async def read_peer(
    node: Node,
    peer: str,
    reader: LineReader,
    writer: LinkWriter,
    sync: Reconciler,
    silence: Silence,
) -> NoReturn:
    """Take records from `peer`, keep the newer ones and flood those on.

    Sync lines go to `sync` (herd_trio/sync.py), which answers them through the
    link's writer: each side sends the records the other lacks or holds in an older
    version, and each keeps what is newer, so the pair converges without resending
    what both already hold. A peer that keeps starting rounds loses the link
    (PeerMisbehaved).
    """
    counts = node.stats.peer(peer)
    ahead = RateLimiter()
    max_skew = node.settings.max_future_skew
    store = node.store
    held = store.held
    logged: list[bytes] = []  # record lines, logged per batch with their verdicts' tails:
    tails: list[bytes] = []  # KEPT, DUPLICATE or STALE (log.peer_lines)
    kept: list[tuple[bytes, bytes]] = []  # records kept, flooded on per batch
    taken = duplicates = stale = 0  # settled below without a Record; into `counts` per batch
    while True:
        silence.waiting()
        lines = await reader.receive_lines()
        silence.heard()
        if not lines:
            raise LinkError(f"{peer} closed the link", "closed")
        if len(lines) > 1 or lines[0] not in HEARTBEATS:
            writer.note_traffic()
        # Every receive checkpoints, so only a long batch (a sync stream's is thousands
        # of lines) checkpoints inside it, and only after its first LINES_PER_CHECKPOINT
        # lines: a short batch is taken in the step that received it. A client's
        # WHATSAT answered in a checkpoint between would miss a record that was read
        # before it ("flood first, then reply", PROTOCOL.md §2).
        handled = 0
        try:  # what was taken is logged even if a later line drops the link
            for line in lines:
                handled += 1
                if handled > LINES_PER_CHECKPOINT:  # clients get the loop meanwhile
                    handled = 1
                    _hand_on(node, peer, logged, tails, kept)  # before anyone logs or floods
                    await trio.lowlevel.checkpoint()
                # Most record lines are a flood's echoes of a line held already, a new
                # client's first record or a client's update; all are settled here by
                # comparing the line, packed, with the held one, and the client times,
                # without building a Record. (A heartbeat has one field, so it is not
                # split into five.)
                if max_skew is None and len(fields := line.split(b" ", 4)) == 5:
                    client, fields[3] = fields[3], b""  # store.split_client, without a call
                    packed = b" ".join(fields)
                    standing = held.get(client)
                    if standing == packed:  # equal to a checked line: the same line
                        duplicates += 1
                        logged.append(line)
                        tails.append(DUPLICATE)
                        continue
                    if (match := canonical_at(line)) is not None:
                        # A new client, or an update whose client time is later or
                        # earlier than the held one's (the time decides the rank):
                        # settled without a Record. Equal times go to _take.
                        order = 1
                        if standing is not None:
                            order = later(match[4], standing[standing.rindex(b" ") + 1 :])
                        if order > 0:
                            if standing is None:
                                store.add_new(client, packed, line)
                            else:
                                store.replace(client, packed, line)
                            taken += 1
                            kept.append((client, line))
                            logged.append(line)
                            tails.append(KEPT)
                            continue
                        if order < 0:
                            stale += 1
                            logged.append(line)
                            tails.append(STALE)
                            continue
                if line == PING:
                    writer.pong()
                    continue
                if line == PONG:
                    if (rtt := writer.ponged()) is not None:
                        counts.rtt = rtt
                    continue
                if line.startswith(SYNC_PREFIXES):
                    parsed = _parse(peer, line, parse_sync)
                    node.log.peer_lines(peer, logged, tails)  # sync may log: keep the order
                    if node.restore.done:  # loading: we would ask for most of the store
                        sync.handle(parsed, trio.current_time())
                    continue
                record = _parse(peer, line, parse_at)
                if max_skew is not None and too_far_ahead(record.sent, node.now_ns(), max_skew):
                    node.log.peer_lines(peer, logged, tails)
                    _refuse_ahead(node, peer, ahead, line)
                    continue
                logged.append(line)
                tails.append(VERDICT_TAILS[_take(node, record, counts, kept)])
        finally:
            counts.kept += taken
            counts.duplicate += duplicates
            counts.stale += stale
            taken = duplicates = stale = 0
            # The batch's records go on, with one write per link.
            _hand_on(node, peer, logged, tails, kept)


def _hand_on(
    node: Node,
    peer: str,
    logged: list[bytes],
    tails: list[bytes],
    kept: list[tuple[bytes, bytes]],
) -> None:
    """Log the lines taken from `peer` so far, flood on the records kept (in the order
    they were kept: a client's later record is its newer) and send them; empty the lists."""
    node.log.peer_lines(peer, logged, tails)
    if kept:
        node.bus.publish(kept, peer)
        kept.clear()
    node.bus.push()


def _parse(peer: str, line: bytes, parse: Callable[[bytes], T]) -> T:
    try:
        return parse(line)
    except ProtocolError as exc:
        raise LinkError(f"{peer} sent a bad line {line[:80]!r}: {exc}") from exc


def _take(node: Node, record: Record, counts: PeerStats, kept: list[tuple[bytes, bytes]]) -> str:
    """Offer a peer's record to the store, add it to `kept` (to flood on) if it stands;
    the verdict to log."""
    standing = node.store.offer(record)
    said = verdict(standing is record, record.at_line, standing.at_line)
    if standing is record:
        counts.kept += 1
        kept.append((record.client, record.at_line))
    elif said == "stale":
        counts.stale += 1
    else:
        counts.duplicate += 1
    return said


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
    current: Callable[[], PeerSecurity] | None = None,
) -> NoReturn:
    """Keep the link to `peer` up until cancelled; redial with capped, jittered backoff.

    `current`, if given, is asked for the security of each new dial (a reload may
    have replaced the keyring or certificates since); else `security` serves them all.
    """
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
                    now = security if current is None else current()
                    stream, reader = await _introduce(node, peer, now, transport)
                up_since = trio.current_time()
                node.log.write(f"link to {peer.name} up ({hostport(peer.host, peer.port)})")
                await carry(node, peer.name, stream, reader)
        except* LINK_ERRORS as group:
            reason = "; ".join(describe_error(exc) for exc in leaves(group))
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
            f"TLS session failed: {describe_error(exc)} (did the peer refuse our certificate?)"
        ) from exc
    return stream, reader


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


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if not str(exc) and exc.__cause__ is not None:  # a failed TLS handshake says why here
        return f"{type(exc).__name__}: {describe_error(exc.__cause__)}"
    return str(exc) or repr(exc)
