"""Loading the state file in the background: lookups meanwhile, no write-back, no early sync."""

from __future__ import annotations

import gc
import sqlite3
from itertools import pairwise
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from herd_trio.lines import LineReader
from herd_trio.persist import Persister
from herd_trio.protocol import Record, parse_at
from herd_trio.restore import SLICE, Restore, clients_named
from herd_trio.statefile import PersistError, load_records, write_records
from herd_trio.store import Store, leaf_of
from tests.helpers import herd_config, make_node, record
from tests.test_links import EMPTY_ROUND, PEER_MAX, carry_collecting
from tests.test_persist import Log, rows, wait_for_batches, wait_for_compactions


def rec(client: bytes, time: int, origin: bytes = b"Clark") -> Record:
    return parse_at(b"AT %s +0.000000001 %s +34.068930-118.445127 %d" % (origin, client, time))


def append(path: Path, *lines: bytes) -> None:
    """Append `lines` to the file, as a server (or one a crash stopped) leaves them."""
    with path.open("ab") as file:
        file.write(b"".join(line + b"\n" for line in lines))


async def opened(
    path: Path, store: Store, log: Log | None = None, compact_min: int = 65_536
) -> tuple[Restore, Persister]:
    """A Restore of `path` into `store` with its Persister attached, as serve() builds them."""
    restore = await Restore.open(path, store, log or Log())
    persister = Persister(path, store=store, compact_min=compact_min)
    store.on_change(persister.note)
    restore.attach(persister)
    return restore, persister


def test_clients_named_takes_client_lines_only() -> None:
    lines = [
        b"IAMAT kiwi +1+1 5",
        b"WHATSAT pear 10 5",
        b"WHATISAT plum 10 5",
        b"IAMAT too few",
        b"HELLO a b c",
        b"",
    ]
    assert clients_named(lines) == [b"kiwi", b"pear", b"plum"]


async def test_a_missing_file_is_loaded_at_once(tmp_path: Path) -> None:
    restore = await Restore.open(tmp_path / "nobody.records", Store(), Log())
    assert restore.done
    await restore.wait()  # returns at once
    assert not (tmp_path / "nobody.records").exists()


