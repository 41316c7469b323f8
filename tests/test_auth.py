"""Peer handshake with a shared secret: HMAC challenge-response, key rotation, refusals."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from herd_trio.auth import (
    MAX_KEYS,
    AcceptHello,
    DialHello,
    HandshakeError,
    Hello,
    Keyring,
    accept_handshake,
    auth_line,
    dial_handshake,
    key_id,
    parse_accept_hello,
    parse_auth,
    parse_dial_hello,
    transcript_mac,
)
from herd_trio.lines import LineReader

MAX_LINE = 4096 + 512  # what links.py gives a peer reader
OLD = b"old-secret-0123456789abcdef"
NEW = b"new-secret-fedcba9876543210"
OTHER = b"someone-elses-secret-000000"
DIALER, ACCEPTOR = b"Bona", b"Clark"  # the name that sorts first dials


class Recording(trio.abc.Stream):
    """A stream that keeps a copy of every byte sent through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class Side:
    """One end of a handshake under test: its stream, reader and how it ended."""

    stream: Recording
    reader: LineReader
    result: bytes | None = None
    error: Exception | None = None

    @classmethod
    def over(cls, stream: trio.abc.Stream) -> Side:
        recording = Recording(stream)
        return cls(recording, LineReader(recording, MAX_LINE))

    async def run(self, handshake: Callable[[Side], Awaitable[bytes | None]]) -> None:
        """Run `handshake`, keep its result or error, and close the stream like a caller."""
        async with self.stream:
            try:
                self.result = await handshake(self)
            except Exception as exc:  # the test asserts which one
                self.error = exc


def allow_only(*names: bytes) -> Callable[[bytes], bool]:
    return lambda name: name in names


async def link(
    dialer: Keyring | None,
    acceptor: Keyring | None,
    *,
    allowed: Callable[[bytes], bool] | None = None,
    peer: bytes = ACCEPTOR,
) -> tuple[Side, Side]:
    """Both ends of one handshake over a memory stream pair, run concurrently."""
    left, right = trio.testing.memory_stream_pair()
    dial, accept = Side.over(left), Side.over(right)

    async def dial_side(side: Side) -> None:
        await dial_handshake(side.stream, side.reader, me=DIALER, peer=peer, keyring=dialer)

    async def accept_side(side: Side) -> bytes:
        return await accept_handshake(
            side.stream,
            side.reader,
            me=ACCEPTOR,
            allowed=allowed or allow_only(DIALER),
            keyring=acceptor,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial.run, dial_side)
        nursery.start_soon(accept.run, accept_side)
    return dial, accept


def ring(*keys: bytes) -> Keyring:
    return Keyring(keys)


# --- success and the wire transcript ------------------------------------------------------


async def test_same_secret_links_up_and_names_the_peer() -> None:
    dial, accept = await link(ring(OLD), ring(OLD))
    assert dial.error is None
    assert accept.error is None
    assert accept.result == DIALER


async def test_transcript_is_three_lines_of_the_documented_shape() -> None:
    keyring = ring(NEW, OLD)
    dial, accept = await link(keyring, keyring)
    ids = b",".join(keyring.ids)
    first, third = bytes(dial.stream.sent).splitlines(keepends=True)
    (second,) = bytes(accept.stream.sent).splitlines(keepends=True)
    assert re.fullmatch(rb"HELLO herd_trio/1 Bona Clark [0-9a-f]{32} " + ids + rb"\n", first)
    assert re.fullmatch(
        rb"HELLO herd_trio/1 Clark Bona [0-9a-f]{32} " + keyring.ids[0] + rb" [0-9a-f]{64}\n",
        second,
    )
    assert re.fullmatch(rb"AUTH [0-9a-f]{64}\n", third)


async def test_nonces_are_fresh_on_every_connection() -> None:
    nonces: set[bytes] = set()
    for _ in range(5):
        dial, accept = await link(ring(OLD), ring(OLD))
        nonces.add(bytes(dial.stream.sent).split()[4])
        nonces.add(bytes(accept.stream.sent).split()[4])
    assert len(nonces) == 10


