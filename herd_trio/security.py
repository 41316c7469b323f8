"""PLACEHOLDER (replaced by the config branch): peer keyring and TLS contexts."""

from __future__ import annotations

import ssl

import attrs

from herd_trio.auth import Keyring


@attrs.frozen
class TlsContexts:
    client: ssl.SSLContext
    server: ssl.SSLContext


@attrs.frozen
class PeerSecurity:
    keyring: Keyring | None = None
    tls: TlsContexts | None = None
