"""AdaptiveLimiter: AIMD without clocks."""

from __future__ import annotations

import asyncio

import pytest

from connector.zoho.limiter import AdaptiveLimiter


async def test_multiplicative_decrease_once_per_generation() -> None:
    lim = AdaptiveLimiter(20)
    tickets = [await lim.acquire() for _ in range(8)]
    assert lim.in_flight == 8
    # a burst of 429s for calls started in the same generation lowers the limit once
    assert lim.on_overload(tickets[0]) is True
    assert lim.limit == 10
    for t in tickets[1:]:
        assert lim.on_overload(t) is False
    assert lim.limit == 10
    # a call started after the decrease can lower it again
    fresh = await lim.acquire()
    assert lim.on_overload(fresh) is True
    assert lim.limit == 5
    for _ in range(9):
        await lim.release()
    assert lim.in_flight == 0
    assert lim.decreases == 2


async def test_floor_at_min_limit() -> None:
    lim = AdaptiveLimiter(4, min_limit=2)
    for _ in range(5):
        lim.on_overload()
    assert lim.limit == 2


async def test_additive_increase_after_a_window_up_to_max() -> None:
    lim = AdaptiveLimiter(6)
    lim.on_overload()
    assert lim.limit == 3
    for _ in range(2):
        lim.on_success()
    assert lim.limit == 3  # window not yet full
    lim.on_success()
    assert lim.limit == 4  # 3 successes at limit 3 -> +1
    for _ in range(4):
        lim.on_success()
    assert lim.limit == 5
    for _ in range(100):
        lim.on_success()
    assert lim.limit == 6 == lim.max_limit
    assert lim.increases == 3


async def test_waiters_blocked_at_limit_proceed_on_release() -> None:
    lim = AdaptiveLimiter(2)
    a = await lim.acquire()
    await lim.acquire()
    lim.on_overload(a)  # limit 1 while 2 are in flight
    got = asyncio.Event()

    async def waiter() -> None:
        async with lim.slot():
            got.set()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert not got.is_set()
    await lim.release()  # in flight 1, limit 1: still blocked
    await asyncio.sleep(0)
    assert not got.is_set()
    await lim.release()
    await asyncio.wait_for(task, 5)
    assert got.is_set() and lim.in_flight == 0


async def test_concurrency_never_exceeds_limit() -> None:
    lim = AdaptiveLimiter(3)
    peak = 0

    async def work() -> None:
        nonlocal peak
        async with lim.slot():
            peak = max(peak, lim.in_flight)
            await asyncio.sleep(0)
            lim.on_success()

    await asyncio.gather(*(work() for _ in range(50)))
    assert peak == 3
    assert lim.in_flight == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(0)
    with pytest.raises(ValueError):
        AdaptiveLimiter(5, min_limit=6)
    with pytest.raises(ValueError):
        AdaptiveLimiter(5, decrease_factor=1.0)


async def test_queued_counts_the_calls_holding_a_slot_and_those_waiting_for_one() -> None:
    # the planner plans a new call behind these (PlannerInput.calls_ahead)
    lim = AdaptiveLimiter(2)
    held = [await lim.acquire() for _ in range(2)]
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert (lim.in_flight, lim.waiting, lim.queued) == (2, 3, 5)
    waiters[2].cancel()  # a call given up while waiting leaves the queue
    await asyncio.gather(waiters[2], return_exceptions=True)
    assert lim.queued == 4
    await lim.release()
    await asyncio.sleep(0)
    assert (lim.in_flight, lim.waiting, lim.queued) == (2, 1, 3)
    assert held
    await lim.release()
    await asyncio.gather(*waiters[:2])
    assert (lim.in_flight, lim.waiting, lim.queued) == (2, 0, 2)
    await lim.release()
    await lim.release()
    assert lim.queued == 0