async def test_lines_after_the_handshake_stay_in_the_reader() -> None:
    left, right = trio.testing.memory_stream_pair()
    keyring = ring(OLD)
    async with left, right:
        dial_reader, accept_reader = LineReader(left, MAX_LINE), LineReader(right, MAX_LINE)

        async def dialer() -> None:
            await dial_handshake(left, dial_reader, me=DIALER, peer=ACCEPTOR, keyring=keyring)
            await left.send_all(b"AT first\nAT second\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dialer)
            peer = await accept_handshake(
                right, accept_reader, me=ACCEPTOR, allowed=allow_only(DIALER), keyring=keyring
            )
        assert peer == DIALER
        assert await accept_reader.receive_line() == b"AT first"
        assert await accept_reader.receive_line() == b"AT second"


async def test_without_a_secret_the_legacy_lines_are_exchanged() -> None:
    dial, accept = await link(None, None)
    assert (dial.error, accept.error, accept.result) == (None, None, DIALER)
    assert bytes(dial.stream.sent) == b"HELLO herd_trio/1 Bona Clark\n"
    assert bytes(accept.stream.sent) == b"HELLO herd_trio/1 Clark Bona\n"


# --- refusals -------------------------------------------------------------------------------


async def test_wrong_secret_is_refused_on_both_sides() -> None:
    dial, accept = await link(ring(OLD), ring(OTHER))
    # The acceptor notices first (no key id in common) and closes without a word;
    # the dialer then sees the connection end.
    assert isinstance(accept.error, HandshakeError)
    assert "holds no secret we hold" in str(accept.error)
    assert accept.stream.sent == b""
    assert isinstance(dial.error, HandshakeError)
    assert "closed the connection during the handshake" in str(dial.error)
    assert accept.result is None


async def test_an_acceptor_proof_under_another_key_is_refused_and_no_auth_is_sent() -> None:
    """A fake acceptor knows the dialer's key id (public) but not the secret behind it."""
    keyring = ring(OLD)

    async def fake_acceptor(side: Side) -> None:
        hello = parse_dial_hello(await side.reader.receive_line())
        assert isinstance(hello, DialHello)
        nonce = bytes(16)
        mac = transcript_mac(OTHER, "accept", hello, nonce, hello.key_ids[0])
        await side.stream.send_all(
            AcceptHello(ACCEPTOR, DIALER, nonce, hello.key_ids[0], mac).line()
        )
        assert await side.reader.receive_line() is None  # the dialer hung up, no AUTH

    dial = await script_against_dialer(keyring, fake_acceptor)
    assert isinstance(dial.error, HandshakeError)
    assert "proof from b'Clark' does not verify" in str(dial.error)
    assert b"AUTH" not in dial.stream.sent


async def test_an_auth_under_another_key_is_refused() -> None:
    keyring = ring(OLD)

    async def fake_dialer(side: Side) -> None:
        hello = DialHello(DIALER, ACCEPTOR, bytes(16), keyring.ids)  # ids are public
        await side.stream.send_all(hello.line())
        reply = parse_accept_hello(await side.reader.receive_line())
        assert isinstance(reply, AcceptHello)
        mac = transcript_mac(OTHER, "dial", hello, reply.nonce, reply.key_id)
        await side.stream.send_all(auth_line(mac))

    accept = await script_against_acceptor(keyring, fake_dialer)
    assert isinstance(accept.error, HandshakeError)
    assert "AUTH from b'Bona' does not verify" in str(accept.error)


async def test_a_peer_that_is_not_an_allowed_neighbour_is_refused_before_any_mac() -> None:
    dial, accept = await link(ring(OLD), ring(OLD), allowed=allow_only(b"Jaquez"))
    assert isinstance(accept.error, HandshakeError)
    assert str(accept.error) == "b'Bona' is not a neighbour allowed to link here"
    assert accept.stream.sent == b""  # nothing computed, nothing sent
    assert isinstance(dial.error, HandshakeError)


async def test_not_allowed_also_without_a_secret() -> None:
    dial, accept = await link(None, None, allowed=allow_only(b"Jaquez"))
    assert isinstance(accept.error, HandshakeError)
    assert "not a neighbour" in str(accept.error)
    assert isinstance(dial.error, HandshakeError)


async def test_a_hello_addressed_to_another_server_is_refused() -> None:
    dial, accept = await link(ring(OLD), ring(OLD), peer=b"Jaquez")
    assert isinstance(accept.error, HandshakeError)
    assert str(accept.error) == "HELLO addressed to b'Jaquez', not to us"
    assert isinstance(dial.error, HandshakeError)


async def test_an_answer_from_another_server_is_refused() -> None:
    keyring = ring(OLD)

    async def impostor(side: Side) -> None:
        hello = parse_dial_hello(await side.reader.receive_line())
        assert isinstance(hello, DialHello)
        nonce, ident = bytes(16), hello.key_ids[0]
        mac = transcript_mac(OLD, "accept", hello, nonce, ident)  # even with the secret
        await side.stream.send_all(AcceptHello(b"Jaquez", DIALER, nonce, ident, mac).line())

    dial = await script_against_dialer(keyring, impostor)
    assert isinstance(dial.error, HandshakeError)
    assert str(dial.error) == "HELLO from b'Jaquez', expected b'Clark'"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"GET / HTTP/1.1",
        b"HELLO herd_trio/2 Bona Clark",
        b"HELLO herd_trio/1 Bona",
        b"HELLO herd_trio/1 Bona Clark 00",
        b"HELLO herd_trio/1 Bona Clark " + b"0" * 32 + b" " + b"g" * 16,
        b"HELLO herd_trio/1 Bona Clark " + b"A" * 32 + b" " + b"0" * 16,  # uppercase hex
    ],
)
async def test_garbage_instead_of_hello_is_refused(line: bytes) -> None:
    async def garbage(side: Side) -> None:
        await side.stream.send_all(line + b"\n")

    accept = await script_against_acceptor(ring(OLD), garbage)
    assert isinstance(accept.error, HandshakeError)
    assert accept.stream.sent == b""


