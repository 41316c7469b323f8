"""Store: the newest record per client by (client time, origin, coords), PROTOCOL.md §2."""

from __future__ import annotations

from decimal import Decimal
from random import Random

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from herd_trio import store as store_module
from herd_trio.protocol import Record, later
from herd_trio.store import (
    LEAF_LEVEL,
    MAX_LEVEL,
    Store,
    fingerprint_line,
    key_of,
    node_of,
    pack,
    record_of,
    split_client,
    unpack,
)


def rec(
    time: str,
    origin: bytes = b"Clark",
    coords: bytes = b"+34-118",
    client: bytes = b"kiwi",
    skew: bytes = b"+0.000000000",
) -> Record:
    at_line = b"AT %s %s %s %s %s" % (origin, skew, client, coords, time.encode())
    return Record(client, coords, Decimal(time), origin, at_line)


def test_first_record_of_a_client_is_kept() -> None:
    store = Store()
    record = rec("10")
    assert store.get(b"kiwi") is None
    assert store.offer(record) is record
    assert store.get(b"kiwi") == record
    assert len(store) == 1


def test_newer_client_time_wins_compared_as_numbers() -> None:
    store = Store()
    assert store.offer(rec("9.5", origin=b"Zed", coords=b"+9-9"))
    newer = rec("10", origin=b"Alpha", coords=b"+1-1")  # "10" < "9.5" as bytes
    assert store.offer(newer) is newer
    assert store.get(b"kiwi") == newer
    assert (
        store.offer(offered := rec("9.99999999999", origin=b"Zed", coords=b"+9-9")) is not offered
    )
    assert store.get(b"kiwi") == newer


def test_older_record_is_refused_and_the_stored_one_kept() -> None:
    store = Store()
    held = rec("1621464827.959498503")
    store.offer(held)
    assert store.offer(offered := rec("1621464827.959498502", origin=b"Zed")) is not offered
    assert store.get(b"kiwi") == held


def test_equal_time_tie_breaks_on_origin_then_coords() -> None:
    store = Store()
    store.offer(rec("5", origin=b"Bona", coords=b"+9-9"))
    by_origin = rec("5", origin=b"Clark", coords=b"+1-1")
    assert store.offer(by_origin) is by_origin
    assert store.offer(offered := rec("5", origin=b"Bona", coords=b"+9.9-9")) is not offered
    by_coords = rec("5", origin=b"Clark", coords=b"+2-1")
    assert store.offer(by_coords) is by_coords
    assert store.get(b"kiwi") == by_coords
    assert (
        store.offer(offered := rec("5", origin=b"Clark", coords=b"+10-1")) is not offered
    )  # b"+1" < b"+2"


def test_equal_times_with_different_spelling_tie_break_on_origin() -> None:
    store = Store()
    store.offer(rec("5.000", origin=b"Clark"))
    assert (
        store.offer(offered := rec("5", origin=b"Bona")) is not offered
    )  # same time, lower origin
    assert store.offer(offered := rec("5.0", origin=b"Jaquez")) is offered


def test_a_repeated_record_is_refused() -> None:
    store = Store()
    heard: list[Record] = []
    store.on_change(lambda client, line: heard.append(record_of(line)))
    first = rec("5")
    assert store.offer(first) is first
    assert (
        store.offer(offered := rec("5")) is not offered
    )  # the same record again, e.g. flooded back
    assert store.get(b"kiwi") == first
    assert heard == [first]


def test_records_of_equal_rank_converge_whatever_the_order() -> None:
    # Clark takes the same IAMAT twice (say, before and after a restart without
    # state_dir): same client time, origin and coords, so the same rank, but another
    # time difference in the AT line. Servers that see the two in different orders
    # must still end up holding the same AT line (PROTOCOL.md §2: all servers converge
    # on the same winner), or WHATSAT answers differ by server and every digest sync
    # resends that bucket forever.
    before = rec("5", skew=b"+1.000000000")
    after = rec("5", skew=b"+2.000000000")
    assert before.rank == after.rank
    one, two = Store([before, after]), Store([after, before])
    assert one.get(b"kiwi") == two.get(b"kiwi")
    assert one.digest() == two.digest()


def test_clients_are_independent() -> None:
    store = Store()
    kiwi, apple = rec("5", client=b"kiwi"), rec("1", client=b"apple")
    assert store.offer(kiwi)
    assert store.offer(apple)
    assert (store.get(b"kiwi"), store.get(b"apple"), len(store)) == (kiwi, apple, 2)
    nfc, nfd = "caf\u00e9".encode(), "cafe\u0301".encode()
    store.offer(rec("1", client=nfc))
    store.offer(rec("1", client=nfd))
    assert len(store) == 4


def test_on_change_hears_every_kept_record_and_nothing_else() -> None:
    store = Store()
    heard: list[tuple[bytes, bytes]] = []
    also: list[tuple[bytes, bytes]] = []
    store.on_change(lambda client, line: heard.append((client, line)))
    store.on_change(lambda client, line: also.append((client, line)))
    first, newer, other = rec("1"), rec("2"), rec("1", client=b"apple")
    store.offer(first)
    store.offer(rec("0.5"))
    store.offer(newer)
    store.offer(rec("2"))
    store.offer(other)
    assert heard == [(r.client, r.at_line) for r in (first, newer, other)]
    assert also == heard


