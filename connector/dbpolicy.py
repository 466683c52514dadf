"""The state database boundary: which driver errors are passing trouble, how a best-effort
write gives up, and how a database operation is retried.

* :data:`TRANSIENT` are the errors of a database that went away or is busy (connection lost,
  server restarting, pool exhausted, network): worth another attempt. Everything else
  (a programming error, a missing table, a constraint) is not, and propagates at once.
* :func:`best_effort` wraps a bookkeeping write whose loss costs nothing but information
  (why a pipeline halted, that it stopped cleanly): a failure is logged in one format and the
  caller carries on.
* :func:`retrying` is the one retry policy (tenacity): transient errors only, exponential
  backoff with jitter and a cap, every retry logged in one format.

Log lines name the error's class and SQLSTATE only, never its message or a DSN (a driver's
message can quote the connection string; invariant: secrets never in logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import psycopg
from psycopg_pool import PoolTimeout
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    stop_never,
)
from tenacity.stop import stop_base

log = logging.getLogger(__name__)

# connection-class failures: the only ones a retry can cure (STYLE.md: retry only these)
TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    OSError,
    TimeoutError,
)

# what a best-effort bookkeeping write may swallow: any database error, not a bug of ours
BEST_EFFORT: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout, OSError)


def describe(exc: BaseException) -> str:
    """The error's class and SQLSTATE (``UndefinedTable/42P01``): safe to log, never the
    message (which may quote a DSN or a row's values)."""
    code = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}/{code}" if code else type(exc).__name__


@contextlib.asynccontextmanager
async def best_effort(what: str, pipeline: str | None = None) -> AsyncIterator[None]:
    """Run a bookkeeping write that must not stop the caller: a database failure is logged
    (``state write failed: <what> (<error>); carrying on``) and swallowed. Cancellation and
    any other exception propagate."""
    try:
        yield
    except BEST_EFFORT as exc:
        log.warning(
            "state write failed: %s (%s); carrying on",
            what,
            describe(exc),
            extra={"pipeline": pipeline} if pipeline is not None else None,
        )


def retrying(
    what: str,
    *,
    pipeline: str | None = None,
    initial: float = 0.5,
    cap: float = 30.0,
    attempts: int | None = None,
    stop: asyncio.Event | None = None,
) -> AsyncRetrying:
    """The one retry policy of the state database: retry :data:`TRANSIENT` failures only
    (anything else, e.g. a programming error, propagates at once), waiting ``initial`` × 2ⁿ
    plus up to ``initial`` of random jitter, at most ``cap`` seconds, forever or for
    ``attempts`` tries (then the last error propagates); with ``stop``, a wait ends early when
    it is set and no further attempt is made (the last error propagates). Each retry is logged as
    ``state database unavailable for <what> (<error>); retrying in <s>s``. Use::

        async for attempt in dbpolicy.retrying("the bulk job's result"):
            with attempt:
                ...
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "state database unavailable for %s (%s); retrying in %.1fs",
            what,
            describe(exc) if exc is not None else "?",
            wait,
            extra={"pipeline": pipeline} if pipeline is not None else None,
        )

    def wait(state: RetryCallState) -> float:
        # exponential from `initial`, plus jitter (so that processes that lost the same
        # database do not come back in step), capped
        step = initial * 2.0 ** min(state.attempt_number - 1, 60)
        return min(cap, step + random.uniform(0, initial))

    async def sleep(seconds: float) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    give_up: stop_base = stop_after_attempt(attempts) if attempts is not None else stop_never
    return AsyncRetrying(
        sleep=sleep,
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait,
        stop=stop_any(give_up, _StopWhenSet(stop)) if stop is not None else give_up,
        before_sleep=before_sleep,
        reraise=True,
    )


class _StopWhenSet(stop_base):
    """No further attempt once the event is set (shutting down)."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.event.is_set()