# --- replay and reflection --------------------------------------------------------------------


async def test_a_replayed_dialer_transcript_is_refused() -> None:
    keyring = ring(OLD)
    recorded, accept = await link(keyring, keyring)
    assert accept.result == DIALER
    transcript = bytes(recorded.stream.sent)

    async def replay(side: Side) -> None:
        await side.stream.send_all(transcript)  # HELLO and AUTH, byte for byte
        await side.reader.receive_line()  # the new acceptor's fresh challenge

    accept = await script_against_acceptor(keyring, replay)
    assert isinstance(accept.error, HandshakeError)
    assert "AUTH from b'Bona' does not verify" in str(accept.error)
    assert accept.result is None


async def test_a_replayed_acceptor_transcript_is_refused() -> None:
    keyring = ring(OLD)
    _, recorded = await link(keyring, keyring)
    transcript = bytes(recorded.stream.sent)

    async def replay(side: Side) -> None:
        await side.reader.receive_line()  # the dialer's fresh nonce: ignored
        await side.stream.send_all(transcript)

    dial = await script_against_dialer(keyring, replay)
    assert isinstance(dial.error, HandshakeError)
    assert "proof from b'Clark' does not verify" in str(dial.error)
    assert b"AUTH" not in dial.stream.sent


async def test_reflecting_the_acceptors_own_mac_is_refused() -> None:
    """The acceptor's MAC covers exactly the AUTH transcript; only the role label differs."""
    keyring = ring(OLD)

    async def reflect(side: Side) -> None:
        await side.stream.send_all(DialHello(DIALER, ACCEPTOR, bytes(16), keyring.ids).line())
        reply = parse_accept_hello(await side.reader.receive_line())
        assert isinstance(reply, AcceptHello)
        await side.stream.send_all(auth_line(reply.mac))

    accept = await script_against_acceptor(keyring, reflect)
    assert isinstance(accept.error, HandshakeError)
    assert "AUTH from b'Bona' does not verify" in str(accept.error)


