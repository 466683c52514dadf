"""The engine's outbox reads (docs/architecture.md): one batch under backpressure, TRUNCATE
events, the acknowledged stamps seeded from ``key_state``, and the catch-up read-ahead after a
restart (issue 14).

``OutboxReading`` is a mixin of :class:`connector.engine.Engine`, which holds the state it uses
(declared below for the type checker). Split from ``connector.engine`` (issue 20)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg

from connector import outbox, state, truncate
from connector.coalesce import BatchTracker, Coalescer
from connector.config import PipelineConfig
from connector.emitter_parents import parent_demands, released_children
from connector.engine_common import EngineOptions
from connector.events import ChangeEvent, Op, stamp_of
from connector.metrics import Metrics
from connector.outbox import ReadPosition

if TYPE_CHECKING:
    from connector.emitter import Emitter

# the engine's logger: records keep the name they had before the split
log = logging.getLogger("connector.engine")

# keys remembered as read ahead in one catch-up (``_read_ahead``): ~100 bytes each, so at most
# ~20 MB; keys beyond it are looked up again in each batch, as before (correct, slower)
READ_AHEAD_REMEMBERED = 200_000

# children held PARENT_NOT_SYNCED whose parent is in the CRM now: looked for at most this often,
# this many at a time (issue 21, ``_release_held``)
RELEASE_EVERY_S = 2.0
RELEASE_LIMIT = 1_000
# parent keys waiting children need (``_read_demands``): read as often, at most this many
DEMAND_LIMIT = 100_000
# a subform pipeline's parents re-created in the CRM (``_rewrite_moved_sets``): looked for this
# often (one join of subform_sets with the parents' key_state)
MOVED_SETS_EVERY_S = 10.0


class OutboxReading:
    """Reading the outbox into the coalescer: a mixin of ``Engine``."""

    pipeline: PipelineConfig
    schema: str
    metrics: Metrics | None
    options: EngineOptions
    tracker: BatchTracker
    coalescer: Coalescer
    _positions: dict[int, ReadPosition]
    _batch_no: int
    _batch_events: dict[int, int]
    _read_pos: ReadPosition
    _caught_up: bool
    _changed: asyncio.Condition
    _catchup_to: int
    _read_ahead_keys: int
    _read_ahead_done: set[str]
    _release_at: float = 0.0  # monotonic: when held children are looked for next
    _moved_sets_at: float = 0.0  # monotonic: when re-created parents are looked for next
    emitter: Emitter | None
    _demand_at: float = 0.0  # monotonic: when children's needs of this pipeline are read next
    _pulled: dict[str, float]  # key -> by when waiting children need it (epoch seconds)
    _looked_up: bool  # some pipeline's lookup names this one, or it holds a subform

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
        if events:
            await self._foresee(reader, events)
        self._caught_up = not read_any
        self._read_pos = pos
        if await self._release_held(reader):
            self._caught_up = False  # released children are pending: not idle yet
        await self._read_demands(reader)
        await self._rewrite_moved_sets()
        async with self._changed:
            self._changed.notify_all()
        return read_any

    async def _release_held(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Parents first (issue 21): children held ``PARENT_NOT_SYNCED`` whose parent is in
        the CRM now go out again at their newest committed version, read ahead like the
        catch-up's (``Coalescer.add_ahead``: the row lies behind the checkpoint and holds no
        batch). Their acknowledgement resolves the dead letter. Never stale: a version older
        than the one ``key_state`` holds (the held one) is not sent; a key pending or in
        flight is left alone (its newer version is on its way). A pipeline without lookups
        never queries anything. A subform pipeline's lines wait for their order the same way
        (``emitter_subform``). Returns how many keys became pending."""
        if self.pipeline.subform_of is None and not any(
            m.type == "lookup" for m in self.pipeline.fields.values()
        ):
            return 0
        now = time.monotonic()
        if now < self._release_at:
            return 0
        self._release_at = now + RELEASE_EVERY_S
        name = self.pipeline.name
        busy = self.coalescer.pending().keys() | set(self.coalescer.in_flight())
        keys = [
            k
            for k in await released_children(
                conn,
                self.schema,
                name,
                RELEASE_LIMIT,
                deleted_parents=self.pipeline.subform_of is not None,
            )
            if k not in busy
        ]
        if not keys:
            return 0
        newest = await outbox.newest_rows(conn, self.schema, name, keys)
        known = await state.key_states(conn, self.schema, name, keys)
        released = 0
        for key, ev in sorted(newest.items(), key=lambda kv: kv[1].offset):
            held = known.get(key)
            if held is not None and held.stamp is not None and held.stamp.newer_than(stamp_of(ev)):
                continue  # older than what was held: never sent
            self.coalescer.set_acked(key, None)  # the held version itself goes again
            released += self.coalescer.add_ahead(ev)
        if released:
            log.info(
                "children whose parent is in the CRM now are sent again",
                extra={"pipeline": name, "keys": released},
            )
        return released

    async def _rewrite_moved_sets(self) -> None:
        """A subform pipeline (issue 21, question 4): every ``MOVED_SETS_EVERY_S``, the sets of
        parents whose CRM record changed since their set was written are written again
        (``SubformWrites.rewrite_moved_sets``: the order deleted and inserted again while
        its lines stayed). Nothing for other pipelines."""
        if self.pipeline.subform_of is None or self.emitter is None:
            return
        now = time.monotonic()
        if now < self._moved_sets_at:
            return
        self._moved_sets_at = now + MOVED_SETS_EVERY_S
        await self.emitter.rewrite_moved_sets()

    async def _foresee(self, conn: psycopg.AsyncConnection[Any], events: list[ChangeEvent]) -> None:
        """Parents first, ahead of time (``ParentGate.foresee``): the parents the batch's live
        writes name and the CRM does not hold yet are pulled forward now, so the parent's
        pipeline plans them before the children are due. A pipeline without parents asks
        nothing (``ParentGate.foresee`` returns at once)."""
        if self.emitter is None:
            return
        pending = self.coalescer.pending()
        keys = dict.fromkeys(ev.key for ev in events if ev.op not in (Op.SNAPSHOT, Op.DELETE))
        entries = [pending[k] for k in keys if k in pending]
        pulled = await self.emitter.foresee(conn, entries)
        if pulled:
            log.debug(
                "parents pulled forward ahead of their children",
                extra={"pipeline": self.pipeline.name, "parents": pulled},
            )

    async def _read_demands(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Parents pulled forward (issue 21): the keys of this pipeline that waiting children
        need in the CRM by a moment (``parent_demand``, written by the children's emitters,
        in this process or another), read every ``RELEASE_EVERY_S``; ``_plan`` gives each
        such pending key that deadline when it is earlier than its own. Only a pipeline some
        lookup names queries anything."""
        if not self._looked_up:
            return
        now = time.monotonic()
        if now < self._demand_at:
            return
        self._demand_at = now + RELEASE_EVERY_S
        pulled = await parent_demands(conn, self.schema, self.pipeline.name, DEMAND_LIMIT)
        new = pulled.keys() - self._pulled.keys()
        if new:
            log.info(
                "parents pulled forward: waiting children need them sooner",
                extra={"pipeline": self.pipeline.name, "keys": len(new)},
            )
        self._pulled = pulled

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
        behind = {ev.key for ev in events if ev.offset <= self._catchup_to}
        if not behind:
            log.info(
                "caught up with what was committed at the start",
                extra={"pipeline": self.pipeline.name, "keys_read_ahead": self._read_ahead_keys},
            )
            self._catchup_to = 0
            self._read_ahead_done.clear()
            return []
        # A key read ahead once in this run needs no second look (issue 19, session 16): what
        # came back (or, left out, the batch's own row) was its newest version committed after
        # this run started, so no older one can be sent any more: the coalescer holds that
        # version pending or in flight, or its stamp as acknowledged or dead-lettered (in
        # memory, or in key_state, which `_seed_acked` reloads: both written before
        # `complete`). A later batch's older versions of the key are dropped against it, and a
        # newer one is read in order. Before this, every batch looked up every key again: in
        # the 60-minute soak one run read 386,786 rows ahead for 48,000 keys.
        keys = sorted(behind - self._read_ahead_done)
        if not keys:
            return []
        # the batch's own rows are left out by the query (not fetched nor parsed again): what
        # comes back lies ahead of the batch
        here = [ev.offset for ev in events]
        newest = await outbox.newest_rows(conn, self.schema, self.pipeline.name, keys, here)
        ahead = sorted(newest.values(), key=lambda ev: ev.offset)
        if len(self._read_ahead_done) < READ_AHEAD_REMEMBERED:  # beyond it: looked up again
            self._read_ahead_done.update(keys)
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