@pytest.mark.parametrize("content", [b"this is not a records file" * 100, b""])
async def test_a_file_that_is_not_a_records_file_fails_at_open(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "Clark.records"
    path.write_bytes(content)
    with pytest.raises(PersistError, match=r"Clark\.records is (empty, )?not a herd_trio records"):
        await Restore.open(path, Store(), Log())


async def test_a_file_of_the_sqlite_format_is_converted_and_loaded(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    conn = sqlite3.connect(tmp_path / "Clark.sqlite3")
    with conn:
        conn.execute("CREATE TABLE records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)")
        conn.execute("INSERT INTO records VALUES (?, ?)", (b"kiwi", rec(b"kiwi", 1).at_line))
    conn.close()
    store, log = Store(), Log()
    restore, _ = await opened(path, store, log)
    assert log.lines[0].startswith(f"converted 1 records from {tmp_path / 'Clark.sqlite3'}")
    await restore.run()
    assert list(store) == [rec(b"kiwi", 1)]


async def test_the_load_fills_the_store_logs_and_writes_nothing_back(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "Clark.records"
    records = [rec(b"client-%d" % i, i) for i in range(3000)]  # several slices and chunks
    write_records(path, records)
    store, log = Store(), Log()
    restore, persister = await opened(path, store, log)
    assert not restore.done
    await nursery.start(persister.run)
    await restore.run()
    assert restore.done
    assert sorted(store, key=lambda r: r.client) == sorted(records, key=lambda r: r.client)
    assert log.lines[0] == f"loading records from {path}"
    assert log.lines[-1].startswith(f"3000 records loaded from {path} in ")
    assert log.lines[-1].endswith(" s (3000 clients held)")
    assert persister.statistics().pending == 0  # loaded records are on disk already
    assert store.offer(newer := rec(b"client-5", 9999)) is newer  # a later record is written
    await wait_for_batches(persister, 1)
    assert rows(path)[b"client-5"] == newer.at_line
    assert persister.statistics().rows_written == 1


async def test_bad_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    good = rec(b"kiwi", 7)
    write_records(path, [good])
    append(
        path,
        b"AT garbage",
        b"AT  Clark +0.000000001 spaced +1+1 1",  # not canonical
        b"AT Clark +0.000000001 nan +1+1 nan",  # not a time
        b"AT Clark +0.000000001 where 1+1 1",  # not coordinates
        b"\x00\xff",
    )
    store, log = Store(), Log()
    restore, _ = await opened(path, store, log)
    await restore.run()
    assert list(store) == [good]
    assert f"skipped 5 lines of {path} that are not valid AT lines" in log.lines
    assert load_records(path) == [good]  # the same rule for tools


async def test_ensure_fetches_named_clients_before_the_load_reaches_them(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"client-%d" % i, 100 + i) for i in range(2000)])
    store = Store()
    restore, persister = await opened(path, store)
    await restore.ensure(
        [b"WHATSAT client-1999 10 5", b"IAMAT client-7 +1+1 1", b"IAMAT new +1+1 1"]
    )
    assert {r.client for r in store} == {b"client-1999", b"client-7"}
    assert store.get(b"client-7") == rec(b"client-7", 107)
    assert persister.statistics().pending == 0  # looked-up records are not written back
    assert restore.lookups == 3
    # A client held from a peer, older than the file's record: the file's record wins.
    assert store.offer(peer := rec(b"client-9", 1, origin=b"Bona")) is peer
    await restore.ensure([b"IAMAT client-9 +1+1 1", b"WHATSAT client-9 10 5"])
    assert store.get(b"client-9") == rec(b"client-9", 109)
    assert restore.lookups == 4
    await restore.run()
    assert len(store) == 2000
    await restore.ensure([b"IAMAT other +1+1 1"])  # loaded: no more lookups
    assert restore.lookups == 4


async def test_lines_the_fast_path_leaves_are_loaded_as_before(tmp_path: Path) -> None:
    """A new client's canonical line is kept without a Record; a line of the right shape
    that is not canonical (a latitude past 90), and a client's second line, are offered
    as Records: the newer record of a client stands whichever line came first."""
    path = tmp_path / "Clark.records"
    far = parse_at(b"AT Clark +0.000000001 far +10+1 1").at_line.replace(b"+10+1", b"+95+1")
    write_records(path, [rec(b"kiwi", 5), rec(b"pear", 5)])
    append(path, far, rec(b"kiwi", 9).at_line, rec(b"pear", 1, origin=b"Bona").at_line)
    store, log = Store(), Log()
    restore, _ = await opened(path, store, log)
    await restore.run()
    assert store.line(b"far") == far
    assert store.get(b"kiwi") == rec(b"kiwi", 9)
    assert store.get(b"pear") == rec(b"pear", 5)  # the older line, read later, lost
    assert log.lines[-1].startswith(f"5 records loaded from {path} in ")


async def test_appended_lines_are_loaded_and_looked_up(tmp_path: Path) -> None:
    """Lines appended after the sorted section: the load and the lookups see them,
    newer than the sorted section's line of the same client."""
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"client-%d" % i, 100 + i) for i in range(500)])
    append(path, rec(b"client-7", 9000).at_line, rec(b"journal-only", 5).at_line)
    store = Store()
    restore, persister = await opened(path, store)
    # A line the persister appends during this run is not a lookup's business.
    append(path, rec(b"late", 1).at_line)
    await restore.ensure(
        [b"WHATSAT journal-only 10 5", b"IAMAT client-7 +1+1 1", b"IAMAT late +1+1 1"]
    )
    assert store.get(b"journal-only") == rec(b"journal-only", 5)
    assert store.get(b"client-7") == rec(b"client-7", 9000)
    assert store.get(b"late") is None
    assert persister.statistics().pending == 0
    await restore.run()
    assert len(store) == 501  # the lines of the file as it was at open: not "late"
    assert store.get(b"client-7") == rec(b"client-7", 9000)