def test_role_labels_make_the_two_macs_differ() -> None:
    hello = DialHello(DIALER, ACCEPTOR, bytes(16), (key_id(OLD),))
    nonce = bytes(range(16))
    dial = transcript_mac(OLD, "dial", hello, nonce, key_id(OLD))
    accept = transcript_mac(OLD, "accept", hello, nonce, key_id(OLD))
    assert dial != accept


def test_names_cannot_be_shifted_between_fields() -> None:
    """Length prefixes: ("a\\0b", "c") and ("a", "b\\0c") are different transcripts."""
    nonce = bytes(16)
    one = DialHello(b"a\0b", b"c", nonce, (key_id(OLD),))
    two = DialHello(b"a", b"b\0c", nonce, (key_id(OLD),))
    assert transcript_mac(OLD, "dial", one, nonce, key_id(OLD)) != transcript_mac(
        OLD, "dial", two, nonce, key_id(OLD)
    )


def test_wire_format_known_answers() -> None:
    """Pinned values: a change here breaks interoperation with deployed servers."""
    key = b"0123456789abcdef"
    assert (
        key_id(key)
        == hmac.new(key, b"herd_trio/1 key id", hashlib.sha256).hexdigest()[:16].encode()
    )
    hello = DialHello(b"Bona", b"Clark", bytes(16), (key_id(key),))
    message = b"".join(
        len(part).to_bytes(4, "big") + part
        for part in (
            b"herd_trio/1 dial",
            b"Bona",
            b"Clark",
            bytes(16),
            bytes(range(16)),
            key_id(key),
            key_id(key),
        )
    )
    expected = hmac.new(key, message, hashlib.sha256).digest()
    dial = transcript_mac(key, "dial", hello, bytes(range(16)), key_id(key))
    accept = transcript_mac(key, "accept", hello, bytes(range(16)), key_id(key))
    assert dial == expected
    assert key_id(key) == b"155b5bf33b6672f1"
    assert dial.hex() == "45b1fd6e950e718addf187bc68433d6714ee99b4adbe1e54a2f8f19d1c691153"
    assert accept.hex() == "25c7e4abbb706f2e97b2bef924b7b0beef9f8cca3a64c6be2bc71df04c7bfe19"


# --- misconfiguration: secret on one side only -----------------------------------------------


async def test_a_secret_acceptor_refuses_a_legacy_dialer_and_says_why() -> None:
    dial, accept = await link(None, ring(OLD))
    assert isinstance(accept.error, HandshakeError)
    assert str(accept.error) == (
        "b'Bona' sent an unauthenticated HELLO, but a secret is configured here:"
        " configure the same one on it"
    )
    assert accept.stream.sent == b""
    assert isinstance(dial.error, HandshakeError)


async def test_an_acceptor_without_a_secret_refuses_a_nonce_and_says_why() -> None:
    dial, accept = await link(ring(OLD), None)
    assert isinstance(accept.error, HandshakeError)
    assert str(accept.error) == (
        "b'Bona' authenticates with a secret, but no secret is configured here"
        " (set the same secret_env or keyring_file)"
    )
    assert accept.stream.sent == b""
    assert isinstance(dial.error, HandshakeError)
    assert "it refused us" in str(dial.error)


