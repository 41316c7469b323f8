"""Peer link handshake: prove knowledge of a shared secret, never send it.

Three lines, once per connection, before any AT line (D dials, A accepts):

    D -> A   HELLO herd_trio/1 <D> <A> <nonceD> <key ids D holds, comma-separated>
    A -> D   HELLO herd_trio/1 <A> <D> <nonceA> <key id> <macA>
    D -> A   AUTH <macD>

Nonces are 16 random bytes from `secrets`, key ids 8 bytes, MACs HMAC-SHA256; all
lowercase hex on the wire. Both MACs cover the same transcript (both names, both
nonces, the key ids D offered, the key id A chose) under a label naming the role
that signs: a MAC made as acceptor never verifies as a dialer's (no reflection), and
each side's MAC covers the other side's fresh nonce (no replay). D checks macA before
it sends macD, so a fake acceptor learns nothing it could use.

Key ids exist for rotation. A keyring holds several secrets; a key id is a one-way
function of one secret (an HMAC of a constant), so the acceptor can pick a secret
both sides hold without either revealing it: any two keyrings that share a secret
link up, whatever their order. Signing with a fixed "primary" would not do that: a
server at [new, old] would sign with `new`, which a server still at [old] cannot check.

With no keyring on either side, the legacy lines `HELLO herd_trio/1 <D> <A>` and
`HELLO herd_trio/1 <A> <D>` are exchanged (what links.py has always sent). A server
with a keyring refuses them; a server without one refuses an authenticated HELLO,
and both say why (misconfiguration, not an attack, is the usual cause).

Deadlines belong to the caller (links.py applies HANDSHAKE_DEADLINE with fail_after).
Parsing is pure (bytes in, records or HandshakeError out) so it is tested without I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import attrs
import trio

from herd_trio.lines import LineReader

VERSION = b"herd_trio/1"
NONCE_BYTES = 16  # 128 bits: a repeat is never expected, so a fresh nonce defeats replay
KEY_ID_BYTES = 8  # enough to tell a few keys apart; a collision only costs a failed MAC
MIN_SECRET_BYTES = 16  # MACs go to anyone who connects: a short secret is open to guessing
MAX_KEYS = 8  # rotation needs two or three; a bound keeps HELLO lines and checks small
_NONCE = re.compile(rb"[0-9a-f]{%d}" % (2 * NONCE_BYTES))
_KEY_ID = re.compile(rb"[0-9a-f]{%d}" % (2 * KEY_ID_BYTES))
_MAC = re.compile(rb"[0-9a-f]{%d}" % (2 * hashlib.sha256().digest_size))
_KEY_ID_LABEL = b"herd_trio/1 key id"

Role = Literal["dial", "accept"]


class HandshakeError(Exception):
    """The peer handshake failed; the message says why and never holds a secret."""


def _show(value: bytes) -> str:
    """An untrusted wire value, escaped and bounded, for an error message."""
    return repr(value[:64]) + ("..." if len(value) > 64 else "")


def key_id(key: bytes) -> bytes:
    """The public id of a secret, as hex: it names the secret without revealing it."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[: 2 * KEY_ID_BYTES].encode()


def check_keys(keys: Sequence[bytes], source: str = "keyring", lines: Sequence[int] = ()) -> None:
    """ValueError naming the first unusable secret by its place, never by its value.

    Every way to build a keyring (a file, one environment variable, the constructor)
    goes through here. `lines` gives each key's line number in `source`, if it has one.
    """
    if not keys:
        raise ValueError(f"{source} holds no secret")
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{source} holds {len(keys)} secrets; at most {MAX_KEYS}")
    for index, key in enumerate(keys):
        if lines:
            where = f"{source} line {lines[index]}"
        else:
            where = f"{source} secret {index + 1}" if len(keys) > 1 else source
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"{where}: secret shorter than {MIN_SECRET_BYTES} bytes")
        if key in keys[:index]:
            raise ValueError(f"{where}: repeats an earlier secret")


