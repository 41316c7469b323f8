"""The herd's configuration: TOML in, a validated frozen config out, or one clear error.

Data only: nothing here reads a key file, a certificate or a socket (security.py
builds the keyring and TLS contexts from this data at start-up). msgspec checks types
and ranges (declared on the fields) and rejects unknown keys; the cross-checks that
span servers (unknown neighbours, duplicate ports) run after it. Every error reads
`FILE: FIELD.PATH: what is wrong`. Relative paths in a file are relative to that file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

DEFAULT_CONFIG = "default_herd.toml"  # packaged beside this module
DEFAULT_LABEL = "<default config>"  # names the embedded default in error messages
_WILDCARDS = ("", "0.0.0.0", "::")  # bind every address: clash with any host
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # goes on the wire as one AT field
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123
_LOCATION = re.compile(r"[+-][0-9]{1,2}(?:\.[0-9]+)?[+-][0-9]{1,3}(?:\.[0-9]+)?")
_MSGSPEC = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Interval = Annotated[float, msgspec.Meta(gt=0, le=3600)]  # seconds


class ConfigError(Exception):
    """A configuration that cannot run: `FILE: FIELD.PATH: what is wrong`, one line.

    `field` is the dotted TOML path (`servers.Clark.port`); `file` is set by `load`
    (or by the caller, for errors found later from the same config, see `in_file`).
    """

    def __init__(self, problem: str, *, field: str | None = None, file: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.field, self.file = problem, field, file

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.field, self.problem) if part)

    def in_file(self, file: str) -> ConfigError:
        """The same error, said of config `file` (see `label`)."""
        return ConfigError(self.problem, field=self.field, file=file)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `[herd]` table: settings shared by every server of the herd."""

    log_dir: str = "logs"
    one_shot: bool = False
    max_line: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 4096
    places: Literal["offline", "google", "google-legacy"] = "offline"
    places_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    places_url: str | None = None
    places_key_env: str = "GOOGLE_PLACES_API_KEY"
    places_concurrency: Positive = 16
    places_cache_ttl: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    places_cache_size: Count = 1024
    state_dir: str | None = None
    secret_env: str | None = None
    heartbeat_interval: Interval = 1.0  # seconds between PINGs on an idle peer link
    write_deadline: Interval = 10.0  # seconds a peer or client write may stall before drop
    sync_interval: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 5.0  # digest exchanges
    max_clients: Positive = 10_000  # open client connections per server (clamped to fd limit)
    max_clients_per_address: Count = 0  # open client connections per remote address; 0: no cap
    # seconds without a complete line after which a connection may be closed to admit a
    # newcomer at max_clients (one process holding every slot must not lock
    # everyone out); a connection that sent a line more recently is never closed for one
    admission_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0
    # seconds a client may hold an incomplete line (bytes without their LF) before it is
    # closed: slowloris; a line typed by hand takes far less
    line_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    # seconds without a complete line after which a client is closed; 0: never (the
    # default: telnet users keep persistent sessions open for hours)
    client_idle_timeout: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 0.0
    keyring_file: str | None = None  # peer secrets, one per line, the first one signs
    tls_cert: str | None = None  # PEM certificate chain of this herd's servers (peer links)
    tls_key: str | None = None  # its private key
    tls_ca: str | None = None  # the CA that signs every server's certificate
    # Seconds a client time may be ahead of this server's clock; further ahead, an IAMAT
    # gets `?` and a peer's record is dropped. None (the default): any time is taken.
    max_future_skew: Annotated[float, msgspec.Meta(gt=0, le=10 * 365 * 86400)] | None = None
    # Bytes of a logged line or reply beyond which the log holds an escaped preview.
    log_line_limit: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 1024
    # Bytes after which <NAME>.log is rotated to <NAME>.log.1; 0: never rotate.
    log_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 100 << 20
    log_backups: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3  # rotated files kept


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One `[servers.NAME]` table."""

    port: Port
    peer_port: Port
    host: str = "127.0.0.1"  # where neighbours dial this server (and, without listen, binds)
    # the address both ports bind (`0.0.0.0`, `::`, one address); None: bind `host`
    listen: str | None = None
    neighbours: list[str] = msgspec.field(default_factory=list)
    tls_cert: str | None = None  # this server's own certificate, instead of [herd]'s
    tls_key: str | None = None
    admin_port: Port | None = None  # HTTP admin listener (PROTOCOL.md §6); None: none
    admin_host: str = "127.0.0.1"
    admin_token_env: str | None = None  # bearer token variable; required off loopback
    location: str | None = None  # ISO 6709 like IAMAT coords: where the map draws it

    @property
    def bind(self) -> str:
        """The address the client and peer ports listen on: `listen`, else `host`."""
        return self.host if self.listen is None else self.listen


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

    def places_key(self) -> str:
        """The Google API key, read from the environment variable `places_key_env` names."""
        return os.environ[self.herd.places_key_env]


def label(path: Path | None) -> str:
    """How errors name a config: the path as given, or DEFAULT_LABEL for the embedded one."""
    return DEFAULT_LABEL if path is None else str(path)


def home(path: Path | None) -> Path:
    """The folder a config's relative paths resolve against: the file's, or the working
    directory for the embedded default."""
    return Path.cwd() if path is None else path.resolve().parent


def load(path: Path | None = None, *, environ: Mapping[str, str] = os.environ) -> HerdConfig:
    """Read and validate a config file, or the embedded default herd when `path` is None.

    Paths in the config resolve against `home(path)`. Reads only the config file
    itself. Raises ConfigError, a one-line `FILE: FIELD.PATH: problem`.
    """
    where = label(path)
    try:
        return _resolve(_parse(_read(path)), home(path), environ)
    except ConfigError as exc:
        raise exc.in_file(where) from exc


def _read(path: Path | None) -> str:
    if path is None:
        return resources.files("herd_trio").joinpath(DEFAULT_CONFIG).read_text()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read: not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _parse(text: str) -> HerdConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from exc
    try:
        return msgspec.convert(raw, HerdConfig)
    except msgspec.ValidationError as exc:
        raise _translate(raw, exc) from exc


def _resolve(herd: HerdConfig, base: Path, environ: Mapping[str, str]) -> HerdConfig:
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
    return msgspec.structs.replace(herd, herd=settings, servers=servers)


def check(herd: HerdConfig, environ: Mapping[str, str] = os.environ) -> None:
    """The checks that span fields and servers; ConfigError names the first problem.

    Ranges are declared on the fields and checked by msgspec; this reads no file.
    """
    settings = herd.herd
    if not herd.servers:
        raise ConfigError("no servers configured", field="servers")
    for name, server in herd.servers.items():
        cert = server.tls_cert or settings.tls_cert
        key = server.tls_key if server.tls_cert else settings.tls_key
        tls = [cert, key, settings.tls_ca]
        if any(tls) and not all(tls):
            raise ConfigError(
                "peer TLS needs tls_cert and tls_key (here or in [herd]) and tls_ca in [herd]",
                field=f"servers.{name}",
            )
        if (server.tls_cert is None) != (server.tls_key is None):
            raise ConfigError("set both tls_cert and tls_key, or neither", field=f"servers.{name}")
    if settings.secret_env is not None and settings.keyring_file is not None:
        raise ConfigError("set secret_env or keyring_file, not both", field="herd")
    if settings.places != "offline" and not environ.get(settings.places_key_env):
        raise ConfigError(
            f"places = {settings.places!r} needs an API key in ${settings.places_key_env},"
            " which is not set",
            field="herd.places_key_env",
        )
    if settings.places_url is not None and not re.match(r"https?://[^/\s]+", settings.places_url):
        raise ConfigError(
            f"expected an http(s) URL, not {settings.places_url!r}", field="herd.places_url"
        )
    _check_servers(herd)


def _check_servers(herd: HerdConfig) -> None:
    # (machine, address, port): a server with `listen` runs on the machine its `host`
    # names, so servers of a multi-host herd may share ports; without it, all share one.
    taken: dict[tuple[str, str, int], str] = {}
    for name, server in herd.servers.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"bad server name {name!r} (use 1-64 of A-Z a-z 0-9 _ . -)", field="servers"
            )
        if (problem := host_problem(server.host)) is not None:
            raise ConfigError(problem, field=f"servers.{name}.host")
        if server.listen is not None:
            if (problem := host_problem(server.listen)) is not None:
                raise ConfigError(problem, field=f"servers.{name}.listen")
            if server.host in _WILDCARDS:
                raise ConfigError(
                    f"{server.host!r} cannot be dialled: with listen set, host is the"
                    " address neighbours dial (this server's own address or name)",
                    field=f"servers.{name}.host",
                )
        _check_admin(name, server)
        machine = "" if server.listen is None else server.host
        for key in ("port", "peer_port", "admin_port"):
            port: int | None = getattr(server, key)
            if port is None:
                continue
            field = f"servers.{name}.{key}"
            bound = server.admin_host if key == "admin_port" else server.bind
            host = "*" if bound in _WILDCARDS else bound
            clashes = [(machine, host, port), (machine, "*", port)]
            if host == "*":
                clashes += [k for k in taken if k[0] == machine and k[2] == port]
            for clash in clashes:
                if clash in taken:
                    raise ConfigError(f"{port} is already used by {taken[clash]}", field=field)
            taken[machine, host, port] = field
        for neighbour in server.neighbours:
            if neighbour not in herd.servers:
                raise ConfigError(
                    f"unknown server {neighbour!r}", field=f"servers.{name}.neighbours"
                )
            if neighbour == name:
                raise ConfigError(
                    "a server cannot neighbour itself", field=f"servers.{name}.neighbours"
                )


def _check_admin(name: str, server: ServerConfig) -> None:
    """The admin listener's host, its token rule, and the server's location."""
    if (problem := host_problem(server.admin_host)) is not None:
        raise ConfigError(problem, field=f"servers.{name}.admin_host")
    if server.admin_token_env is None and not is_loopback_name(server.admin_host):
        raise ConfigError(
            "an admin listener off loopback needs admin_token_env (a bearer token)",
            field=f"servers.{name}.admin_token_env",
        )
    if server.location is not None and not location_degrees(server.location):
        raise ConfigError(
            f"expected ISO 6709 like +34.068930-118.445127, not {server.location!r}",
            field=f"servers.{name}.location",
        )


def is_loopback_name(host: str) -> bool:
    """True if `host` is a loopback address or `localhost` (no DNS)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def location_degrees(location: str) -> tuple[float, float] | None:
    """(latitude, longitude) of an ISO 6709 `+DD.D+DDD.D` string, or None if it is not one.

    Floats are fine here: a location only places a server on the map.
    """
    if not _LOCATION.fullmatch(location):
        return None
    split = max(location.rfind("+"), location.rfind("-"))
    lat, lon = float(location[:split]), float(location[split:])
    return (lat, lon) if abs(lat) <= 90 and abs(lon) <= 180 else None


