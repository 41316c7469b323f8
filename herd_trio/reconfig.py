"""Live reconfiguration: SIGHUP (or `POST /reload` on the admin port) re-reads the config.

What changes live, per server: its neighbours (links to added neighbours are dialled
or accepted, links to removed ones closed and their bus subscriptions dropped; a
neighbour whose address changed is redialled), the peer secrets and certificates
(used by every new connection; links already up stay), and the log files (reopened).
Everything else (the name, ports, addresses, [herd] settings) needs a restart: a
reload that changes it says so in one log line and keeps the running value. A config
that does not load is logged and the running one stays, whole.

`Links` owns one server's dialled links, each under its own cancel scope in the
server's nursery; `Reloader` is the process's: it re-reads the config once and hands
each server of the process its part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
import trio

from herd_trio.config import ConfigError, HerdConfig, ServerConfig, Settings
from herd_trio.links import Peer, dials, run_link
from herd_trio.log import ServerLog
from herd_trio.node import Node
from herd_trio.peerport import PeerPort
from herd_trio.security import PeerSecurity

# Fields a reload applies; every other difference is reported and waits for a restart.
LIVE_SERVER_FIELDS = frozenset({"neighbours", "tls_cert", "tls_key"})
LIVE_HERD_FIELDS = frozenset({"keyring_file", "secret_env", "tls_cert", "tls_key", "tls_ca"})


def dialled(herd: HerdConfig, name: str) -> dict[str, Peer]:
    """The neighbours server `name` dials, by name, with the address it dials."""
    return {
        peer: Peer(peer, herd.servers[peer].host, herd.servers[peer].peer_port)
        for peer in herd.neighbours(name)
        if dials(name, peer)
    }


def dialling(herd: HerdConfig, name: str) -> frozenset[str]:
    """The neighbours that dial server `name` (its peer port accepts only these)."""
    return frozenset(peer for peer in herd.neighbours(name) if dials(peer, name))


def fixed_changes(old: HerdConfig, new: HerdConfig, name: str) -> list[str]:
    """The dotted fields of server `name` and [herd] that differ but cannot change live."""
    before, after = old.servers[name], new.servers[name]
    changed = [
        f"servers.{name}.{field}"
        for field in ServerConfig.__struct_fields__
        if field not in LIVE_SERVER_FIELDS and getattr(before, field) != getattr(after, field)
    ]
    changed += [
        f"herd.{field}"
        for field in Settings.__struct_fields__
        if field not in LIVE_HERD_FIELDS and getattr(old.herd, field) != getattr(new.herd, field)
    ]
    return changed


@attrs.frozen
class Changes:
    """What a reload did to one server."""

    linked: tuple[str, ...] = ()  # neighbours added (dialled, or now accepted)
    unlinked: tuple[str, ...] = ()  # neighbours removed (links closed)
    redialled: tuple[str, ...] = ()  # neighbours whose address changed
    kept: tuple[str, ...] = ()  # fields that differ but need a restart

    def as_json(self) -> dict[str, list[str]]:
        """The changes as JSON-ready lists (the answer of `POST /reload`)."""
        return {key: list(value) for key, value in attrs.asdict(self).items()}


@attrs.define(eq=False)
class Links:
    """One server's peer links that a reload can change: the links it dials, each under
    its own cancel scope in the server's nursery, and the peer port's list of dialers."""

    node: Node
    herd: HerdConfig
    door: PeerPort
    nursery: trio.Nursery
    _scopes: dict[str, tuple[Peer, trio.CancelScope]] = attrs.field(factory=dict, init=False)
    # called with the new config after each reload (the admin view follows the links)
    watchers: list[Callable[[HerdConfig], None]] = attrs.field(factory=list, init=False)

    @property
    def dialled(self) -> frozenset[str]:
        """The neighbours this server keeps a link to by dialling."""
        return frozenset(self._scopes)

    def start(self) -> None:
        """Dial every neighbour the config says this server dials."""
        for peer in dialled(self.herd, self.node.name).values():
            self._dial(peer)

    def security(self) -> PeerSecurity:
        """The peer security new connections use (the latest a reload gave)."""
        return self.door.security

    def apply(self, herd: HerdConfig, security: PeerSecurity) -> Changes:
        """Make the links match `herd` (which names this server) and use `security`."""
        name = self.node.name
        kept = fixed_changes(self.herd, herd, name)
        self.door.security = security
        wanted = dialled(herd, name)
        accepting = dialling(herd, name)
        unlinked = sorted(self.door.allow(accepting) | (self.dialled - wanted.keys()))
        for gone in self.dialled - wanted.keys():
            self._hang_up(gone)
        redialled = [
            peer.name
            for peer in wanted.values()
            if peer.name in self._scopes and self._scopes[peer.name][0] != peer
        ]
        for moved in redialled:
            self._hang_up(moved)
        linked = sorted((wanted.keys() - self.dialled) - set(redialled))
        linked += sorted(accepting - dialling(self.herd, name))
        for peer in wanted.values():
            if peer.name not in self._scopes:
                self._dial(peer)
        self.herd = herd
        for watcher in self.watchers:
            watcher(herd)
        return Changes(tuple(sorted(linked)), tuple(unlinked), tuple(redialled), tuple(kept))

    def _dial(self, peer: Peer) -> None:
        scope = trio.CancelScope()
        self._scopes[peer.name] = (peer, scope)
        link = partial(run_link, self.node, peer, self.security(), current=self.security)

        async def supervised() -> None:
            with scope:
                await link()

        self.nursery.start_soon(supervised, name=f"{self.node.name} link {peer.name}")

    def _hang_up(self, name: str) -> None:
        _, scope = self._scopes.pop(name)
        scope.cancel()
        self.node.log.write(f"link to {name} closed by a reload")


def describe(changes: Changes) -> str:
    """One log line for a reload's changes to one server."""
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("linked", changes.linked),
            ("unlinked", changes.unlinked),
            ("redialled", changes.redialled),
        )
        if names
    ]
    said = "; ".join(parts) or "no link changes"
    if changes.kept:
        said += (
            f"; NOT changed (restart to apply, the running values stay): {', '.join(changes.kept)}"
        )
    return said


@attrs.define(eq=False)
class Reloader:
    """The process's reload: re-read the config once, then apply it to each server.

    `read` returns the new config and each server's peer security, or raises
    ConfigError; servers register their `Links` as they start.
    """

    read: Callable[[Iterable[str]], tuple[HerdConfig, dict[str, PeerSecurity]]]
    logs: dict[str, ServerLog]
    servers: dict[str, Links] = attrs.field(factory=dict, init=False)

    def reload(self, why: str) -> dict[str, Any]:
        """Reload now; what changed per server, or the error (JSON-ready)."""
        for log in self.logs.values():
            reopened = "reopened" if log.reopen() else "could NOT be reopened"
            log.write(f"{why}: log file {reopened}; reloading the config")
        try:
            herd, security = self.read(list(self.servers))
            missing = sorted(set(self.servers) - set(herd.servers))
            if missing:
                raise ConfigError(f"{', '.join(missing)} missing from the new config")
        except ConfigError as exc:
            for log in self.logs.values():
                log.write(f"reload failed, the running config stays: {exc}")
            return {"ok": False, "error": str(exc)}
        done: dict[str, Any] = {}
        for name, links in self.servers.items():
            changes = links.apply(herd, security[name])
            self.logs[name].write(f"reloaded: {describe(changes)}")
            done[name] = changes.as_json()
        return {"ok": True, "servers": done}
