"""Optional mutual TLS on peer links: both ends show a certificate from the herd's CA.

Identity is the server's herd NAME, not its host. Every server of the default herd
listens on 127.0.0.1, so a certificate valid for "127.0.0.1" would let any server of
the herd pose as any other; a certificate carrying the name ("Bona") as a DNS
subjectAltName says which server it is. So the dialler passes the peer's name as
`server_hostname` and OpenSSL checks it (case-insensitively, SAN only, no wildcards
expected from a private CA); the acceptor cannot know the name before the HELLO line,
so it checks the client certificate against the name the HELLO claims with
`certificate_matches` (fold it into `allowed` of `auth.accept_handshake`).

Only the CA in `tls_ca` is trusted (not the system's public CAs): a certificate some
public CA issued for a look-alike name must not open a link.

Errors: a failed TLS handshake raises `trio.BrokenResourceError` (its __cause__ is the
`ssl.SSLError`, e.g. `ssl.SSLCertVerificationError`); the transport's own errors
(`trio.BrokenResourceError`, `trio.ClosedResourceError`, `OSError`) pass through. With
TLS 1.3 the client's handshake completes before the server has checked the client's
certificate, so a refused client certificate may surface on the dialler's first
receive instead (the auth handshake that follows does one) as
`trio.BrokenResourceError`. Either way the refusing side sends its TLS alert, so the
other side's ssl.SSLError names the reason (`_handshake`).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Literal

import attrs
import trio

MIN_VERSION = ssl.TLSVersion.TLSv1_2  # 1.0 and 1.1 are deprecated (RFC 8996)


class CertificateError(ValueError):
    """A CA, certificate or key file that does not load; `setting` names the one to fix."""

    def __init__(self, setting: Literal["tls_ca", "tls_cert"], message: str) -> None:
        super().__init__(message)
        self.setting = setting


@attrs.frozen
class TlsFiles:
    """Where one server's peer-TLS material is: its certificate chain, key and the CA."""

    cert: str
    key: str
    ca: str


@attrs.frozen
class TlsContexts:
    """One server's mutual-TLS contexts: `dialling` for links it dials, `accepting`
    for links dialled to it. Built once at start-up (`load_contexts`)."""

    dialling: ssl.SSLContext
    accepting: ssl.SSLContext


def _context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    try:
        # cafile given: only that CA is trusted, the system store is not loaded
        context = ssl.create_default_context(purpose, cafile=files.ca)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError("tls_ca", f"cannot load {files.ca!r}: {exc}") from exc
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        message = f"cannot load {files.cert!r} with tls_key {files.key!r}: {exc}"
        raise CertificateError("tls_cert", message) from exc
    context.minimum_version = MIN_VERSION
    context.verify_mode = ssl.CERT_REQUIRED  # mutual: the accepting side asks too
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The accepting side's context: our certificate, and a client certificate required.

    Reads the files; CertificateError (a ValueError) with a one-line message if one
    does not load.
    """
    return _context(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The dialling side's context: our certificate, and the server's name checked.

    Reads the files; CertificateError as for `server_context`.
    """
    context = _context(ssl.Purpose.SERVER_AUTH, files)
    context.check_hostname = True  # against the peer's herd name, see wrap_dialled
    return context


def load_contexts(files: TlsFiles) -> TlsContexts:
    """Both contexts of one server; reads the files (CertificateError if one is bad)."""
    return TlsContexts(dialling=client_context(files), accepting=server_context(files))


async def wrap_dialled(
    stream: trio.abc.Stream, context: ssl.SSLContext, peer_name: str
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS over a connection we dialled to `peer_name`; its certificate must name it.

    On success the returned stream owns `stream` (closing it closes both). On error
    nothing is closed: the caller still owns `stream` and closes it. Raises
    trio.BrokenResourceError (TLS refused; __cause__ says why) or the transport's
    errors. No deadline: the caller sets one.
    """
    tls = trio.SSLStream(stream, context, server_hostname=peer_name)
    await _handshake(tls, stream)
    return tls


async def wrap_accepted(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS over a connection a peer made to us; it must show a certificate of our CA.

    Ownership, errors and deadline as for `wrap_dialled`. Which server the client is
    gets checked after its HELLO, with `certificate_matches`.
    """
    tls = trio.SSLStream(stream, context, server_side=True)
    await _handshake(tls, stream)
    return tls


ALERT_GRACE = 1.0  # seconds to hand a refusal's alert to the transport before giving up


async def _handshake(tls: trio.SSLStream[trio.abc.Stream], stream: trio.abc.Stream) -> None:
    """`tls.do_handshake()`, and when it refuses the peer, tell the peer why.

    OpenSSL writes a TLS alert ("unknown ca", "certificate required", ...) into the
    outgoing buffer when it refuses the other side, but trio's SSLStream raises
    before sending what is buffered (python-trio/trio#3413), so the peer only sees
    the connection close: an "unexpected EOF" or, with some OpenSSL builds, a clean
    end, and its operator cannot tell a refused certificate from a network fault.
    Sending the buffered alert ourselves makes the peer's error name the reason on
    every OpenSSL version. Best effort: a peer that is gone already changes nothing.
    """
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        refused = exc
    else:
        return
    # Outside the except block: a cancellation while sending replaces the error.
    if isinstance(refused.__cause__, ssl.SSLError):
        await _send_pending_alert(tls, stream)
    raise refused


async def _send_pending_alert(
    tls: trio.SSLStream[trio.abc.Stream], stream: trio.abc.Stream
) -> None:
    outgoing = getattr(tls, "_outgoing", None)  # SSLStream's MemoryBIO; private, hence getattr
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    alert = outgoing.read()
    gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    with trio.move_on_after(ALERT_GRACE), contextlib.suppress(*gone):
        await stream.send_all(alert)


def certificate_names(tls: trio.SSLStream[trio.abc.Stream]) -> frozenset[str]:
    """The DNS names (lowercase) in the peer's verified certificate; empty if none."""
    cert = tls.getpeercert()  # a dict once the handshake verified one, else None/{}
    if not cert:
        return frozenset()
    alt_names: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())
    return frozenset(value.lower() for kind, value in alt_names if kind == "DNS")


def certificate_matches(tls: trio.SSLStream[trio.abc.Stream], name: bytes | str) -> bool:
    """True if the peer's certificate carries herd server `name` as a DNS name.

    Exact, case-insensitive, no wildcards: a herd CA issues one certificate per server.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return False
    return name.lower() in certificate_names(tls)