def _check_keys(_instance: object, _attribute: object, keys: tuple[bytes, ...]) -> None:
    check_keys(keys)


@attrs.frozen(repr=False)
class Keyring:
    """The secrets a server accepts from peers, its preferred one first.

    Any two keyrings that share a secret authenticate each other; the order only
    decides which shared secret an acceptor picks. The repr shows key ids, never keys.
    """

    keys: tuple[bytes, ...] = attrs.field(validator=_check_keys)
    ids: tuple[bytes, ...] = attrs.field(init=False, eq=False)

    @ids.default
    def _ids(self) -> tuple[bytes, ...]:
        return tuple(key_id(key) for key in self.keys)

    def __repr__(self) -> str:
        return f"Keyring(ids={[i.decode() for i in self.ids]})"

    def choose(self, offered: Iterable[bytes]) -> tuple[bytes, bytes] | None:
        """(key id, secret) of our first secret whose id is in `offered`; None if none is."""
        wanted = set(offered)
        for ident, key in zip(self.ids, self.keys, strict=True):
            if ident in wanted:
                return ident, key
        return None

    def find(self, ident: bytes) -> bytes | None:
        """The secret with key id `ident`, or None."""
        found = self.choose([ident])
        return None if found is None else found[1]

    @classmethod
    def parse(cls, text: bytes, *, source: str = "keyring") -> Keyring:
        """A keyring from file contents: one secret per line, the first one preferred.

        Surrounding white space is dropped; blank lines and lines starting with `#`
        are skipped. ValueError names the line, never the secret on it.
        """
        keys: list[bytes] = []
        lines: list[int] = []
        for number, raw in enumerate(text.split(b"\n"), 1):
            line = raw.strip()
            if line and not line.startswith(b"#"):
                keys.append(line)
                lines.append(number)
        check_keys(keys, source, lines)
        return cls(tuple(keys))

    @classmethod
    def from_secret(cls, value: str, *, source: str = "secret") -> Keyring:
        """A keyring of ONE secret given as text (an environment variable's value).

        Surrounding white space is dropped; no separator is recognised, so any other
        byte may be part of the secret. ValueError names `source`, never the secret.
        """
        secret = os.fsencode(value).strip()  # os.environ decodes with surrogateescape
        check_keys((secret,), source)
        return cls((secret,))


# --- messages: pure parsing and formatting -------------------------------------------


@attrs.frozen
class Hello:
    """The unauthenticated HELLO, both directions: `HELLO herd_trio/1 <from> <to>`."""

    sender: bytes
    receiver: bytes

    def line(self) -> bytes:
        """The line on the wire."""
        return b"HELLO %s %s %s\n" % (VERSION, self.sender, self.receiver)


@attrs.frozen
class DialHello:
    """The dialer's challenge: its nonce and the ids of the secrets it holds."""

    sender: bytes
    receiver: bytes
    nonce: bytes  # raw bytes
    key_ids: tuple[bytes, ...]

    def line(self) -> bytes:
        """The line on the wire."""
        ids = b",".join(self.key_ids)
        return b"HELLO %s %s %s %s %s\n" % (
            VERSION,
            self.sender,
            self.receiver,
            self.nonce.hex().encode(),
            ids,
        )


@attrs.frozen
class AcceptHello:
    """The acceptor's answer: its nonce, the secret it chose, and its proof."""

    sender: bytes
    receiver: bytes
    nonce: bytes  # raw bytes
    key_id: bytes
    mac: bytes  # raw bytes

    def line(self) -> bytes:
        """The line on the wire."""
        return b"HELLO %s %s %s %s %s %s\n" % (
            VERSION,
            self.sender,
            self.receiver,
            self.nonce.hex().encode(),
            self.key_id,
            self.mac.hex().encode(),
        )


def auth_line(mac: bytes) -> bytes:
    """The dialer's proof on the wire."""
    return b"AUTH %s\n" % mac.hex().encode()


