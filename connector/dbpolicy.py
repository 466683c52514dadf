"""The state database boundary: which driver errors are passing trouble, how a best-effort
write gives up, and how a database operation is retried.

* :data:`TRANSIENT` are the errors of a database that went away or is busy (connection lost,
  server restarting, pool exhausted, network): worth another attempt. Everything else
  (a programming error, a missing table, a constraint) is not, and propagates at once.
* :func:`best_effort` wraps a bookkeeping write whose loss costs nothing but information
  (why a pipeline halted, that it stopped cleanly): a failure is logged in one format and the
  caller carries on.

Log lines name the error's class and SQLSTATE only, never its message or a DSN (a driver's
message can quote the connection string; invariant: secrets never in logs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
from psycopg_pool import PoolTimeout

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
