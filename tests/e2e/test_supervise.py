"""Supervision primitives of the runtime: named tasks, signal handlers that restore the
previous ones, the pipeline lease on a real PostgreSQL; verify's value comparison."""

from __future__ import annotations

import asyncio
import os
import signal
from decimal import Decimal

from connector import db
from connector.runtime import PipelineLease, TaskSupervisor, on_stop_signals
from connector.verify import same_value


async def test_a_failing_task_is_recorded_and_named() -> None:
    sup = TaskSupervisor()

    async def boom() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("disk on fire")

    async def forever() -> None:
        await asyncio.Event().wait()

    sup.spawn("side", forever())
    sup.spawn("worker", boom())
    await asyncio.wait_for(sup.failed.wait(), 5)
    assert sup.failure is not None and sup.failure.name == "worker"
    assert "disk on fire" in sup.failure.describe()
    assert sup.names == ["side"]  # the dead task is no longer referenced, the other is
    await sup.close()
    assert sup.names == []


async def test_a_task_that_returns_unexpectedly_is_a_failure() -> None:
    sup = TaskSupervisor()

    async def quits() -> None:
        return None

    async def may_quit() -> None:
        return None

    sup.spawn("allowed", may_quit(), may_return=True)
    await asyncio.sleep(0.05)
    assert not sup.failed.is_set()
    sup.spawn("loop", quits())
    await asyncio.wait_for(sup.failed.wait(), 5)
    assert sup.failure is not None and sup.failure.error is None
    assert "ended unexpectedly" in sup.failure.describe()


async def test_signal_handlers_call_back_and_are_restored() -> None:
    seen: list[signal.Signals] = []

    def previous(signum: int, frame: object) -> None:  # pragma: no cover - never called
        raise AssertionError("previous handler called")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        got = asyncio.Event()
        with on_stop_signals(lambda s: (seen.append(s), got.set())):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(got.wait(), 5)
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


async def test_one_lease_owner_and_a_standby_that_takes_over(database: str) -> None:
    key = db.advisory_key("connector", "pipeline", "orders")
    first = PipelineLease(database, key, name="orders", owner="a", retry_interval=0.05)
    second = PipelineLease(database, key, name="orders", owner="b", retry_interval=0.05)
    stop = asyncio.Event()
    assert await first.acquire(stop)
    waiting = asyncio.create_task(second.acquire(stop))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # hot standby: retrying
    await first.release()
    assert await asyncio.wait_for(waiting, 5)
    assert second.held
    # a standby told to stop gives up without the lease
    third = PipelineLease(database, key, name="orders", owner="c", retry_interval=0.05)
    stop3 = asyncio.Event()
    t3 = asyncio.create_task(third.acquire(stop3))
    await asyncio.sleep(0.1)
    stop3.set()
    assert await asyncio.wait_for(t3, 5) is False
    await third.release()
    await second.release()


def test_verify_compares_values_by_meaning() -> None:
    assert same_value(Decimal("12.50"), 12.5, "currency")
    assert not same_value(Decimal("12.50"), 12.51, "currency")
    assert same_value("2024-01-02T03:04:05+00:00", "2024-01-02T04:04:05+01:00", "datetime")
    assert not same_value("2024-01-02T03:04:05+00:00", "2024-01-02T03:04:06+00:00", "datetime")
    assert same_value(None, "", "text")
    assert not same_value("a", "A", "text")
    assert same_value(["b", "a"], ["a", "b"], "multiselectpicklist")
    assert same_value(7, Decimal("7"), "integer")
    assert same_value(False, None, "boolean")
    assert not same_value(True, False, "boolean")
