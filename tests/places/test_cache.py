"""AnswerCache on its own: fakes and a fake clock, no sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from herd_trio.places.cache import AnswerCache, CacheStatistics


class Upstream:
    """A fake remote: counts calls, takes `delay` seconds, answers `calls` so far."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.calls = 0
        self.fail_next = False

    def __call__(self, key: str) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            self.calls += 1
            number = self.calls
            await trio.sleep(self.delay)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError(f"call {number} failed")
            return f"{key}#{number}"

        return call


def keep_all(_: str) -> bool:
    return True


async def test_ttl_expiry_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=10.0, size=8)
    upstream = Upstream(delay=1.0)
    assert await cache.fetch("a", upstream("a"), keep=keep_all) == "a#1"  # stored at t=1
    await trio.sleep(9.5)
    assert await cache.fetch("a", upstream("a"), keep=keep_all) == "a#1"  # t=10.5
    await trio.sleep(0.5)  # t=11: expired
    assert await cache.fetch("a", upstream("a"), keep=keep_all) == "a#2"
    assert trio.current_time() == 12.0


async def test_lru_bound(autojump_clock: trio.testing.MockClock) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=100.0, size=2)
    upstream = Upstream(delay=0)
    for key in "abacab":
        await cache.fetch(key, upstream(key), keep=keep_all)
    # a#1, b#2, a hit, c#3 evicts b (a was used since), a hit, b#4 evicts c
    assert upstream.calls == 4
    assert await cache.fetch("a", upstream("a"), keep=keep_all) == "a#1"
    assert await cache.fetch("c", upstream("c"), keep=keep_all) == "c#5"


async def test_keep_false_is_not_stored(autojump_clock: trio.testing.MockClock) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=100.0, size=2)
    upstream = Upstream(delay=0)
    for _ in range(3):
        await cache.fetch("a", upstream("a"), keep=lambda answer: False)
    assert upstream.calls == 3


@pytest.mark.parametrize(("ttl", "size"), [(0.0, 8), (10.0, 0)])
async def test_nothing_stored_but_calls_in_flight_still_shared(
    autojump_clock: trio.testing.MockClock, ttl: float, size: int
) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=ttl, size=size)
    upstream = Upstream(delay=1.0)
    answers: list[str] = []

    async def ask() -> None:
        answers.append(await cache.fetch("a", upstream("a"), keep=keep_all))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert answers == ["a#1"] * 5
    assert await cache.fetch("a", upstream("a"), keep=keep_all) == "a#2"
    assert cache.statistics() == CacheStatistics(entries=0, in_flight=0, hits=0, joins=4, calls=2)


async def test_a_failing_call_raises_for_its_caller_and_waiters_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=10.0, size=8)
    upstream = Upstream(delay=1.0)
    upstream.fail_next = True
    answers: list[tuple[float, str]] = []

    async def first() -> None:
        with pytest.raises(RuntimeError, match="call 1 failed"):
            await cache.fetch("a", upstream("a"), keep=keep_all)

    async def wait() -> None:
        answer = await cache.fetch("a", upstream("a"), keep=keep_all)
        answers.append((trio.current_time(), answer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait)
        nursery.start_soon(wait)
    # Call 1 fails at t=1; one waiter makes call 2 (done at t=2), the other joins it.
    assert answers == [(2.0, "a#2"), (2.0, "a#2")]
    assert upstream.calls == 2


async def test_a_cancelled_caller_hands_over_to_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=10.0, size=8)
    upstream = Upstream(delay=5.0)
    answers: list[tuple[float, str]] = []

    async def wait() -> None:
        answer = await cache.fetch("a", upstream("a"), keep=keep_all)
        answers.append((trio.current_time(), answer))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1.0):  # the first caller's own deadline
            nursery.start_soon(wait)
            nursery.start_soon(wait)
            await cache.fetch("a", upstream("a"), keep=keep_all)
    # The first call dies at t=1 with its caller; a waiter's call then takes 5 s.
    assert answers == [(6.0, "a#2"), (6.0, "a#2")]
    assert cache.statistics() == CacheStatistics(entries=1, in_flight=0, hits=0, joins=1, calls=2)


async def test_hits_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    cache: AnswerCache[str, str] = AnswerCache(ttl=10.0, size=8)
    upstream = Upstream(delay=0)
    await cache.fetch("a", upstream("a"), keep=keep_all)
    with trio.CancelScope() as scope:
        scope.cancel()
        await cache.fetch("a", upstream("a"), keep=keep_all)
        pytest.fail("a hit did not checkpoint")
    assert cache.statistics().hits == 1
