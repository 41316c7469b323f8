"""The lines of range-based reconciliation (herd_trio/sync.py) as pure functions.

The key space (64-bit client keys) is a tree of fan-out 16: node (level, index)
holds the keys whose top 4*level bits are `index`; level 0 is the root, level 16 a
single key. Fingerprints and keys travel as 16 lowercase hex digits. Like
herd_trio/protocol.py, nothing here does I/O.
"""

from __future__ import annotations

import re

import attrs

from herd_trio.protocol import ProtocolError

SUMS = b"SUMS"  # SUMS <level> <first> <fp>...: fingerprints of up to 16 sibling nodes
ITEMS = b"ITEMS"  # ITEMS <level> <index> <key><fp>...: every record of a small node
NEED = b"NEED"  # NEED <key>...: send me your records of these keys
SYNC_PREFIXES = (SUMS + b" ", ITEMS + b" ", NEED + b" ")
TREE_LEVELS = 16  # 64-bit keys, 4 bits per level
SUMS_MAX = 16  # nodes per SUMS line: one parent's children
ITEMS_MAX = 32  # records a node may hold to be listed rather than split
NEED_MAX = 64  # keys per NEED line
_NUMBER = re.compile(rb"0|[1-9][0-9]{0,19}")
_HEX16 = re.compile(rb"[0-9a-f]{16}")
_HEX32 = re.compile(rb"[0-9a-f]{32}")


@attrs.frozen
class Sums:
    """My fingerprints of nodes (level, first), (level, first + 1), ..."""

    level: int
    first: int
    fps: tuple[int, ...]


@attrs.frozen
class Items:
    """Every record I hold in node (level, index), as (key, fingerprint) pairs."""

    level: int
    index: int
    pairs: tuple[tuple[int, int], ...]


@attrs.frozen
class Need:
    """The keys whose records I lack or hold in another version."""

    keys: tuple[int, ...]


SyncLine = Sums | Items | Need


def format_sums(level: int, first: int, fps: list[int]) -> bytes:
    """A SUMS line: `SUMS level first` and one 16-hex-digit fingerprint per node."""
    return b"SUMS %d %d %s" % (level, first, b" ".join(b"%016x" % fp for fp in fps))


def format_items(level: int, index: int, pairs: list[tuple[int, int]]) -> bytes:
    """An ITEMS line: `ITEMS level index` and 32 hex digits (key, fingerprint) per record."""
    head = b"ITEMS %d %d" % (level, index)
    return b" ".join([head, *(b"%016x%016x" % pair for pair in pairs)])


def format_need(keys: list[int]) -> bytes:
    """A NEED line: `NEED` and 16 hex digits per key."""
    return b" ".join([NEED, *(b"%016x" % key for key in keys)])


def _node(level_field: bytes, index_field: bytes) -> tuple[int, int]:
    if not (_NUMBER.fullmatch(level_field) and _NUMBER.fullmatch(index_field)):
        raise ProtocolError("bad tree node")
    level, index = int(level_field), int(index_field)
    if level > TREE_LEVELS or index >= 16**level:
        raise ProtocolError(f"no tree node {level} {index}")
    return level, index


def _hex(fields: list[bytes], pattern: re.Pattern[bytes]) -> list[int]:
    if not all(pattern.fullmatch(field) for field in fields):
        raise ProtocolError("bad hex field")
    return [int(field, 16) for field in fields]


def parse_sync(line: bytes) -> SyncLine:
    """A SUMS, ITEMS or NEED line from a peer; ProtocolError if malformed or out of bounds.

    Bounds are part of the format (SUMS_MAX, ITEMS_MAX, NEED_MAX), so one line can
    never ask for more than a fixed amount of work; the separators must be single
    spaces, as these lines are produced only by format_sums/items/need.
    """
    fields = line.split(b" ")
    verb = fields[0]
    if verb == SUMS and len(fields) >= 4:
        level, first = _node(fields[1], fields[2])
        fps = _hex(fields[3:], _HEX16)
        if len(fps) > SUMS_MAX or first % SUMS_MAX or first + len(fps) > 16**level:
            raise ProtocolError("SUMS out of bounds")
        return Sums(level, first, tuple(fps))
    if verb == ITEMS and len(fields) >= 3:
        level, index = _node(fields[1], fields[2])
        if len(fields) - 3 > ITEMS_MAX:
            raise ProtocolError(f"ITEMS with more than {ITEMS_MAX} records")
        pairs = tuple(divmod(value, 1 << 64) for value in _hex(fields[3:], _HEX32))
        if any(key >> (64 - 4 * level) != index for key, _ in pairs):
            raise ProtocolError("ITEMS key outside its node")
        return Items(level, index, pairs)
    if verb == NEED and 2 <= len(fields) <= NEED_MAX + 1:
        return Need(tuple(_hex(fields[1:], _HEX16)))
    raise ProtocolError("bad sync line")
