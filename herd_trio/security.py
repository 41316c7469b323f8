"""What a server needs to secure its peer links, read once at start-up from the config.

config.py holds data only; this module does the reading: the secret from the
environment or the keyring file, and the certificates into TLS contexts. `__main__`
calls `load_security` once per process before any server is constructed, so a bad
secret or certificate is a config error (exit status 2, one line) and servers get
ready-made objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from herd_trio.auth import Keyring
from herd_trio.config import ConfigError, HerdConfig, Settings
from herd_trio.tls import CertificateError, TlsContexts, TlsFiles, load_contexts


@attrs.frozen
class PeerSecurity:
    """One server's peer-link protection: a keyring (None: no secret, so peers are
    accepted from loopback only) and mutual TLS (None: plain TCP)."""

    keyring: Keyring | None = None
    tls: TlsContexts | None = None


def load_security(
    herd: HerdConfig, names: Iterable[str], environ: Mapping[str, str] = os.environ
) -> dict[str, PeerSecurity]:
    """The peer security of each server in `names`, from files and the environment.

    The keyring is read once and shared by all of them; each server's TLS contexts
    are built from its own certificate (or `[herd]`'s). Raises ConfigError naming the
    field to fix (the caller adds the file, see `ConfigError.in_file`).
    """
    keyring = load_keyring(herd.herd, environ)
    return {name: PeerSecurity(keyring, load_tls(herd, name)) for name in names}


def load_keyring(settings: Settings, environ: Mapping[str, str] = os.environ) -> Keyring | None:
    """The keyring `secret_env` or `keyring_file` names; None if neither is set.

    `secret_env` names a variable holding ONE secret; `keyring_file` a file of
    secrets, one per line (the way to rotate them). ConfigError on a problem, never
    showing a secret.
    """
    if settings.secret_env is not None:
        field, env = "herd.secret_env", settings.secret_env
        if not (value := environ.get(env)):
            raise ConfigError(f"${env} is not set", field=field)
        try:
            return Keyring.from_secret(value, source=f"${env}")
        except ValueError as exc:
            raise ConfigError(str(exc), field=field) from exc
    if settings.keyring_file is not None:
        field, path = "herd.keyring_file", settings.keyring_file
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path!r}: {exc.strerror}", field=field) from exc
        try:
            return Keyring.parse(text, source=repr(path))
        except ValueError as exc:
            raise ConfigError(str(exc), field=field) from exc
    return None


def load_tls(herd: HerdConfig, name: str) -> TlsContexts | None:
    """Server `name`'s mutual-TLS contexts, or None if no certificate is configured.

    A server's own `tls_cert`/`tls_key` take precedence over `[herd]`'s, so each
    server can hold a certificate that names only itself, also under `--all`.
    ConfigError names the setting whose file does not load.
    """
    server, settings = herd.servers[name], herd.herd
    own = server.tls_cert is not None
    cert, key = (server.tls_cert, server.tls_key) if own else (settings.tls_cert, settings.tls_key)
    if cert is None:
        return None
    if key is None or settings.tls_ca is None:  # config.check refuses this; be explicit
        raise ConfigError("peer TLS needs tls_cert, tls_key and tls_ca", field=f"servers.{name}")
    try:
        return load_contexts(TlsFiles(cert, key, settings.tls_ca))
    except CertificateError as exc:
        table = f"servers.{name}" if own and exc.setting != "tls_ca" else "herd"
        raise ConfigError(str(exc), field=f"{table}.{exc.setting}") from exc
