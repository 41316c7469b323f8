"""The silence watchdog of a peer link, on trio's mock clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from herd_trio.silence import Silence


class Silent(Exception):
    pass


async def test_waiting_longer_than_the_limit_raises_at_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silence = Silence(3.0, Silent)
    silence.waiting()
    start = trio.current_time()
    with pytest.raises(Silent):
        await silence.watch()
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_lines_in_time_keep_the_link_and_handling_them_is_not_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silence = Silence(3.0, Silent)
    silence.waiting()
    began = math.inf

    async def reader() -> None:
        nonlocal began
        for _ in range(5):
            await trio.sleep(2.5)  # the peer speaks just in time
            silence.heard()
            await trio.sleep(10)  # a long answer to a sync round: not the peer's silence
            silence.waiting()
        began = trio.current_time()
        await trio.sleep(60)

    async def link() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(silence.watch)
            await reader()

    with pytest.RaisesGroup(Silent):
        await link()
    assert trio.current_time() - began == pytest.approx(3.0)
