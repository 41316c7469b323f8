"""Mutual TLS on peer links: trustme certificates over memory streams and real sockets."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme

from herd_trio.auth import Keyring, accept_handshake, dial_handshake
from herd_trio.lines import LineReader
from herd_trio.tls import (
    CertificateError,
    TlsFiles,
    certificate_matches,
    certificate_names,
    client_context,
    load_contexts,
    server_context,
    wrap_accepted,
    wrap_dialled,
)

Wrapped = trio.SSLStream[trio.abc.Stream]


@attrs.frozen
class Herd:
    """A CA and the files of two servers' certificates: Bona dials Clark."""

    ca: trustme.CA
    bona: TlsFiles  # the dialler
    clark: TlsFiles  # the acceptor


def write_files(folder: Path, ca: trustme.CA, cert: trustme.LeafCert) -> TlsFiles:
    folder.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return TlsFiles(
        cert=str(folder / "cert.pem"),
        key=str(folder / "key.pem"),
        ca=str(folder / "ca.pem"),
    )


def make_herd(folder: Path) -> Herd:
    ca = trustme.CA()
    return Herd(
        ca,
        bona=write_files(folder / "bona", ca, ca.issue_cert("Bona", "127.0.0.1")),
        clark=write_files(folder / "clark", ca, ca.issue_cert("Clark", "127.0.0.1")),
    )


@pytest.fixture(scope="module")
def herd(tmp_path_factory: pytest.TempPathFactory) -> Herd:
    return make_herd(tmp_path_factory.mktemp("herd"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Herd:
    """The same names, certified by ANOTHER CA."""
    return make_herd(tmp_path_factory.mktemp("stranger"))


@attrs.define
class Outcome:
    tls: Wrapped | None = None
    error: Exception | None = None


async def both_sides(
    dial: Callable[[trio.abc.Stream], Awaitable[Wrapped]],
    accept: Callable[[trio.abc.Stream], Awaitable[Wrapped]],
    then: Callable[[Outcome, Outcome], Awaitable[None]] | None = None,
    pair: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> tuple[Outcome, Outcome]:
    """Run a TLS handshake on each end (dialler, acceptor), then `then`, then close both.

    Each side closes its transport when its handshake fails, as the caller in links.py
    does, so the other side sees the end instead of waiting forever.
    """
    left, right = pair if pair is not None else trio.testing.memory_stream_pair()
    outcomes = Outcome(), Outcome()

    async def side(
        stream: trio.abc.Stream,
        wrap: Callable[[trio.abc.Stream], Awaitable[Wrapped]],
        outcome: Outcome,
    ) -> None:
        try:
            outcome.tls = await wrap(stream)
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            outcome.error = exc
            await stream.aclose()

    async with left, right:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, left, dial, outcomes[0])
            nursery.start_soon(side, right, accept, outcomes[1])
        if then is not None:
            await then(*outcomes)
        for outcome in outcomes:
            if outcome.tls is not None:
                await outcome.tls.aclose()
    return outcomes


def dialler(
    files: TlsFiles, peer: str = "Clark"
) -> Callable[[trio.abc.Stream], Awaitable[Wrapped]]:
    context = client_context(files)

    async def dial(stream: trio.abc.Stream) -> Wrapped:
        return await wrap_dialled(stream, context, peer)

    return dial


def acceptor(files: TlsFiles) -> Callable[[trio.abc.Stream], Awaitable[Wrapped]]:
    context = server_context(files)

    async def accept(stream: trio.abc.Stream) -> Wrapped:
        return await wrap_accepted(stream, context)

    return accept


def refusal(exc: BaseException | None) -> ssl.SSLError | None:
    """The ssl.SSLError behind the BrokenResourceError trio raises for a refused peer."""
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        return exc.__cause__
    return None


def alert_of(exc: BaseException | None) -> str | None:
    """The reason of the TLS alert behind a refused handshake (e.g. TLSV1_ALERT_UNKNOWN_CA)."""
    error = refusal(exc)
    return None if error is None else error.reason


async def dialler_refusal(client: Outcome) -> ssl.SSLError | None:
    """How the dialler learns that the server refused its certificate.

    With TLS 1.3 the client's handshake is over before the server has judged the
    client's certificate, so the refusal may only show on the first receive.
    """
    await trio.lowlevel.checkpoint()
    if client.tls is None:
        return refusal(client.error)
    try:
        await client.tls.receive_some()
    except trio.BrokenResourceError as exc:
        return refusal(exc)
    return None


async def exchange(client: Outcome, server: Outcome) -> None:
    assert client.tls is not None
    assert server.tls is not None
    await client.tls.send_all(b"AT hello\n")
    assert await server.tls.receive_some() == b"AT hello\n"
    await server.tls.send_all(b"PING\n")
    assert await client.tls.receive_some() == b"PING\n"


# --- success ------------------------------------------------------------------------------


async def test_mutual_tls_handshake_succeeds_and_data_flows(herd: Herd) -> None:
    checked: list[object] = []

    async def then(client: Outcome, server: Outcome) -> None:
        await exchange(client, server)
        assert client.tls is not None
        assert server.tls is not None
        assert client.tls.version() in ("TLSv1.2", "TLSv1.3")
        checked.append(certificate_names(server.tls))
        checked.append(certificate_matches(server.tls, b"Clark"))
        checked.append(certificate_matches(server.tls, "bona"))
        checked.append(certificate_matches(server.tls, b"\xff"))
        checked.append(certificate_names(client.tls))

    client, server = await both_sides(dialler(herd.bona), acceptor(herd.clark), then)
    assert (client.error, server.error) == (None, None)
    assert checked == [frozenset({"bona"}), False, True, False, frozenset({"clark"})]


async def test_mutual_tls_over_a_real_loopback_socket(herd: Herd) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        connecting = trio.testing.open_stream_to_socket_listener(listener)
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.Stream] = []

            async def accept_one() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(accept_one)
            dialled = await connecting
        client, server = await both_sides(
            dialler(herd.bona), acceptor(herd.clark), exchange, (dialled, accepted[0])
        )
    assert (client.error, server.error) == (None, None)


async def test_auth_handshake_runs_over_tls_and_checks_the_certificate_name(herd: Herd) -> None:
    keyring = Keyring((b"0123456789abcdef0123",))
    names: list[bytes] = []

    async def then(client: Outcome, server: Outcome) -> None:
        assert client.tls is not None
        assert server.tls is not None
        tls_in = server.tls

        async def dial() -> None:
            assert client.tls is not None
            reader = LineReader(client.tls, 4096)
            await dial_handshake(client.tls, reader, me=b"Bona", peer=b"Clark", keyring=keyring)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dial)
            names.append(
                await accept_handshake(
                    tls_in,
                    LineReader(tls_in, 4096),
                    me=b"Clark",
                    allowed=lambda name: name == b"Bona" and certificate_matches(tls_in, name),
                    keyring=keyring,
                )
            )

    client, server = await both_sides(dialler(herd.bona), acceptor(herd.clark), then)
    assert (client.error, server.error, names) == (None, None, [b"Bona"])


