"""The peer port: who may open a link to this server, and the links it accepts.

`PeerPort.handle` is the peer listener's handler: the loopback rule (no secret), TLS,
the HELLO handshake against the keyring, one link per neighbour (a newer connection
replaces an older one), then `links.carry` until the link fails. It also notes, for
the log, a neighbour that is meant to dial this server and has not.
"""

from __future__ import annotations

import math
from typing import NoReturn

import attrs
import trio

from herd_trio.auth import HandshakeError, accept_handshake
from herd_trio.errors import leaves
from herd_trio.lines import LineReader
from herd_trio.links import (
    HANDSHAKE_DEADLINE,
    LINK_ERRORS,
    carry,
    describe_error,
    drop_kind,
    peer_max_line,
)
from herd_trio.log import RateLimiter
from herd_trio.net import describe, host_of, is_loopback
from herd_trio.node import Node
from herd_trio.security import PeerSecurity
from herd_trio.sync import PeerMisbehaved
from herd_trio.tls import certificate_matches, wrap_accepted

ABSENT_NOTICE = 5.0  # seconds a dialling neighbour may be absent before the log says so
ABSENT_REPEAT = 60.0  # seconds between reminders while it stays absent


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

    def allow(self, dialers: frozenset[str]) -> frozenset[str]:
        """Accept links from `dialers` from now on (a reload); close the links of the
        neighbours no longer among them, and return their names."""
        self.dialers = dialers
        gone = frozenset(self._accepted) - dialers
        for name in gone:
            self._accepted.pop(name).cancel()
            self.node.log.write(f"link from {name} closed: no longer a neighbour")
        return gone

    async def handle(self, transport: trio.abc.Stream) -> None:
        """Authenticate one connection to the peer port and carry its link until it ends."""
        who = describe(transport)
        try:
            with trio.fail_after(HANDSHAKE_DEADLINE):
                peer, stream, reader = await self._authenticate(transport)
        except LINK_ERRORS as exc:
            self._refuse(who, type(exc).__name__, describe_error(exc))
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
                    reason = "; ".join(describe_error(exc) for exc in errors)
                    self.node.stats.link_dropped(peer, drop_kind(group), reason)
                    self._dropped(peer, who, errors)
            finally:
                if self._accepted.get(peer) is scope:
                    del self._accepted[peer]
        if scope.cancelled_caught and peer in self.dialers:
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
                since.setdefault(name, now)  # a neighbour added by a reload
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
        text = f"link from {peer} dropped: " + "; ".join(describe_error(exc) for exc in errors)
        if not any(isinstance(exc, PeerMisbehaved) for exc in errors):
            self.node.log.write(text)
        else:
            self._refusals.write(f"{host_of(who)} misbehaved", self.node.log.write, text)

    def _refuse(self, who: str, kind: str, reason: str) -> None:
        self.node.stats.refused(kind)
        text = f"refused peer connection from {who}: {reason}"
        self._refusals.write(f"{host_of(who)} {kind}", self.node.log.write, text)