def test_iteration_is_a_snapshot() -> None:
    store = Store()
    a, b = rec("1", client=b"a"), rec("1", client=b"b")
    store.offer(a)
    store.offer(b)
    seen = []
    for record in store:
        seen.append(record)
        store.offer(rec("1", client=b"c" + record.client))  # must not break the loop
        store.offer(rec("9", client=record.client))
    assert seen == [a, b]
    assert len(store) == 4


def test_constructor_keeps_the_newest_of_the_records_given() -> None:
    newest = rec("3")
    store = Store(iter([rec("1"), newest, rec("2"), rec("1", client=b"x")]))
    assert store.get(b"kiwi") == newest
    assert len(store) == 2


records = st.builds(
    rec,
    time=st.sampled_from(["1", "2", "10", "9.99"]),  # one spelling per value: see above
    origin=st.sampled_from([b"Bailey", b"Bona", b"Clark"]),
    coords=st.sampled_from([b"+1-1", b"+1.0-1", b"+2-1"]),
    client=st.sampled_from([b"a", b"b"]),
)


@given(st.lists(records, max_size=12), st.randoms(use_true_random=False))
def test_any_arrival_order_converges_on_the_same_winner(batch: list[Record], rng: Random) -> None:
    shuffled = list(batch)
    rng.shuffle(shuffled)
    one, two = Store(), Store()
    for record in batch:
        one.offer(record)
    for record in shuffled:
        two.offer(record)
    for client in (b"a", b"b"):
        best = max((r.rank for r in batch if r.client == client), default=None)
        held_one, held_two = one.get(client), two.get(client)
        assert (held_one and held_one.rank) == best
        assert (held_two and held_two.rank) == best


# --- the reconciliation tree --------------------------------------------------------------


def oracle_summary(held: list[Record], level: int, index: int) -> tuple[int, int]:
    """Independent: XOR of XXH3-64 of the AT lines whose client key is in the node."""
    fp = count = 0
    for one in held:
        key = xxhash.xxh3_64(one.client).intdigest()
        if key >> (64 - 4 * level) == index:
            fp ^= xxhash.xxh3_64(one.at_line).intdigest()
            count += 1
    return fp, count


def test_node_summaries_follow_every_change_at_every_level() -> None:
    store = Store()
    assert store.summary(0, 0) == (0, 0)
    kiwi, apple = rec("1"), rec("1", client=b"apple")
    store.offer(kiwi)
    store.offer(apple)
    newer = rec("2")
    store.offer(newer)
    store.offer(rec("0"))  # refused: no change
    held = [newer, apple]
    for level in (0, 1, 2, LEAF_LEVEL, LEAF_LEVEL + 1, 9, MAX_LEVEL):
        for client in (b"kiwi", b"apple", b"absent"):
            index = node_of(key_of(client), level)
            assert store.summary(level, index) == oracle_summary(held, level, index)
    assert store.summary(0, 0)[1] == 2
    assert store.find(key_of(b"kiwi")) == newer.at_line
    assert store.find(key_of(b"absent")) is None


def test_members_lists_exactly_the_records_of_a_node() -> None:
    held = [rec("1", client=b"c%d" % n) for n in range(300)]
    store = Store(held)
    for level in (0, 1, 3, LEAF_LEVEL, LEAF_LEVEL + 2):
        index = node_of(key_of(b"c7"), level)
        listed = sorted(store.members(level, index))
        expected = sorted(
            (key_of(r.client), r.at_line) for r in held if node_of(key_of(r.client), level) == index
        )
        assert listed == expected
        assert store.summary(level, index)[1] == len(expected)
    assert {line for _, line in store.members(0, 0)} == {r.at_line for r in held}
    assert fingerprint_line(held[0].at_line) != fingerprint_line(held[1].at_line)


@given(st.lists(records, max_size=12), st.randoms(use_true_random=False))
def test_the_same_records_in_any_order_give_the_same_summaries(
    batch: list[Record], rng: Random
) -> None:
    shuffled = list(batch)
    rng.shuffle(shuffled)
    one, two = Store(batch), Store(shuffled)
    assert one.digest() == two.digest()
    assert one.summary(0, 0) == two.summary(0, 0)
    assert one.summary(MAX_LEVEL, key_of(b"a")) == two.summary(MAX_LEVEL, key_of(b"a"))


@given(
    st.binary(min_size=1, max_size=30).filter(
        lambda b: not any(c in b for c in b" \t\n\r\x0b\x0c")
    ),
    st.sampled_from([b"+0.000000001", b"-12.500000000"]),
)
def test_a_packed_line_unpacks_to_the_same_line(client: bytes, skew: bytes) -> None:
    line = b"AT Clark %s %s +1+1 5" % (skew, client)
    packed = pack(line, client)
    assert len(packed) == len(line) - len(client)
    assert unpack(packed, client) == line
    assert pack(line, b"other") == line  # not its client: kept whole
    assert unpack(line, b"other") == line
    assert split_client(line) == (client, packed)


