"""Client connections: admission, then each line answered in order, from the store.

The path of one IAMAT reads forward: parse it, offer the record to the store, publish
it if the store kept it, wait (briefly) until the links have it, reply. WHATSAT adds a
call to the places source, bounded by places_timeout.
"""

from __future__ import annotations

import heapq
import itertools
import re
import time
import traceback
from collections.abc import Iterator

import attrs
import trio

from herd_trio import protocol
from herd_trio.lines import LineReader, LineTimeout, LineTooLong
from herd_trio.log import RECEIVED, SENT
from herd_trio.net import describe, host_of, linger, send_within
from herd_trio.node import Node
from herd_trio.places import JSON, PlacesSource, error_body, legacy_body, render
from herd_trio.protocol import (
    Iamat,
    ProtocolError,
    Whatsat,
    at_parts,
    iamat_match,
    later,
    make_record,
    parse_command_fields,
    question,
)
from herd_trio.store import unpack

# A browser or scanner that talks HTTP to a client port gets its `?` and is closed
# at once rather than answered header by header.
HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} \S+ HTTP/[0-9]")
FAIR_SHARE = 64  # lines answered before a pipelining client yields to the others
# Errors that end one client connection and nothing else.
CLIENT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


class IdleTimeout(Exception):
    """No complete line for client_idle_timeout seconds."""


def answer_line(node: Node, line: bytes, received_ns: int) -> tuple[bytes | Whatsat, bool]:
    """The reply to one client line (or the WHATSAT still to be answered), and whether
    the line's record was kept and published.

    An accepted IAMAT is handed to the links (published on the bus) before this
    returns, so it is on its way to the neighbours before the client sees the reply.
    A stale or repeated IAMAT gets the stored line (PROTOCOL.md §2).
    """
    kept: list[tuple[bytes, bytes]] = []
    reply = answer(node, line, received_ns, kept)
    if kept:
        node.bus.publish(kept)
    return reply, bool(kept)


def answer(
    node: Node, line: bytes, received_ns: int, kept: list[tuple[bytes, bytes]]
) -> bytes | Whatsat:
    """answer_line for a batch of lines: the record an IAMAT keeps is added to `kept`
    as (client, AT line), for the caller to publish before any reply goes out.

    A well-formed IAMAT (the common line) is taken apart by parse_command's regex
    here, and a new client's is kept without building an Iamat or a Record.
    """
    match = iamat_match(line)
    if match is not None:
        client, coords, time = match.groups()
    else:
        try:
            command = parse_command_fields(line)
        except ProtocolError:
            node.stats.invalid += 1
            return question(line)
        if isinstance(command, Whatsat):
            node.stats.whatsat += 1
            return command if node.store.get(command.client) is not None else question(line)
        client, coords, time = command
    max_skew = node.settings.max_future_skew
    if max_skew is not None and protocol.too_far_ahead(
        Iamat(client, coords, time).sent, received_ns, max_skew
    ):
        return question(line)
    node.stats.iamat += 1
    store = node.store
    held = store.held.get(client)
    # A new client, or a later client time than the held record's (which decides the
    # rank whatever else differs): kept without building a Record. An earlier time is
    # answered with the held line. Equal times (a repeat, or a tie that origin and
    # coords break) are for offer().
    if held is not None and (order := later(time, held[held.rindex(b" ") + 1 :])) <= 0:
        if order < 0:
            return unpack(held, client) + b"\n"
        record = make_record(node.wire_name, received_ns, Iamat(client, coords, time))
        standing = store.offer(record, repeat=True)
        if standing is not record:
            return standing.at_line + b"\n"
        at_line = record.at_line
    else:
        head, tail = at_parts(node.wire_name, received_ns, coords, time)
        at_line = head + client + tail
        if held is None:
            store.add_new(client, head + tail, at_line)  # head + tail: store.pack's form
        else:
            store.replace(client, head + tail, at_line)
    kept.append((client, at_line))
    return at_line + b"\n"


