"""The engine's snapshot orchestration (docs/snapshot.md): the initial sync runs alongside the
loop one chunk at a time, each chunk held until read whole, flushed, and resolved before the
next one is read.

``SnapshotRuns`` is a mixin of :class:`connector.engine.Engine`, which holds the state it uses
(declared below for the type checker). Split from ``connector.engine`` (issue 20)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import state
from connector.config import PipelineConfig
from connector.emitter import Emitter, acting_for
from connector.engine_common import Clock, SnapshotMode
from connector.metrics import Metrics
from connector.outbox import ReadPosition
from connector.snapshot import Chunk, SnapshotProgress, Snapshotter

# the engine's logger: records keep the name they had before the split
log = logging.getLogger("connector.engine")


class SnapshotRuns:
    """The initial sync, run through the pipeline: a mixin of ``Engine``."""

    pipeline: PipelineConfig
    clock: Clock
    source_dsn: str
    state_dsn: str
    schema: str
    metrics: Metrics | None
    snapshot_mode: SnapshotMode
    snapshot_progress: bool | None
    snapshot_report: dict[str, Any] | None
    _pool: AsyncConnectionPool[Any] | None
    _read_pos: ReadPosition
    _saved_pos: ReadPosition
    _kick: asyncio.Event
    _changed: asyncio.Condition
    _force_restart: bool
    _snapshot_task: asyncio.Task[None] | None
    _backlog_hold: tuple[int, int] | None
    emitter: Emitter | None

    if TYPE_CHECKING:  # defined by Engine

        def flush_all(self) -> None: ...

    def _holding_backlog(self) -> bool:
        """While a snapshot chunk is being read, its rows leave only as full bulk jobs or with
        the chunk's flush: a partly read chunk is not sent by a costlier mix."""
        hold = self._backlog_hold
        if hold is None:
            return False
        if self._read_pos.passed(*hold):
            self._backlog_hold = None
            return False
        return True

    # ------------------------------------------------------------------ snapshot
    async def _maybe_start_snapshot(self, stop: asyncio.Event) -> None:
        if self.snapshot_mode == "never":
            return
        snap = Snapshotter(
            self.pipeline,
            source_dsn=self.source_dsn,
            state_dsn=self.state_dsn,
            schema=self.schema,
            metrics=self.metrics,
            progress=SnapshotProgress(self.pipeline.name, terminal=self.snapshot_progress)
            if self.snapshot_progress is not False
            else None,
        )
        current = await snap.status()
        restart = self.snapshot_mode == "force" and self._force_restart
        if current is not None and current.status == "done" and not restart:
            self.snapshot_report = current.report
            if self.metrics is not None:  # done before this start: the gauge says so
                self.metrics.snapshot_progress_ratio.labels(pipeline=self.pipeline.name).set(1.0)
            return
        await snap.prepare(restart=restart)
        self._force_restart = False
        last = await self._last_snapshot_row()
        if last is not None and not self._saved_pos.passed(*last):
            # a chunk written before this start: held until read whole (set before the first
            # read, so that no part of it leaves on its own by a costlier mix)
            self._backlog_hold = last

        async def run_snapshot() -> None:
            delay = 0.5
            await self._parents_synced_first(stop)
            while True:
                try:
                    # chunks written before a restart go first, each as its own flush
                    await self._wait_snapshot_resolved()
                    with acting_for(self.pipeline.name):
                        row = await snap.run(stop, chunk_sent=self._chunk_sent)
                    if row.status == "running" and not stop.is_set():
                        # every chunk is written; wait until its last row is resolved
                        await self._wait_snapshot_resolved()
                        self.snapshot_report = await snap.finish()
                    return
                except (psycopg.OperationalError, PoolTimeout) as exc:
                    # resumable by construction: go on from the last committed chunk
                    log.warning("snapshot interrupted; resuming", extra={"error": str(exc)})
                    await self.clock.wait_any((stop,), delay)
                    delay = min(delay * 2, 30.0)
                    if stop.is_set():
                        return

        self._snapshot_task = asyncio.create_task(
            run_snapshot(), name=f"snapshot:{self.pipeline.name}"
        )
        self._snapshot_task.add_done_callback(lambda _t: self._kick.set())

    async def _parents_synced_first(self, stop: asyncio.Event) -> None:
        """Initial sync in dependency order (issue 21): a pipeline whose lookups name parent
        pipelines reads its first chunk once each parent that takes an initial sync has
        finished its own (``snapshots.status = 'done'``: every parent row acknowledged or
        dead-lettered), so its rows find their parents in the CRM instead of waiting for
        them; a subform pipeline after its parent's (its lines are rows of those records). A
        pipeline without parents, or whose parents take none, starts at once."""
        assert self.emitter is not None and self._pool is not None
        named = dict.fromkeys(parent for _, _, parent in self.emitter.mapper.lookup_columns)
        if self.pipeline.subform_of is not None:
            named[self.pipeline.subform_of.pipeline] = None
        todo = [n for n in named if self.emitter.parents[n].snapshot != "never"]
        said: float | None = None  # when the wait was last logged (monotonic)
        while todo and not stop.is_set():
            async with self._pool.connection() as conn:
                rows = [(n, await state.get_snapshot(conn, self.schema, n)) for n in todo]
            todo = [n for n, row in rows if row is None or row.status != "done"]
            if not todo:
                break
            now = time.monotonic()
            if said is None or now - said >= 300.0:  # at once (INFO), then every 5 min (WARNING)
                log.log(
                    logging.INFO if said is None else logging.WARNING,
                    "initial sync waits for the initial sync of its parent pipeline(s) %s"
                    " (parents first); see: connector status",
                    ", ".join(todo),
                    extra={"pipeline": self.pipeline.name, "waiting_for": ", ".join(todo)},
                )
                said = now
            await self.clock.wait_any((stop,), 1.0)

    async def _last_snapshot_row(self) -> tuple[int, int] | None:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            cur = await conn.cursor(row_factory=tuple_row).execute(
                sql.SQL(Q_LAST_SNAPSHOT_ROW).format(schema=sql.Identifier(self.schema)),
                (self.pipeline.name,),
            )
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    async def _wait_snapshot_resolved(self) -> None:
        last = await self._last_snapshot_row()
        if last is None:
            return
        last_id, txid = last
        if self._saved_pos.passed(last_id, txid):
            return
        # the chunk written before the restart: flush it once it is read whole
        self._backlog_hold = (last_id, txid)
        self._kick.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._read_pos.passed(last_id, txid))
        self.flush_all()
        async with self._changed:
            await self._changed.wait_for(lambda: self._saved_pos.passed(last_id, txid))

    async def _chunk_sent(self, chunk: Chunk) -> None:
        """Snapshot hook: once the reader has the whole chunk, flush it now; return when the
        checkpoint has passed it (every row acknowledged or dead-lettered)."""
        self._backlog_hold = (chunk.max_outbox_id, chunk.txid)
        self._kick.set()
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._read_pos.passed(chunk.max_outbox_id, chunk.txid)
            )
        self.flush_all()
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._saved_pos.passed(chunk.max_outbox_id, chunk.txid)
            )


Q_LAST_SNAPSHOT_ROW = """
SELECT id, txid::text FROM {schema}.outbox
 WHERE pipeline = %s AND op = 'snapshot' ORDER BY id DESC LIMIT 1
"""
