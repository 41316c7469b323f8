"""End to end: peer-link security of real `python -m herd_trio` processes on 127.0.0.1.

The test process plays the attacker: it opens the servers' peer and client ports
itself and speaks (or forges) the handshake of docs/security.md with the pure helpers
of herd_trio/auth.py. Every attack tries to slip in an AT line that would win over an
honest record (a client time in 2100); afterwards a marker update from the attacked
server must have reached all five servers (floods since the attack have propagated:
links are FIFO, so a forged record flooded earlier would be there too) while every
server still holds the honest record, and the attacked server's log must say why it
refused.

Each attack connects from its own loopback source address (127.0.0.N), so the
refusal log, rate-limited per address and kind, shows every one of them.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from herd_trio.auth import (
    AcceptHello,
    DialHello,
    Hello,
    Keyring,
    auth_line,
    key_id,
    parse_accept_hello,
    parse_auth,
    parse_dial_hello,
    transcript_mac,
)
from herd_trio.store import BUCKETS
from herd_trio.tls import certificate_names
from tests.e2e.herd import (
    Herd,
    connect,
    exchange,
    free_ports,
    neighbours_of,
    poll,
    running,
)

SECRET_ENV = "HERD_E2E_PEER_SECRET"
VICTIM = b"victim.example.org"
HONEST = (b"+34.068930-118.445127", b"1621464827.959498503")
FORGED_COORDS = b"+10.5-10.5"
FORGED = FORGED_COORDS.decode()
DEADLINE = 5.0  # seconds any single exchange with a server may take


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A fresh herd secret in $HERD_E2E_PEER_SECRET, which server processes inherit."""
    value = secrets.token_hex(32)
    monkeypatch.setenv(SECRET_ENV, value)
    return value.encode()


def wrong_secret() -> bytes:
    """A well-formed secret the herd does not hold."""
    return secrets.token_hex(32).encode()


def source(number: int) -> str:
    """The attacker's loopback source address number `number` (127.0.0.0/8 is all local)."""
    return f"127.0.0.{number}"


def forged_at(origin: bytes, number: int) -> bytes:
    """An AT line for the victim that would win over the honest record (client time 2100)."""
    return b"AT %s +0.000000000 %s %s 4102444800.%09d\n" % (origin, VICTIM, FORGED_COORDS, number)


# --- the attacker's side of a connection --------------------------------------------


@attrs.define(eq=False)
class Conn:
    """One TCP connection the test holds: line reads, and the rest until the peer closes."""

    stream: trio.abc.Stream
    buffer: bytearray = attrs.field(factory=bytearray)

    @classmethod
    async def open(cls, port: int, source_address: str) -> Conn:
        """Connect to 127.0.0.1:`port` from `source_address`."""
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source_address)
        return cls(stream)

    async def line(self) -> bytes:
        """The next line the other end sends (with its LF); b"" if it closes first."""
        with trio.fail_after(DEADLINE):
            while (end := self.buffer.find(b"\n")) < 0:
                chunk = await self.stream.receive_some()
                if not chunk:
                    rest, self.buffer = bytes(self.buffer), bytearray()
                    return rest
                self.buffer += chunk
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    async def finish(self, data: bytes) -> bytes:
        """Send `data` (the other end may have hung up already), then read until it closes.

        Returns what it sent besides lines already read. A reset (our bytes unread when
        it closed) ends the read like a close.
        """
        with suppress(trio.BrokenResourceError):
            if data:
                await self.stream.send_all(data)
        received = bytearray(self.buffer)
        with trio.fail_after(DEADLINE):
            try:
                while chunk := await self.stream.receive_some():
                    received += chunk
            except trio.BrokenResourceError:
                pass
        await self.stream.aclose()
        return bytes(received)


async def refused_line(herd: Herd, name: str, address: str, reason: str, since: int = 0) -> str:
    """Wait until `name` logs (after byte `since`) a refused peer connection from
    `address` saying `reason`; that line."""
    prefix = f" refused peer connection from {address}:"

    async def check() -> str | None:
        await trio.lowlevel.checkpoint()
        lines = log_text(herd, name, since).splitlines()
        return next((ln for ln in lines if prefix in ln and reason in ln), None)

    return await poll(f"{name} logs {prefix}...{reason!r}", check, deadline=DEADLINE)


async def holds(herd: Herd, name: str, client: bytes) -> bytes:
    """The AT line `name` holds for `client` (or its `?` line)."""
    reply = await herd.whatsat(name, client, b"1", b"0")
    return reply.split(b"\n", 1)[0] + b"\n"


async def assert_victim_unchanged(
    herd: Herd, victim_line: bytes, attacked: str, case: str, names: list[str] | None = None
) -> None:
    """A marker update from `attacked` reaches every server; all still hold `victim_line`."""
    names = names or herd.names
    marker = f"marker-{case}".replace(" ", "-").encode()
    marker_line = await herd.iamat(attacked, marker, b"+1+1", str(time.time()).encode())
    for name in names:
        await herd.wait_for(name, marker, marker_line)
    for name in names:
        assert await holds(herd, name, VICTIM) == victim_line, f"{case}: {name} changed"