def _fields(line: bytes | None, counts: Sequence[int]) -> list[bytes]:
    if line is None:
        raise HandshakeError("peer closed the connection during the handshake")
    fields = line.split()
    if not fields or fields[0] != b"HELLO":
        raise HandshakeError(f"expected HELLO, got {_show(line)}")
    if len(fields) < 2 or fields[1] != VERSION:
        raise HandshakeError(f"unsupported handshake version in {_show(line)}")
    if len(fields) not in counts:
        raise HandshakeError(f"malformed HELLO {_show(line)}")
    return fields


def _hex(field: bytes, pattern: re.Pattern[bytes], what: str) -> bytes:
    if not pattern.fullmatch(field):
        raise HandshakeError(f"malformed {what} {_show(field)}")
    return bytes.fromhex(field.decode("ascii"))


def parse_dial_hello(line: bytes | None) -> Hello | DialHello:
    """The dialer's first line (None: the stream ended); HandshakeError if malformed."""
    fields = _fields(line, (4, 6))
    if len(fields) == 4:
        return Hello(fields[2], fields[3])
    ids = tuple(fields[5].split(b","))
    if len(ids) > MAX_KEYS or not all(_KEY_ID.fullmatch(i) for i in ids):
        raise HandshakeError(f"malformed key ids {_show(fields[5])}")
    return DialHello(fields[2], fields[3], _hex(fields[4], _NONCE, "nonce"), ids)


def parse_accept_hello(line: bytes | None) -> Hello | AcceptHello:
    """The acceptor's answer (None: the stream ended); HandshakeError if malformed."""
    fields = _fields(line, (4, 7))
    if len(fields) == 4:
        return Hello(fields[2], fields[3])
    if not _KEY_ID.fullmatch(fields[5]):
        raise HandshakeError(f"malformed key id {_show(fields[5])}")
    nonce = _hex(fields[4], _NONCE, "nonce")
    return AcceptHello(fields[2], fields[3], nonce, fields[5], _hex(fields[6], _MAC, "MAC"))


def parse_auth(line: bytes | None) -> bytes:
    """The raw MAC from the dialer's AUTH line (None: the stream ended)."""
    if line is None:
        raise HandshakeError("peer closed the connection before AUTH")
    fields = line.split()
    if len(fields) != 2 or fields[0] != b"AUTH":
        raise HandshakeError(f"expected AUTH <mac>, got {_show(line)}")
    return _hex(fields[1], _MAC, "MAC")


def transcript_mac(key: bytes, role: Role, hello: DialHello, nonce: bytes, chosen: bytes) -> bytes:
    """HMAC-SHA256 by `role` over the whole handshake: both names, nonces and key ids.

    Fields are length-prefixed, so no two different transcripts give the same input
    (names are arbitrary non-space bytes and could hold any separator).
    """
    parts = (
        b"herd_trio/1 " + role.encode(),
        hello.sender,
        hello.receiver,
        hello.nonce,
        nonce,
        b",".join(hello.key_ids),
        chosen,
    )
    message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
    return hmac.new(key, message, hashlib.sha256).digest()


# --- the handshake over a stream ------------------------------------------------------

_NO_SECRET_HERE = "but no secret is configured here (set the same secret_env or keyring_file)"
_SECRET_HERE = "but a secret is configured here: configure the same one on it"


