"""Client connections: admission, then each line answered in order, from the store.

The path of one IAMAT reads forward: parse it, offer the record to the store, publish
it if the store kept it, wait (briefly) until the links have it, reply. WHATSAT adds a
call to the places source, bounded by places_timeout.
"""

from __future__ import annotations

import re
import traceback

import attrs
import trio

from herd_trio import protocol
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.net import describe, host_of, send_within
from herd_trio.node import Node
from herd_trio.places import JSON, PlacesSource, error_body, legacy_body, render
from herd_trio.protocol import ProtocolError, Whatsat, make_record, parse_command, question

# A browser or scanner that talks HTTP to a client port gets its `?` and is closed
# at once rather than answered header by header.
HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} \S+ HTTP/[0-9]")
FAIR_SHARE = 64  # lines answered before a pipelining client yields to the others
HANDOFF_DEADLINE = 0.05  # seconds a reply may wait for its update to reach the links
# Errors that end one client connection and nothing else.
CLIENT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


def answer_line(node: Node, line: bytes, received_ns: int) -> tuple[bytes | Whatsat, bool]:
    """The reply to one client line (or the WHATSAT still to be answered), and whether
    the line's record was kept and published.

    An accepted IAMAT is handed to the links (published on the bus) before this
    returns, so it is on its way to the neighbours before the client sees the reply.
    A stale or repeated IAMAT gets the stored line (PROTOCOL.md §2).
    """
    try:
        command = parse_command(line)
    except ProtocolError:
        return question(line), False
    if isinstance(command, Whatsat):
        return (command if node.store.get(command.client) is not None else question(line)), False
    if protocol.too_far_ahead(command.sent, received_ns, node.settings.max_future_skew):
        return question(line), False
    record = make_record(node.wire_name, received_ns, command)
    standing = node.store.offer(record, repeat=True)
    if standing is not record:
        return standing.at_line + b"\n", False
    node.bus.publish(record)
    return record.at_line + b"\n", True


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
        with trio.move_on_after(timeout):
            body = await places.nearby(lat, lon, command.radius_m, command.bound)
        body = _cap(body, command.bound)
    return record.at_line + b"\n" + render(body) + b"\n\n"


def _cap(body: JSON, bound: int) -> JSON:
    results = body.get("results")
    if isinstance(results, list) and len(results) > bound:
        return {**body, "results": results[:bound]}
    return body


@attrs.define(eq=False)
class Admission:
    """How many client connections are open, in all and per remote address."""

    max_clients: int
    per_address: int = 0  # 0: no cap
    open: int = attrs.field(default=0, init=False)
    _by_address: dict[str, int] = attrs.field(factory=dict, init=False)

    def refusal(self, address: str) -> str | None:
        """Why a new connection from `address` is refused now, or None to admit it."""
        if self.open >= self.max_clients:
            return f"{self.max_clients} clients already connected"
        if self.per_address and self._by_address.get(address, 0) >= self.per_address:
            return f"{self.per_address} connections from {address} already"
        return None

    def enter(self, address: str) -> None:
        """Count an admitted connection."""
        self.open += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1

    def leave(self, address: str) -> None:
        """Count a connection that closed."""
        self.open -= 1
        if (left := self._by_address.pop(address) - 1) > 0:
            self._by_address[address] = left


async def handle_client(
    node: Node, places: PlacesSource, admission: Admission, stream: trio.abc.Stream
) -> None:
    """Admit one client connection within the limits, then answer it.

    Over the limits, a connection is closed at once without a word: the protocol has
    no error reply for it, and a refused client can simply retry. The caller
    (trio.serve_listeners) closes the stream afterwards.
    """
    who = describe(stream)
    address = host_of(who)
    if (reason := admission.refusal(address)) is not None:
        node.log.write(f"{who} refused: {reason}")
        return
    admission.enter(address)
    try:
        await Session(node, places, stream, who).run()
    except Exception as exc:
        # A bug must not let one client take the server and everyone else down: it is
        # logged in full (tests fail on "internal error" in any log) and the connection
        # is closed.
        trace = "".join(traceback.format_exception(exc))
        node.log.write(f"{who} internal error, closing: {trace!r}")
    finally:
        admission.leave(address)


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
    _replies: list[bytes] = attrs.field(factory=list, init=False)
    _flooded: bool = attrs.field(default=False, init=False)  # `_replies` hold an update
    _first: bool = attrs.field(default=True, init=False)  # no line answered yet

    async def run(self) -> None:
        """Answer until the client closes, errs, or must be closed; log why it ended."""
        log, who = self.node.log, self.who
        reader = LineReader(self.stream, self.node.settings.max_line)
        log.write(f"{who} connected")
        try:
            while lines := await reader.receive_lines():
                if not await self._answer(lines):
                    return
            log.write(f"{who} closed by the client")
        except LineTooLong as exc:
            limit = self.node.settings.max_line
            log.write(f"{who} sent a line longer than {limit} bytes, closing: {exc.head!r}")
        except CLIENT_ERRORS as exc:
            log.write(f"{who} dropped: {exc!r}")

    async def _answer(self, lines: list[bytes]) -> bool:
        """Answer lines that arrived together; False when the connection must close."""
        node, log, who = self.node, self.node.log, self.who
        received_ns = node.now_ns()  # when these lines were complete
        # Peer records that became readable in the same poll as these lines are
        # scheduled in this batch too; one checkpoint lets them land in the store
        # first, so a WHATSAT sent after an IAMAT's reply sees that IAMAT.
        if any(b"WHAT" in line for line in lines):
            await trio.lowlevel.cancel_shielded_checkpoint()
        for index, line in enumerate(lines, 1):
            if index % FAIR_SHARE == 0 and self._replies:
                await self._flush()  # a pipelining client must not hold the loop for long
            log.received(who, line)
            if not line.strip():  # bytes.strip() drops exactly the six white-space bytes
                continue  # blank lines are ignored, also in one_shot mode
            if self._first and HTTP_REQUEST.match(line):
                await self._reply(question(line))
                log.write(f"{who} sent an HTTP request to the client port; closing")
                return False
            self._first = False
            reply, flooded = answer_line(node, line, received_ns)
            self._flooded |= flooded
            if isinstance(reply, Whatsat):
                if self._replies:  # earlier answers must not wait for the places source
                    await self._flush()
                reply = await whatsat(node, self.places, reply)
            if node.settings.one_shot:
                await self._reply(reply)
                log.write(f"{who} closed after one reply (one_shot)")
                return False
            log.sent(who, reply)
            self._replies.append(reply)
        if self._replies:
            await self._flush()
        return True

    async def _reply(self, reply: bytes) -> None:
        self.node.log.sent(self.who, reply)
        self._replies.append(reply)
        await self._flush()

    async def _flush(self) -> None:
        if self._flooded:  # flood first, then reply
            with trio.move_on_after(HANDOFF_DEADLINE):
                await self.node.bus.wait_handed_off()
        data, self._replies, self._flooded = b"".join(self._replies), [], False
        # A client that never reads is dropped, not buffered.
        await send_within(self.stream, data, self.node.settings.write_deadline)
