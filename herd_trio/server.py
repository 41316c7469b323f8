"""One herd server: the owner of its nursery, and little else.

`serve()` builds the server's `Node` (store, bus, log, settings), opens its two
listeners and runs, in one nursery: the state file's load (herd_trio/restore.py), the
client listener, the peer listener, one supervised link per neighbour this server
dials, the log flusher and the absent-neighbour reporter. The rooms below it
(client.py, links.py) get what they use and never see this module.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from herd_trio import admin
from herd_trio.bus import Bus
from herd_trio.client import Admission, handle_client
from herd_trio.config import HerdConfig
from herd_trio.links import dials
from herd_trio.log import ServerLog
from herd_trio.net import hostport
from herd_trio.node import Node
from herd_trio.peerport import PeerPort
from herd_trio.persist import open_persister
from herd_trio.places import PlacesSource
from herd_trio.reconfig import Links, Reloader
from herd_trio.restore import Restore
from herd_trio.security import PeerSecurity
from herd_trio.statefile import PersistError, state_path
from herd_trio.store import Store


class StartupError(Exception):
    """A server could not start (a port in use, a log file it cannot open)."""


async def open_listeners(name: str, role: str, host: str, port: int) -> list[trio.SocketListener]:
    """Listen on `host:port`; StartupError names the server and port if it can't."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or repr(exc)
        where = hostport(host, port)
        raise StartupError(f"{name}: cannot listen for {role}s on {where}: {reason}") from exc


async def serve(
    name: str,
    herd: HerdConfig,
    places: PlacesSource,
    log: ServerLog,
    security: PeerSecurity,
    *,
    max_clients: int,
    admin_token: str | None = None,
    version: str = "unknown",
    reloader: Reloader | None = None,
    now_ns: Callable[[], int] = time.time_ns,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run server `name` until cancelled; report its Node once both ports accept.

    With `state_dir`, the server's records are loaded in the background once both
    ports accept (the file is opened and checked before) and every record it keeps is
    written back; the persister closes last, after the listeners and links that feed
    the store, so a clean stop loses nothing. /readyz says ready once loaded.
    `reloader`, if given, gets this server's links, so a reload can change them.
    """
    cfg, settings = herd.servers[name], herd.herd
    store, restore = Store(), Restore()
    async with contextlib.AsyncExitStack() as stack:
        if settings.state_dir is not None:
            path = state_path(settings.state_dir, name)
            try:
                restore = await Restore.open(path, store, log.write)
                stack.callback(restore.close)
                persister = await stack.enter_async_context(
                    open_persister(path, store, log=log.write)
                )
                restore.attach(persister)
            except (OSError, PersistError) as exc:
                message = f"{name}: cannot use state file {str(path)!r}: {exc}"
                raise StartupError(message) from exc
            if restore.done:
                log.write(f"0 records loaded from {path}")
        node = Node(name, settings, store, Bus(), log, now_ns, restore=restore)
        node.stats.state_loaded = restore.done
        clients = await open_listeners(name, "client", cfg.bind, cfg.port)
        stack.push_async_callback(_close_all, clients)  # until serve_listeners owns them
        peers = await open_listeners(name, "peer", cfg.bind, cfg.peer_port)
        stack.push_async_callback(_close_all, peers)
        log.write(f"listening for {listening(herd, name)}")
        neighbours = herd.neighbours(name)
        admission = Admission(
            min(settings.max_clients, max_clients),
            settings.max_clients_per_address,
            settings.admission_grace,
        )
        door = PeerPort(node, security, frozenset(n for n in neighbours if dials(n, name)))
        async with trio.open_nursery() as nursery:
            if not restore.done:
                nursery.start_soon(_load, node, name=f"{name} load")
            nursery.start_soon(log.run_flusher, name=f"{name} log flusher")
            nursery.start_soon(node.bus.run_coalescer, name=f"{name} flood coalescer")
            nursery.start_soon(node.bus.run_handoff_clock, name=f"{name} handoff clock")
            nursery.start_soon(door.report_absent, name=f"{name} absent neighbours")
            handler = partial(handle_client, node, places, admission)
            nursery.start_soon(trio.serve_listeners, handler, clients)
            nursery.start_soon(trio.serve_listeners, door.handle, peers)
            links = Links(node, herd, door, nursery)
            links.start()
            node.stats.listening = True  # /readyz: both ports accept
            reload = None
            if reloader is not None:
                reloader.servers[name] = links  # SIGHUP and POST /reload reach it
                reload = partial(reloader.reload, f"POST /reload on {name}'s admin port")
            stats, store = node.stats, node.store
            found = admin.admin_app(
                name, herd, stats, store, version, admin_token, places, reload=reload
            )
            if found:
                links.watchers.append(partial(admin.reconfigured, found[0], name))
                await nursery.start(partial(admin.serve, *found), name=f"{name} admin")
            task_status.started(node)
            await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _load(node: Node) -> None:
    await node.restore.run()
    node.stats.state_loaded = True


async def _close_all(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def listening(herd: HerdConfig, name: str) -> str:
    """Where server `name` listens, and where neighbours dial it if that differs."""
    cfg = herd.servers[name]
    clients, peers = hostport(cfg.bind, cfg.port), hostport(cfg.bind, cfg.peer_port)
    where = f"clients on {clients} and peers on {peers}"
    if cfg.bind != cfg.host:
        where += f" (neighbours dial {hostport(cfg.host, cfg.peer_port)})"
    return where


def log_path(herd: HerdConfig, name: str) -> Path:
    """Where server `name` writes its log."""
    return Path(herd.herd.log_dir) / f"{name}.log"