async def dial_handshake(
    stream: trio.abc.SendStream,
    reader: LineReader,
    *,
    me: bytes,
    peer: bytes,
    keyring: Keyring | None,
) -> None:
    """Introduce ourselves to `peer` over a connection we dialled; authenticate it.

    Returns once `peer` has proved the secret (or, with no keyring, said HELLO). The
    reader keeps whatever the peer sent after its HELLO. Raises HandshakeError, the
    reader's LineTooLong and the stream's errors; closes nothing (the caller owns
    `stream`) and sets no deadline (the caller wraps the call in fail_after).
    """
    if keyring is None:
        await stream.send_all(Hello(me, peer).line())
        reply = parse_accept_hello(_refused_if_none(await reader.receive_line(), peer))
        _check_names(reply, sender=peer, receiver=me)
        if isinstance(reply, AcceptHello):
            raise HandshakeError(f"{_show(peer)} authenticates with a secret, {_NO_SECRET_HERE}")
        return
    hello = DialHello(me, peer, secrets.token_bytes(NONCE_BYTES), keyring.ids)
    await stream.send_all(hello.line())
    reply = parse_accept_hello(_refused_if_none(await reader.receive_line(), peer))
    _check_names(reply, sender=peer, receiver=me)
    if not isinstance(reply, AcceptHello):
        raise HandshakeError(f"{_show(peer)} did not authenticate, {_SECRET_HERE}")
    key = keyring.find(reply.key_id)
    if key is None:
        raise HandshakeError(f"{_show(peer)} chose key id {_show(reply.key_id)}, not one we hold")
    expected = transcript_mac(key, "accept", hello, reply.nonce, reply.key_id)
    if not hmac.compare_digest(reply.mac, expected):
        raise HandshakeError(
            f"proof from {_show(peer)} does not verify (it does not hold the secret it named,"
            " or the answer was tampered with)"
        )
    await stream.send_all(auth_line(transcript_mac(key, "dial", hello, reply.nonce, reply.key_id)))


async def accept_handshake(
    stream: trio.abc.SendStream,
    reader: LineReader,
    *,
    me: bytes,
    allowed: Callable[[bytes], bool],
    keyring: Keyring | None,
) -> bytes:
    """Authenticate a peer that dialled us; return its name.

    `allowed(name)` says whether `name` may link here (a neighbour that dials us); it
    is asked before anything secret is computed. The reader keeps whatever the peer
    sent after its AUTH (or legacy HELLO). Raises HandshakeError, the reader's
    LineTooLong and the stream's errors; closes nothing and sets no deadline.
    """
    hello = parse_dial_hello(await reader.receive_line())
    if hello.receiver != me:
        raise HandshakeError(f"HELLO addressed to {_show(hello.receiver)}, not to us")
    peer = hello.sender
    if not allowed(peer):
        raise HandshakeError(f"{_show(peer)} is not a neighbour allowed to link here")
    if keyring is None:
        if isinstance(hello, DialHello):
            raise HandshakeError(f"{_show(peer)} authenticates with a secret, {_NO_SECRET_HERE}")
        await stream.send_all(Hello(me, peer).line())
        return peer
    if not isinstance(hello, DialHello):
        raise HandshakeError(f"{_show(peer)} sent an unauthenticated HELLO, {_SECRET_HERE}")
    chosen = keyring.choose(hello.key_ids)
    if chosen is None:
        theirs = ",".join(i.decode() for i in hello.key_ids)
        ours = ",".join(i.decode() for i in keyring.ids)
        raise HandshakeError(
            f"{_show(peer)} holds no secret we hold (its key ids {theirs}, ours {ours})"
        )
    ident, key = chosen
    nonce = secrets.token_bytes(NONCE_BYTES)
    proof = transcript_mac(key, "accept", hello, nonce, ident)
    await stream.send_all(AcceptHello(me, peer, nonce, ident, proof).line())
    mac = parse_auth(await reader.receive_line())
    if not hmac.compare_digest(mac, transcript_mac(key, "dial", hello, nonce, ident)):
        raise HandshakeError(
            f"AUTH from {_show(peer)} does not verify (wrong secret, or a replayed or"
            " reflected handshake)"
        )
    return peer


def _refused_if_none(line: bytes | None, peer: bytes) -> bytes:
    if line is None:
        raise HandshakeError(
            f"{_show(peer)} closed the connection during the handshake: it refused us"
            " (no secret in common, not its neighbour, or a secret configured on one"
            " side only; its log says which)"
        )
    return line


def _check_names(reply: Hello | AcceptHello, *, sender: bytes, receiver: bytes) -> None:
    if reply.receiver != receiver:
        raise HandshakeError(f"HELLO addressed to {_show(reply.receiver)}, not to us")
    if reply.sender != sender:
        raise HandshakeError(f"HELLO from {_show(reply.sender)}, expected {_show(sender)}")
