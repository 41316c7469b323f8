"""The wire protocol as pure functions: bytes in, records and bytes out.

Nothing here does I/O or imports trio, so every rule of PROTOCOL.md §1-2 is tested
without an event loop. Fields are split with `bytes.split()` (no argument), which splits
on exactly the six ASCII white-space bytes the protocol names; `str.split()` would also
split on U+00A0, `\\x1c` and friends.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import MAX_PREC, Decimal, localcontext
from typing import NamedTuple

import attrs

MAX_CLIENT_ID = 256  # bytes: PROTOCOL.md §1
MAX_RADIUS_KM = 50
MAX_BOUND = 20
NS_PER_S = 1_000_000_000
_INT_DIGITS = 4000  # below sys.get_int_max_str_digits() (4300 by default)
_INT_LIMIT = 10**_INT_DIGITS

# Checked with a bytes regex (times: bytes.isdigit, ASCII digits only) before any
# conversion: Decimal() and int() accept "nan",
# "1_000", " 7" and non-ASCII digits, none of which the protocol allows.
_COORDS = re.compile(rb"([+-][0-9]{1,2}(?:\.[0-9]+)?)([+-][0-9]{1,3}(?:\.[0-9]+)?)")
_RADIUS = re.compile(rb"[0-9]+(?:\.[0-9]+)?")
_BOUND = re.compile(rb"[0-9]+")
_HEX = re.compile(rb"[0-9a-f]+")
_SKEW = re.compile(rb"[+-][0-9]+\.[0-9]{9}")

# Fast paths: one regex for a whole well-formed line, with the coordinate ranges in the
# pattern (latitude up to 90, longitude up to 180, exactly 90 or 180 only with a zero
# fraction). A line it matches is one the field-by-field checks accept, with the same
# result; any other line takes those checks, which name what is wrong. In a bytes
# pattern `\s` is exactly the six white-space bytes `bytes.split()` splits on.
# Runs of digits, of non-space and the optional parts are possessive (`++`, `?+`): what
# follows each is a byte it cannot take (a space, a sign, a dot, the end), so giving
# some back could never make a match. The result is the same; the work is a quarter
# less (0.45 against 0.6 us per AT line), as the regex remembers no backtracking points.
_LAT = rb"[+-](?:[0-8]?[0-9](?:\.[0-9]++)?+|90(?:\.0++)?+)"
_LON = rb"[+-](?:(?:1[0-7][0-9]|0?[0-9]?[0-9])(?:\.[0-9]++)?+|180(?:\.0++)?+)"
_AT_LINE = re.compile(
    rb"AT (\S++) [+-][0-9]++\.[0-9]{9} (\S{1,%d}+) (%s%s) ([0-9]++(?:\.[0-9]++)?+)"
    % (MAX_CLIENT_ID, _LAT, _LON)
)
_IAMAT_LINE = re.compile(
    rb"\s*+IAMAT\s++(\S{1,%d}+)\s++(%s%s)\s++([0-9]++(?:\.[0-9]++)?+)\s*+"
    % (MAX_CLIENT_ID, _LAT, _LON)
)


class ProtocolError(ValueError):
    """A line or field that the protocol does not allow."""


class Iamat(NamedTuple):
    """`IAMAT client coords time`, fields kept as received.

    Records and commands are named tuples, not attrs classes: one is made per line on
    the hot path, and a frozen attrs instance costs twice as much to build.
    """

    client: bytes
    coords: bytes
    time: bytes  # the client's clock, as sent (checked when the line was parsed)

    @property
    def sent(self) -> Decimal:
        """The client's clock, exact. Built when asked: a new client's IAMAT is kept
        without comparing it with anything (PROTOCOL.md §2 ranks by it)."""
        return Decimal(self.time.decode())

    @property
    def lat_lon(self) -> tuple[Decimal, Decimal]:
        """The coordinates as exact decimal degrees (checked when the line was parsed)."""
        return parse_coords(self.coords)


@attrs.frozen
class Whatsat:
    """`WHATSAT client radius bound` (or its synonym WHATISAT)."""

    client: bytes
    radius_km: Decimal
    bound: int

    @property
    def radius_m(self) -> int:
        """The radius in whole metres (10 km -> 10000), never below 1 m."""
        return max(1, int((self.radius_km * 1000).to_integral_value()))


class Record(NamedTuple):
    """One client's location as a server took it; what the herd floods and stores."""

    client: bytes
    coords: bytes
    sent: Decimal  # the client's clock, exact
    origin: bytes  # the name of the server that took the IAMAT
    at_line: bytes  # the reply as first produced, without LF; WHATSAT repeats it

    @property
    def rank(self) -> tuple[Decimal, bytes, bytes]:
        """PROTOCOL.md's key: client time, then origin, then coords; the same on every server.

        An IAMAT whose rank is not higher than the stored one's is a repeat or stale.
        """
        return (self.sent, self.origin, self.coords)

    def supersedes(self, other: Record) -> bool:
        """True if this record replaces `other` in a store: a higher rank, or the same
        rank and a greater AT line.

        Equal ranks with different AT lines happen (a server restarted without
        state_dir takes the same IAMAT again, with another time difference; `5` and
        `5.0` are the same time). The AT line as the last tie-break makes every server
        keep the same one, so their WHATSAT answers and digests agree.
        """
        rank, other_rank = self.rank, other.rank
        return rank > other_rank or (rank == other_rank and self.at_line > other.at_line)

    @property
    def lat_lon(self) -> tuple[Decimal, Decimal]:
        """The coordinates as exact decimal degrees."""
        return parse_coords(self.coords)


