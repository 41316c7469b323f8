"""The herd's configuration: TOML in, a validated frozen config out, or one clear error.

msgspec does the type checking and rejects unknown keys with a path
(`$.servers.Clark.port`); the cross-checks that span servers (unknown neighbours,
duplicate ports) run after it. Relative paths in a file are relative to that file.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from herd_trio.auth import Keyring

DEFAULT_CONFIG = "default_herd.toml"  # packaged beside this module
_WILDCARDS = ("", "0.0.0.0", "::")  # bind every address: clash with any host
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # goes on the wire as one AT field


class ConfigError(Exception):
    """A configuration that cannot run; the message is the one line the user sees."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `[herd]` table: settings shared by every server of the herd."""

    log_dir: str = "logs"
    one_shot: bool = False
    max_line: int = 4096
    places: Literal["offline", "google", "google-legacy"] = "offline"
    places_timeout: float = 5.0
    places_url: str | None = None
    places_key_env: str = "GOOGLE_PLACES_API_KEY"
    places_concurrency: int = 16
    places_cache_ttl: float = 10.0
    places_cache_size: int = 1024
    state_dir: str | None = None
    secret_env: str | None = None
    heartbeat_interval: float = 1.0  # seconds between PINGs on an idle peer link
    write_deadline: float = 10.0  # seconds a peer or client write may stall before drop
    sync_interval: float = 5.0  # seconds between digest exchanges on a peer link
    max_clients: int = 10_000  # open client connections per server (clamped to the fd limit)
    max_clients_per_address: int = 0  # open client connections per remote address; 0: no cap
    keyring_file: str | None = None  # peer secrets, one per line, the first one signs
    tls_cert: str | None = None  # PEM certificate chain of this herd's servers (peer links)
    tls_key: str | None = None  # its private key
    tls_ca: str | None = None  # the CA that signs every server's certificate


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One `[servers.NAME]` table."""

    port: int
    peer_port: int
    host: str = "127.0.0.1"
    neighbours: list[str] = msgspec.field(default_factory=list)
    tls_cert: str | None = None  # this server's own certificate, instead of [herd]'s
    tls_key: str | None = None


class HerdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole file; `servers` keeps the file's order."""

    servers: dict[str, ServerConfig]
    herd: Settings = msgspec.field(default_factory=Settings)

    def neighbours(self, name: str) -> list[str]:
        """Everyone `name` talks to: talk relations are symmetric (PROTOCOL.md §4)."""
        mine = set(self.servers[name].neighbours)
        mine.update(other for other, cfg in self.servers.items() if name in cfg.neighbours)
        mine.discard(name)
        return sorted(mine)

    def keyring(self, environ: Mapping[str, str] = os.environ) -> Keyring | None:
        """The peer secrets (`secret_env` or `keyring_file`), or None if none are set.

        ValueError with a one-line message if they are unusable.
        """
        from herd_trio.auth import Keyring

        return Keyring.from_config(self.herd, environ)

    def tls_contexts(self, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
        """(dialling, accepting) contexts for mutual TLS on server `name`'s peer links.

        A server's own `tls_cert`/`tls_key` take precedence over `[herd]`'s, so each
        server can hold a certificate that names only itself, also under `--all`.
        """
        server = self.servers[name]
        settings = self.herd
        if server.tls_cert is not None:
            settings = msgspec.structs.replace(
                settings, tls_cert=server.tls_cert, tls_key=server.tls_key
            )
        if settings.tls_cert is None:
            return None
        from herd_trio.tls import client_context, server_context

        return client_context(settings), server_context(settings)

    def places_key(self) -> str:
        """The Google API key, read from the environment variable `places_key_env` names."""
        return os.environ[self.herd.places_key_env]


def load(path: Path | None = None, *, environ: Mapping[str, str] = os.environ) -> HerdConfig:
    """Read and validate a config file, or the embedded default herd when `path` is None.

    Paths in a file resolve against its folder; those of the embedded default against
    the working directory. Raises ConfigError with a one-line message.
    """
    if path is None:
        text = resources.files("herd_trio").joinpath(DEFAULT_CONFIG).read_text()
        where, base = "embedded default config", Path.cwd()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from exc
        where, base = str(path), path.resolve().parent
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    try:
        herd = msgspec.convert(raw, HerdConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_name_the_server(raw, exc)}") from exc
    check(herd, environ)
    settings = herd.herd
    paths = {
        key: str(base / value)
        for key in ("log_dir", "state_dir", "keyring_file", "tls_cert", "tls_key", "tls_ca")
        if (value := getattr(settings, key)) is not None
    }
    servers = {
        name: msgspec.structs.replace(
            server,
            **{
                key: str(base / value)
                for key in ("tls_cert", "tls_key")
                if (value := getattr(server, key)) is not None
            },
        )
        for name, server in herd.servers.items()
    }
    settings = msgspec.structs.replace(settings, **paths)
    herd = msgspec.structs.replace(herd, herd=settings, servers=servers)
    try:  # secrets and certificates are read now, so a bad one fails at start (exit 2)
        herd.keyring(environ)
        for name in herd.servers:
            herd.tls_contexts(name)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return herd


def check(herd: HerdConfig, environ: Mapping[str, str] = os.environ) -> None:
    """The checks that span fields and servers; ConfigError names the first problem."""
    settings = herd.herd
    if not herd.servers:
        raise ConfigError("no servers configured")
    if not 64 <= settings.max_line <= 1 << 20:
        raise ConfigError(f"max_line must be between 64 and 1048576, not {settings.max_line}")
    if not 0 < settings.places_timeout <= 600:
        raise ConfigError(f"places_timeout must be in (0, 600] seconds: {settings.places_timeout}")
    if settings.places_concurrency < 1 or settings.places_cache_size < 0:
        raise ConfigError("places_concurrency must be >= 1 and places_cache_size >= 0")
    if not 0 < settings.heartbeat_interval <= 3600 or not 0 < settings.write_deadline <= 3600:
        raise ConfigError("heartbeat_interval and write_deadline must be in (0, 3600] seconds")
    if not 0 < settings.sync_interval <= 86400:
        raise ConfigError(f"sync_interval must be in (0, 86400] seconds: {settings.sync_interval}")
    if settings.max_clients < 1 or settings.max_clients_per_address < 0:
        raise ConfigError("max_clients must be >= 1 and max_clients_per_address >= 0")
    for name, server in herd.servers.items():
        cert = server.tls_cert or settings.tls_cert
        key = server.tls_key if server.tls_cert else settings.tls_key
        tls = [cert, key, settings.tls_ca]
        if any(tls) and not all(tls):
            raise ConfigError(
                f"servers.{name}: peer TLS needs tls_cert and tls_key (here or in [herd])"
                " and tls_ca in [herd]"
            )
        if (server.tls_cert is None) != (server.tls_key is None):
            raise ConfigError(f"servers.{name}: set both tls_cert and tls_key, or neither")
    if settings.places_cache_ttl < 0:
        raise ConfigError("places_cache_ttl must be >= 0")
    if settings.places != "offline" and not environ.get(settings.places_key_env):
        raise ConfigError(
            f"places = {settings.places!r} needs an API key in ${settings.places_key_env},"
            " which is not set"
        )
    if settings.places_url is not None and not re.match(r"https?://[^/\s]+", settings.places_url):
        raise ConfigError(f"places_url must be an http(s) URL: {settings.places_url!r}")
    taken: dict[tuple[str, int], str] = {}
    for name, server in herd.servers.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"server name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        for key in ("port", "peer_port"):
            port: int = getattr(server, key)
            label = f"servers.{name}.{key}"
            if not 1 <= port <= 65535:
                raise ConfigError(f"{label} = {port} is not a TCP port (1-65535)")
            host = "*" if server.host in _WILDCARDS else server.host
            clashes = [(host, port)] if host != "*" else [k for k in taken if k[1] == port]
            clashes += [("*", port)]
            for clash in clashes:
                if clash in taken:
                    raise ConfigError(f"{label} = {port} is already used by {taken[clash]}")
            taken[host, port] = label
        for neighbour in server.neighbours:
            if neighbour not in herd.servers:
                raise ConfigError(f"servers.{name}.neighbours: unknown server {neighbour!r}")
            if neighbour == name:
                raise ConfigError(f"servers.{name}.neighbours: a server cannot neighbour itself")


def _name_the_server(raw: dict[str, object], exc: msgspec.ValidationError) -> str:
    """msgspec says `$.servers[...].port` for a dict value; say `servers.Clark.port`."""
    servers = raw.get("servers")
    if "$.servers[...]" in str(exc) and isinstance(servers, dict):
        for name, table in servers.items():
            try:
                msgspec.convert(table, ServerConfig)
            except msgspec.ValidationError as inner:
                text = str(inner)
                if " - at `$" not in text:
                    return f"{text} - at `servers.{name}`"
                return text.replace(" - at `$", f" - at `servers.{name}")
    return str(exc)
