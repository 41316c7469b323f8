"""Peer links: one persistent TCP connection per pair of neighbours.

Of each pair, the server whose name sorts first dials and keeps the link up with a
supervised loop (`run_link`); the other accepts on its peer port (`handle_peer`).
One connection per edge means each record crosses an edge at most once each way.

On the wire, after the handshake (herd_trio/auth.py, inside TLS if configured), a link
carries AT lines exactly as the origin server produced them (the AT line holds every
field of a record) and PING lines when idle. On link-up, and after every sync_interval
in which the link carried no record, each side sends a DIGEST of its store
(anti-entropy, as memberlist's push/pull): the other answers with the records of every
bucket where the two differ. In between, a link carries every record its store accepts,
except back to where it came from. The receiver keeps only records newer than its own,
so replays and duplicates are harmless and floods terminate on any graph.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import attrs
import trio

from herd_trio.auth import HandshakeError, accept_handshake, dial_handshake
from herd_trio.bus import Outbox, OutboxClosed
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.protocol import DIGEST, ProtocolError, format_digest, parse_at, parse_digest
from herd_trio.store import BUCKETS
from herd_trio.tls import certificate_matches, wrap_accepted, wrap_dialled

if TYPE_CHECKING:
    from herd_trio.server import Server

PING = b"PING"
DIAL_DEADLINE = 3.0  # seconds: loopback and LAN dials take milliseconds
HANDSHAKE_DEADLINE = 2.0  # seconds, as NATS gives a route to authenticate
SILENT_BEATS = 3  # a link whose peer says nothing for this many heartbeats is dead
FAILURE_LOG_EVERY = 20  # while a neighbour stays down, log every 20th failed dial
PEER_LINE_SLACK = 512  # bytes an AT line adds to the client line it came from
PEER_MIN_LINE = 8192  # bytes: a DIGEST line is 16 hex digits per bucket


class LinkError(Exception):
    """The peer broke the link protocol or went silent; the link is dropped."""


LINK_ERRORS = (
    OSError,  # ssl.SSLError included
    HandshakeError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    LinkError,
    LineTooLong,
    OutboxClosed,
)

Dial = Callable[[str, int], Awaitable[trio.abc.Stream]]


@attrs.frozen
class Backoff:
    """Capped exponential backoff with jitter: attempt n waits in [hi/2, hi].

    hi = min(cap, initial * factor**n). Half the range is random so a herd restarted
    at once does not redial in lockstep; the floor of hi/2 avoids hammering a
    neighbour that accepts and hangs up at once.
    """

    initial: float = 0.05
    factor: float = 2.0
    cap: float = 1.0  # a restarted neighbour is linked again within about a second
    stable_after: float = 5.0  # seconds up before the failure count is forgotten
    rand: Callable[[float, float], float] = random.uniform

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures."""
        hi = min(self.cap, self.initial * self.factor ** min(failures, 64))
        return self.rand(hi / 2, hi)


BACKOFF = Backoff()


@contextmanager
def direct_sender(stream: trio.abc.SendStream) -> Iterator[Callable[[bytes], int] | None]:
    """A non-blocking `send` on `stream`'s socket for the link's outbox, or None (TLS).

    It works on a duplicate of the socket's descriptor, closed with the block, so the
    trio stream stays the socket's owner; the outbox uses it only while the link's
    writer is idle, so the two never write at the same time.
    """
    if not isinstance(stream, trio.SocketStream):
        yield None
        return
    raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    try:
        raw.setblocking(False)
        yield raw.send
    finally:
        raw.close()


def peer_max_line(server: Server) -> int:
    """The longest line a peer may send: an AT line built from a max_line IAMAT, or a DIGEST.

    An AT line holds the IAMAT's fields plus the time difference, which repeats the
    client time's integer digits: up to twice the IAMAT. A record the peer cannot take
    would drop the link on every digest exchange, forever.
    """
    return max(2 * server.settings.max_line + PEER_LINE_SLACK, PEER_MIN_LINE)


def dials(me: str, peer: str) -> bool:
    """True if `me` dials `peer` (the name that sorts first dials)."""
    return me < peer


def is_loopback(stream: trio.abc.Stream) -> bool:
    """True if the remote end of `stream` is on this host (127.0.0.0/8, ::1)."""
    if not isinstance(stream, trio.SocketStream):
        return False
    try:
        host = stream.socket.getpeername()[0]
        address = ipaddress.ip_address(host.split("%")[0])
    except (OSError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


async def carry(server: Server, peer: str, stream: trio.abc.Stream, reader: LineReader) -> NoReturn:
    """Exchange records with `peer` over an established link until the link fails.

    Raises one of LINK_ERRORS (inside an ExceptionGroup) when the peer closes, goes
    silent, breaks the protocol or stops reading.
    """
    with server.bus.subscribe(peer) as outbox:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_outbox, server, stream, outbox)
            await read_peer(server, peer, reader, outbox)
    raise AssertionError("unreachable")  # pragma: no cover