Command = Iamat | Whatsat


def _time_parts(field: bytes) -> tuple[bytes, bytes] | None:
    """`S` or `S.F` (ASCII digits only; `bytes.isdigit` knows no others) as (S, F)."""
    whole, dot, frac = field.partition(b".")
    if whole.isdigit() and (frac.isdigit() if dot else True):
        return whole, frac
    return None


def parse_time(field: bytes) -> Decimal:
    """POSIX seconds from the wire, exactly; ProtocolError for anything else."""
    if _time_parts(field) is None:
        raise ProtocolError(f"bad time {field!r}")
    return Decimal(field.decode("ascii"))


def time_ns(field: bytes) -> int:
    """POSIX seconds from the wire as integer nanoseconds, truncating extra digits."""
    parts = _time_parts(field)
    if parts is None:
        raise ProtocolError(f"bad time {field!r}")
    whole, frac = parts
    if len(whole) > _INT_DIGITS:  # int() refuses over 4300 digits (CVE-2020-10735)
        with localcontext() as context:
            context.prec = len(whole) + 10  # exact: no rounding at any length
            return int(Decimal(whole.decode()).scaleb(9)) + int(frac[:9].ljust(9, b"0"))
    return int(whole) * NS_PER_S + int(frac[:9].ljust(9, b"0"))


def parse_coords(field: bytes) -> tuple[Decimal, Decimal]:
    """ISO 6709 `+lat-lon` as exact decimal degrees; ProtocolError when out of range."""
    match = _COORDS.fullmatch(field)
    if match is None:
        raise ProtocolError(f"bad coordinates {field!r}")
    lat, lon = Decimal(match.group(1).decode()), Decimal(match.group(2).decode())
    # Comparisons are exact; abs() would round to the context's 28 digits first.
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ProtocolError(f"coordinates out of range {field!r}")
    return lat, lon


def check_coords(field: bytes) -> None:
    """ProtocolError unless `field` is valid ISO 6709 `+lat-lon` within range.

    The same rule as parse_coords, without building Decimals: a peer's AT line needs
    checking, not its values, and this runs for every record on every link.
    """
    match = _COORDS.fullmatch(field)
    if match is None:
        raise ProtocolError(f"bad coordinates {field!r}")
    for part, limit in ((match.group(1), 90), (match.group(2), 180)):
        whole, _, fraction = part[1:].partition(b".")
        degrees = int(whole)  # at most three ASCII digits, by the regex
        if degrees > limit or (degrees == limit and fraction.strip(b"0")):
            raise ProtocolError(f"coordinates out of range {field!r}")