async def test_a_legacy_dialer_refuses_an_authenticated_answer() -> None:
    async def answer_with_a_mac(side: Side) -> None:
        await side.reader.receive_line()
        hello = DialHello(DIALER, ACCEPTOR, bytes(16), (key_id(OLD),))
        mac = transcript_mac(OLD, "accept", hello, bytes(16), key_id(OLD))
        await side.stream.send_all(
            AcceptHello(ACCEPTOR, DIALER, bytes(16), key_id(OLD), mac).line()
        )

    dial = await script_against_dialer(None, answer_with_a_mac)
    assert isinstance(dial.error, HandshakeError)
    assert "no secret is configured here" in str(dial.error)


async def test_a_secret_dialer_refuses_a_legacy_answer() -> None:
    async def legacy(side: Side) -> None:
        await side.reader.receive_line()
        await side.stream.send_all(Hello(ACCEPTOR, DIALER).line())

    dial = await script_against_dialer(ring(OLD), legacy)
    assert isinstance(dial.error, HandshakeError)
    assert str(dial.error) == (
        "b'Clark' did not authenticate, but a secret is configured here:"
        " configure the same one on it"
    )


# --- deadlines (the caller's) -------------------------------------------------------------------


async def test_a_silent_dialer_hits_the_callers_deadline_at_exactly_two_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    async with left, right:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError), trio.fail_after(2):
            await accept_handshake(
                right,
                LineReader(right, MAX_LINE),
                me=ACCEPTOR,
                allowed=allow_only(DIALER),
                keyring=ring(OLD),
            )
        assert trio.current_time() - start == 2


async def test_a_dialer_that_stops_before_auth_hits_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keyring = ring(OLD)
    left, right = trio.testing.memory_stream_pair()
    async with left, right:
        await left.send_all(DialHello(DIALER, ACCEPTOR, bytes(16), keyring.ids).line())
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError), trio.fail_after(2):
            await accept_handshake(
                right,
                LineReader(right, MAX_LINE),
                me=ACCEPTOR,
                allowed=allow_only(DIALER),
                keyring=keyring,
            )
        assert trio.current_time() - start == 2


async def test_a_silent_acceptor_hits_the_dialers_deadline_at_exactly_two_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    async with left, right:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError), trio.fail_after(2):
            await dial_handshake(
                left, LineReader(left, MAX_LINE), me=DIALER, peer=ACCEPTOR, keyring=ring(OLD)
            )
        assert trio.current_time() - start == 2


# --- rotation --------------------------------------------------------------------------------

# The three steps: add NEW as a second secret everywhere, make it the first everywhere,
# drop OLD everywhere. Servers move one at a time, so any two of these may meet.
STEPS = {
    "0:[old]": (OLD,),
    "1:[old,new]": (OLD, NEW),
    "2:[new,old]": (NEW, OLD),
    "3:[new]": (NEW,),
}


@pytest.mark.parametrize("acceptor", list(STEPS))
@pytest.mark.parametrize("dialer", list(STEPS))
async def test_rotation_matrix_links_exactly_when_keyrings_overlap(
    dialer: str, acceptor: str
) -> None:
    dial, accept = await link(Keyring(STEPS[dialer]), Keyring(STEPS[acceptor]))
    overlap = bool(set(STEPS[dialer]) & set(STEPS[acceptor]))
    assert (accept.result == DIALER) is overlap
    assert (dial.error is None) is overlap
    assert (accept.error is None) is overlap


@pytest.mark.parametrize(
    ("first", "second"),
    [((NEW, OLD), (OLD,)), ((OLD, NEW), (NEW,))],
    ids=["[new,old]-vs-[old]", "[old,new]-vs-[new]"],
)
async def test_skipped_steps_still_link_while_a_secret_is_shared(
    first: tuple[bytes, ...], second: tuple[bytes, ...]
) -> None:
    for dialer, acceptor in ((first, second), (second, first)):
        dial, accept = await link(Keyring(dialer), Keyring(acceptor))
        assert (dial.error, accept.error, accept.result) == (None, None, DIALER)


async def test_the_acceptor_prefers_its_first_shared_secret() -> None:
    _, accept = await link(ring(OLD, NEW), ring(NEW, OLD))
    assert accept.result == DIALER
    assert bytes(accept.stream.sent).split()[5] == key_id(NEW)