async def read_peer(server: Server, peer: str, reader: LineReader, outbox: Outbox) -> NoReturn:
    """Take records from `peer`, keep the newer ones and flood those on.

    A DIGEST from the peer is answered by queueing, on this link's outbox, every
    record of each bucket where the two stores differ; the peer does the same with
    ours, and each side keeps what is newer, so the pair converges without resending
    what both already hold.
    """
    silence = SILENT_BEATS * server.settings.heartbeat_interval
    who = f"peer {peer}"
    store, bus, log = server.store, server.bus, server.log
    while True:
        lines: list[bytes] = []
        with trio.move_on_after(silence) as scope:
            lines = await reader.receive_lines()
        if scope.cancelled_caught:
            raise LinkError(f"no word from {peer} for {silence:g} s")
        if not lines:
            raise LinkError(f"{peer} closed the link")
        if len(lines) > 1 or lines[0] != PING:
            outbox.traffic_at = trio.current_time()
        for line in lines:
            if line == PING:
                continue
            try:
                if line.startswith(DIGEST):
                    missing = store.differing(parse_digest(line, BUCKETS))
                    for record in missing:
                        outbox.put(record)
                    if missing:
                        log.write(f"sync with {peer}: sending {len(missing)} records")
                    continue
                log.received(who, line)
                record = parse_at(line)
            except ProtocolError as exc:
                raise LinkError(f"{peer} sent a bad line {line[:80]!r}: {exc}") from exc
            if store.offer(record):
                bus.publish(record, source=peer)


async def write_outbox(server: Server, stream: trio.abc.SendStream, outbox: Outbox) -> NoReturn:
    """Send the outbox to the peer in batches, a DIGEST first and then every
    sync_interval that the link was quiet, and a PING whenever it is otherwise idle
    for a heartbeat interval."""
    settings = server.settings
    interval, deadline, sync = (
        settings.heartbeat_interval,
        settings.write_deadline,
        settings.sync_interval,
    )
    bus, store = server.bus, server.store
    next_sync = trio.current_time()  # the first thing on a new link is a digest
    first = True
    with direct_sender(stream) as sender:
        outbox.sender = sender
        try:
            while True:
                now = trio.current_time()
                if now >= next_sync and not first and now - outbox.traffic_at < sync:
                    # Records crossed this link lately: some are in flight, so the stores
                    # differ in many buckets for no lasting reason, and answering a digest
                    # would resend most of the store. The flood is doing the work; compare
                    # once the link has been quiet for a whole interval.
                    next_sync = outbox.traffic_at + sync
                    continue
                if now >= next_sync:
                    data = format_digest(store.digest()) + b"\n"
                    next_sync, first = now + sync, False
                else:
                    batch = []
                    with trio.move_on_at(min(trio.current_time() + interval, next_sync)):
                        batch = await outbox.take()
                    residue = outbox.take_residue()  # a direct send's tail goes first
                    if batch or residue:
                        data = residue + b"".join([record.at_line + b"\n" for record in batch])
                        outbox.traffic_at = trio.current_time()
                    elif trio.current_time() >= next_sync:
                        continue
                    else:
                        data = PING + b"\n"
                upto = outbox.taken
                outbox.busy = True
                try:
                    with trio.move_on_after(deadline) as scope:  # (fail_after costs a generator)
                        await stream.send_all(data)
                finally:
                    outbox.busy = False
                if scope.cancelled_caught:  # a peer that stops reading cannot pin us
                    raise trio.TooSlowError
                bus.mark_written(outbox, upto)
        finally:
            outbox.sender = None  # the duplicate descriptor closes with the block


