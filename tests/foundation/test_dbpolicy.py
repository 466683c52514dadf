"""The state database's one retry policy (connector/dbpolicy.py, issue 20): transient errors
are retried with capped, jittered exponential backoff and logged without their message;
anything else propagates at once. No database needed: the driver's own exception classes."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import PoolTimeout
from tenacity import RetryCallState

from connector import dbpolicy

SECRET = "host=db user=app password=hunter2"


class Flaky:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


async def _run(
    fn: Flaky, *, initial: float = 0.001, cap: float = 0.002, attempts: int | None = None
) -> str:
    policy = dbpolicy.retrying(
        "the test write", pipeline="orders", initial=initial, cap=cap, attempts=attempts
    )
    async for attempt in policy:
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


async def test_retries_transient_errors_and_logs_each_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fn = Flaky([psycopg.OperationalError(SECRET), PoolTimeout("pool"), OSError("reset")])
    with caplog.at_level(logging.WARNING, logger="connector.dbpolicy"):
        assert await _run(fn, initial=0.001, cap=0.002) == "done"
    assert fn.calls == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "connector.dbpolicy"]
    assert len(lines) == 3
    assert lines[0].startswith(
        "state database unavailable for the test write (OperationalError); retrying in "
    )
    assert "(PoolTimeout)" in lines[1] and "(OSError)" in lines[2]
    assert all(getattr(r, "pipeline", None) == "orders" for r in caplog.records)
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.UndefinedTable("no table"),
        psycopg.errors.SyntaxError("bad sql"),
        psycopg.errors.UniqueViolation("dup"),
        psycopg.ProgrammingError("programming"),
        ValueError("a bug of ours"),
    ],
)
async def test_gives_up_at_once_on_anything_else(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    fn = Flaky([error])
    with caplog.at_level(logging.WARNING, logger="connector.dbpolicy"):
        with pytest.raises(type(error)):
            await _run(fn, initial=0.001)
    assert fn.calls == 1
    assert not [r for r in caplog.records if r.name == "connector.dbpolicy"]


async def test_a_bounded_policy_raises_the_last_error() -> None:
    fn = Flaky([psycopg.OperationalError("down")] * 5)
    with pytest.raises(psycopg.OperationalError):
        await _run(fn, initial=0.001, cap=0.001, attempts=3)
    assert fn.calls == 3


@given(
    initial=st.floats(min_value=0.01, max_value=5.0),
    cap=st.floats(min_value=0.01, max_value=60.0),
    attempt=st.integers(min_value=1, max_value=200),
)
def test_waits_grow_exponentially_with_jitter_and_never_pass_the_cap(
    initial: float, cap: float, attempt: int
) -> None:
    policy = dbpolicy.retrying("x", initial=initial, cap=cap)
    state = RetryCallState(policy, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    wait = policy.wait(state)
    base = initial * 2 ** min(attempt - 1, 100)
    assert 0 <= wait <= cap
    if base + initial <= cap:
        assert base <= wait <= base + initial


async def test_a_stop_ends_the_retries_with_the_last_error() -> None:
    stop = asyncio.Event()
    fn = Flaky([psycopg.OperationalError("down")] * 1000)

    async def run() -> None:
        policy = dbpolicy.retrying("x", initial=30.0, cap=30.0, stop=stop)
        async for attempt in policy:
            with attempt:
                await fn()

    task = asyncio.create_task(run())
    while fn.calls < 1:
        await asyncio.sleep(0.01)
    stop.set()  # during a 30-second wait: it ends now, without waiting it out
    with pytest.raises(psycopg.OperationalError):
        await asyncio.wait_for(task, 10)
    assert fn.calls <= 2