def _client_id(field: bytes) -> bytes:
    if len(field) > MAX_CLIENT_ID:
        raise ProtocolError(f"client id longer than {MAX_CLIENT_ID} bytes")
    return field


def parse_command(line: bytes) -> Command:
    """Parse one client line (terminator already removed); ProtocolError if invalid."""
    match = _IAMAT_LINE.fullmatch(line)
    if match is not None:  # the common case, in one regex
        client, coords, time = match.groups()
        return Iamat(client, coords, time)
    return parse_command_fields(line)


def parse_command_fields(line: bytes) -> Command:
    """parse_command field by field, without the fast path (which must agree with it)."""
    fields = line.split()
    if len(fields) != 4:
        raise ProtocolError("wrong number of fields")
    verb = fields[0]
    if verb == b"IAMAT":
        client, coords, time = fields[1], fields[2], fields[3]
        parse_coords(coords)  # checked here; Iamat.lat_lon gives the values
        parse_time(time)  # checked here; Iamat.sent gives the value
        return Iamat(_client_id(client), coords, time)
    if verb in (b"WHATSAT", b"WHATISAT"):
        radius, bound = fields[2], fields[3]
        if not _RADIUS.fullmatch(radius):
            raise ProtocolError(f"bad radius {radius!r}")
        radius_km = Decimal(radius.decode("ascii"))
        if not 0 < radius_km <= MAX_RADIUS_KM:
            raise ProtocolError(f"radius out of range {radius!r}")
        if not _BOUND.fullmatch(bound) or len(bound) > 3 or int(bound) > MAX_BOUND:
            raise ProtocolError(f"bad bound {bound!r}")
        return Whatsat(_client_id(fields[1]), radius_km, int(bound))
    raise ProtocolError(f"unknown command {verb!r}")


def format_skew(skew_ns: int) -> bytes:
    """`+S.NNNNNNNNN`: sign always shown (`+` for zero), exactly nine fractional digits."""
    sign = b"-" if skew_ns < 0 else b"+"
    seconds, ns = divmod(abs(skew_ns), NS_PER_S)
    if seconds >= _INT_LIMIT:  # "%d" refuses over 4300 digits; Decimal prints any length
        with localcontext() as context:
            context.prec = MAX_PREC
            return b"%s%s.%09d" % (sign, format(Decimal(seconds), "f").encode(), ns)
    return b"%s%d.%09d" % (sign, seconds, ns)


def too_far_ahead(sent: Decimal, now_ns: int, max_skew: float | None) -> bool:
    """True if client time `sent` is more than `max_skew` seconds ahead of `now_ns`.

    The optional clock guard (`max_future_skew`): a record from the far future would
    win over every later honest update of that client (PROTOCOL.md §2 orders by client
    time), so a server may refuse it. None turns the guard off.
    """
    if max_skew is None:
        return False
    # Exact for any client time: Decimal compares with float without rounding, and
    # a time too long for the context's precision is far beyond any skew anyway.
    return sent - Decimal(now_ns).scaleb(-9) > max_skew


def make_record(server: bytes, received_ns: int, iamat: Iamat) -> Record:
    """The record (and its AT line) for an IAMAT that arrived complete at `received_ns`."""
    at_line = format_at(server, received_ns, iamat)
    return Record(iamat.client, iamat.coords, iamat.sent, server, at_line)


def format_at(server: bytes, received_ns: int, iamat: Iamat) -> bytes:
    """The AT line (without LF) that `server` answers an IAMAT with that arrived
    complete at `received_ns`."""
    head, tail = at_parts(server, received_ns, iamat.coords, iamat.time)
    return head + iamat.client + tail


