"""Command line: `python -m herd_trio NAME`, `python -m herd_trio --all`, or
`python -m herd_trio status|iamat|whatsat ...` (status.py, clientcmd.py). Command words
come first; `python -m herd_trio -- status` runs a server that is named `status`.

Exit status: 0 after SIGINT/SIGTERM, 2 for a bad command line or config, 1 when a
server cannot start (a port in use); every failure is one line on stderr. A config
error reads `FILE: FIELD.PATH: what is wrong`. Everything a server reads at start-up
(config, secrets, certificates, the descriptor limit) is read here, once, before any
server is constructed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import resource
import secrets
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import attrs
import msgspec
import trio

from herd_trio import clientcmd, config, status
from herd_trio.admin import admin_token
from herd_trio.auth import Keyring
from herd_trio.config import ConfigError, HerdConfig
from herd_trio.errors import leaves
from herd_trio.log import ServerLog
from herd_trio.places import open_places
from herd_trio.reconfig import Reloader
from herd_trio.security import PeerSecurity, load_security
from herd_trio.server import StartupError, listening, log_path, serve
from herd_trio.statefile import state_path

PROG = "herd_trio"
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "status": status.main,
    "iamat": partial(clientcmd.main, "iamat"),
    "whatsat": partial(clientcmd.main, "whatsat"),
}
SECRET_BYTES = 32  # 256 bits from `secrets`: --all's per-process peer secret
FD_RESERVE = 64  # descriptors kept for listeners, links, logs, state and the places source
GC_YOUNG = 50_000  # container allocations between young collections (collect_less)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, as PROTOCOL.md §5 gives it."""
    parser = _Parser(prog=PROG, description="Run a server (or all servers) of a proxy herd.")
    parser.add_argument("name", nargs="?", help="the server to run, e.g. Clark")
    parser.add_argument("--all", action="store_true", help="run every server of the config")
    parser.add_argument("--config", type=Path, help="herd config file (TOML); default: built in")
    parser.add_argument("--log-dir", type=Path, help="write <NAME>.log here (overrides config)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="keep records here (overrides config); default for --all: 'state' in the"
        " config file's folder (the working directory for the built-in config)",
    )
    parser.add_argument("--one-shot", action="store_true", help="close after the first reply")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    args = parser.parse_args(argv)
    if args.all == (args.name is not None):
        parser.error("give a server NAME or --all, not both" if args.all else "give a server NAME")
    return args


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version(PROG)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def apply_overrides(herd: HerdConfig, args: argparse.Namespace) -> HerdConfig:
    """The config with command-line settings (paths relative to the working directory)."""
    settings = herd.herd
    if args.log_dir is not None:
        settings = msgspec.structs.replace(settings, log_dir=str(args.log_dir.resolve()))
    if args.state_dir is not None:
        settings = msgspec.structs.replace(settings, state_dir=str(args.state_dir.resolve()))
    if args.one_shot:
        settings = msgspec.structs.replace(settings, one_shot=True)
    if args.all and settings.state_dir is None:
        # One process holding the whole herd is the case where a stop loses everything,
        # so it keeps state by default. Not beside the logs: a restart with another
        # --log-dir would start empty. The config's own folder stays put.
        state_dir = config.home(args.config) / "state"
        settings = msgspec.structs.replace(settings, state_dir=str(state_dir))
    return msgspec.structs.replace(herd, herd=settings)


async def run_herd(
    herd: HerdConfig,
    names: list[str],
    logs: dict[str, ServerLog],
    security: dict[str, PeerSecurity],
    max_clients: int,
    tokens: dict[str, str | None] | None = None,
    reloader: Reloader | None = None,
) -> None:
    """Run the named servers until SIGINT or SIGTERM, then cancel them all.

    SIGHUP stops nothing: it reopens the log files (logrotate moved them) and, with a
    `reloader`, re-reads the config and applies what can change live to every server
    of the process (herd_trio/reconfig.py).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_places(herd) as places, trio.open_nursery() as nursery:
            for name in names:
                server = partial(
                    serve,
                    name,
                    herd,
                    places,
                    logs[name],
                    security[name],
                    max_clients=max_clients,
                    admin_token=(tokens or {}).get(name),
                    version=version(),
                    reloader=reloader,
                )
                await nursery.start(server, name=f"server {name}")
                cfg = herd.servers[name]
                where = listening(herd, name)
                note = open_to_local_users(security[name])
                print(f"{name}: {where}{note}", flush=True)
                if note:
                    logs[name].write(note.removeprefix("; "))
                if warning := unprotected(name, cfg.bind, security[name]):
                    print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
                    logs[name].write(f"warning: {warning}")
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
                if reloader is not None:
                    reloader.reload("SIGHUP received")
                    continue
                for log in logs.values():
                    reopened = "reopened" if log.reopen() else "could NOT be reopened"
                    log.write(f"SIGHUP received: log file {reopened}; nothing else changes")
            for log in logs.values():
                log.write(f"{signal.Signals(signum).name} received, shutting down")
            nursery.cancel_scope.cancel()


def open_to_local_users(security: PeerSecurity) -> str:
    """`; ...` for the start-up line if any local user can join the herd as a peer."""
    if security.keyring is not None or security.tls is not None:
        return ""
    return (
        "; peer links are NOT authenticated: any local user can join as a peer"
        " (set secret_env or keyring_file)"
    )


def process_secret(herd: HerdConfig, security: dict[str, PeerSecurity]) -> dict[str, PeerSecurity]:
    """Under --all, a fresh random secret for servers that have none configured.

    Every server of the herd runs in this process, so they all share it, and no other
    local user can join as a peer: secure by default where it costs nothing (issue 12).
    """
    settings = herd.herd
    if settings.secret_env is not None or settings.keyring_file is not None:
        return security
    keyring = Keyring((secrets.token_bytes(SECRET_BYTES),))
    return {name: attrs.evolve(each, keyring=keyring) for name, each in security.items()}


def unprotected(name: str, host: str, security: PeerSecurity) -> str | None:
    """A warning if server `name` listens beyond loopback with no peer secret or TLS."""
    if security.keyring is not None or security.tls is not None:
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: be safe and warn
        pass
    return (
        f"{name} listens on {host} without a peer secret or TLS: peers are accepted"
        " from loopback only, and anyone who reaches the client port can report locations"
    )


class ToServerLogs(logging.Handler):
    """Copies the package's own log records (places loading, source errors) to every
    server log of this process, escaped like any other untrusted text."""

    def __init__(self, logs: Iterable[ServerLog]) -> None:
        super().__init__(logging.INFO)
        self.logs = list(logs)

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record to each server log."""
        text = f"{record.name}: {record.levelname.lower()}: {record.getMessage()!r}"
        for log in self.logs:
            log.write(text)