def host_problem(host: str) -> str | None:
    """Why `host` cannot be bound, judged by its syntax alone (no DNS); None if it may be.

    An IP address, a wildcard, or an RFC 1123 host name whose last label is not all
    digits: `127.0.0.300` is neither an address nor a name, and must not reach the
    resolver, which would only say "Name or service not known".
    """
    if host in _WILDCARDS:
        return None
    if host.startswith("[") and host.endswith("]"):
        return f"write the IPv6 address {host[1:-1]!r} without brackets"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        named = len(host) <= 253 and all(map(_HOST_LABEL.fullmatch, labels))
        if named and not labels[-1].isdigit():
            return None
        return f"{host!r} is neither an IP address nor a valid host name"
    return None


def _translate(raw: dict[str, object], exc: msgspec.ValidationError) -> ConfigError:
    """msgspec's message as `FIELD.PATH: problem`, without its `$.` paths and backticks.

    msgspec says `$.servers[...].port` for a value inside a dict, so the server
    tables are converted one by one to find which one it is.
    """
    servers = raw.get("servers")
    inside = str(exc).endswith("`$.servers[...]`") or "`$.servers[...]." in str(exc)
    if inside and isinstance(servers, dict):
        for name, table in servers.items():
            try:
                msgspec.convert(table, ServerConfig)
            except msgspec.ValidationError as inner:
                return _field_error(str(inner), f"servers.{name}")
    return _field_error(str(exc))


def _field_error(text: str, prefix: str = "") -> ConfigError:
    match = _MSGSPEC.fullmatch(text)
    assert match is not None  # the pattern matches any text
    what = match["what"]
    field = ".".join(part for part in (prefix, (match["path"] or "").lstrip(".")) if part)
    for pattern, problem in (
        (r"Object contains unknown field `(.*)`", "unknown key"),
        (r"Object missing required field `(.*)`", "required key missing"),
    ):
        if key := re.fullmatch(pattern, what):
            return ConfigError(problem, field=".".join(p for p in (field, key[1]) if p))
    what = what.replace("`", "")
    return ConfigError(what[:1].lower() + what[1:], field=field or None)
