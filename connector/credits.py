"""The credit recorder: charged CRM calls queued for the ``credit_ledger`` and attributed to
the pipeline on whose behalf they were made (docs/emitter.md; split out of connector/emitter.py,
which re-exports these names)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from connector import state

#: The pipeline on whose behalf a CRM call is made (credit ledger attribution).
current_pipeline: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "connector_current_pipeline", default=None
)
# the HTTP seconds of each CRM call made in this context (CreditRecorder appends them): the
# upsert latency estimate is the HTTP call only, not the limiter's slot wait (issue 18)
http_seconds: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "connector_http_seconds", default=None
)


class CreditRecorder:
    """A ``ZohoClient.on_call`` hook that queues charged calls for the ``credit_ledger``.

    The hook is synchronous (it runs inside the client's request); ``flush`` writes the queue.
    Calls are attributed to ``current_pipeline`` (set by the emitter around its calls).
    ``chain`` is called too (e.g. the metrics hook of the runtime).
    """

    def __init__(self, chain: Callable[..., None] | None = None) -> None:
        self._queue: list[tuple[str | None, str, int, int, int | None]] = []
        self._chain = chain

    def __call__(  # noqa: PLR0917 (CallHook's positional contract)
        self,
        api: str,
        records: int,
        credits: int,
        latency_s: float,
        status: int,
        remaining: int | None,
    ) -> None:
        if credits > 0:
            self._queue.append((current_pipeline.get(), api, credits, records, remaining))
        seen = http_seconds.get()
        if seen is not None:
            seen.append(latency_s)
        if self._chain is not None:
            self._chain(api, records, credits, latency_s, status, remaining)

    def pending(self) -> int:
        return len(self._queue)

    async def flush_pending(
        self,
        pool: AsyncConnectionPool[Any],
        schema: str,
        *,
        then: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        """The one flush of this queue (the runtime's periodic and exit flushes and the
        engine's flushes all come here): with calls queued, ``flush`` them through one of
        ``pool``'s connections, then run ``then`` on that connection (the engine reads the
        rolling 24 h total there). Nothing queued: no connection is taken. Errors are the
        caller's to handle; calls not stored stay queued."""
        if not self._queue:
            return
        async with pool.connection() as conn:
            await self.flush(conn, schema)
            if then is not None:
                await then(conn)

    async def flush(self, conn: psycopg.AsyncConnection[Any], schema: str) -> int:
        """Write the queued calls into ``credit_ledger`` in one transaction; returns the credits
        written. Calls that were not stored stay queued for the next flush.

        The write is shielded from the caller's cancellation. Interrupted during its COMMIT,
        psycopg cancels the query on the server, reads the COMMIT's answer and raises
        ``CancelledError`` even when the rows were stored; re-queued, they were written again
        by the next flush (the engine's shutdown does one): a bulk job's 500 counted twice.
        A cancelled caller now waits for the write to end (a few rows), so that the queue
        holds exactly what was not stored, then the cancellation goes on; a second cancel is
        passed to the write (psycopg's own handling again)."""
        queue, self._queue = self._queue, []
        if not queue:
            return 0
        write = asyncio.create_task(self._write(conn, schema, queue), name="credit-ledger-flush")
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            if not write.done():
                with contextlib.suppress(Exception):  # its failure re-queued the calls
                    await write
            raise
        return sum(q[2] for q in queue)

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        queue: list[tuple[str | None, str, int, int, int | None]],
    ) -> None:
        try:
            async with conn.transaction():
                for pipeline, api, credits, records, remaining in queue:
                    await state.record_credits(
                        conn,
                        schema,
                        pipeline,
                        api=api,
                        credits=credits,
                        records=records,
                        remaining=remaining,
                    )
        except BaseException:
            self._queue[:0] = queue
            raise


@contextlib.contextmanager
def acting_for(pipeline: str) -> Iterator[None]:
    """Attribute CRM calls made inside the block to ``pipeline`` (credit ledger)."""
    token = current_pipeline.set(pipeline)
    try:
        yield
    finally:
        current_pipeline.reset(token)