async def test_a_bisection_finds_every_client_of_a_large_file(tmp_path: Path) -> None:
    """20,000 clients over 65,536 leaves: many leaves hold two or more, some none."""
    path = tmp_path / "Clark.records"
    records = [rec(b"c%d" % i, i) for i in range(20_000)]
    write_records(path, records)
    assert len({leaf_of(r.client) for r in records}) < len(records)  # shared leaves
    store = Store()
    restore, _ = await opened(path, store)
    assert restore.reader is not None
    found = restore.reader.lookup([r.client for r in records] + [b"absent", b"c20000"])
    assert sorted(found, key=lambda r: r.client) == sorted(records, key=lambda r: r.client)
    restore.close()


async def test_a_whole_load_allows_compaction(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"client-%d" % i, i) for i in range(50)])
    append(path, *[rec(b"client-%d" % i, 100 + i).at_line for i in range(50)])
    store = Store()
    restore, persister = await opened(path, store, compact_min=1)
    await nursery.start(persister.run)
    store.offer(rec(b"new", 1))  # noted: written, but the file is not compacted yet
    await wait_for_batches(persister, 1)
    assert persister.statistics().compactions == 0
    await restore.run()
    store.offer(rec(b"newer", 1))
    await wait_for_compactions(persister, 1)  # 102 lines appended for 52 clients
    assert rows(path) == {r.client: r.at_line for r in store}
    assert len(rows(path)) == 52


async def test_records_from_peers_during_the_load_win_or_lose_by_rank(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A peer's record newer than the file's is kept and written; a peer's record older
    than the file's loses, and the file's record is what stays on disk."""
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"kiwi", 10), rec(b"pear", 10)])
    store = Store()
    restore, persister = await opened(path, store)
    assert store.offer(newer := rec(b"kiwi", 20, origin=b"Bona")) is newer
    assert store.offer(older := rec(b"pear", 5, origin=b"Bona")) is older  # not loaded yet
    await nursery.start(persister.run)
    await wait_for_batches(persister, 1)  # the older pear went to disk, over the newer row
    await restore.run()
    assert store.get(b"kiwi") == newer
    assert store.get(b"pear") == rec(b"pear", 10)
    await wait_for_batches(persister, 2)  # the loaded pear is written back: its client was
    assert rows(path) == {b"kiwi": newer.at_line, b"pear": rec(b"pear", 10).at_line}


async def test_no_sync_before_the_store_is_loaded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """While loading, a link neither starts a sync round nor answers one; once loaded,
    it starts its round at once."""
    herd = herd_config(heartbeat_interval=2.0, sync_interval=100.0)
    alpha = attrs.evolve(make_node("Alpha", herd), restore=Restore(done=False))
    alpha.store.offer(record("Alpha", b"IAMAT kiwi +34-118 5"))
    ours, theirs = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    start = trio.current_time()
    nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
    reader = LineReader(theirs, PEER_MAX)
    await theirs.send_all(EMPTY_ROUND + b"\n")  # "I hold nothing": not answered while loading
    with trio.fail_after(60):
        assert await reader.receive_line() == b"PING"
        assert trio.current_time() - start == 2.0
        await trio.sleep(1.5)
        await alpha.restore.run()  # nothing to read: done at once
        round_start = await reader.receive_line()
    assert round_start is not None
    assert round_start.startswith(b"SUMS 0 0 ")
    assert trio.current_time() - start == 3.5
    assert errors == []


async def test_the_load_lets_other_tasks_run_between_slices(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"client-%d" % i, i) for i in range(10 * SLICE)])
    store = Store()
    restore, _ = await opened(path, store)
    turns: list[int] = []  # how many records the store held at each turn of the other task
    collecting: list[bool] = []  # whether the cyclic collector ran meanwhile

    async def other_client() -> None:
        while not restore.done:
            turns.append(len(store))
            if 0 < len(store) < 10 * SLICE:
                collecting.append(gc.isenabled())
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_client)
        await restore.run()
    assert len(store) == 10 * SLICE
    steps = [b - a for a, b in pairwise(turns)]
    # At most one slice per scheduler batch (trio may run the two tasks in either order
    # within a batch, so two slices can fall between two turns of the other task).
    assert max(steps) <= 2 * SLICE
    assert len({n for n in turns if 0 < n < 10 * SLICE}) >= 4  # it ran during the load
    assert collecting
    assert not any(collecting)  # no full collections over what is being loaded...
    assert gc.isenabled()  # ...and back on afterwards
