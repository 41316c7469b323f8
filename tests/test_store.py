"""Store: the newest record per client by (client time, origin, coords), PROTOCOL.md §2."""

from __future__ import annotations

import zlib
from decimal import Decimal
from hashlib import blake2b
from random import Random

from hypothesis import given
from hypothesis import strategies as st

from herd_trio.protocol import Record
from herd_trio.store import Store


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
    assert store.get(b"kiwi") is record
    assert len(store) == 1


def test_newer_client_time_wins_compared_as_numbers() -> None:
    store = Store()
    assert store.offer(rec("9.5", origin=b"Zed", coords=b"+9-9"))
    newer = rec("10", origin=b"Alpha", coords=b"+1-1")  # "10" < "9.5" as bytes
    assert store.offer(newer) is newer
    assert store.get(b"kiwi") is newer
    assert (
        store.offer(offered := rec("9.99999999999", origin=b"Zed", coords=b"+9-9")) is not offered
    )
    assert store.get(b"kiwi") is newer


def test_older_record_is_refused_and_the_stored_one_kept() -> None:
    store = Store()
    held = rec("1621464827.959498503")
    store.offer(held)
    assert store.offer(offered := rec("1621464827.959498502", origin=b"Zed")) is not offered
    assert store.get(b"kiwi") is held


def test_equal_time_tie_breaks_on_origin_then_coords() -> None:
    store = Store()
    store.offer(rec("5", origin=b"Bona", coords=b"+9-9"))
    by_origin = rec("5", origin=b"Clark", coords=b"+1-1")
    assert store.offer(by_origin) is by_origin
    assert store.offer(offered := rec("5", origin=b"Bona", coords=b"+9.9-9")) is not offered
    by_coords = rec("5", origin=b"Clark", coords=b"+2-1")
    assert store.offer(by_coords) is by_coords
    assert store.get(b"kiwi") is by_coords
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
    store.on_change(heard.append)
    first = rec("5")
    assert store.offer(first) is first
    assert (
        store.offer(offered := rec("5")) is not offered
    )  # the same record again, e.g. flooded back
    assert store.get(b"kiwi") is first
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
    heard: list[Record] = []
    also: list[Record] = []
    store.on_change(heard.append)
    store.on_change(also.append)
    first, newer, other = rec("1"), rec("2"), rec("1", client=b"apple")
    store.offer(first)
    store.offer(rec("0.5"))
    store.offer(newer)
    store.offer(rec("2"))
    store.offer(other)
    assert heard == [first, newer, other]
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
    assert store.get(b"kiwi") is newest
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


# --- digests for anti-entropy -------------------------------------------------------------


def oracle_digest(held: list[Record]) -> list[int]:
    """Independent digest: per crc32 bucket, the XOR of 8-byte blake2b of the AT lines."""
    buckets = [0] * 256
    for one in held:
        fingerprint = blake2b(one.at_line, digest_size=8).digest()
        buckets[zlib.crc32(one.client) % 256] ^= int.from_bytes(fingerprint, "big")
    return buckets


def test_digest_summarises_what_the_store_holds() -> None:
    store = Store()
    assert store.digest() == [0] * 256
    kiwi, apple = rec("1"), rec("1", client=b"apple")
    store.offer(kiwi)
    store.offer(apple)
    assert store.digest() == oracle_digest([kiwi, apple])
    newer = rec("2")
    store.offer(newer)
    assert store.digest() == oracle_digest([newer, apple])  # the replaced one is gone
    store.offer(rec("0"))  # refused: no change
    assert store.digest() == oracle_digest([newer, apple])


def test_differing_gives_every_record_of_the_differing_buckets() -> None:
    mine, theirs = Store(), Store()
    shared = [rec("1", client=b"c%d" % n) for n in range(50)]
    for one in shared:
        mine.offer(one)
        theirs.offer(one)
    assert mine.differing(theirs.digest()) == []
    extra = rec("1", client=b"extra")
    mine.offer(extra)
    newer = rec("9", client=b"c7")
    theirs.offer(newer)
    sent = mine.differing(theirs.digest())
    buckets = {zlib.crc32(b"extra") % 256, zlib.crc32(b"c7") % 256}
    assert sorted(r.client for r in sent) == sorted(
        r.client for r in mine if zlib.crc32(r.client) % 256 in buckets
    )
    assert extra in sent
    for one in sent:  # the receiver keeps what is newer: the pair converges
        theirs.offer(one)
    for one in theirs.differing(mine.digest()):
        mine.offer(one)
    assert mine.digest() == theirs.digest()
    assert mine.get(b"c7") == newer
    assert theirs.get(b"extra") == extra


@given(st.lists(records, max_size=12), st.randoms(use_true_random=False))
def test_the_same_records_in_any_order_give_the_same_digest(
    batch: list[Record], rng: Random
) -> None:
    shuffled = list(batch)
    rng.shuffle(shuffled)
    assert Store(batch).digest() == Store(shuffled).digest()
