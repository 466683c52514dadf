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
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import dbpolicy, outbox, state, truncate
from connector.coalesce import BatchTracker, Coalescer, PendingEntry
from connector.config import PipelineConfig
from connector.costs import CostModel
from connector.emitter import CallbackUrl, CreditRecorder, EmitOutcome, Emitter, acting_for
from connector.errors import TransientError
from connector.events import ChangeEvent, Op, stamp_of
from connector.metrics import Metrics
from connector.outbox import OutboxWatcher, ReadPosition
from connector.planner import PendingKey, Plan, PlannerInput, choose_mix, plan
from connector.snapshot import Chunk, SnapshotProgress, Snapshotter
from connector.zoho.client import ZohoClient

log = logging.getLogger(__name__)

SnapshotMode = Literal["auto", "never", "force"]


@dataclass
class ReplayReport:
    events: int = 0  # outbox events in the range
    sent_keys: int = 0  # keys sent (newest version each)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    poll_interval: float = 1.0  # seconds between reads without a wake-up
    # the OutboxWatcher's adaptive poll for committed unread rows: min_interval while rows
    # keep arriving, doubling to max_interval while idle (no NOTIFY: DESIGN.md invariant 9)
    wake_poll_min: float = 0.05
    wake_poll_max: float = 1.0
    read_limit: int = 25_000  # outbox rows per read (a whole snapshot chunk fits)
    max_pending: int = 50_000  # backpressure: stop reading above this many keys
    drain_timeout: float = 30.0  # on stop, how long calls in flight may take to finish
    default_upsert_latency: float = 2.0  # planner input until measured
    default_bulk_latency: float = 120.0
    retry_backoff_max: float = 30.0
    bulk_poll_initial: float = 2.0  # first bulk job poll (a callback wakes it earlier)
    bulk_poll_max: float = 30.0
    # keys of a bulk job that may run on the CRM without its id known are held back for
    # factor × its expected duration (at least the minimum), or until its callback
    orphan_fence_factor: float = 3.0
    orphan_fence_min: float = 5.0
    # the CRM's X-API-CREDITS-REMAINING is trusted this long after the last call; then the
    # planner goes by the ledger again, so one call probes whether the credits came back
    credit_probe_interval: float = 30.0
    # acknowledged stamps kept in memory once the checkpoint has passed them (most recent
    # first); older ones are reloaded from key_state when their key shows up again
    acked_cache: int = 10_000


