"""One pipeline's loop: outbox → coalescer → planner → emitter → checkpoint.

::

    read a batch (gap-free, outbox.read_batch)          ← OutboxWatcher wake-up, or poll_interval
      └─ seed acknowledged stamps from key_state, add to the coalescer (BatchTracker counts)
    plan (planner.plan: wait / upsert groups / bulk groups)
      └─ take the keys (in-flight fencing), one task per group → Emitter
           └─ done → Coalescer.complete(acked=True); transient → complete(acked=False)
    checkpoint the position of the last fully resolved reader batch (invariant 5)
    sleep until the plan's wake_at, a new batch, a finished call, or stop

Backpressure: no reading while more than ``max_pending`` keys are pending or in flight.
On start, open bulk jobs are resumed (``Emitter.recover``) before anything is read, and a
pipeline never synced runs its initial sync (``snapshot.Snapshotter``) alongside the loop, one
chunk at a time: each chunk is flushed as soon as it has been read (a 25,000-row chunk goes as
one Bulk Write job) and the next chunk is read once it is resolved.

On stop: no more reading or planning; calls in flight get ``drain_timeout`` to finish, then are
cancelled (an unfinished bulk job stays recorded and is resumed by id on the next start); the
checkpoint only ever covers resolved events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import dbpolicy, outbox, state
from connector.coalesce import BatchTracker, Coalescer, PendingEntry
from connector.config import PipelineConfig
from connector.costs import CostModel
from connector.emitter import CallbackUrl, CreditRecorder, EmitOutcome, Emitter, acting_for
from connector.engine_common import Clock, EngineOptions, SnapshotMode, SystemClock
from connector.engine_drain import drain_plan
from connector.engine_fences import OrphanFences
from connector.engine_plan import Planning
from connector.engine_read import OutboxReading
from connector.engine_replay import Replay, ReplayReport
from connector.engine_snapshot import SnapshotRuns
from connector.errors import TransientError
from connector.metrics import Metrics
from connector.org import board_for
from connector.outbox import OutboxWatcher, ReadPosition
from connector.zoho.client import ZohoClient

# the names other modules import from here, some now defined in the split-out modules
# (engine_common, engine_drain, engine_fences, engine_read, engine_replay, engine_snapshot)
__all__ = [
    "Engine",
    "EngineOptions",
    "ReplayReport",
    "SnapshotMode",
    "drain_plan",
]

log = logging.getLogger(__name__)


class Engine(Planning, OutboxReading, OrphanFences, SnapshotRuns, Replay):
    """Runs one pipeline. Construct, then ``await run(stop)`` (or ``drain()`` /
    ``run_snapshot()``). No I/O in the constructor."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        client: ZohoClient,
        pool: AsyncConnectionPool[Any],
        emitter: Emitter,
        credit_recorder: CreditRecorder,
        state_dsn: str,
        source_dsn: str | None = None,
        schema: str = "connector",
        metrics: Metrics | None = None,
        daily_credit_budget: int = 50_000,
        credit_reserve: int = 1_000,
        callback_url: CallbackUrl | None = None,
        options: EngineOptions | None = None,
        snapshot: SnapshotMode | None = None,
        snapshot_progress: bool | None = None,
        cost: CostModel | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.clock: Clock = clock or SystemClock()
        self.client = client
        self.state_dsn = state_dsn
        self.source_dsn = source_dsn or state_dsn
        self.schema = schema
        self.metrics = metrics
        self.budget = pipeline.daily_credit_budget or daily_credit_budget
        self.reserve = credit_reserve
        self.callback_url = callback_url
        self.options = options or EngineOptions()
        self.snapshot_mode: SnapshotMode = snapshot or pipeline.snapshot
        self.snapshot_progress = snapshot_progress
        self.cost = cost or CostModel()
        if pipeline.subform_of is not None:  # Bulk Write takes no subform column: upsert only
            self.cost = dataclasses.replace(self.cost, bulk_write=False)
        self.credits: CreditRecorder = credit_recorder
        self.tracker = BatchTracker()
        self.coalescer = Coalescer(self.tracker)
        self.emitter: Emitter | None = None
        self.snapshot_report: dict[str, Any] | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._positions: dict[int, ReadPosition] = {}
        self._batch_no = 0
        self._read_pos = outbox.START
        self._saved_pos = outbox.START
        self._resolved_pos = outbox.START
        self._tasks: set[asyncio.Task[EmitOutcome]] = set()
        self._bulk_tasks: set[asyncio.Task[EmitOutcome]] = set()
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()
        self._drain_once = False
        self._flush_seq = 0  # flush_all requests so far
        self._flushing = False  # the plan being dispatched is a flush_all's
        self._drain_all = False
        self._retry_until = 0.0
        self._retry_delay = 0.0
        self._caught_up = False
        self._pulled: dict[str, float] = {}  # parent keys waiting children need (engine_read)
        self._looked_up = False  # set per run from the emitter's pipelines
        self._bulk_out = False  # a full job's estimate leaves no change time for one (logged)
        self._snapshot_task: asyncio.Task[None] | None = None
        # given by the composition root (``connector.pipeline.build_pipeline``), which owns
        # them; ``_pool`` / ``emitter`` are set only while a run / drain / replay uses them
        self._given_pool = pool
        self._given_emitter = emitter
        self._spent_24h = 0
        self._force_restart = False
        self._batch_events: dict[int, int] = {}
        self._fences: dict[int, float] = {}  # bulk_jobs.id -> when its fence ends (wall clock)
        # outbox rows up to this id were committed before this run started: a previous owner
        # may have sent them without storing the ack (``_read_ahead``)
        self._catchup_to = 0
        self._read_ahead_keys = 0  # newest versions read ahead while catching up (logged)
        self._read_ahead_done: set[str] = set()  # keys read ahead in this run (``_read_ahead``)
        self._backlog_hold: tuple[int, int] | None = None  # snapshot chunk being read: (id, txid)
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._calls_seen = -1
        self._calls_seen_at = 0.0

    # ------------------------------------------------------------------ public API
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain (finish calls in flight within
        ``drain_timeout``) and return."""
        await self._run(stop, until_idle=False)

    async def drain(self, stop: asyncio.Event | None = None) -> None:
        """Send everything now: read the outbox to its end, flush every pending change with the
        cheapest API for its size (no waiting for deadlines), wait for the results and the
        snapshot (if one runs), checkpoint, and return. For tests, replay and the demo."""
        self._drain_all = True
        await self._run(stop or asyncio.Event(), until_idle=True)

    async def run_snapshot(
        self, stop: asyncio.Event | None = None, *, restart: bool = False
    ) -> dict[str, Any] | None:
        """``connector snapshot``: run the initial sync (resume it, or start over with
        ``restart``) through the pipeline until every row is acknowledged or dead-lettered;
        returns the snapshot's report (None when stopped before the end)."""
        self.snapshot_mode = "force" if restart else "auto"
        self._force_restart = restart
        self._drain_all = True
        await self._run(stop or asyncio.Event(), until_idle=True)
        return self.snapshot_report

    def flush_all(self) -> None:
        """While ``run`` runs: send everything pending now instead of waiting for deadlines
        (one flush; later changes are planned normally again). Entries it sends, or that
        are in flight now, and that come back for a retry are flushed again after the
        backoff."""
        self._drain_once = True
        self._flush_seq += 1
        self._kick.set()

    def wake_bulk(self, job_row_id: int) -> bool:
        """A verified bulk-write callback for ``bulk_jobs.id``: poll that job now. For a job
        abandoned without its id (an orphan the CRM may run), the callback says it has
        finished, so it can no longer write: its keys are released at once."""
        if job_row_id in self._fences:
            self._release_fence(job_row_id, persist=True)
            self._kick.set()
            return True
        if self.emitter is not None and self.emitter.wake_bulk(job_row_id):
            return True
        # not (yet) known here: perhaps an orphan's callback arriving while its fence is being
        # set up (recover); recorded so that the fence, when set, is already over
        self._persist_unfence(job_row_id)
        return False

    @property
    def checkpoint(self) -> ReadPosition:
        return self._saved_pos

    # ------------------------------------------------------------------ the loop
    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[None]:
        """The state pool and the emitter given to the constructor (the composition root,
        ``connector.pipeline.build_pipeline``, owns and closes them), in use for one run /
        drain / replay; the credits recorded meanwhile are flushed at its end."""
        async with contextlib.AsyncExitStack() as stack:
            self._pool = self._given_pool
            stack.callback(setattr, self, "_pool", None)
            stack.push_async_callback(self._flush_credits_quietly)
            stack.callback(board_for(self.client.limiter).forget, self.pipeline.name)
            self.emitter = self._given_emitter
            await self.emitter.load_source_types()
            yield

    async def _flush_credits_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush_credits()

    async def _run(self, stop: asyncio.Event, *, until_idle: bool) -> None:
        name = self.pipeline.name
        async with self._resources():
            assert self.emitter is not None
            listener = OutboxWatcher(
                self.state_dsn,
                self.schema,
                name,
                lambda: self._read_pos,
                min_interval=self.options.wake_poll_min,
                max_interval=self.options.wake_poll_max,
            )
            reader: psycopg.AsyncConnection[Any] | None = None
            abrupt = False
            try:
                await listener.start()
                reader = await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=True)
                self._read_pos = await outbox.load_checkpoint(reader, self.schema, name)
                self._saved_pos = self._resolved_pos = self._read_pos
                self._catchup_to = await outbox.last_committed_id(reader, self.schema, name)
                self._read_ahead_done.clear()
                self._release_at = 0.0  # held children: looked for at the first read
                self._demand_at, self._pulled = 0.0, {}  # children's needs: read at once
                self._looked_up = any(  # by a lookup or as a subform's parent
                    (m.type == "lookup" and m.pipeline == name)
                    for p in self.emitter.parents.values()
                    for m in p.fields.values()
                ) or any(
                    p.subform_of is not None and p.subform_of.pipeline == name
                    for p in self.emitter.parents.values()
                )
                with acting_for(name):
                    await self.emitter.recover()
                await self._load_fences()
                await self._flush_credits()
                await self._maybe_start_snapshot(stop)
                await self._loop(stop, reader, listener, until_idle=until_idle)
            except asyncio.CancelledError:
                abrupt = True
                raise
            finally:
                await self._shutdown(abrupt=abrupt)
                if reader is not None:
                    await reader.close()
                await listener.close()

    async def _loop(
        self,
        stop: asyncio.Event,
        reader: psycopg.AsyncConnection[Any],
        listener: OutboxWatcher,
        *,
        until_idle: bool,
    ) -> None:
        name = self.pipeline.name
        while not stop.is_set():
            self._raise_failed()
            # -- read
            try:
                read_any = await self._read(reader)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning(
                    "outbox read failed; reconnecting (%s)",
                    dbpolicy.describe(exc),
                    extra={"pipeline": name},
                )
                with contextlib.suppress(Exception):
                    await reader.close()
                try:
                    async for attempt in dbpolicy.retrying(
                        "the outbox reader", pipeline=name, initial=0.1, cap=10.0, stop=stop
                    ):
                        with attempt:
                            reader = await psycopg.AsyncConnection.connect(
                                self.state_dsn, autocommit=True
                            )
                except dbpolicy.TRANSIENT:
                    pass  # stopping while the database is away: the loop ends
                continue
            # -- plan and dispatch
            now = self.clock.now()
            wake_at = self._dispatch(now)
            # -- checkpoint
            try:
                await self._save_checkpoint()
                await self._flush_credits()
            except (psycopg.OperationalError, PoolTimeout) as exc:
                log.warning("cannot checkpoint yet; retrying", extra={"error": str(exc)})
            self._export_gauges(now)
            if self.emitter is not None:
                self.emitter.rejections.flush()  # the summary of rejections not logged singly
            if until_idle and self._idle():
                log.info("pipeline drained", extra={"pipeline": name})
                return
            if read_any and self._can_read():
                continue  # more may be waiting: read again before sleeping
            timeout = self.options.poll_interval
            if wake_at is not None:
                timeout = max(0.0, min(timeout, wake_at - self.clock.now()))
            if self._retry_until > now:
                timeout = min(timeout, max(0.0, self._retry_until - now))
            await self._sleep(stop, listener, timeout)

    def _idle(self) -> bool:
        return (
            self._caught_up
            and not self._tasks
            and len(self.coalescer) == 0
            and not self.coalescer.in_flight()
            and (self._snapshot_task is None or self._snapshot_task.done())
        )

    def _spawn(
        self,
        send: Callable[[list[PendingEntry]], Awaitable[EmitOutcome]],
        entries: list[PendingEntry],
        kind: str,
    ) -> None:
        flush_seq, by_flush = self._flush_seq, self._flushing

        async def job() -> EmitOutcome:
            try:
                outcome = await send(entries)
            except (TransientError, psycopg.OperationalError, PoolTimeout) as exc:
                log.warning("%s call failed; entries stay pending", kind, extra={"error": str(exc)})
                outcome = EmitOutcome(retry=list(entries))
            except BaseException:
                # cancelled (stop) or a permanent error: nothing is acknowledged, the events
                # stay behind the checkpoint
                self.coalescer.complete(entries, acked=False)
                raise
            for fence in outcome.fences:  # before the entries are pending again
                self._add_fence(fence.job, fence.keys, fence.seconds_left)
            self.coalescer.complete(outcome.done, acked=True)
            self.coalescer.complete(outcome.retry, acked=False)
            self.coalescer.complete(outcome.later, acked=False)  # behind their own fences
            if outcome.retry:
                self._retry_delay = min(
                    max(self._retry_delay * 2, 1.0), self.options.retry_backoff_max
                )
                self._retry_until = self.clock.now() + self._retry_delay
                if by_flush or self._flush_seq != flush_seq:
                    # a flush_all covered these entries (they were sent by it, or in flight
                    # when it was asked for): they go with a flush again after the backoff,
                    # not at their deadline
                    self._drain_once = True
            elif outcome.done:
                self._retry_delay = 0.0
            self._kick.set()
            return outcome

        task = asyncio.create_task(job(), name=f"emit-{kind}:{self.pipeline.name}")
        self._tasks.add(task)
        if kind == "bulk":
            self._bulk_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[EmitOutcome]) -> None:
        self._bulk_tasks.discard(task)
        self._kick.set()

    def _raise_failed(self) -> None:
        for task in list(self._tasks):
            if task.done():
                self._tasks.discard(task)
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        snap = self._snapshot_task
        if snap is not None and snap.done() and not snap.cancelled():
            exc = snap.exception()
            if exc is not None:
                raise exc

    # ------------------------------------------------------------------ checkpoint & state
    async def _save_checkpoint(self) -> None:
        upto = self.tracker.resolved_upto()
        if upto is None or upto not in self._positions:
            return
        pos = self._positions[upto]
        for b in [b for b in self._positions if b < upto]:
            del self._positions[b]
        if pos == self._saved_pos:
            return
        assert self._pool is not None
        passed_batches = [b for b in self._batch_events if b <= upto]
        passed = sum(self._batch_events[b] for b in passed_batches)
        async with self._pool.connection() as conn:
            await outbox.save_checkpoint(conn, self.schema, self.pipeline.name, pos, passed)
            for b in passed_batches:
                del self._batch_events[b]
            await self._read_spent(conn)
        self._saved_pos = pos
        self._resolved_pos = pos
        # memory stays flat in the table size: what the checkpoint passed is in key_state
        self.coalescer.trim_acked(self.options.acked_cache)
        if self.metrics is not None:
            name = self.pipeline.name
            self.metrics.checkpoint_offset.labels(pipeline=name).set(pos.last_id)
            async with self._pool.connection() as conn:
                open_letters = await state.open_dead_letter_count(conn, self.schema, name)
            self.metrics.dead_letters_open.labels(pipeline=name).set(open_letters)
            self.metrics.api_credits_remaining.set(self._credits_left)
        async with self._changed:
            self._changed.notify_all()

    async def _flush_credits(self) -> None:
        if self._pool is None:
            return
        await self.credits.flush_pending(self._pool, self.schema, then=self._read_spent)

    async def _read_spent(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._spent_24h = await state.credits_spent(conn, self.schema)

    def _export_gauges(self, now: float) -> None:
        if self.metrics is None:
            return
        name = self.pipeline.name
        self.metrics.pending_keys.labels(pipeline=name).set(len(self.coalescer))
        oldest = self.coalescer.oldest_at()
        age = max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0
        self.metrics.oldest_pending_change_age_seconds.labels(pipeline=name).set(age)

    async def _sleep(self, stop: asyncio.Event, listener: OutboxWatcher, timeout: float) -> None:
        if self._kick.is_set() or listener.event.is_set():
            self._kick.clear()
            listener.event.clear()
            return
        await self.clock.wait_any((stop, self._kick, listener.event), timeout)
        self._kick.clear()
        listener.event.clear()

    async def _shutdown(self, *, abrupt: bool) -> None:
        """Stop the snapshot, give upsert calls in flight ``drain_timeout`` to finish (none
        when cancelled), cancel bulk jobs' waits at once (they are recorded and resumed by id
        on the next start), then checkpoint what is resolved."""
        snap = self._snapshot_task
        if snap is not None and not snap.done():
            snap.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await snap
        if self._tasks:
            for t in self._tasks:
                if abrupt or t in self._bulk_tasks:
                    t.cancel()
            _done, pending = await asyncio.wait(
                set(self._tasks), timeout=self.options.drain_timeout
            )
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self._tasks.clear()
            self._bulk_tasks.clear()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._save_checkpoint()