# --- the secret stays home ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialer", "acceptor"),
    [((OLD,), (OLD,)), ((NEW, OLD), (OLD, NEW)), ((OLD,), (OTHER,)), ((OLD,), ())],
)
async def test_no_secret_is_ever_written_to_the_stream_or_an_error(
    dialer: tuple[bytes, ...], acceptor: tuple[bytes, ...]
) -> None:
    dial, accept = await link(Keyring(dialer), Keyring(acceptor) if acceptor else None)
    said = bytes(dial.stream.sent) + bytes(accept.stream.sent)
    said += str(dial.error).encode() + str(accept.error).encode()
    assert said.strip()
    for secret in {*dialer, *acceptor}:
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in said
            assert form.lower() not in said.lower()


def test_keyring_repr_shows_ids_not_secrets() -> None:
    keyring = ring(NEW, OLD)
    text = repr(keyring)
    assert OLD.decode() not in text
    assert NEW.decode() not in text
    assert key_id(NEW).decode() in text


# --- message parsing (pure) ----------------------------------------------------------------------

NAMES = st.from_regex(rb"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
TOKENS = st.one_of(
    st.sampled_from([b"HELLO", b"herd_trio/1", b"AUTH", b"Bona", b"Clark", b"0" * 16, b"f" * 32]),
    st.sampled_from([b"a" * 64, b",".join([b"1" * 16] * 3), b",", b"\xff", b"\x00"]),
    st.binary(max_size=70),
)
LINES = st.one_of(st.binary(max_size=300), st.lists(TOKENS, max_size=8).map(b" ".join))


@given(LINES)
def test_parsers_never_crash(line: bytes) -> None:
    for parse in (parse_dial_hello, parse_accept_hello, parse_auth):
        with contextlib.suppress(HandshakeError):
            parse(line)


@given(NAMES, NAMES)
def test_legacy_hello_round_trips(sender: bytes, receiver: bytes) -> None:
    line = Hello(sender, receiver).line()
    assert parse_dial_hello(line.rstrip(b"\n")) == Hello(sender, receiver)
    assert parse_accept_hello(line.rstrip(b"\n")) == Hello(sender, receiver)


@given(
    NAMES,
    NAMES,
    st.binary(min_size=16, max_size=16),
    st.lists(st.binary(min_size=16, max_size=32), min_size=1, max_size=MAX_KEYS, unique=True),
)
def test_dial_hello_round_trips(
    sender: bytes, receiver: bytes, nonce: bytes, keys: list[bytes]
) -> None:
    hello = DialHello(sender, receiver, nonce, tuple(key_id(k) for k in keys))
    assert parse_dial_hello(hello.line().rstrip(b"\n")) == hello


@given(NAMES, NAMES, st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32))
def test_accept_hello_and_auth_round_trip(
    sender: bytes, receiver: bytes, nonce: bytes, mac: bytes
) -> None:
    reply = AcceptHello(sender, receiver, nonce, key_id(OLD), mac)
    assert parse_accept_hello(reply.line().rstrip(b"\n")) == reply
    assert parse_auth(auth_line(mac).rstrip(b"\n")) == mac


def test_end_of_stream_is_a_handshake_error() -> None:
    for parse in (parse_dial_hello, parse_accept_hello, parse_auth):
        with pytest.raises(HandshakeError, match="closed the connection"):
            parse(None)


def test_too_many_key_ids_are_refused() -> None:
    ids = b",".join([b"0" * 16] * (MAX_KEYS + 1))
    with pytest.raises(HandshakeError, match="malformed key ids"):
        parse_dial_hello(b"HELLO herd_trio/1 Bona Clark " + b"0" * 32 + b" " + ids)


def test_error_messages_escape_and_bound_untrusted_bytes() -> None:
    with pytest.raises(HandshakeError) as info:
        parse_dial_hello(b"\x1b[31mHELLO" + b"x" * 5000)
    message = str(info.value)
    assert "\x1b" not in message
    assert len(message) < 200


