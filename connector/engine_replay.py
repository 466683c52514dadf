"""``connector replay``: an outbox range sent again, newest version per key, never stale
(docs/operations-cli.md).

``Replay`` is a mixin of :class:`connector.engine.Engine`, which holds the state it uses
(declared below for the type checker) and re-exports ``ReplayReport``. Split from
``connector.engine`` (issue 20)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from connector import outbox, state
from connector.coalesce import BatchTracker, Coalescer
from connector.config import PipelineConfig
from connector.emitter import EmitOutcome
from connector.engine_common import Clock
from connector.events import Op, stamp_of


@dataclass
class ReplayReport:
    events: int = 0  # outbox events in the range
    sent_keys: int = 0  # keys sent (newest version each)


class Replay:
    """``Engine.replay``: a mixin of ``Engine``."""

    pipeline: PipelineConfig
    schema: str
    clock: Clock
    tracker: BatchTracker
    coalescer: Coalescer
    _pool: AsyncConnectionPool[Any] | None
    _drain_all: bool
    _retry_until: float
    _tasks: set[asyncio.Task[EmitOutcome]]
    _fences: dict[int, float]

    if TYPE_CHECKING:  # defined by Engine and its other mixins

        def _resources(self) -> contextlib.AbstractAsyncContextManager[None]: ...
        async def _load_fences(self) -> None: ...
        def _raise_failed(self) -> None: ...
        def _dispatch(self, now: float) -> float | None: ...
        async def _flush_credits(self) -> None: ...

    async def replay(
        self,
        *,
        from_offset: int | None = None,
        to_offset: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        key: str | None = None,
        resend: bool = False,
    ) -> ReplayReport:
        """Send an outbox range again (``connector replay``), newest version per key, with the
        cheapest API for its size. Never stale: an event older than what ``key_state`` holds
        for its key is skipped. Without ``resend`` an event equal to the acknowledged one is
        skipped too (replay is then idempotent: only what never reached the CRM goes); with
        ``resend`` the acknowledged version is sent again (e.g. after records were lost on the
        CRM side). The checkpoint is not touched. Not while ``run`` runs for this pipeline."""
        report = ReplayReport()
        saved = self.coalescer, self.tracker
        self.tracker = BatchTracker()
        self.coalescer = Coalescer(self.tracker)
        try:
            async with self._resources():
                assert self._pool is not None
                await self._load_fences()  # an orphan bulk job may still write these keys
                batch = 0
                async with self._pool.connection() as conn:
                    async for page in outbox.read_range(
                        conn,
                        self.schema,
                        self.pipeline.name,
                        from_offset=from_offset,
                        to_offset=to_offset,
                        since=since,
                        until=until,
                        key=key,
                    ):
                        report.events += len(page)
                        # a TRUNCATE is not replayed (it names no key): verify --repair
                        page = [ev for ev in page if ev.op is not Op.TRUNCATE]
                        keys = sorted({ev.key for ev in page})
                        known = await state.key_states(conn, self.schema, self.pipeline.name, keys)
                        if resend:  # sent again even when identical to what the CRM last got
                            await state.forget_sent(conn, self.schema, self.pipeline.name, keys)
                        batch += 1
                        self.tracker.register(batch, len(page))
                        for ev in page:
                            ks = known.get(ev.key)
                            if ks is not None and ks.stamp is not None:
                                stale = ks.stamp.newer_than(stamp_of(ev))
                                same = not stale and not ev.newer_than(ks.stamp)
                                if stale or (same and not resend):
                                    self.coalescer.set_acked(ev.key, ks.stamp)
                            self.coalescer.add(ev, batch)
                            self.coalescer.set_acked(ev.key, None)
                report.sent_keys = len(self.coalescer)
                self._drain_all = True
                while len(self.coalescer) or self._tasks:
                    self._raise_failed()
                    now = self.clock.now()
                    wake = self._dispatch(now)
                    if self._tasks:
                        await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    elif len(self.coalescer):
                        resume_at = wake if wake is not None else self._retry_until
                        await self.clock.sleep(max(0.05, resume_at - self.clock.now()))
                    await self._flush_credits()
                self._raise_failed()
        finally:
            self.coalescer, self.tracker = saved
            self._drain_all = False
            self._fences.clear()
        return report