def log_text(herd: Herd, name: str, since: int = 0) -> str:
    """Server `name`'s log from byte offset `since`."""
    log = herd.log(name)
    return log.read_bytes()[since:].decode() if log.exists() else ""


def log_size(herd: Herd, name: str) -> int:
    """The current length of server `name`'s log, to read what comes after."""
    log = herd.log(name)
    return log.stat().st_size if log.exists() else 0


async def wait_relinked(herd: Herd, name: str, marks: dict[str, int]) -> None:
    """Wait until `name` and each running neighbour log their link up after `marks`.

    Log offsets rather than the last state in the log: a restarted server's log and its
    neighbours' logs still hold the old link's lines until the new ones are flushed.
    """
    for peer in neighbours_of(herd.edges, name):
        if not herd.running(peer):
            continue
        for me, other in ((name, peer), (peer, name)):

            async def check(me: str = me, other: str = other) -> bool | None:
                await trio.lowlevel.checkpoint()
                text = log_text(herd, me, marks.get(me, 0))
                up = f" link to {other} up" in text or f" link from {other} up" in text
                return True if up else None

            await poll(f"{me} logs its link with {other} up again", check)


async def restart(herd: Herd, name: str, config: Path) -> None:
    """Stop `name` cleanly, start it with `config`, wait for all its links."""
    marks = {n: log_size(herd, n) for n in herd.names}
    assert herd.kill(name, signal.SIGTERM) == 0
    herd.start(name, config=config)
    await wait_relinked(herd, name, marks)


# --- attacks on peer ports -----------------------------------------------------------


@attrs.frozen
class Recorded:
    """A genuine dialler's HELLO and AUTH lines, captured by a fake acceptor."""

    hello: bytes
    auth: bytes


async def record_handshake(herd: Herd, secret: bytes, dialler: str, acceptor: str) -> Recorded:
    """Start every server but `acceptor` and capture `dialler`'s handshake lines.

    The test listens on `acceptor`'s peer port and answers as it would (it knows the
    secret), so the real `dialler` process sends a valid AUTH for this one connection.
    """
    keyring = Keyring((secret,))
    listeners = await trio.open_tcp_listeners(herd.peer_ports[acceptor], host="127.0.0.1")
    try:
        for name in herd.names:
            if name != acceptor:
                herd.start(name)
        with trio.fail_after(10):
            conn = Conn(await listeners[0].accept())
    finally:
        for listener in listeners:
            await listener.aclose()
    hello_line = await conn.line()
    hello = parse_dial_hello(hello_line.rstrip(b"\n"))
    assert isinstance(hello, DialHello), hello_line
    assert (hello.sender, hello.receiver) == (dialler.encode(), acceptor.encode())
    chosen = keyring.choose(hello.key_ids)
    assert chosen is not None, hello_line
    ident, key = chosen
    nonce = secrets.token_bytes(16)
    proof = transcript_mac(key, "accept", hello, nonce, ident)
    await conn.stream.send_all(
        AcceptHello(hello.receiver, hello.sender, nonce, ident, proof).line()
    )
    auth = await conn.line()
    # A genuine proof, valid for the nonce of this connection only.
    assert parse_auth(auth.rstrip(b"\n")) == transcript_mac(key, "dial", hello, nonce, ident)
    await conn.stream.aclose()
    await herd.wait_logged(dialler, f"link to {acceptor} dropped")
    return Recorded(hello_line, auth)


def dial_hello(sender: str, receiver: str, keys: list[bytes]) -> DialHello:
    """A dialler's challenge naming `sender` and `receiver`, holding `keys`."""
    ids = tuple(key_id(key) for key in keys)
    return DialHello(sender.encode(), receiver.encode(), secrets.token_bytes(16), ids)


async def blind(herd: Herd, target: str, data: bytes, address: str, forged: bytes) -> bytes:
    """Send `data` and the forged line at once to `target`'s peer port; what came back."""
    conn = await Conn.open(herd.peer_ports[target], address)
    return await conn.finish(data + forged)


async def after_answer(
    herd: Herd,
    target: str,
    hello: DialHello,
    address: str,
    respond: Callable[[AcceptHello], bytes],
) -> bytes:
    """Send `hello`, read the acceptor's answer, send `respond(answer)`; what else came."""
    conn = await Conn.open(herd.peer_ports[target], address)
    await conn.stream.send_all(hello.line())
    answer = parse_accept_hello((await conn.line()).rstrip(b"\n"))
    assert isinstance(answer, AcceptHello), answer
    assert answer.receiver == hello.sender
    return await conn.finish(respond(answer))