# --- keyrings from text ---------------------------------------------------------------------------


def refusal(make: Callable[[], Keyring]) -> str:
    """The ValueError message of building a keyring that must be refused."""
    try:
        make()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("accepted")


def test_keyring_file_skips_comments_and_blanks_and_keeps_order() -> None:
    text = b"# rotated 2024-05: new first\r\n\n  " + NEW + b"  \r\n   # old, drop soon\n" + OLD
    keyring = Keyring.parse(text)
    assert keyring.keys == (NEW, OLD)
    assert keyring.keys[0] == NEW


NINE = b"\n".join(b"%016d-secret" % n for n in range(MAX_KEYS + 1))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "'keys' holds no secret"),
        (b"# only a comment\n\n   \n", "'keys' holds no secret"),
        (OLD + b"\nshort-secret\n", "'keys' line 2: secret shorter than 16 bytes"),
        (OLD + b"\n" + NEW + b"\n" + OLD + b"\n", "'keys' line 3: repeats an earlier secret"),
        (NINE, "'keys' holds 9 secrets; at most 8"),
        (b"# new\n" + OLD + b"\n\nshort\n", "'keys' line 4: secret shorter than 16 bytes"),
    ],
)
def test_bad_keyring_files_are_refused_without_showing_secrets(text: bytes, message: str) -> None:
    assert refusal(lambda: Keyring.parse(text, source="'keys'")) == message


def test_one_secret_is_kept_verbatim_but_for_surrounding_space() -> None:
    keyring = Keyring.from_secret(" a,secret with, commas \n", source="$HERD_SECRET")
    assert keyring == Keyring((b"a,secret with, commas",))
    assert refusal(lambda: Keyring.from_secret("  short  ", source="$HERD_SECRET")) == (
        "$HERD_SECRET: secret shorter than 16 bytes"
    )


def test_a_keyring_must_hold_long_distinct_secrets() -> None:
    """The constructor, parse and from_secret share one check (check_keys)."""
    assert refusal(lambda: Keyring(())) == "keyring holds no secret"
    assert refusal(lambda: Keyring((OLD, b"x" * 15))) == (
        "keyring secret 2: secret shorter than 16 bytes"
    )
    assert refusal(lambda: Keyring((OLD, OLD))) == "keyring secret 2: repeats an earlier secret"
    assert refusal(lambda: Keyring(tuple(NINE.split()))) == "keyring holds 9 secrets; at most 8"


# --- helpers that script one side ----------------------------------------------------------------


async def run_script(side: Side, script: Callable[[Side], Awaitable[None]]) -> None:
    """Play an attacker or broken peer; its own failures fail the test."""
    async with side.stream:
        await script(side)


async def script_against_acceptor(
    keyring: Keyring | None, script: Callable[[Side], Awaitable[None]]
) -> Side:
    """Run a real acceptor against a scripted dialer; return the acceptor's side."""
    left, right = trio.testing.memory_stream_pair()
    fake, accept = Side.over(left), Side.over(right)

    async def accept_side(side: Side) -> bytes:
        return await accept_handshake(
            side.stream, side.reader, me=ACCEPTOR, allowed=allow_only(DIALER), keyring=keyring
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept.run, accept_side)
        nursery.start_soon(run_script, fake, script)
    return accept


async def script_against_dialer(
    keyring: Keyring | None, script: Callable[[Side], Awaitable[None]]
) -> Side:
    """Run a real dialer against a scripted acceptor; return the dialer's side."""
    left, right = trio.testing.memory_stream_pair()
    dial, fake = Side.over(left), Side.over(right)

    async def dial_side(side: Side) -> None:
        await dial_handshake(side.stream, side.reader, me=DIALER, peer=ACCEPTOR, keyring=keyring)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial.run, dial_side)
        nursery.start_soon(run_script, fake, script)
    return dial