def at_parts(server: bytes, received_ns: int, coords: bytes, time: bytes) -> tuple[bytes, bytes]:
    """format_at's line for an IAMAT's (checked) coords and time, as the bytes before
    its client field and the bytes after it: the line is `head + client + tail`, and
    `head + tail` is the form a store keeps (store.pack), so a new client's IAMAT is
    kept without splitting its line again.

    A time of up to 18 whole digits (every clock of this era) is read here, without
    time_ns's checks: an IAMAT's time was checked when its line was parsed. Each
    int() of bytes and each number written costs about as much as the rest of a
    step here, so the common cases take fewer: a time in nanoseconds is one int(),
    and a client clock less than a second behind is one number to write.
    """
    tail = b" %s %s" % (coords, time)
    whole, _, frac = time.partition(b".")
    if len(whole) > 18:  # beyond any clock of this era: time_ns and format_skew, exactly
        return b"AT %s %s " % (server, format_skew(received_ns - time_ns(time))), tail
    if len(frac) == 9:
        skew = received_ns - int(whole + frac)
    else:
        skew = received_ns - (int(whole) * NS_PER_S + int(frac[:9].ljust(9, b"0")))
    if 0 <= skew < NS_PER_S:
        return b"AT %s +0.%09d " % (server, skew), tail
    sign = b"+"
    if skew < 0:
        sign, skew = b"-", -skew
    return b"AT %s %s%d.%09d " % (server, sign, skew // NS_PER_S, skew % NS_PER_S), tail


def later(time: bytes, than: bytes) -> int:
    """Compare two checked client times exactly, as their Decimals compare: 1 if `time`
    is later than `than`, -1 if earlier, and 0 if they are equal or are not compared
    here (one has more than 18 whole digits and they differ in shape); on 0 the caller
    compares Records, whose rank also breaks ties.

    For the hot paths' updates of a held client, without a Decimal. Two times of the
    same length with the dot in the same place (a client's clock, read the same way
    each time) order as their bytes do. Otherwise a fraction's digits without their
    trailing zeros order as the fractions do (`5` and `50` are equal, `05` < `5` <
    `51` < `6`), so the whole part as an int and that string decide.
    """
    if len(time) == len(than) and time.find(b".") == than.find(b"."):
        return (time > than) - (time < than)
    whole, _, frac = time.partition(b".")
    held_whole, _, held_frac = than.partition(b".")
    if len(whole) > 18 or len(held_whole) > 18:
        return 0
    mine, theirs = (int(whole), frac.rstrip(b"0")), (int(held_whole), held_frac.rstrip(b"0"))
    return (mine > theirs) - (mine < theirs)


def parse_at(line: bytes) -> Record:
    """A record from an AT line as a server produced it; ProtocolError if malformed.

    This is how records travel between servers: the AT line carries every field of
    the record, and forwarding it byte for byte keeps WHATSAT's first line exact.
    """
    match = _AT_LINE.fullmatch(line)
    if match is not None:  # the common case, in one regex
        origin, client, coords, time = match.groups()
        return Record(client, coords, Decimal(time.decode()), origin, line)
    return parse_at_fields(line)


# iamat_match(line): the match of a well-formed IAMAT line, whose groups() are its
# client, coords and time, as parse_command's fast path takes them; None does not mean
# invalid (parse_command_fields then says). The regex's own method: no Python call, and
# no Iamat built, for a new client's IAMAT (client.answer).
iamat_match: Callable[[bytes], re.Match[bytes] | None] = _IAMAT_LINE.fullmatch

# canonical_at(line) is true (a match) if `line` is an AT line that parse_at takes on
# its fast path (one regex): for the hot path that keeps a new client's record from its
# line without building a Record. False (None) does not mean invalid: parse_at then
# says, checking field by field. The regex's own method, so no Python call per line.
canonical_at: Callable[[bytes], re.Match[bytes] | None] = _AT_LINE.fullmatch


def parse_at_fields(line: bytes) -> Record:
    """parse_at field by field, without the fast path (which must agree with it)."""
    fields = line.split()
    if len(fields) != 6 or fields[0] != b"AT":
        raise ProtocolError("not an AT line")
    _, origin, skew, client, coords, time = fields
    if not _SKEW.fullmatch(skew):
        raise ProtocolError(f"bad time difference {skew!r}")
    check_coords(coords)
    at_line = b" ".join(fields)
    if at_line != line:
        raise ProtocolError("AT line not in canonical form")
    return Record(_client_id(client), coords, parse_time(time), origin, at_line)


def question(line: bytes) -> bytes:
    """The reply to anything invalid: `? ` and the line exactly as received, then LF."""
    return b"? " + line + b"\n"