async def whatsat(node: Node, places: PlacesSource, command: Whatsat) -> bytes:
    """The stored AT line plus the places near it; never later than places_timeout."""
    record = node.store.get(command.client)
    assert record is not None  # records are never removed
    if command.bound == 0:
        body = legacy_body([], "OK")  # PROTOCOL.md: bound 0 makes no outbound call
    else:
        lat, lon = record.lat_lon
        timeout = node.settings.places_timeout
        body = error_body("UNKNOWN_ERROR", f"places source did not answer within {timeout} s")
        node.stats.places_calls += 1
        began = time.perf_counter()
        with trio.move_on_after(timeout):
            body = await places.nearby(lat, lon, command.radius_m, command.bound)
        node.stats.places.observe(time.perf_counter() - began)
        if body.get("status") not in ("OK", "ZERO_RESULTS"):
            node.stats.places_errors += 1
        body = _cap(body, command.bound)
    return record.at_line + b"\n" + render(body) + b"\n\n"


def _cap(body: JSON, bound: int) -> JSON:
    results = body.get("results")
    if isinstance(results, list) and len(results) > bound:
        return {**body, "results": results[:bound]}
    return body


@attrs.define(eq=False)
class Ticket:
    """One admitted connection as Admission sees it: where it is from, when it last
    completed a line, and the scope that closes it."""

    who: str
    address: str
    active_at: float  # trio time of its last batch of complete lines, or of its admission
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    answering: bool = False  # between receiving lines and writing their replies
    evicted: bool = False  # closed by Admission to make room; no longer counted
    gone: bool = False  # the connection ended; its heap entry is dropped when met


@attrs.define(eq=False)
class Admission:
    """How many client connections are open, in all and per remote address, and which
    one gives way to a newcomer when every slot is taken.

    The choice is a lazy min-heap of (last activity, order, ticket). A session only
    stores a new time in its ticket, once per batch of lines, and never touches the
    heap. When a newcomer needs a slot, an entry whose key is out of date is pushed
    back with the ticket's time, and the first up-to-date entry is the connection that
    has gone longest without a complete line. Every push-back pays for one activity
    update, so a choice costs amortised O(log n), never a scan of every connection.
    Entries of connections that ended are dropped when met, and the heap is rebuilt
    when more than half of it is dead.
    """

    max_clients: int
    per_address: int = 0  # 0: no cap
    grace: float = 5.0  # seconds: a connection active more recently is never evicted
    open: int = attrs.field(default=0, init=False)
    _by_address: dict[str, int] = attrs.field(factory=dict, init=False)
    _heap: list[tuple[float, int, Ticket]] = attrs.field(factory=list, init=False)
    _order: Iterator[int] = attrs.field(factory=itertools.count, init=False)

    def admit(self, who: str, address: str, now: float) -> tuple[Ticket | None, str]:
        """A ticket for connection `who` from `address` and what to log, or (None, why
        it is refused).

        At max_clients, the connection idle longest is evicted if it has had no
        complete line for more than `grace` seconds: its scope is cancelled (the
        session closes itself, lingering) and it stops counting at once.
        """
        if self.per_address and self._by_address.get(address, 0) >= self.per_address:
            return None, f"{self.per_address} connections from {address} already"
        note = "admitted"
        if self.open >= self.max_clients:
            victim = self._victim(now)
            if victim is None:
                reason = f"{self.max_clients} clients already connected"
                return None, f"{reason}, each active within {self.grace} s"
            victim.evicted = True
            idle = f"no complete line for {now - victim.active_at:.1f} s"
            victim.scope.cancel(reason=f"evicted to admit {who}")
            self._count(victim.address, -1)
            note = f"admitted by closing {victim.who} ({idle}) at {self.max_clients} clients"
        ticket = Ticket(who, address, now)
        self._count(address, 1)
        heapq.heappush(self._heap, (now, next(self._order), ticket))
        return ticket, note

    def leave(self, ticket: Ticket) -> None:
        """Forget a connection that ended (evicted or not)."""
        ticket.gone = True
        if not ticket.evicted:
            self._count(ticket.address, -1)
        if len(self._heap) > 2 * self.open + 64:  # amortised O(1) per leave
            self._heap = [entry for entry in self._heap if not entry[2].gone]
            heapq.heapify(self._heap)

    def _victim(self, now: float) -> Ticket | None:
        heap = self._heap
        while heap:
            key, _, ticket = heap[0]
            if ticket.gone or ticket.evicted:
                heapq.heappop(heap)
                continue
            if ticket.answering:  # busy with a reply (a WHATSAT): counts as active
                ticket.active_at = now
            if ticket.active_at != key:  # stale: push back with the current time
                heapq.heapreplace(heap, (ticket.active_at, next(self._order), ticket))
                continue
            if now - key <= self.grace:
                return None  # the oldest is recent, so every connection is
            heapq.heappop(heap)
            return ticket
        return None

    def _count(self, address: str, step: int) -> None:
        self.open += step
        if (left := self._by_address.get(address, 0) + step) > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)