# --- refusals --------------------------------------------------------------------------------


async def test_a_server_certificate_from_another_ca_is_refused(herd: Herd, stranger: Herd) -> None:
    client, server = await both_sides(dialler(herd.bona), acceptor(stranger.clark))
    assert isinstance(refusal(client.error), ssl.SSLCertVerificationError)
    assert alert_of(server.error) == "TLSV1_ALERT_UNKNOWN_CA"  # the dialler said why


async def test_a_client_certificate_from_another_ca_is_refused(herd: Herd, stranger: Herd) -> None:
    late: list[ssl.SSLError | None] = []

    async def then(client: Outcome, server: Outcome) -> None:
        late.append(await dialler_refusal(client))

    # trusts the herd CA (so it accepts Clark) but shows a certificate of another CA
    impostor = attrs.evolve(herd.bona, cert=stranger.bona.cert, key=stranger.bona.key)
    _, server = await both_sides(dialler(impostor), acceptor(herd.clark), then)
    assert isinstance(refusal(server.error), ssl.SSLCertVerificationError)
    # The dialler learns why, not just that the connection ended (an "unexpected EOF",
    # or a clean end with some OpenSSL builds): the acceptor sends its alert.
    assert late[0] is not None
    assert late[0].reason == "TLSV1_ALERT_UNKNOWN_CA", late


async def test_a_client_without_a_certificate_is_refused(herd: Herd) -> None:
    bare = ssl.create_default_context(cafile=herd.bona.ca)  # trusts the CA, shows nothing
    late: list[ssl.SSLError | None] = []

    async def dial(stream: trio.abc.Stream) -> Wrapped:
        return await wrap_dialled(stream, bare, "Clark")

    async def then(client: Outcome, server: Outcome) -> None:
        late.append(await dialler_refusal(client))

    _, server = await both_sides(dial, acceptor(herd.clark), then)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(refusal(server.error))
    assert late[0] is not None
    assert late[0].reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", late


async def test_a_server_certificate_for_another_name_is_refused(herd: Herd) -> None:
    # Clark's certificate is valid for 127.0.0.1 too: only the name tells servers apart.
    client, server = await both_sides(dialler(herd.bona, peer="Jaquez"), acceptor(herd.clark))
    assert isinstance(refusal(client.error), ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(refusal(client.error))
    assert server.error is not None


# --- contexts -----------------------------------------------------------------------------------


def test_contexts_require_certificates_both_ways_and_tls_1_2(herd: Herd) -> None:
    server, client = server_context(herd.clark), client_context(herd.bona)
    for context in (server, client):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.check_hostname is True
    assert server.check_hostname is False


def test_only_the_configured_ca_is_trusted(herd: Herd) -> None:
    """No system CAs: a public CA's certificate for a herd name must not open a link."""
    for context in (server_context(herd.clark), client_context(herd.bona)):
        assert context.cert_store_stats()["x509_ca"] == 1


def test_unreadable_tls_files_name_the_setting_and_file(herd: Herd, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(CertificateError, match=r"cannot load .*missing\.pem") as info:
        server_context(TlsFiles(cert=herd.clark.cert, key=herd.clark.key, ca=missing))
    assert info.value.setting == "tls_ca"
    wrong_key = TlsFiles(cert=herd.clark.cert, key=herd.bona.key, ca=herd.clark.ca)
    with pytest.raises(CertificateError, match=r"cannot load .*cert\.pem.* with tls_key") as info:
        server_context(wrong_key)
    assert info.value.setting == "tls_cert"
    assert "\n" not in str(info.value)


def test_load_contexts_builds_both_sides(herd: Herd) -> None:
    contexts = load_contexts(herd.clark)
    assert contexts.dialling.check_hostname is True
    assert contexts.accepting.check_hostname is False
    assert contexts.accepting.verify_mode == ssl.CERT_REQUIRED