def fd_budget() -> int:
    """How many client connections the process's descriptor limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 30


def raise_fd_limit() -> None:
    """Raise the soft descriptor limit to the hard one, as servers commonly do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def collect_less() -> None:
    """Let the cyclic garbage collector's young collections run GC_YOUNG allocations apart.

    A server allocates a few short-lived tuples and lists per line, and the default
    (a young collection every 700 container allocations, whose survivors, the store's
    cached records, move on to be scanned again in the older generations) cost 15% of
    the CPU of a server alone answering pipelined IAMATs (25.1-25.9 against 29.5-30.7
    us per reply) and about 8% of a whole herd's (bench.sidebyside). Reference
    counting frees records and lines; what waits longer for the collector is the odd
    cycle (a trio traceback), a few MB at most.
    """
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


def locations(herd: HerdConfig) -> list[str]:
    """Where this process's logs and state go, one line each, for stdout at start-up."""
    settings = herd.herd
    state = (
        f"state: {settings.state_dir}"
        if settings.state_dir is not None
        else "state: none (records live in memory only; set state_dir or --state-dir)"
    )
    return [f"logs: {settings.log_dir}", state]


def announce(herd: HerdConfig, logs: dict[str, ServerLog]) -> None:
    """Say where logs and state go: on stdout, and in each server's own log."""
    for line in locations(herd):
        print(line, flush=True)
    state_dir = herd.herd.state_dir
    for name, log in logs.items():
        state = "none" if state_dir is None else str(state_path(state_dir, name))
        log.write(f"log file {log_path(herd, name)}; state file {state}")


def open_log(herd: HerdConfig, name: str) -> ServerLog:
    """Server `name`'s log file, bounded as the config says; OSError if it cannot open."""
    settings = herd.herd
    return ServerLog(
        log_path(herd, name),
        name,
        line_limit=settings.log_line_limit,
        max_bytes=settings.log_max_bytes,
        backups=settings.log_backups,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # command words; `-- status` runs a server so named
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        herd = apply_overrides(config.load(args.config), args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # FILE: FIELD.PATH: problem
        return 2
    if args.all:
        names = list(herd.servers)
    elif args.name in herd.servers:
        names = [args.name]
    else:
        known = ", ".join(herd.servers)
        hint = " (commands come first: status --config FILE)" if args.name in COMMANDS else ""
        print(f"{PROG}: unknown server {args.name!r} (configured: {known}){hint}", file=sys.stderr)
        return 2
    try:  # secrets and certificates: read once, for every server of this process
        security = load_security(herd, names)
        tokens = {name: admin_token(herd, name) for name in names}
    except ConfigError as exc:
        print(exc.in_file(config.label(args.config)), file=sys.stderr)
        return 2
    process_keyring = None
    if args.all and (generated := process_secret(herd, security)) is not security:
        security = generated
        process_keyring = security[names[0]].keyring
        print("peer links: authenticated with a random secret made for this process", flush=True)

    def reread(servers: Iterable[str]) -> tuple[HerdConfig, dict[str, PeerSecurity]]:
        """The config file again, with the same command line; ConfigError if it is bad."""
        new = apply_overrides(config.load(args.config), args)
        try:
            secured = load_security(new, servers)
        except ConfigError as exc:
            raise exc.in_file(config.label(args.config)) from exc
        if process_keyring is not None and all(s.keyring is None for s in secured.values()):
            keyring = process_keyring
            secured = {name: attrs.evolve(s, keyring=keyring) for name, s in secured.items()}
        return new, secured

    collect_less()
    raise_fd_limit()  # before max_clients is sized by the descriptor limit
    max_clients = min(herd.herd.max_clients, fd_budget())
    failed: list[BaseException] = []
    with ExitStack() as stack:
        logs: dict[str, ServerLog] = {}
        try:
            for name in names:
                logs[name] = open_log(herd, name)
                stack.callback(logs[name].close)  # the last lines reach the file on any exit
            if herd.herd.state_dir is not None:
                Path(herd.herd.state_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"{PROG}: cannot open log or state files: {exc}", file=sys.stderr)
            return 1
        announce(herd, logs)
        package_log = logging.getLogger("herd_trio")
        package_log.setLevel(logging.INFO)
        package_log.propagate = False  # into the server logs, never onto the terminal
        package_log.addHandler(ToServerLogs(logs.values()))
        try:
            reloader = Reloader(reread, logs)
            trio.run(run_herd, herd, names, logs, security, max_clients, tokens, reloader)
        except* StartupError as group:
            failed = list(leaves(group))
    for error in failed:
        print(f"{PROG}: {error}", file=sys.stderr)
    return 1 if failed else 0


def cli() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
