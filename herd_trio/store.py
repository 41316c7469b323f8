"""The newest record per client: last writer wins, and that decision is the flood dedupe.

The store keeps, per client, only the AT line (it carries every field of a record:
PROTOCOL.md §3) and builds a `Record` when asked. Beside it sits the index that
range-based reconciliation needs (herd_trio/sync.py): every client has a 64-bit key
(`key_of`, XXH3-64 of its id), the key space is a tree of fan-out 16, and for the top
five levels (root to 65,536 leaves, by the key's leading 16 bits) the store keeps the
XOR of its records' fingerprints and how many records each node holds: levels 2 and 4
are updated on every change, levels 0, 1 and 3 combined from them when asked. Nodes
below the leaves (down to one key per node at level 16) are computed from the leaf's
members when asked; a leaf holds ~15 clients at 1M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal

from xxhash import xxh3_64_intdigest

from herd_trio.protocol import Record
from herd_trio.synclines import TREE_LEVELS

FANOUT = 16  # children per node: 4 bits of the key per level
LEAF_LEVEL = 4  # the deepest level kept up to date: 16**4 leaves
LEAVES = FANOUT**LEAF_LEVEL
MAX_LEVEL = TREE_LEVELS  # 64-bit keys: a level-16 node is one key
KEY_BITS = 64
_LEAF_SHIFT = KEY_BITS - 4 * LEAF_LEVEL
_MID = 2  # the inner level kept up to date beside the leaves
_MID_SHIFT = 4 * (LEAF_LEVEL - _MID)  # leaf index -> its level-2 node
CACHE = 4096  # records per cache generation: ~2 MB, the clients active right now


# key_of(client): a client's 64-bit key in the reconciliation tree, the same on every
# server. XXH3-64 (unseeded): a store hashes twice per new record on every server, and
# it is 8 times as fast as BLAKE2b-64 from Python (0.09 against 0.73 us). Neither is
# keyed, so neither keeps a client from choosing ids that share a leaf; the sync's
# per-request budgets bound what such a leaf costs (herd_trio/sync.py). The hash
# function itself, not a wrapper: no Python call on the hot paths.
key_of: Callable[[bytes], int] = xxh3_64_intdigest

# fingerprint_line(at_line): 64 bits that change whenever the record (its AT line)
# does, the same on every server: XXH3-64 of the AT line. A range's fingerprint is the
# XOR of its records' (see Store), which finds accidental differences: two sets of
# lines whose hashes XOR to the same 64 bits by chance are as unlikely as with a
# cryptographic hash. A client cannot aim for such a collision either: the AT line
# holds the time difference that the server measured, down to the nanosecond.
fingerprint_line: Callable[[bytes], int] = xxh3_64_intdigest


def leaf_of(client: bytes) -> int:
    """The leaf of the reconciliation tree that holds `client` (its key's top 16 bits)."""
    return key_of(client) >> _LEAF_SHIFT


def fingerprint(record: Record) -> int:
    """The fingerprint of `record` (see fingerprint_line)."""
    return fingerprint_line(record.at_line)


def node_of(key: int, level: int) -> int:
    """The index of the level-`level` node that holds `key`."""
    return key >> (KEY_BITS - 4 * level)


def split_client(line: bytes) -> tuple[bytes, bytes] | None:
    """(client, packed): the fourth field of AT line `line` and the line without it (two
    spaces mark the spot), as the store keeps it; None if `line` has fewer fields.

    The client is the dict key already; keeping it twice would cost ~30 B a record.
    Every record line a server receives is split so (a flood's echoes are found by
    comparing packed forms): one split and one join, half the cost of slicing around
    searches for the spaces. links.read_peer does the same inline, without the call
    (3% of a relay's instructions per update).
    """
    fields = line.split(b" ", 4)  # AT origin skew client rest
    if len(fields) != 5:
        return None
    client, fields[3] = fields[3], b""
    return client, b" ".join(fields)


def pack(line: bytes, client: bytes) -> bytes:
    """`line` without its client field (see split_client). A line whose fourth field is
    not `client` (never, for a checked AT line) is kept whole."""
    split = split_client(line)
    return split[1] if split is not None and split[0] == client else line


def unpack(packed: bytes, client: bytes) -> bytes:
    """The AT line that pack() made `packed` from."""
    spot = packed.find(b"  ")
    if spot < 0:
        return packed
    return packed[: spot + 1] + client + packed[spot + 1 :]


_Cached = tuple[Record, int, int]  # a record, its leaf and its fingerprint (-1: not known)


def record_of(at_line: bytes) -> Record:
    """The record of an AT line that a store holds (checked when it came in)."""
    _, origin, _, client, coords, time = at_line.split()
    return Record(client, coords, Decimal(time.decode()), origin, at_line)


class Store:
    """One record per client; a record replaces another only if it supersedes it.

    Every server applies the same rule (PROTOCOL.md §2: client time, then origin, then
    coords), so all of them converge on the same winner whatever order floods arrive
    in, and a record that is not newer is neither stored nor forwarded, which is what
    makes floods terminate on graphs with cycles.
    """

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self._lines: dict[bytes, bytes] = {}  # client -> packed AT line, first-arrival order
        # The same dict, read-only: every client's packed AT line (split_client), for the
        # hot paths' checks: a client not in it is new (add_new), and a line whose packed
        # form equals its client's is byte for byte the line held (a flood's echo). An
        # attribute, not a property: one lookup per client line, no call.
        self.held: Mapping[bytes, bytes] = self._lines
        self._listeners: list[Callable[[bytes, bytes], None]] = []
        # The XOR of the fingerprints of the records under each level-2 node and under
        # each leaf, and how many records each level-2 node holds (a leaf's count is its
        # member list's length); levels 1 and 3 are 16 of these summed, the root all 256
        # level-2 nodes (once per sync round, ~10 us: cheaper than an XOR per record).
        # XOR makes a summary independent of arrival order and cheap to update: a
        # replacement XORs out the old fingerprint and in the new.
        # Lists, not arrays: an array boxes and unboxes a 64-bit int on every read and
        # write, which costs twice a list's (~100 against ~50 ns per XOR, for ~2.5 MB).
        self._mid_fps = [0] * FANOUT**_MID
        self._mid_counts = [0] * FANOUT**_MID
        self._leaf_fps = [0] * LEAVES
        self._members: list[list[bytes] | None] = [None] * LEAVES  # leaf -> its clients
        # Records recently kept by offer() or asked for, with their leaf and fingerprint
        # (-1 if not known yet), so a client's WHATSAT and its next update neither parse
        # the line nor hash again: two generations of at most CACHE each, the older
        # dropped when the newer fills. (add_new caches nothing: a flood's new records
        # are rarely asked for on every server, and its echoes compare packed lines.)
        self._young: dict[bytes, _Cached] = {}
        self._old: dict[bytes, _Cached] = {}
        for record in records:
            self.offer(record)

    def get(self, client: bytes) -> Record | None:
        """The newest record held for `client`, if any."""
        packed = self._lines.get(client)
        return None if packed is None else self._cached(client, packed)[0]

    def line(self, client: bytes) -> bytes | None:
        """The AT line held for `client`, if any."""
        packed = self._lines.get(client)
        return None if packed is None else unpack(packed, client)

    def _cached(self, client: bytes, packed: bytes) -> _Cached:
        """The held line's Record (leaf, fingerprint): from the cache, or parsed and cached.

        A cached record is always the held one: offer() caches every record it keeps
        in the young generation, which is looked at first, and an old generation is
        dropped when the young one takes its place; add_new() keeps only clients that
        were not held, so none of them has an entry.
        """
        entry = self._young.get(client)
        if entry is not None:
            return entry
        entry = self._old.get(client)
        if entry is None:
            entry = (record_of(unpack(packed, client)), -1, -1)
        self._remember(client, entry)
        return entry

    def _remember(self, client: bytes, entry: _Cached) -> None:
        young = self._young
        young[client] = entry
        if len(young) >= CACHE:
            self._old, self._young = young, {}

    def offer(self, record: Record, *, repeat: bool = False) -> Record:
        """Keep `record` if it supersedes what is held; the record that stands now.

        The result `is record` exactly when it was kept: that one answer is the flood
        dedupe, the client's reply and the peer log's verdict (a record that was not
        kept comes back as the held one, cached or built from the held line).
        `repeat=True` is for a client's own IAMAT: an equal rank is then a repeat
        (PROTOCOL.md §2), never a replacement, even if its AT line (another time
        difference) sorts higher.
        """
        client, line = record.client, record.at_line
        held_line = self._lines.get(client)
        if held_line is None:
            self.add_new(client, pack(line, client), line)
            # The client's WHATSAT or next update comes within moments.
            self._remember(client, (record, -1, -1))
            return record
        held, leaf, held_fp = self._cached(client, held_line)
        if (repeat and record.rank <= held.rank) or not record.supersedes(held):
            return held
        fp = fingerprint_line(line)
        change = fp ^ (held_fp if held_fp >= 0 else fingerprint_line(held.at_line))
        if leaf < 0:
            leaf = key_of(client) >> _LEAF_SHIFT
        self._lines[client] = pack(line, client)
        self._remember(client, (record, leaf, fp))
        self._xor(leaf, change)
        for listener in self._listeners:
            listener(client, line)
        return record

    def add_new(self, client: bytes, packed: bytes, line: bytes) -> None:
        """Keep the first record of `client`: its AT line, checked, and the line's packed
        form (split_client). The caller has seen that `client` is not `held`.

        The hot paths' way in (a new client's IAMAT, a flood's new records): no Record
        is built, and nothing is compared.
        """
        self._lines[client] = packed
        leaf = key_of(client) >> _LEAF_SHIFT
        members = self._members[leaf]
        if members is None:
            self._members[leaf] = [client]
        else:
            members.append(client)
        mid = leaf >> _MID_SHIFT
        self._mid_counts[mid] += 1
        fp = fingerprint_line(line)  # XORed in as _xor does, without the call
        self._leaf_fps[leaf] ^= fp
        self._mid_fps[mid] ^= fp
        for listener in self._listeners:
            listener(client, line)

    def replace(self, client: bytes, packed: bytes, line: bytes) -> None:
        """Keep a newer record of `client`, which is `held`: its AT line, checked, and the
        line's packed form (split_client). The caller has seen that its client time is
        later than the held record's (protocol.later), which decides whatever else
        differs (Record.rank).

        The hot paths' way in for a client's update: no Record is built for either
        line. The client's cached Record, if any, is dropped (the next get() builds
        the new one); its leaf and fingerprint spare a hash.
        """
        held = self._lines[client]
        young, old = self._young.pop(client, None), self._old.pop(client, None)
        _, leaf, held_fp = young or old or (None, -1, -1)  # -1: not known
        if held_fp < 0:
            held_fp = fingerprint_line(unpack(held, client))
        if leaf < 0:
            leaf = key_of(client) >> _LEAF_SHIFT
        self._lines[client] = packed
        change = fingerprint_line(line) ^ held_fp
        self._leaf_fps[leaf] ^= change  # as _xor does, without the call
        self._mid_fps[leaf >> _MID_SHIFT] ^= change
        for listener in self._listeners:
            listener(client, line)

    def _xor(self, leaf: int, change: int) -> None:
        """XOR `change` into the fingerprints of `leaf` and its level-2 node."""
        self._leaf_fps[leaf] ^= change
        self._mid_fps[leaf >> _MID_SHIFT] ^= change

    def on_change(self, listener: Callable[[bytes, bytes], None]) -> None:
        """Call `listener(client, at_line)` (sync, must not raise) for every record the
        store keeps."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[Record]:
        """Every record held when iteration began, in the order their clients first
        arrived; built one at a time (the snapshot copies only references to the lines).
        """
        return (record_of(unpack(line, c)) for c, line in list(self._lines.items()))

    def snapshot(self) -> list[Record]:
        """Every record held, in the order their clients first arrived."""
        return [record_of(unpack(line, c)) for c, line in list(self._lines.items())]

    def digest(self) -> list[int]:
        """The fingerprints of the 16 top-level ranges: equal on stores that hold the same."""
        return [self.summary(1, index)[0] for index in range(FANOUT)]

    # --- the reconciliation tree (herd_trio/sync.py) -------------------------------------

    def summary(self, level: int, index: int) -> tuple[int, int]:
        """(fingerprint, record count) of node (level, index) of the key tree.

        At most 256 list reads (the root) down to the leaves; below them, O(members of
        the leaf).
        """
        if level == _MID:
            return self._mid_fps[index], self._mid_counts[index]
        if level == LEAF_LEVEL:
            return self._leaf_fps[index], len(self._members[index] or ())
        if level < LEAF_LEVEL:  # 0, 1 or 3: combine the level-2 nodes or leaves below
            fps = self._mid_fps if level < _MID else self._leaf_fps
            width = FANOUT ** ((_MID if level < _MID else LEAF_LEVEL) - level)
            fp = 0
            for child_fp in fps[index * width : (index + 1) * width]:
                fp ^= child_fp
            return fp, self.count(level, index)
        fp = count = 0
        for _key, line in self.members(level, index):
            fp ^= fingerprint_line(line)
            count += 1
        return fp, count

    def count(self, level: int, index: int) -> int:
        """How many records node (level, index) holds, for level <= LEAF_LEVEL."""
        if level == 0:
            return len(self._lines)
        if level == _MID:
            return self._mid_counts[index]
        if level == LEAF_LEVEL:
            return len(self._members[index] or ())
        first = index * FANOUT
        if level < _MID:
            return sum(self._mid_counts[first : first + FANOUT])
        return sum(len(members) for members in self._members[first : first + FANOUT] if members)

    def leaf_size(self, level: int, index: int) -> int:
        """Clients a scan of node (level, index) below the leaves looks at (its leaf's)."""
        members = self._members[index >> (4 * (level - LEAF_LEVEL))]
        return 0 if members is None else len(members)

    def members(self, level: int, index: int) -> Iterator[tuple[int, bytes]]:
        """(key, AT line) of every record in node (level, index), skipping empty ranges.

        For small nodes (sync lists them): work is proportional to the records listed
        plus the leaves under the node (at most 256 per non-empty level-2 node), or
        the members of the one leaf when level > LEAF_LEVEL. Large ranges are walked
        leaf by leaf (`leaves`, `leaf_clients`, `line`).
        """
        lines = self._lines
        if level > LEAF_LEVEL:
            leaf = index >> (4 * (level - LEAF_LEVEL))
            shift = KEY_BITS - 4 * level
            for client in self._members[leaf] or ():
                key = key_of(client)
                if key >> shift == index:
                    yield key, unpack(lines[client], client)
            return
        for leaf in self.leaves(level, index):
            for client in self._members[leaf] or ():
                yield key_of(client), unpack(lines[client], client)

    def leaves(self, level: int, index: int) -> Iterator[int]:
        """The non-empty leaves under node (level, index), level <= LEAF_LEVEL, in order.

        Empty level-2 nodes are skipped by their counts; inside the others every leaf
        slot is looked at (256 list reads), so a sparse store is walked quickly.
        """
        members = self._members
        if level < _MID:
            width = FANOUT ** (_MID - level)
            counts = self._mid_counts
            for mid in range(index * width, (index + 1) * width):
                if counts[mid]:
                    yield from self.leaves(_MID, mid)
            return
        width = FANOUT ** (LEAF_LEVEL - level)
        for leaf in range(index * width, (index + 1) * width):
            if members[leaf]:
                yield leaf

    def leaf_clients(self, leaf: int) -> list[bytes]:
        """The clients of one leaf (do not modify the list)."""
        return self._members[leaf] or []

    def lines_of_leaves(self, first: int, stop: int) -> list[bytes]:
        """The AT lines of every client in leaves `first` to `stop` - 1, leaf by leaf
        (the state file's sorted order, herd_trio/statefile.py)."""
        lines, members = self._lines, self._members
        out: list[bytes] = []
        for leaf in range(first, stop):
            for client in members[leaf] or ():
                out.append(unpack(lines[client], client))
        return out

    def find(self, key: int) -> bytes | None:
        """The AT line of the client whose key is `key`, if held (a scan of its leaf)."""
        for client in self._members[key >> _LEAF_SHIFT] or ():
            if key_of(client) == key:
                return unpack(self._lines[client], client)
        return None