class Engine:
    """Runs one pipeline. Construct, then ``await run(stop)`` (or ``drain()`` /
    ``run_snapshot()``). No I/O in the constructor."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        client: ZohoClient,
        state_dsn: str,
        source_dsn: str | None = None,
        schema: str = "connector",
        metrics: Metrics | None = None,
        daily_credit_budget: int = 50_000,
        credit_reserve: int = 1_000,
        callback_url: CallbackUrl | None = None,
        credit_recorder: CreditRecorder | None = None,
        options: EngineOptions | None = None,
        snapshot: SnapshotMode | None = None,
        snapshot_progress: bool | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.pipeline = pipeline
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
        self.credits = credit_recorder
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
        self._snapshot_task: asyncio.Task[None] | None = None
        self._installed_hook = False
        self._prev_hook: Any = None
        self._spent_24h = 0
        self._force_restart = False
        self._batch_events: dict[int, int] = {}
        self._fences: dict[int, float] = {}  # bulk_jobs.id -> when its fence ends (wall clock)
        # outbox rows up to this id were committed before this run started: a previous owner
        # may have sent them without storing the ack (``_read_ahead``)
        self._catchup_to = 0
        self._read_ahead_keys = 0  # newest versions read ahead while catching up (logged)
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
                    now = _now()
                    wake = self._dispatch(now)
                    if self._tasks:
                        await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    elif len(self.coalescer):
                        resume_at = wake if wake is not None else self._retry_until
                        await asyncio.sleep(max(0.05, resume_at - _now()))
                    await self._flush_credits()
                self._raise_failed()
        finally:
            self.coalescer, self.tracker = saved
            self._drain_all = False
            self._fences.clear()
        return report

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
        """The state pool, the emitter and the credit hook, for one run / drain / replay."""
        name = self.pipeline.name
        if self.credits is None:
            self._prev_hook = self.client.on_call
            self.credits = CreditRecorder(chain=self.client.on_call)
            self.client.on_call = self.credits
            self._installed_hook = True
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.state_dsn,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True},
            open=False,
            name=f"engine-{name}",
        )
        try:
            await pool.open(wait=True)
            self._pool = pool
            self.emitter = Emitter(
                self.pipeline,
                client=self.client,
                pool=pool,
                schema=self.schema,
                metrics=self.metrics,
                source_dsn=self.source_dsn,
                callback_url=self.callback_url,
                bulk_poll_initial=self.options.bulk_poll_initial,
                bulk_poll_max=self.options.bulk_poll_max,
                default_bulk_latency=self.options.default_bulk_latency,
                orphan_fence_factor=self.options.orphan_fence_factor,
                orphan_fence_min=self.options.orphan_fence_min,
            )
            await self.emitter.load_source_types()
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._flush_credits()
            await pool.close()
            self._pool = None
            if self._installed_hook:
                self.client.on_call = self._prev_hook
                self.credits = None
                self._installed_hook = False

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
            now = _now()
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
                timeout = max(0.0, min(timeout, wake_at - _now()))
            if self._retry_until > now:
                timeout = min(timeout, max(0.0, self._retry_until - now))
            await self._sleep(stop, listener, timeout)

    async def _read(self, reader: psycopg.AsyncConnection[Any]) -> bool:
        """Read one batch unless backpressure holds; True if it brought events."""
        if not self._can_read():
            return False
        events, pos = await outbox.read_batch(
            reader, self.schema, self.pipeline.name, self._read_pos, self.options.read_limit
        )
        self._batch_no += 1
        batch = self._batch_no
        self._positions[batch] = pos
        self._batch_events[batch] = len(events)
        if self.metrics is not None and events:
            # each committed outbox event reaches the reader once per pass: count it here (both
            # capture modes; after a restart the events behind the checkpoint count again)
            for op, n in collections.Counter(ev.op for ev in events).items():
                self.metrics.events_captured_total.labels(pipeline=self.pipeline.name, op=op).inc(n)
        if any(ev.op is Op.TRUNCATE for ev in events):
            events = await self._truncates(reader, events)
        read_any = bool(events)
        ahead: list[ChangeEvent] = []
        if events:
            await self._seed_acked(reader, events)
            ahead = await self._read_ahead(reader, events)
        self.tracker.register(batch, len(events))
        for ev in events:
            self.coalescer.add(ev, batch)
        for ev in ahead:  # after the batch: they release the batch's superseded versions
            self.coalescer.add_ahead(ev)
        self._caught_up = not read_any
        self._read_pos = pos
        async with self._changed:
            self._changed.notify_all()
        return read_any

    async def _truncates(
        self, conn: psycopg.AsyncConnection[Any], events: list[ChangeEvent]
    ) -> list[ChangeEvent]:
        """Replace each TRUNCATE event by what ``pipelines.on_truncate`` makes of it
        (connector/truncate.py): nothing (hold) or a delete per known or pending key."""
        out: list[ChangeEvent] = []
        for ev in events:
            if ev.op is not Op.TRUNCATE:
                out.append(ev)
                continue
            pending = [*self.coalescer.pending(), *self.coalescer.in_flight()]
            out.extend(
                await truncate.handle(
                    conn,
                    self.schema,
                    self.pipeline,
                    ev,
                    pending_keys=[*pending, *(e.key for e in out)],
                    metrics=self.metrics,
                )
            )
        return out

    async def _seed_acked(
        self, conn: psycopg.AsyncConnection[Any], events: list[ChangeEvent]
    ) -> None:
        """Load key_state's acknowledged stamps for keys the coalescer has not seen, so that
        replayed or superseded events are dropped (invariant 7)."""
        unknown = sorted({ev.key for ev in events if self.coalescer.acked(ev.key) is None})
        if not unknown:
            return
        known = await state.key_states(conn, self.schema, self.pipeline.name, unknown)
        for key, ks in known.items():
            if ks.stamp is None:
                continue
            current = self.coalescer.acked(key)
            if current is None or ks.stamp.newer_than(current):
                self.coalescer.set_acked(key, ks.stamp)

    async def _read_ahead(
        self, conn: psycopg.AsyncConnection[Any], events: list[ChangeEvent]
    ) -> list[ChangeEvent]:
        """Never stale across a restart, in bounded time (issue 14). The previous owner may have
        sent a newer version of a key than ``key_state`` records (killed, or its lease lost,
        between the CRM's answer and storing the ack; or an orphan bulk job). Re-read from the
        checkpoint, an older version comes first, and with a backlog past its deadline it would
        be sent at once, over the newer one. So while the reader is behind what was committed
        when this run started, each key of a batch also gets its newest committed outbox row,
        read ahead by one index step and merged after the batch (``Coalescer.add_ahead``): the
        key goes out at that version (or not at all, if ``key_state`` already has it). The row
        lies ahead of the reader, so it holds no batch: the batch's versions it supersedes are
        resolved at once, and the batch the reader later reads the row in waits for its
        acknowledgement (or drops it as already acknowledged). (Holding each key until the
        reader reached that row made the checkpoint wait for the whole backlog to be read;
        merging the row into the batch made it wait for every key's newest version to be
        acknowledged within one run, which under frequent restarts and a busy table chased the
        versions written meanwhile for ever.)"""
        if not self._catchup_to:
            return []
        keys = sorted({ev.key for ev in events if ev.offset <= self._catchup_to})
        if not keys:
            log.info(
                "caught up with what was committed at the start",
                extra={"pipeline": self.pipeline.name, "keys_read_ahead": self._read_ahead_keys},
            )
            self._catchup_to = 0
            return []
        here = {ev.offset for ev in events}
        newest = await outbox.newest_rows(conn, self.schema, self.pipeline.name, keys)
        ahead = sorted(
            (ev for ev in newest.values() if ev.offset not in here), key=lambda ev: ev.offset
        )
        if ahead and not self._read_ahead_keys:
            log.info(
                "catching up after a restart: each key's newest committed version is read ahead",
                extra={"pipeline": self.pipeline.name, "committed_up_to": self._catchup_to},
            )
        self._read_ahead_keys += len(ahead)
        return ahead

    def _can_read(self) -> bool:
        busy = len(self.coalescer) + len(self.coalescer.in_flight())
        return busy < self.options.max_pending

    def _idle(self) -> bool:
        return (
            self._caught_up
            and not self._tasks
            and len(self.coalescer) == 0
            and not self.coalescer.in_flight()
            and (self._snapshot_task is None or self._snapshot_task.done())
        )

    # ------------------------------------------------------------------ planning
    def _dispatch(self, now: float) -> float | None:
        fence_end = self._expire_fences(now)
        if now < self._retry_until:
            return _earliest(self._retry_until, fence_end)
        self._flushing = False
        p = self._plan(now)
        if p is None:
            return fence_end
        assert self.emitter is not None
        for keys in p.bulk:
            entries = self.coalescer.take(keys)
            if entries:
                self._spawn(self.emitter.send_bulk, entries, "bulk")
        for keys in p.upserts:
            entries = self.coalescer.take(keys)
            if entries:
                self._spawn(self.emitter.send_upsert, entries, "upsert")
        if p.upserts or p.bulk:
            log.debug(
                "plan dispatched",
                extra={
                    "pipeline": self.pipeline.name,
                    "reason": p.reason,
                    "upsert_calls": len(p.upserts),
                    "bulk_jobs": len(p.bulk),
                },
            )
        if self.metrics is not None:
            self.metrics.api_credits_below_reserve.set(1 if p.budget_alert else 0)
        return _earliest(p.wake_at, fence_end)

    def _plan(self, now: float) -> Plan | None:
        pending = self.coalescer.pending()
        if not pending:
            self._drain_once = False
            return None
        in_flight = self.coalescer.in_flight()
        fenced = self.coalescer.fenced()
        keys = [
            PendingKey(
                e.key,
                (e.live_at or e.oldest_at).timestamp(),
                e.key in in_flight or e.key in fenced,
                backlog=e.live_at is None,
            )
            for e in pending.values()
        ]
        assert self.emitter is not None
        est = self.emitter.latency  # high percentiles, bulk by job size (connector/latency.py)
        est.default_upsert = self.options.default_upsert_latency
        bulk_full, bulk_by_size = est.bulk_profile(self.cost.bulk_batch)
        inp = PlannerInput(
            now=now,
            pending=keys,
            max_staleness=self.pipeline.max_staleness.total_seconds(),
            credits_left=self._credits_left,
            reserve=self.reserve,
            concurrency=self.client.limiter.limit,
            upsert_latency=est.upsert(),
            bulk_latency=bulk_full,
            cost=self.cost,
            hold_backlog=self._holding_backlog(),
            freshness=self.pipeline.freshness,
            bulk_latency_by_size=bulk_by_size,
            retry_allowance=self.pipeline.retry_allowance.total_seconds(),
        )
        if self._drain_all or self._drain_once:
            self._flushing = self._drain_once
            self._drain_once = False
            return drain_plan(inp)
        return plan(inp)

    @property
    def _credits_left(self) -> int:
        left = self.budget - self._spent_24h
        remaining = self.client.credits_remaining
        if remaining is not None and self._crm_remaining_fresh():
            left = min(left, remaining)
        return left

    def _crm_remaining_fresh(self) -> bool:
        """The CRM's remaining count is a reading at the last call. Without calls it never
        changes, so a 0 read when the allowance ran out would stop sending for good although
        the CRM's window rolls on: after ``credit_probe_interval`` without a call it is not
        used (the ledger is), and the next flush's answer reads it again."""
        calls = int(getattr(self.client, "calls", 0))
        now = time.monotonic()
        if calls != self._calls_seen:
            self._calls_seen, self._calls_seen_at = calls, now
        return now - self._calls_seen_at < self.options.credit_probe_interval

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
                self._retry_until = _now() + self._retry_delay
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

    # ------------------------------------------------------------------ orphan fences
    async def _load_fences(self) -> None:
        """Fences of bulk jobs abandoned without their id (``bulk_jobs.fence_until``, by this
        start's ``recover`` or an earlier run): their keys wait until the bound or the job's
        callback. Loaded before anything is read, so no newer version can go first."""
        assert self._pool is not None
        async with self._pool.connection() as conn:
            fences = await state.bulk_fences(conn, self.schema, self.pipeline.name)
        for f in fences:
            self._add_fence(f.job, f.keys, f.seconds_left)

    def _add_fence(self, job: int, keys: list[str], seconds: float) -> None:
        self.coalescer.fence(keys, job)
        self._fences[job] = max(self._fences.get(job, 0.0), _now() + seconds)
        log.info(
            "keys fenced: a bulk job may still write them on the CRM",
            extra={
                "pipeline": self.pipeline.name,
                "job_row": job,
                "keys": len(keys),
                "seconds": round(seconds, 1),
            },
        )

    def _expire_fences(self, now: float) -> float | None:
        """Release fences whose time is up; the earliest remaining end (a wake-up)."""
        for job, until in list(self._fences.items()):
            if until <= now:
                self._release_fence(job, persist=False)
        return min(self._fences.values()) if self._fences else None

    def _release_fence(self, job: int, *, persist: bool) -> None:
        self._fences.pop(job, None)
        self.coalescer.unfence(job)
        if persist:
            self._persist_unfence(job)

    def _persist_unfence(self, job: int) -> None:
        if self._pool is not None:
            pool = self._pool

            async def clear() -> None:
                with contextlib.suppress(psycopg.Error, PoolTimeout):
                    async with pool.connection() as conn:
                        await state.bulk_unfence(conn, self.schema, job)

            task = asyncio.create_task(clear(), name=f"unfence:{self.pipeline.name}:{job}")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

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
        if self.credits is None or self._pool is None:
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
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self._kick.wait()),
            asyncio.ensure_future(listener.event.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
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
                    await _sleep_or_stop(stop, delay)
                    delay = min(delay * 2, 30.0)
                    if stop.is_set():
                        return

        self._snapshot_task = asyncio.create_task(
            run_snapshot(), name=f"snapshot:{self.pipeline.name}"
        )
        self._snapshot_task.add_done_callback(lambda _t: self._kick.set())

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


def drain_plan(inp: PlannerInput) -> Plan:
    """Everything pending and not in flight, now, with the cheapest mix for its size (ties go
    to fewer bulk jobs): the planner's cost rule without its waiting."""
    free = sorted((pk for pk in inp.pending if not pk.in_flight), key=lambda pk: pk.oldest_at)
    if not free:
        return Plan([], [], None, "drain: all pending keys in flight", False)
    keys = [pk.key for pk in free]
    mix = choose_mix(inp, len(keys), math.inf)
    c = inp.cost
    bulk_keys, up_keys = keys[: mix.bulk_records], keys[mix.bulk_records :]
    bulk = [bulk_keys[i : i + c.bulk_batch] for i in range(0, len(bulk_keys), c.bulk_batch)]
    ups = [up_keys[i : i + c.upsert_batch] for i in range(0, len(up_keys), c.upsert_batch)]
    return Plan(ups, bulk, None, f"drain {len(keys)}", inp.credits_left < inp.reserve)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _now() -> float:
    return datetime.now(UTC).timestamp()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


__all__ = ["Engine", "EngineOptions", "drain_plan"]