# An attack on a live herd: (herd, source address, forged AT line, the herd's secret,
# a recorded genuine handshake) -> everything the attacked server sent back.
Attack = Callable[[Herd, str, bytes, bytes, Recorded], Awaitable[bytes]]


@attrs.frozen
class Case:
    """One attack: which server it targets, what it does, what that server must log."""

    name: str
    target: str
    reason: str
    attack: Attack


async def unauthenticated(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """A legacy HELLO without a secret, as neighbour Bailey would send it."""
    return await blind(h, "Bona", Hello(b"Bailey", b"Bona").line(), a, f)


async def wrong_secret_attack(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """A dialler holding a secret the herd does not, plus a made-up AUTH."""
    hello = dial_hello("Bailey", "Campbell", [wrong_secret()])
    return await blind(h, "Campbell", hello.line() + auth_line(secrets.token_bytes(32)), a, f)


async def right_id_wrong_secret(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """The herd's key id (it is public) but a MAC made with another secret."""
    hello = dial_hello("Campbell", "Jaquez", [s])
    wrong = wrong_secret()
    return await after_answer(
        h,
        "Jaquez",
        hello,
        a,
        lambda ans: auth_line(transcript_mac(wrong, "dial", hello, ans.nonce, ans.key_id)) + f,
    )


async def reflected(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """The acceptor's own proof sent back to it as the dialler's AUTH."""
    hello = dial_hello("Bona", "Clark", [s])
    return await after_answer(h, "Clark", hello, a, lambda ans: auth_line(ans.mac) + f)


async def replayed(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """Bona's genuine HELLO and AUTH for Clark, recorded earlier, replayed to Clark."""
    hello = parse_dial_hello(r.hello.rstrip(b"\n"))
    assert isinstance(hello, DialHello)
    return await after_answer(h, "Clark", hello, a, lambda ans: r.auth + f)


async def replayed_elsewhere(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """Bona's recorded handshake for Clark sent to Campbell, which Bona does dial."""
    return await blind(h, "Campbell", r.hello + r.auth, a, f)


async def non_neighbour(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """Clark, with the right secret, dialling Bailey: not its neighbour."""
    return await blind(h, "Bailey", dial_hello("Clark", "Bailey", [s]).line(), a, f)


async def wrong_direction(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """Bona, with the right secret, dialling Bailey: a neighbour, but Bailey dials Bona."""
    return await blind(h, "Bailey", dial_hello("Bona", "Bailey", [s]).line(), a, f)


async def stranger(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """A name no config lists, with the right secret."""
    return await blind(h, "Jaquez", dial_hello("Mallory", "Jaquez", [s]).line(), a, f)


async def silent(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """The AT line without its LF, and the connection held open: no line ever completes."""
    return await blind(h, "Bona", b"", a, f.rstrip(b"\n"))


async def no_handshake(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """An AT line straight onto a peer port."""
    return await blind(h, "Jaquez", b"", a, f)


async def at_instead_of_auth(h: Herd, a: str, f: bytes, s: bytes, r: Recorded) -> bytes:
    """A valid HELLO from a neighbour, then the AT line where the AUTH belongs."""
    hello = dial_hello("Bona", "Campbell", [s])
    return await after_answer(h, "Campbell", hello, a, lambda ans: f)


CASES = [
    Case("unauthenticated", "Bona", "b'Bailey' sent an unauthenticated HELLO", unauthenticated),
    Case("wrong secret", "Campbell", "b'Bailey' holds no secret we hold", wrong_secret_attack),
    Case(
        "right key id, wrong secret",
        "Jaquez",
        "AUTH from b'Campbell' does not verify",
        right_id_wrong_secret,
    ),
    Case("reflected proof", "Clark", "AUTH from b'Bona' does not verify", reflected),
    Case("replayed handshake", "Clark", "AUTH from b'Bona' does not verify", replayed),
    Case(
        "replayed to another server",
        "Campbell",
        "HELLO addressed to b'Clark', not to us",
        replayed_elsewhere,
    ),
    Case("non-neighbour", "Bailey", "b'Clark' is not a neighbour allowed", non_neighbour),
    Case("wrong direction", "Bailey", "b'Bona' is not a neighbour allowed", wrong_direction),
    Case("stranger", "Jaquez", "b'Mallory' is not a neighbour allowed", stranger),
    Case("AT without handshake", "Jaquez", "expected HELLO, got b'AT ", no_handshake),
    Case("silent", "Bona", "timed out", silent),  # after HANDSHAKE_DEADLINE (2 s)
    Case("AT instead of AUTH", "Campbell", "expected AUTH <mac>, got b'AT ", at_instead_of_auth),
]


async def test_attacks_on_peer_and_client_ports_change_no_record(
    tmp_path: Path, secret: bytes
) -> None:
    with running(Herd.create(tmp_path, secret_env=SECRET_ENV)) as herd:
        recorded = await record_handshake(herd, secret, "Bona", "Clark")
        herd.start("Clark")
        await herd.wait_linked()
        linked = {name: log_size(herd, name) for name in herd.names}
        victim_line = await herd.iamat("Jaquez", VICTIM, *HONEST)
        for name in herd.names:
            await herd.wait_for(name, VICTIM, victim_line)

        for number, case in enumerate(CASES, 10):
            address = source(number)
            forged = forged_at(case.target.encode(), number)
            sent = await case.attack(herd, address, forged, secret, recorded)
            # A refused peer gets nothing (beyond the acceptor's own HELLO, read above):
            # no DIGEST, no record, no PING.
            assert sent == b"", f"{case.name}: {case.target} sent {sent!r}"
            await refused_line(herd, case.target, address, case.reason)
            await assert_victim_unchanged(herd, victim_line, case.target, case.name)

        # An AT line on a client port is just an invalid command.
        forged = forged_at(b"Bona", 99)
        assert await exchange(herd.ports["Bona"], forged) == b"? " + forged
        await herd.wait_logged("Bona", f"> {b'? ' + forged!r}")
        await assert_victim_unchanged(herd, victim_line, "Bona", "client port")

        # No attacker ever held a link, none replaced a real one, no forged record arrived.
        for name in herd.names:
            text = log_text(herd, name, linked[name])
            assert set(re.findall(r" link from \w+ up \(([0-9.]+):", text)) <= {"127.0.0.1"}
            assert "replaced by a new connection" not in text, f"{name}: {text}"
            assert not re.search(rf" peer \w+ < b'AT .*{re.escape(FORGED)}", text), text


def outside_address() -> str:
    """A local IPv4 address that is not loopback (skip the test if the host has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: picks a route, sends nothing
        except OSError:
            pytest.skip("no route off this host")
        address: str = probe.getsockname()[0]
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("no non-loopback address on this host")
    return address


async def test_without_a_secret_only_loopback_peers_are_accepted(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Clark", "Jaquez"], [("Clark", "Jaquez")])) as herd:
        address = outside_address()
        await herd.start_all()
        victim_line = await herd.iamat("Clark", VICTIM, *HONEST)
        for name in herd.names:
            await herd.wait_for(name, VICTIM, victim_line)
        # Clark's own legacy HELLO (all a link needs without a secret), from off-host.
        hello = Hello(b"Clark", b"Jaquez").line()
        try:
            conn = await Conn.open(herd.peer_ports["Jaquez"], address)
        except OSError as exc:
            pytest.skip(f"cannot connect from {address}: {exc}")
        assert await conn.finish(hello + forged_at(b"Clark", 1)) == b""
        await refused_line(herd, "Jaquez", address, "not loopback, and no secret or TLS")
        await assert_victim_unchanged(herd, victim_line, "Jaquez", "off-host", herd.names)


async def test_a_non_neighbour_server_with_the_secret_cannot_link(
    tmp_path: Path, secret: bytes
) -> None:
    with running(Herd.create(tmp_path, secret_env=SECRET_ENV)) as herd:
        # Aaron's own config makes Bailey its neighbour; the herd's does not.
        ports = free_ports(2)
        rogue = Herd(
            herd.root,
            [*herd.names, "Aaron"],
            [*herd.edges, ("Aaron", "Bailey")],
            {**herd.ports, "Aaron": ports[0]},
            {**herd.peer_ports, "Aaron": ports[1]},
            dict(herd.extra),
        )
        herd.start("Aaron", config=rogue.write_config(herd.root / "aaron.toml"))
        # Aaron holds a winning record before the herd is up: any link it got could carry it.
        await (await connect(rogue.ports["Aaron"])).aclose()
        newer = await rogue.iamat("Aaron", VICTIM, FORGED_COORDS, b"4102444800")
        await herd.start_all()
        victim_line = await herd.iamat("Jaquez", VICTIM, *HONEST)
        for name in herd.names:
            await herd.wait_for(name, VICTIM, victim_line)
        await refused_line(herd, "Bailey", "127.0.0.1", "b'Aaron' is not a neighbour allowed")
        await assert_victim_unchanged(herd, victim_line, "Bailey", "rogue server")
        assert await holds(rogue, "Aaron", VICTIM) == newer
        assert " link from Aaron up" not in log_text(herd, "Bailey")
        assert " up " not in log_text(herd, "Aaron")
        assert "internal error" not in log_text(herd, "Aaron")


async def test_rotating_the_secret_keeps_every_link(tmp_path: Path) -> None:
    """docs/security.md's three steps, one server restart at a time, on a triangle.

    Each server has its own config file and keyring, so every mix of neighbouring
    keyrings a rotation passes through ([old]/[old,new], [old,new]/[new,old],
    [new,old]/[new]) is met by a link that must come back up.
    """
    old, new = secrets.token_hex(32).encode(), secrets.token_hex(32).encode()
    names = ["Bona", "Campbell", "Clark"]
    edges = [("Bona", "Campbell"), ("Bona", "Clark"), ("Campbell", "Clark")]
    with running(Herd.create(tmp_path, names, edges)) as herd:
        configs: dict[str, Path] = {}
        for name in names:
            (tmp_path / f"{name}.keys").write_bytes(old + b"\n")
            path = tmp_path / f"{name}.toml"
            configs[name] = herd.write_config(path, keyring_file=f"{name}.keys")
            herd.start(name, config=configs[name])
        await herd.wait_linked()
        probes = iter(range(10, 250))
        steps = [("add", [old, new], old), ("promote", [new, old], new), ("remove", [new], new)]
        for step, keys, chosen in steps:
            for name in names:  # one server at a time, as an operator would
                (tmp_path / f"{name}.keys").write_bytes(b"\n".join(keys) + b"\n")
                await restart(herd, name, configs[name])
                client = f"rotation-{step}-{name}".encode()
                line = await herd.iamat(name, client, b"+1+1", str(time.time()).encode())
                for other in names:
                    await herd.wait_for(other, client, line)
            # On the wire: offered both secrets, an acceptor now picks `chosen`.
            hello = dial_hello("Bona", "Clark", [old, new])
            conn = await Conn.open(herd.peer_ports["Clark"], source(next(probes)))
            await conn.stream.send_all(hello.line())
            answer = parse_accept_hello((await conn.line()).rstrip(b"\n"))
            assert isinstance(answer, AcceptHello)
            assert answer.key_id == key_id(chosen), step
            await conn.stream.aclose()
        # The old secret alone no longer opens a link.
        address = source(next(probes))
        await blind(herd, "Clark", dial_hello("Bona", "Clark", [old]).line(), address, b"")
        await refused_line(herd, "Clark", address, "b'Bona' holds no secret we hold")
        for name in names:  # the herd's servers never refused one another
            assert " refused peer connection from 127.0.0.1:" not in log_text(herd, name)


# --- mutual TLS ----------------------------------------------------------------------


def write_cert(ca: trustme.CA, root: Path, stem: str, *names: str) -> dict[str, str]:
    """A certificate of `ca` for `names` as tls/<stem>.pem and .key; the config keys."""
    (root / "tls").mkdir(exist_ok=True)
    cert = ca.issue_cert(*names, "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(root / "tls" / f"{stem}.pem")
    cert.private_key_pem.write_to_path(root / "tls" / f"{stem}.key")
    return {"tls_cert": f"tls/{stem}.pem", "tls_key": f"tls/{stem}.key"}


def write_ca(ca: trustme.CA, root: Path, stem: str) -> str:
    """`ca`'s certificate as tls/<stem>.pem; the config value."""
    (root / "tls").mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(root / "tls" / f"{stem}.pem")
    return f"tls/{stem}.pem"


def per_server_tls(herd: Herd, ca: trustme.CA) -> dict[str, Path]:
    """One certificate per server, naming it, and one config file per server.

    [herd] has a single tls_cert, so each process gets its own copy of the config
    (docs/security.md: "run each server with its own config file").
    """
    tls_ca = write_ca(ca, herd.root, "herd-ca")
    return {
        name: herd.write_config(
            herd.root / f"{name}.toml", **write_cert(ca, herd.root, name, name), tls_ca=tls_ca
        )
        for name in herd.names
    }


async def tls_connect(
    port: int, address: str, trust: trustme.CA, client: trustme.LeafCert, name: str
) -> Conn:
    """TLS to a peer port from `address`, showing `client`, expecting a certificate of
    `trust` naming `name`. With TLS 1.3 a refused client certificate shows only later."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    trust.configure_trust(context)
    client.configure_cert(context)
    conn = await Conn.open(port, address)
    tls = trio.SSLStream(conn.stream, context, server_hostname=name)
    try:
        with trio.fail_after(DEADLINE):
            await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return Conn(tls)


async def test_mtls_herd_links_and_refuses_certificates_from_another_ca(
    tmp_path: Path, secret: bytes
) -> None:
    with running(Herd.create(tmp_path, secret_env=SECRET_ENV)) as herd:
        ca = trustme.CA()
        configs = per_server_tls(herd, ca)
        for name in herd.names:
            herd.start(name, config=configs[name])
        await herd.wait_linked()
        victim_line = await herd.iamat("Jaquez", VICTIM, *HONEST)
        for name in herd.names:
            await herd.wait_for(name, VICTIM, victim_line)

        # The peer port speaks TLS with Jaquez's own certificate...
        jaquez = herd.peer_ports["Jaquez"]
        holder = ca.issue_cert("Campbell")
        conn = await tls_connect(jaquez, source(10), ca, holder, "Jaquez")
        assert isinstance(conn.stream, trio.SSLStream)
        assert "jaquez" in certificate_names(conn.stream)
        await trio.aclose_forcefully(conn.stream)
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls_connect(jaquez, source(11), ca, holder, "Clark")
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        # ...so a plain-text handshake, even with the secret, gets nowhere;
        hello = dial_hello("Campbell", "Jaquez", [secret])
        assert not (await blind(herd, "Jaquez", hello.line(), source(12), b"")).startswith(b"HE")
        await refused_line(herd, "Jaquez", source(12), "")
        # and a certificate of the herd's CA does not let its holder pose as another server.
        conn = await tls_connect(jaquez, source(13), ca, ca.issue_cert("Bona"), "Jaquez")
        hello = dial_hello("Clark", "Jaquez", [secret])
        assert await conn.finish(hello.line() + forged_at(b"Clark", 13)) == b""
        await refused_line(herd, "Jaquez", source(13), "")
        await assert_victim_unchanged(herd, victim_line, "Jaquez", "wrong name")

        # Clark restarted with a certificate for "Clark" from another CA (it trusts the
        # herd's CA and holds the secret: only its certificate is wrong).
        other = trustme.CA()
        rogue = herd.write_config(
            tmp_path / "Clark-other-ca.toml",
            **write_cert(other, tmp_path, "other-Clark", "Clark"),
            tls_ca=write_ca(ca, tmp_path, "herd-ca"),
        )
        marks = {name: log_size(herd, name) for name in herd.names}
        assert herd.kill("Clark", signal.SIGTERM) == 0
        herd.start("Clark", config=rogue)
        await (await connect(herd.ports["Clark"])).aclose()
        newer = await herd.iamat("Clark", VICTIM, FORGED_COORDS, b"4102444800")
        # Jaquez refuses Clark's certificate; Bona refuses it too, so Clark logs Bona's
        # connection refused.
        await refused_line(herd, "Jaquez", "127.0.0.1", "", since=marks["Jaquez"])
        await refused_line(herd, "Clark", "127.0.0.1", "", since=marks["Clark"])
        honest = [name for name in herd.names if name != "Clark"]
        await assert_victim_unchanged(herd, victim_line, "Bona", "other CA", honest)
        assert await holds(herd, "Clark", VICTIM) == newer
        for name in herd.names:
            text = log_text(herd, name, marks[name])
            assert not re.search(
                r" link (to|from) \w+ up" if name == "Clark" else " Clark up", text
            )


async def start_tls_acceptor(herd: Herd, ca: trustme.CA) -> None:
    """Start only Jaquez of a per-server-certificate herd; wait until it accepts."""
    configs = per_server_tls(herd, ca)
    herd.start("Jaquez", config=configs["Jaquez"])
    await (await connect(herd.ports["Jaquez"])).aclose()


async def test_refusing_a_certificate_from_another_ca_logs_why(
    tmp_path: Path, secret: bytes
) -> None:
    edges = [("Clark", "Jaquez")]
    with running(Herd.create(tmp_path, ["Clark", "Jaquez"], edges, secret_env=SECRET_ENV)) as herd:
        ca, other = trustme.CA(), trustme.CA()
        await start_tls_acceptor(herd, ca)
        rogue = herd.write_config(
            tmp_path / "Clark-other-ca.toml",
            **write_cert(other, tmp_path, "other-Clark", "Clark"),
            tls_ca=write_ca(ca, tmp_path, "herd-ca"),
        )
        herd.start("Clark", config=rogue)
        line = await refused_line(herd, "Jaquez", "127.0.0.1", "")
        assert "certificate" in line, line
        log = await herd.wait_logged("Clark", "link to Jaquez failed (attempt 1)")
        failed = next(ln for ln in log.splitlines() if "link to Jaquez failed" in ln)
        assert "unknown ca" in failed.lower(), failed  # the alert Jaquez sent


async def test_refusing_a_certificate_for_another_name_logs_why(
    tmp_path: Path, secret: bytes
) -> None:
    edges = [("Clark", "Jaquez")]
    with running(Herd.create(tmp_path, ["Clark", "Jaquez"], edges, secret_env=SECRET_ENV)) as herd:
        ca = trustme.CA()
        await start_tls_acceptor(herd, ca)
        # Clark is Jaquez's neighbour, but this certificate names Bona.
        conn = await tls_connect(
            herd.peer_ports["Jaquez"], source(10), ca, ca.issue_cert("Bona"), "Jaquez"
        )
        assert await conn.finish(dial_hello("Clark", "Jaquez", [secret]).line()) == b""
        line = await refused_line(herd, "Jaquez", source(10), "")
        assert "certificate" in line, line


async def test_mtls_with_one_certificate_shared_by_the_herd(tmp_path: Path, secret: bytes) -> None:
    """The single-config setup: one certificate naming every server, in [herd]."""
    ca = trustme.CA()
    names = ["Bona", "Campbell", "Clark"]
    edges = [("Bona", "Campbell"), ("Campbell", "Clark")]
    tls = {"tls_ca": write_ca(ca, tmp_path, "ca"), **write_cert(ca, tmp_path, "herd", *names)}
    with running(Herd.create(tmp_path, names, edges, secret_env=SECRET_ENV, **tls)) as herd:
        await herd.start_all()
        line = await herd.iamat("Bona", b"shared", b"+1+1", str(time.time()).encode())
        for name in names:
            await herd.wait_for(name, b"shared", line)


# --- fuzzing a live server -----------------------------------------------------------

TOKENS = [
    b"IAMAT",
    b"WHATSAT",
    b"WHATISAT",
    b"AT",
    b"HELLO",
    b"herd_trio/1",
    b"Ghost",
    b"Solo",
    b"AUTH",
    b"DIGEST",
    b"PING",
    b"kiwi",
    b"+34.068930-118.445127",
    b"+91+181",
    b"1621464827.959498503",
    b"+0.000000000",
    b"-1.5",
    b"10",
    b"50.0001",
    b"20",
    b"nan",
    b"1e9",
    b"\xff\xfe",
    b"\xc2\xa0",
    b"0" * 40,
]
SEPARATORS = [b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\r", b"\xc2\xa0", b"\x00"]
LEGACY_HELLO = b"HELLO herd_trio/1 Ghost Solo\n"


def protocol_lines(verbs: list[bytes]) -> st.SearchStrategy[bytes]:
    """Lines of a verb and fields (protocol words, junk, hex) with odd separators and
    assorted endings."""
    verb = st.sampled_from(verbs) | st.binary(max_size=8)
    field = (
        st.sampled_from(TOKENS)
        | st.binary(max_size=12)
        | st.binary(max_size=40).map(lambda b: b.hex().encode())
    )
    fields = st.lists(st.tuples(st.sampled_from(SEPARATORS), field), max_size=7)
    line = st.tuples(verb, fields).map(lambda vf: vf[0] + b"".join(s + f for s, f in vf[1]))
    ending = st.sampled_from([b"\n", b"\r\n", b"\r", b""])
    return st.lists(st.tuples(line, ending), max_size=6).map(
        lambda parts: b"".join(text + end for text, end in parts)
    )


RAW = st.binary(max_size=2048)
OVERLONG = st.binary(min_size=1, max_size=16).map(lambda b: b * (10000 // len(b) + 1))
CLIENT_PAYLOADS = st.one_of(
    RAW, protocol_lines([b"IAMAT", b"WHATSAT", b"WHATISAT", b"AT"]), OVERLONG
)
PEER_VERBS = [b"AT", b"DIGEST", b"PING", b"HELLO", b"AUTH"]
DIGESTS = st.binary(min_size=8 * BUCKETS, max_size=8 * BUCKETS).map(
    lambda b: b"DIGEST " + b.hex().encode() + b"\n"
)
PEER_PAYLOADS = st.one_of(
    RAW,
    protocol_lines(PEER_VERBS),
    OVERLONG,
    # Past the handshake: what a neighbour's link may carry.
    st.tuples(
        st.just(LEGACY_HELLO), st.one_of(protocol_lines(PEER_VERBS), DIGESTS, RAW, OVERLONG)
    ).map(b"".join),
)


def expected_questions(payload: bytes) -> bytes | None:
    """What the client port answers to `payload` when none of it is a valid command.

    None where the model does not say (a command word in it, an overlong line, a CR
    ending an unterminated last line, an HTTP-like request line).
    """
    if any(word in payload for word in (b"IAMAT", b"WHATSAT", b"WHATISAT", b"HTTP/")):
        return None
    lines = payload.split(b"\n")
    last = lines.pop()
    if last.endswith(b"\r"):
        return None
    lines = [line.removesuffix(b"\r") for line in lines] + ([last] if last else [])
    if any(len(line) > 4095 for line in lines):
        return None
    return b"".join(b"? " + line + b"\n" for line in lines if line.strip())


def opens_link(payload: bytes) -> bool:
    """True if `payload` starts with the legacy HELLO of Solo's neighbour Ghost."""
    first = payload.split(b"\n", 1)[0]
    return len(first) <= 8192 and first.split() == LEGACY_HELLO.split()


async def throw_at(port: int, payload: bytes, *, half_close: bool) -> bytes:
    """Send `payload` to `port`; all the server answered before closing (or a deadline)."""
    received = bytearray()
    async with await connect(port) as stream:
        with suppress(trio.BrokenResourceError):
            await stream.send_all(payload)
            if half_close:
                await stream.send_eof()
        with trio.move_on_after(DEADLINE if half_close else 0.1) as scope:
            with suppress(trio.BrokenResourceError):  # a reset: it closed with bytes unread
                while chunk := await stream.receive_some():
                    received += chunk
        assert not (half_close and scope.cancelled_caught), "the server never closed"
    return bytes(received)


async def fuzz_once(herd: Herd, client: bytes, peer: bytes, half_close: bool) -> None:
    """Throw `client` at the client port and `peer` at the peer port; check the answers."""
    received = await throw_at(herd.ports["Solo"], client, half_close=half_close)
    expected = expected_questions(client)
    if expected is not None:
        assert received == expected if half_close else expected.startswith(received)
    elif received:
        assert received.startswith((b"? ", b"AT ")), received[:100]

    answer = await throw_at(herd.peer_ports["Solo"], peer, half_close=True)
    if opens_link(peer):  # a neighbour's HELLO is answered, then digests, pings, pongs
        assert answer.startswith(b"HELLO herd_trio/1 Solo Ghost\n"), answer[:200]
        for line in answer.splitlines()[1:]:
            assert line.startswith((b"DIGEST ", b"PING", b"PONG", b"AT ")), line[:100]
    else:  # anything else is refused without a word
        assert answer == b"", answer[:200]


def test_fuzzed_bytes_on_both_ports_leave_the_server_answering(tmp_path: Path) -> None:
    # Ghost (never started) is Solo's neighbour and dials it, so the peer port accepts
    # its legacy HELLO from loopback: fuzzing gets past the handshake into the link.
    with running(Herd.create(tmp_path, ["Ghost", "Solo"], [("Ghost", "Solo")])) as herd:
        herd.start("Solo")

        async def accepting() -> None:
            await (await connect(herd.ports["Solo"], deadline=10)).aclose()

        trio.run(accepting)
        started = time.monotonic()

        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(client=CLIENT_PAYLOADS, peer=PEER_PAYLOADS, half_close=st.booleans())
        @example(b"", LEGACY_HELLO + b"DIGEST\n", True)
        @example(b"", LEGACY_HELLO + b"DIGEST " + b"0" * 16 * BUCKETS + b"\n", True)
        @example(b"", LEGACY_HELLO + b"DIGEST " + b"f" * 16 * BUCKETS + b"\n", True)
        @example(b"", LEGACY_HELLO + b"AT Ghost +0.000000000 fuzzed +1+1 1\nPING\n", True)
        @example(b"", LEGACY_HELLO + b"AT Ghost +0.0 fuzzed +1+1 1\nAT x\n", True)
        @example(b"", LEGACY_HELLO + b"\n" * 3 + b"x" * 9000, True)
        @example(b"", b"HELLO herd_trio/1 Ghost Solo 00 11\n", False)
        @example(
            b"", b"HELLO herd_trio/1 Ghost Solo " + b"0" * 32 + b" " + b"1" * 16 + b"\n", False
        )
        def throw(client: bytes, peer: bytes, half_close: bool) -> None:
            assert herd.running("Solo"), "the server died"  # fail fast, shrink fast
            trio.run(fuzz_once, herd, client, peer, half_close)

        throw()
        assert time.monotonic() - started < 60
        assert herd.running("Solo")

        async def still_answers() -> None:
            when = b"%.9f" % time.time()
            reply = await herd.iamat("Solo", b"after-fuzz", HONEST[0], when)
            match = re.fullmatch(rb"AT Solo ([+-]\d+\.\d{9}) after-fuzz (\S+) (\S+)\n", reply)
            assert match is not None, reply
            assert match.group(2, 3) == (HONEST[0], when)
            assert abs(float(match.group(1))) < 5, reply
            assert await holds(herd, "Solo", b"after-fuzz") == reply

        trio.run(still_answers)


async def test_per_server_certificates_in_one_config(tmp_path: Path, secret: bytes) -> None:
    """`[servers.NAME] tls_cert/tls_key`: each server proves only its own name."""
    ca = trustme.CA()
    names = ["Bona", "Campbell", "Clark"]
    edges = [("Bona", "Campbell"), ("Campbell", "Clark")]
    herd = Herd.create(
        tmp_path, names, edges, secret_env=SECRET_ENV, tls_ca=write_ca(ca, tmp_path, "ca")
    )
    text = herd.config.read_text()
    for name in names:
        own = write_cert(ca, tmp_path, name, name)
        lines = "".join(f'{key} = "{value}"\n' for key, value in own.items())
        text = text.replace(f"[servers.{name}]\n", f"[servers.{name}]\n{lines}")
    herd.config.write_text(text)
    with running(herd):
        await herd.start_all()
        line = await herd.iamat("Bona", b"own.certs", b"+1+1", str(time.time()).encode())
        for name in names:
            await herd.wait_for(name, b"own.certs", line)
        # Bona dials Campbell. A connection presenting Clark's certificate (valid, from
        # the herd's CA) while claiming to be Bona is refused for the name.
        conn = await tls_connect(
            herd.peer_ports["Campbell"], source(20), ca, ca.issue_cert("Clark"), "Campbell"
        )
        assert await conn.finish(dial_hello("Bona", "Campbell", [secret]).line()) == b""
        refused = await refused_line(herd, "Campbell", source(20), "")
        assert "does not name Bona" in refused, refused