async def run_link(
    server: Server, peer: str, *, dial: Dial = trio.open_tcp_stream, backoff: Backoff = BACKOFF
) -> NoReturn:
    """Keep the link to `peer` up until cancelled; redial with capped, jittered backoff."""
    target = server.herd.servers[peer]
    log = server.log
    # A neighbour that takes longer than a dead link's silence to answer a dial or a
    # handshake is treated as dead too, so a healed partition relinks within about
    # 3 heartbeats plus one backoff instead of waiting out the fixed deadlines.
    silence = SILENT_BEATS * server.settings.heartbeat_interval
    dial_deadline = min(DIAL_DEADLINE, silence)
    handshake_deadline = min(HANDSHAKE_DEADLINE, silence)
    failures = 0
    while True:
        up_since = math.inf
        try:
            with trio.fail_after(dial_deadline):
                transport = await dial(target.host, target.peer_port)
            async with transport:  # closing the transport also ends a TLS session on it
                with trio.fail_after(handshake_deadline):
                    stream = transport
                    try:
                        if server.tls is not None:
                            stream = await wrap_dialled(transport, server.tls.dialling, peer)
                        reader = LineReader(stream, peer_max_line(server))
                        await dial_handshake(
                            stream,
                            reader,
                            me=server.wire_name,
                            peer=peer.encode(),
                            keyring=server.keyring,
                        )
                    except (trio.BrokenResourceError, OSError) as exc:
                        if server.tls is None:
                            raise
                        # TLS 1.3 checks our certificate after our side of the TLS
                        # handshake is done: a refusal arrives as a reset or an EOF.
                        raise LinkError(
                            f"TLS session failed: {_describe(exc)}"
                            " (did the peer refuse our certificate?)"
                        ) from exc
                up_since = trio.current_time()
                log.write(f"link to {peer} up ({target.host}:{target.peer_port})")
                await carry(server, peer, stream, reader)
        except* LINK_ERRORS as group:
            reason = "; ".join(_reasons(group))
            if up_since < math.inf:
                log.write(f"link to {peer} dropped: {reason}")
            elif failures % FAILURE_LOG_EVERY == 0:
                log.write(f"link to {peer} failed (attempt {failures + 1}): {reason}")
        if trio.current_time() - up_since >= backoff.stable_after:
            failures = 0
        await trio.sleep(backoff.delay(failures))
        failures += 1


async def handle_peer(server: Server, transport: trio.abc.Stream) -> None:
    """Accept a link from a neighbour on the peer port; refuse anyone else.

    A peer must be a configured neighbour that dials this server and pass the
    handshake within HANDSHAKE_DEADLINE: HMAC challenge-response with a secret
    configured, mutual TLS with certificates configured, and with neither, only
    loopback peers are accepted. A neighbour that connects again replaces its old link
    (it was restarted, or the old one is dead). Refusals are logged at most once per
    address and kind every RateLimiter.interval, so a flood cannot fill the disk.
    """
    from herd_trio.server import describe

    who = describe(transport)
    log = server.log

    def refuse(kind: str, reason: str) -> None:
        suppressed = server.refusals.allow(f"{who.rpartition(':')[0]} {kind}")
        if suppressed is not None:
            more = f" ({suppressed} more since the last)" if suppressed else ""
            log.write(f"refused peer connection from {who}: {reason}{more}")

    if server.keyring is None and server.tls is None and not is_loopback(transport):
        refuse("address", "not loopback, and no secret or TLS configured")
        return
    dialling = {n.encode() for n in server.herd.neighbours(server.name) if dials(n, server.name)}
    try:
        with trio.fail_after(HANDSHAKE_DEADLINE):
            stream = transport
            tls = None
            if server.tls is not None:
                stream = tls = await wrap_accepted(transport, server.tls.accepting)

            def allowed(name: bytes) -> bool:
                if name in dialling and tls is not None and not certificate_matches(tls, name):
                    shown = name.decode("ascii", "backslashreplace")
                    raise HandshakeError(f"its TLS certificate does not name {shown}")
                return name in dialling

            reader = LineReader(stream, peer_max_line(server))
            sender = await accept_handshake(
                stream, reader, me=server.wire_name, allowed=allowed, keyring=server.keyring
            )
    except LINK_ERRORS as exc:
        refuse(type(exc).__name__, _describe(exc))
        return
    peer = sender.decode("ascii")  # allowed() matched it against the config's names
    if (old := server.accepted.get(peer)) is not None:
        old.cancel()
    with trio.CancelScope() as scope:
        server.accepted[peer] = scope
        log.write(f"link from {peer} up ({who})")
        try:
            await carry(server, peer, stream, reader)
        except* LINK_ERRORS as group:
            if not scope.cancel_called:  # a replaced link's errors are part of its replacement
                log.write(f"link from {peer} dropped: {'; '.join(_reasons(group))}")
        finally:
            if server.accepted.get(peer) is scope:
                del server.accepted[peer]
    if scope.cancelled_caught:
        log.write(f"link from {peer} replaced by a new connection")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if not str(exc) and exc.__cause__ is not None:  # a failed TLS handshake says why here
        return f"{type(exc).__name__}: {_describe(exc.__cause__)}"
    return str(exc) or repr(exc)


def _reasons(group: BaseExceptionGroup[BaseException]) -> list[str]:
    reasons: list[str] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            reasons += _reasons(exc)
        else:
            reasons.append(_describe(exc))
    return reasons
