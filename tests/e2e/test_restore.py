"""Restart with a big state file: the port accepts at once and answers right while loading."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import trio

from herd_trio.protocol import Record
from herd_trio.statefile import write_records
from tests.e2e.herd import Herd, poll, running

RECORDS = 200_000
COORDS = b"+34.068930-118.445127"
BASE = 1_700_000_000


def stored(i: int) -> Record:
    """Record i of the state file: client `c<i>`, client time BASE + i."""
    client, sent = b"c%d" % i, b"%d.5" % (BASE + i)
    at_line = b"AT Solo +0.000123456 %s %s %s" % (client, COORDS, sent)
    return Record(client, COORDS, Decimal(sent.decode()), b"Solo", at_line)


async def test_a_restart_with_200k_records_answers_right_while_loading(tmp_path: Path) -> None:
    herd = Herd.create(tmp_path, names=["Solo"], edges=[], state_dir="state").with_admin()
    state = tmp_path / "state" / "Solo.records"
    await trio.to_thread.run_sync(write_records, state, [stored(i) for i in range(RECORDS)])
    size = state.stat().st_size
    with running(herd):
        herd.start("Solo")
        session = await herd.session("Solo")  # polls until the port accepts
        last, middle = stored(RECORDS - 1), stored(RECORDS // 2)
        # A stored client the load has not reached yet: its stored line, never `?`.
        reply = await session.whatsat(b"WHATSAT %s 10 0" % last.client)
        assert reply.startswith(last.at_line + b"\n{"), reply
        # An IAMAT older than the stored record gets the stored record's AT line...
        older = b"IAMAT %s +1.0+2.0 %d" % (middle.client, BASE)
        assert await session.line(older) == middle.at_line + b"\n"
        # ...a new client is taken, and an unknown one is still unknown.
        fresh = await session.line(b"IAMAT newcomer %s %d" % (COORDS, BASE))
        assert fresh.startswith(b"AT Solo ")
        assert await session.line(b"WHATSAT nobody 10 0") == b"? WHATSAT nobody 10 0\n"
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            url = f"{herd.admin_url('Solo')}/readyz"

            async def answered() -> httpx.Response | None:
                try:
                    return await client.get(url)
                except httpx.TransportError:
                    return None

            first = await poll("the admin port answers", answered)
            assert first.status_code == 503
            assert first.json()["state_loaded"] is False
            assert first.json()["listeners_up"] is True

            async def ready() -> bool | None:
                return True if (await client.get(url)).status_code == 200 else None

            await poll("Solo ready", ready, deadline=60)
        done = f"{RECORDS} records loaded from"
        log = await herd.wait_logged("Solo", done)
        assert log.index("loading records from") < log.index(" connected") < log.index(done)
        # Every stored record is still answered from the store, the newcomer too.
        for i in (0, RECORDS // 3, RECORDS - 1):
            assert await session.whatsat(b"WHATSAT c%d 10 0" % i) == (
                stored(i).at_line + b"\n" + reply.split(b"\n", 1)[1]
            )
        assert await session.line(b"IAMAT newcomer %s %d" % (COORDS, BASE)) == fresh
        await session.stream.aclose()
    # Nothing loaded was written back: only the newcomer went through the persister.
    assert (await trio.Path(state).read_bytes())[size:] == fresh