async def handle_client(
    node: Node, places: PlacesSource, admission: Admission, stream: trio.abc.Stream
) -> None:
    """Admit one client connection within the limits, then answer it.

    Over the limits, when no connection can give way, a connection is closed at once
    without a word: the protocol has no error reply for it, and a refused client can
    simply retry. The caller (trio.serve_listeners) closes the stream afterwards.
    """
    who = describe(stream)
    ticket, note = admission.admit(who, host_of(who), trio.current_time())
    if ticket is None:
        node.stats.client_refusals += 1
        node.log.write(f"{who} refused: {note}")
        return
    if note != "admitted":
        node.log.write(f"{who} {note}")
    node.stats.clients_open += 1
    node.stats.clients_total += 1
    try:
        await Session(node, places, stream, who, ticket).run()
    except Exception as exc:
        # A bug must not let one client take the server and everyone else down: it is
        # logged in full (tests fail on "internal error" in any log) and the connection
        # is closed.
        trace = "".join(traceback.format_exception(exc))
        node.log.write(f"{who} internal error, closing: {trace!r}")
    finally:
        node.stats.clients_open -= 1
        admission.leave(ticket)


@attrs.define(eq=False)
class Session:
    """One client connection: its lines answered in order, batched into few writes.

    All lines that arrived together are answered with one write; each reply is whole
    inside it.
    """

    node: Node
    places: PlacesSource
    stream: trio.abc.Stream
    who: str
    ticket: Ticket  # its admission: activity time and the scope that evicts it
    _replies: list[bytes] = attrs.field(factory=list, init=False)
    _kept: list[tuple[bytes, bytes]] = attrs.field(factory=list, init=False)  # to publish
    _flooded: bool = attrs.field(default=False, init=False)  # `_replies` hold an update
    _first: bool = attrs.field(default=True, init=False)  # no line answered yet

    async def run(self) -> None:
        """Answer until the client closes, errs, or must be closed; log why it ended.

        When the server ends the connection itself (an over-long or unfinished line,
        one_shot, an HTTP request, idleness, eviction), every reply owed has been
        written and the close lingers (net.linger) so that the client gets them.
        """
        self.node.log.write(f"{self.who} connected")
        ending = True  # if cancelled by eviction
        with self.ticket.scope:
            ending = await self._serve()
        if self.ticket.scope.cancelled_caught:
            self.node.log.write(f"{self.who} closed to admit a newcomer")
        if ending:
            await linger(self.stream)

    async def _serve(self) -> bool:
        """Read and answer lines; True when the server is the one ending the connection."""
        settings, log, who, ticket = self.node.settings, self.node.log, self.who, self.ticket
        reader = LineReader(self.stream, settings.max_line, line_timeout=settings.line_timeout)
        try:
            while lines := await self._receive(reader):
                ticket.active_at = trio.current_time()  # once per batch, not per line
                ticket.answering = True
                more = await self._answer(lines)
                ticket.answering = False
                if not more:
                    return True
            log.write(f"{who} closed by the client")
        except LineTooLong as exc:
            log.write(
                f"{who} sent a line longer than {settings.max_line} bytes, closing: {exc.head!r}"
            )
            return True
        except LineTimeout as exc:
            log.write(
                f"{who} left a line unfinished for {settings.line_timeout} s, closing: {exc.head!r}"
            )
            return True
        except IdleTimeout:
            log.write(f"{who} sent no line for {settings.client_idle_timeout} s, closing")
            return True
        except CLIENT_ERRORS as exc:
            log.write(f"{who} dropped: {exc!r}")
        return False

    async def _receive(self, reader: LineReader) -> list[bytes]:
        idle = self.node.settings.client_idle_timeout
        if not idle:  # the default: persistent sessions may stay idle for hours
            return await reader.receive_lines()
        with trio.move_on_at(self.ticket.active_at + idle):
            return await reader.receive_lines()
        raise IdleTimeout

    async def _answer(self, lines: list[bytes]) -> bool:
        """Answer lines that arrived together; False when the connection must close."""
        node, log, who = self.node, self.node.log, self.who
        received_ns = node.now_ns()  # when these lines were complete
        # A WHATSAT sent after an IAMAT's reply must see that IAMAT (PROTOCOL.md §2).
        # Its record reached this server's socket buffer before the WHATSAT did, so a
        # link's reader takes it no later than the batch after this one: it is either
        # woken by the same poll as these lines (and takes what it reads in that step),
        # or already runnable, and then its next receive reads the record and yields
        # once before handing it over, as trio's receive does. Two checkpoints put
        # this answer after both. (Only a batch of more than LINES_PER_CHECKPOINT
        # lines, a sync stream's, is taken in more than one step.)
        if b"WHAT" in b"\n".join(lines):  # one search in C, not a generator per line
            await trio.lowlevel.cancel_shielded_checkpoint()
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not node.restore.done:  # the state file is still loading: fetch what they name
            await node.restore.ensure(lines)
        logged: list[bytes] = []  # RECEIVED, line, SENT, reply...: one time stamp, one write
        kept, one_shot, requests = self._kept, node.settings.one_shot, node.stats.requests
        # Lines answered one after another without waiting are timed as a run: each
        # counts at the run's mean (Histogram.observe_run), which spares two clock
        # reads and a bucket search per line. A WHATSAT, which waits for the places
        # source, is timed on its own.
        began, answered = time.perf_counter(), 0
        # The batch's entries are logged once its replies are on their way (or the
        # session ended): a client that waits for each reply does not wait for the log
        # too (a tenth of a sequential IAMAT's time here). The log reaches the file
        # within FLUSH_INTERVAL all the same, and a reply that cannot be sent is logged.
        try:
            try:
                for index, line in enumerate(lines, 1):
                    if index % FAIR_SHARE == 0 and self._replies:
                        log.exchanges(who, logged)
                        answered = requests.observe_run(began, answered)
                        await self._flush()  # a pipelining client must not hold the loop for long
                        began = time.perf_counter()
                    logged.append(RECEIVED)
                    logged.append(line)
                    if not line or line.isspace():  # bytes.isspace(): the six white-space bytes
                        continue  # blank lines are ignored, also in one_shot mode
                    if self._first and HTTP_REQUEST.match(line):
                        log.exchanges(who, logged)
                        await self._reply(question(line))
                        log.write(f"{who} sent an HTTP request to the client port; closing")
                        return False
                    self._first = False
                    reply = answer(node, line, received_ns, kept)
                    if isinstance(reply, Whatsat):
                        log.exchanges(who, logged)  # the places source may log while we wait
                        answered = requests.observe_run(began, answered)
                        if self._replies:  # earlier answers must not wait for the places source
                            await self._flush()
                        began = time.perf_counter()
                        reply = await whatsat(node, self.places, reply)
                        requests.observe(time.perf_counter() - began)
                        began = time.perf_counter()
                    else:
                        answered += 1
                    if one_shot:
                        log.exchanges(who, logged)
                        answered = requests.observe_run(began, answered)
                        await self._reply(reply)
                        log.write(f"{who} closed after one reply (one_shot)")
                        return False
                    logged.append(SENT)
                    logged.append(reply)
                    self._replies.append(reply)
            finally:
                requests.observe_run(began, answered)
                self._publish()  # every record kept is flooded, whatever happens next
            if self._replies:
                await self._flush()
        finally:
            log.exchanges(who, logged)
        return True

    async def _reply(self, reply: bytes) -> None:
        self.node.log.sent(self.who, reply)
        self._replies.append(reply)
        await self._flush()

    def _publish(self) -> None:
        """Hand the records kept since the last call to the links, in one publish."""
        if self._kept:
            self.node.bus.publish(self._kept)
            self._kept.clear()
            self._flooded = True

    async def _flush(self) -> None:
        self._publish()
        bus = self.node.bus
        # Flood first, then reply; no longer than the bus's handoff deadline.
        if self._flooded and not bus.handed_off() and not await bus.wait_handed_off():
            # A writer woken meanwhile may be in the batch this deadline woke us in,
            # in either order: one checkpoint lets it write first.
            await trio.lowlevel.checkpoint()
        data, self._replies, self._flooded = b"".join(self._replies), [], False
        # A client that never reads is dropped, not buffered.
        await send_within(self.stream, data, self.node.settings.write_deadline)