def test_split_client_wants_five_fields() -> None:
    assert split_client(b"AT Clark +0.1 kiwi") is None
    assert split_client(b"SUMS 1 0 ab cd ef") == (b"ab", b"SUMS 1 0  cd ef")


def assert_same_store(fast: Store, slow: Store, heard: list[tuple[bytes, bytes]]) -> None:
    """`fast` (fed by the hot paths, its listener's calls in `heard`) holds, digests and
    indexes what `slow` (fed by offer() alone) does, and its listener heard every
    record it kept."""
    assert fast.snapshot() == slow.snapshot()
    assert fast.digest() == slow.digest()
    assert fast.summary(0, 0) == slow.summary(0, 0)
    assert [fast.summary(4, leaf) for leaf in range(0, 65536, 4099)] == [
        slow.summary(4, leaf) for leaf in range(0, 65536, 4099)
    ]
    assert {client: line for client, line in heard} == {r.client: r.at_line for r in slow}
    assert all(fast.get(r.client) == r for r in slow)


@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.integers(0, 9), st.booleans()),
        max_size=30,
    )
)
def test_add_new_and_offer_keep_the_same_store(updates: list[tuple[bytes, int, bool]]) -> None:
    # The hot paths keep a new client's first record with add_new (no Record built);
    # a store fed that way holds, digests and indexes exactly what offer() alone keeps.
    fast, slow = Store(), Store()
    heard: list[tuple[bytes, bytes]] = []
    fast.on_change(lambda client, line: heard.append((client, line)))
    for client, time, by_origin in updates:
        record = rec(str(time), client=client, origin=b"Bona" if by_origin else b"Clark")
        slow.offer(record)
        split = split_client(record.at_line)
        assert split is not None
        assert split[0] == client
        if client not in fast.held:
            fast.add_new(client, split[1], record.at_line)
        elif fast.held[client] != split[1]:  # not the held line: offer() decides
            fast.offer(record)
    assert_same_store(fast, slow, heard)


TIMES = ["4", "5", "5.0", "5.000", "5.1", "5.10", "5.01", "05", "6", "9.999999999"]
TIMES += ["9.9999999991", "1" + "0" * 18, "1" + "0" * 19, "1" + "0" * 19 + ".5"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"a", b"b", b"c"]),
            st.sampled_from(TIMES),
            st.booleans(),  # by another origin
            st.booleans(),  # its held Record asked for (and cached) first
        ),
        max_size=40,
    )
)
def test_the_hot_paths_rule_keeps_what_offer_keeps(
    updates: list[tuple[bytes, str, bool, bool]],
) -> None:
    # The hot paths keep a new client with add_new, a later client time with replace
    # (protocol.later: no Record built for either line), leave an earlier one, and
    # give an equal time (a tie that origin and coords break) to offer(). A store fed
    # that way holds, digests and indexes exactly what offer() alone keeps, and get()
    # never answers from a Record cached before a replace.
    fast, slow = Store(), Store()
    heard: list[tuple[bytes, bytes]] = []
    fast.on_change(lambda client, line: heard.append((client, line)))
    for client, time, by_origin, asked in updates:
        record = rec(time, client=client, origin=b"Bona" if by_origin else b"Clark")
        slow.offer(record)
        if asked:
            fast.get(client)
        split = split_client(record.at_line)
        assert split is not None
        held = fast.held.get(client)
        if held is None:
            fast.add_new(client, split[1], record.at_line)
        elif (order := later(time.encode(), held[held.rindex(b" ") + 1 :])) > 0:
            fast.replace(client, split[1], record.at_line)
        elif order == 0 and held != split[1]:
            fast.offer(record)
    assert_same_store(fast, slow, heard)


@pytest.mark.parametrize("generation", ["_young", "_old"])
def test_replace_drops_a_record_cached_in_either_generation(
    monkeypatch: pytest.MonkeyPatch, generation: str
) -> None:
    monkeypatch.setattr(store_module, "CACHE", 2)  # generations of two clients
    store = Store()
    kiwi, fig = rec("5", client=b"kiwi"), rec("5", client=b"fig")
    store.offer(kiwi)  # cached in the young generation
    if generation == "_old":
        store.offer(fig)  # the young generation fills and becomes the old one
    else:
        store.add_new(b"fig", pack(fig.at_line, b"fig"), fig.at_line)  # nothing cached
    assert b"kiwi" in getattr(store, generation)
    moved = rec("6", client=b"kiwi", coords=b"+35-118")
    split = split_client(moved.at_line)
    assert split is not None
    store.replace(b"kiwi", split[1], moved.at_line)
    assert store.get(b"kiwi") == moved
    assert store.digest() == Store([moved, fig]).digest()


def test_a_store_of_a_thousand_clients_gives_back_every_line() -> None:
    held = [rec("1", client=b"c%d" % n, skew=b"+0.%09d" % n) for n in range(1000)]
    store = Store(held)
    assert store.snapshot() == held
    assert all(store.line(r.client) == r.at_line for r in held)
    assert all(store.get(r.client) == r for r in held)
