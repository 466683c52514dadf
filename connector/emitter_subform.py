"""Writes of a subform pipeline (issue 21; docs/related-tables.md, "Subforms"): a mixin of
:class:`connector.emitter.Emitter`.

A subform pipeline's keys are lines (``order_lines``), but what Zoho stores is the subform field
of the parent's record (``Orders.Lines``), and a write that names it replaces the whole row set.
So one group of line changes becomes one update per parent it touches, each carrying that
parent's complete current line set:

1. each line's parents: the one its image names now and the one it was last written under
   (``key_state.crm_id`` of the line holds that parent's legacy key: a line has no CRM record
   of its own), :func:`connector.subforms.parents_touched`; a parent whose record is deleted
   needs nothing (its rows went with it, or it is marked);
2. parents first, by the lookups' gate (``ParentGate._gate``): a parent not in the CRM yet
   makes its lines wait, then be held ``PARENT_NOT_SYNCED`` at their deadline (released by the
   engine when the parent is acknowledged, as for lookups);
3. under a lock per parent key (sorted, so two groups never deadlock, and a later group always
   reads after an earlier one's write is answered: never an older set last), the sets are read
   from the source table (:func:`connector.subforms.read_line_sets`) and written by the Update
   Records API by the parent's CRM id, at most 100 parents a call. No Bulk Write: Zoho's takes
   no subform column (the planner is told ``CostModel.bulk_write = False``);
4. a line is acknowledged once every parent it touched is written (its ``crm_id`` := the parent
   it is under now); a parent whose set cannot be written whole (``SUBFORM_LIMIT``, a value
   that does not convert) or that the CRM refuses dead-letters the lines that touched it, with
   the reason; a transient failure leaves them pending.

The locks are per process: across a takeover the old owner's write in flight is covered by the
wait every new owner makes (``crm.request_timeout``), as for any pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from connector import parents as pf
from connector import state
from connector.coalesce import PendingEntry
from connector.config import PipelineConfig
from connector.emitter_outcome import EmitOutcome, _Results
from connector.emitter_parents import Gated, parent_view
from connector.emitter_schema import SourceConnections
from connector.errors import DataError, TransientError
from connector.mapping import SubformMapper
from connector.state_common import _as_dict, _q
from connector.subforms import LineEvent, parent_column_type, parents_touched, read_line_sets
from connector.zoho.client import MAX_RECORDS_PER_CALL, ZohoClient
from connector.zoho.records import RecordResult

log = logging.getLogger(__name__)

# the parent each line was last written or tried under (``crm_id`` of the line's row: a line
# has no CRM record of its own); a row made here is completed by the outcome stored after it
Q_REMEMBER_PARENTS = """
INSERT INTO {schema}.key_state AS k (pipeline, key, crm_id)
SELECT %s, u.k, u.p FROM unnest(%s::text[], %s::text[]) AS u(k, p) ORDER BY u.k
ON CONFLICT (pipeline, key) DO UPDATE SET crm_id = EXCLUDED.crm_id, updated_at = now()
"""

# lines in a set the CRM now holds: whatever refused them before (the set over the limit, a
# line that did not convert, a parent not in the CRM) is over, as the set read after their
# last change is written; their dead letters resolve and their state reads synced
Q_SETTLE_LINES = """
WITH u AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS u(k, p)),
     s AS (UPDATE {schema}.key_state k
              SET status = 'synced', crm_id = u.p, last_error = NULL, updated_at = now()
             FROM u
            WHERE k.pipeline = %s AND k.key = u.k AND k.status = 'failed')
UPDATE {schema}.dead_letters d SET status = 'resolved', updated_at = now()
  FROM u WHERE d.pipeline = %s AND d.key = u.k AND d.status IN ('open', 'retried')
"""

# the record each parent's set was last written to (migration 14): a parent re-created in the
# CRM (deleted, inserted again) is found by its key_state's crm_id differing from it
Q_SETS_WRITTEN = """
INSERT INTO {schema}.subform_sets AS s (pipeline, parent_key, crm_id)
SELECT %s, u.k, u.c FROM unnest(%s::text[], %s::text[]) AS u(k, c) ORDER BY u.k
ON CONFLICT (pipeline, parent_key) DO UPDATE SET crm_id = EXCLUDED.crm_id, written_at = now()
"""

# parents whose set changed while they read deleted (nothing to write then): '' is no CRM
# id, so once such a parent is in the CRM again (inserted again, a new record) the pass below
# finds it and writes its set
Q_SETS_UNWRITTEN = """
INSERT INTO {schema}.subform_sets AS s (pipeline, parent_key, crm_id)
SELECT %s, k, '' FROM unnest(%s::text[]) AS k ORDER BY k
ON CONFLICT (pipeline, parent_key) DO UPDATE SET crm_id = '', written_at = now()
"""

# parents in the CRM whose record is not the one their set was last written to
Q_SETS_MOVED = """
SELECT s.parent_key, p.crm_id
  FROM {schema}.subform_sets s
  JOIN {schema}.key_state p ON p.pipeline = %s AND p.key = s.parent_key
 WHERE s.pipeline = %s AND p.status = 'synced' AND NOT p.deleted AND p.crm_id IS NOT NULL
   AND p.crm_id <> s.crm_id
 ORDER BY s.parent_key
 LIMIT %s
"""

#: parents whose set is written again per pass (``rewrite_moved_sets``)
MOVED_SETS_LIMIT = 1_000


def left_field(field: str, parent_key: str) -> str:
    """The gate's name of a parent the line leaves (the dead letter's field when the line waits
    for that one): ``Lines (left 470)``. One name per parent: a delete whose image names the
    order the line moved to, while it was last written under another, leaves two (the soak of
    session 20 found one of them dropped under a shared name, and its rows kept the line)."""
    return f"{field} (left {parent_key})"


class SubformWrites:
    """The writes of a ``subform_of`` pipeline: a mixin of ``Emitter``."""

    pipeline: PipelineConfig
    pool: AsyncConnectionPool[Any]
    schema: str
    client: ZohoClient
    parents: Mapping[str, PipelineConfig]
    source_dsn: str | None
    source_connections: SourceConnections
    _subform: tuple[SubformMapper, str] | None  # the mapper and the parent column's SQL type
    _parent_locks: dict[str, asyncio.Lock]

    if TYPE_CHECKING:  # defined by Emitter and its mixin ParentGate

        async def _gate(
            self,
            entries: Sequence[PendingEntry],
            res: _Results,
            out: EmitOutcome,
            api: str,
            parents_of: Mapping[str, Mapping[str, pf.RecordRef | None]] | None = None,
        ) -> Gated: ...
        def _retry_transient(
            self, key: str, code: str | None, *, transient: bool = False
        ) -> bool: ...
        def _later(self, out: EmitOutcome, entry: PendingEntry) -> None: ...
        def _gave_up(self, key: str) -> str: ...
        def _count(self, api: str, outcome: str, n: int = 1) -> None: ...

    def _lines_mapper(self) -> SubformMapper:
        """The pipeline's mapper: built once (``_subform`` keeps it with the column type)."""
        if self._subform is not None:
            return self._subform[0]
        sub = self.pipeline.subform_of
        assert sub is not None
        return SubformMapper(self.pipeline, self.parents[sub.pipeline])

    async def _send_lines(
        self, entries: Sequence[PendingEntry], res: _Results, out: EmitOutcome
    ) -> None:
        """One planned group of line changes (see the module docstring)."""
        mapper = self._lines_mapper()
        parent = mapper.parent
        async with self.pool.connection() as conn:
            known = await state.key_states(
                conn, self.schema, self.pipeline.name, [e.key for e in entries]
            )
        last = {k: ks.crm_id for k, ks in known.items() if not ks.deleted}
        now_under: dict[str, str | None] = {}
        touched: dict[str, list[str]] = {}  # line key → parent keys, the new one first
        for e in entries:
            ev = e.event
            try:
                parents, memory = parents_touched(
                    mapper, [LineEvent(e.key, ev.op.value, ev.row)], last
                )
            except DataError as exc:
                err = exc.detached()
                res.reject(ev, err.code, str(err), err.field, "update")
                out.done.append(e)
                continue
            under = memory[e.key]
            now_under[e.key] = under
            touched[e.key] = sorted(parents, key=lambda k: k != under)
        refs = [pf.RecordRef(parent.name, k) for ks in touched.values() for k in ks]
        async with self.pool.connection() as conn:
            view = await parent_view(conn, self.schema, sorted(set(refs)))
        named: dict[str, dict[str, pf.RecordRef | None]] = {}
        gate: list[PendingEntry] = []
        # orders whose set these lines change while their pipeline says deleted: nothing to
        # write now, but one may be inserted again (a new record, without rows) before its
        # pipeline sends it: its set is written once it is back (``rewrite_moved_sets``)
        unwritten = sorted(
            {
                k
                for ks in touched.values()
                for k in ks
                if isinstance(view.get(pf.RecordRef(parent.name, k)), pf.Deleted)
            }
        )
        if unwritten:
            async with self.pool.connection() as conn:
                await conn.execute(
                    _q(Q_SETS_UNWRITTEN, self.schema), (self.pipeline.name, unwritten)
                )
        for e in entries:
            if e.key not in touched:
                continue
            live = [
                k
                for k in touched[e.key]
                if not isinstance(view.get(pf.RecordRef(parent.name, k)), pf.Deleted)
            ]
            if not live:  # no parent, or only deleted ones: nothing in the CRM to rewrite
                res.ack(e.event, now_under[e.key])
                out.done.append(e)
                continue
            named[e.key] = {
                (mapper.field if k == now_under[e.key] else left_field(mapper.field, k)): (
                    pf.RecordRef(parent.name, k)
                )
                for k in live
            }
            gate.append(e)
        if not gate:
            return
        waiting_from = len(out.later)
        gated = await self._gate(gate, res, out, "update", parents_of=named)
        go = [e for e, _ in gated.go]
        ids: dict[str, str] = {}
        for _, send in gated.go:
            ids.update({ref.key: crm_id for ref, crm_id in send.ids.items()})
        # a line held (its order refused, deleted or not in the CRM by its deadline) still
        # changed the set of every other order it touched: those in the CRM are written now
        # (their sets read from the table, so the line is where the table has it), only the
        # line's own acknowledgement waits for the held order (session 20's soak: an order a
        # line left kept its row while the order the line moved to was refused)
        going = {e.key for e in go} | {e.key for e in out.later[waiting_from:]}
        held_in_crm = {
            k: st.crm_id
            for e in gate
            if e.key not in going
            for k in touched[e.key]
            if isinstance(st := view.get(pf.RecordRef(parent.name, k)), pf.Synced)
        }
        ids = {**held_in_crm, **ids}
        failed, written = await self._write_parents(mapper, ids)
        await self._sets_written({k: ids[k] for k in written})
        for k in sorted(held_in_crm.keys() - {p for e in go for p in touched[e.key]}):
            if k in failed:
                log.warning(
                    "the order a held line left was not written; it is written again when"
                    " the line is released",
                    extra={"pipeline": self.pipeline.name, "parent": k, "why": failed[k][0]},
                )
        tried = {e.key: now_under[e.key] for e in go if now_under[e.key] is not None}
        settled = {line: k for k, keys in written.items() for line in keys}
        async with self.pool.connection() as conn:
            if tried:  # a line refused with its set is remembered under it (a later delete
                # of it, key only in logical mode, must rewrite that set)
                await conn.execute(
                    _q(Q_REMEMBER_PARENTS, self.schema),
                    (self.pipeline.name, list(tried), list(tried.values())),
                )
            if settled:
                await conn.execute(
                    _q(Q_SETTLE_LINES, self.schema),
                    (list(settled), list(settled.values()), self.pipeline.name, self.pipeline.name),
                )
        for e in go:
            why = next((failed[k] for k in touched[e.key] if k in failed), None)
            if why is None:
                res.ack(e.event, now_under[e.key], "update")
                out.done.append(e)
            elif why[0] == "retry":
                out.retry.append(e)
            elif why[0] == "later":
                self._later(out, e)
            else:
                _, code, message, fname, payload = why
                res.reject(e.event, code, message, fname, "update", payload)
                out.done.append(e)

    async def _sets_written(self, ids: Mapping[str, str]) -> None:
        """Remember the record each parent's set was written to (``subform_sets``)."""
        if not ids:
            return
        keys = sorted(ids)
        async with self.pool.connection() as conn:
            await conn.execute(
                _q(Q_SETS_WRITTEN, self.schema),
                (self.pipeline.name, keys, [ids[k] for k in keys]),
            )

    async def rewrite_moved_sets(self) -> int:
        """Question 4 (docs/related-tables.md): a parent whose CRM record is not the one its
        set was last written to (the order deleted and inserted again: a new record without
        rows, while its lines, with no foreign key, stayed and did not change) has its current
        set written again, under its lock. A set refused for good (``SUBFORM_LIMIT``, a value
        that does not convert, the record refused) is remembered as tried, with a warning: its
        lines are dead-lettered by their own next change, and trying again on every pass would
        spend a credit each time. A transient failure is tried on the next pass. Returns the
        parents written."""
        sub = self.pipeline.subform_of
        if sub is None:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                _q(Q_SETS_MOVED, self.schema), (sub.pipeline, self.pipeline.name, MOVED_SETS_LIMIT)
            )
            rows = [_as_dict(cur, r) for r in await cur.fetchall()]
        moved = {str(r["parent_key"]): str(r["crm_id"]) for r in rows}
        if not moved:
            return 0
        failed, written = await self._write_parents(self._lines_mapper(), moved)
        refused = {k: moved[k] for k, why in failed.items() if why[0] == "dead"}
        for k, why in sorted(failed.items()):
            if why[0] == "dead":
                log.warning(
                    "the set of a re-created parent record was refused; its lines' next"
                    " change tries again",
                    extra={"pipeline": self.pipeline.name, "parent": k, "code": why[1]},
                )
        await self._sets_written({**refused, **{k: moved[k] for k in written}})
        if written:
            log.info(
                "parent records created again in the CRM got their line sets back",
                extra={"pipeline": self.pipeline.name, "parents": len(written)},
            )
        return len(written)

    async def _write_parents(
        self, mapper: SubformMapper, ids: Mapping[str, str]
    ) -> tuple[dict[str, tuple[Any, ...]], dict[str, list[str]]]:
        """Each parent in ``ids`` (legacy key → CRM id) written with its complete current line
        set, under its lock. Returns the parents not written: key → ``("retry",)`` (transient),
        ``("later",)`` (a per-record transient code: backoff) or ``("dead", code, message,
        field, payload)``; and those written: key → the keys of the lines now in its rows."""
        failed: dict[str, tuple[Any, ...]] = {}
        written: dict[str, list[str]] = {}
        if not ids:
            return failed, written
        if self.source_dsn is None:
            raise RuntimeError("a subform pipeline needs the source database to read its lines")
        keys = sorted(ids)
        async with contextlib.AsyncExitStack() as stack:
            for k in keys:  # sorted: two groups never wait for each other in a circle
                lock = self._parent_locks.setdefault(k, asyncio.Lock())
                await stack.enter_async_context(lock)
            async with (
                self.source_connections.slot(),
                await psycopg.AsyncConnection.connect(self.source_dsn, autocommit=True) as conn,
            ):
                if self._subform is None:
                    self._subform = (mapper, await parent_column_type(conn, self.pipeline))
                sets = await read_line_sets(conn, mapper, keys, column_type=self._subform[1])
            for k, err in sets.failed.items():
                failed[k] = ("dead", err.code, str(err), err.field, None)
            records = [(k, {"id": ids[k], mapper.field: rows}) for k, rows in sets.values.items()]
            for i in range(0, len(records), MAX_RECORDS_PER_CALL):
                part = records[i : i + MAX_RECORDS_PER_CALL]
                try:
                    results = await self.client.update(
                        mapper.parent.module,
                        [r for _, r in part],
                        trigger=self.pipeline.triggers,
                    )
                except TransientError as exc:
                    log.warning(
                        "subform update failed after retries; its lines stay pending",
                        extra={"pipeline": self.pipeline.name, "error": str(exc)},
                    )
                    failed.update({k: ("retry",) for k, _ in part})
                    continue
                for (k, record), r in zip(part, results, strict=True):
                    refused = self._parent_outcome(k, record, r)
                    if refused:
                        failed.update(refused)
                    else:
                        written[k] = sets.line_keys[k]
        self._parent_locks_trim()
        return failed, written

    def _parent_outcome(
        self, key: str, record: dict[str, Any], r: RecordResult
    ) -> dict[str, tuple[Any, ...]]:
        """One parent's answer: written (``{}``), refused for now (a transient per-record code
        such as ``RECORD_LOCKED``: its lines back behind a fence, until ``max_staleness`` has
        passed since its first such answer) or refused (its lines dead-lettered)."""
        transient_key = "\x00" + key  # beside the line keys in Emitter._transient (no NUL in a key)
        if r.ok:
            self._retry_transient(transient_key, None)
            self._count("update", "success")
            return {}
        sub = self.pipeline.subform_of
        parent = f"{sub.pipeline if sub else '?'} {key}"
        # the order's record is not in the CRM any more (zoho-crm-api.md §3: INVALID_DATA with
        # details {"id": …} on update of an unknown or deleted id): deleted by the order's own
        # pipeline since the gate read its state, or by hand. Looked at again like a locked
        # record: the next attempt reads the order's state anew (deleted: nothing to write)
        gone = r.code == "INVALID_DATA" and "id" in r.details and r.field is None
        if self._retry_transient(transient_key, r.code, transient=gone):
            return {key: ("later",)}
        self._count("update", "rejected")
        if gone:
            message = (
                f"the CRM record {record['id']} of {parent} is gone ({r.code}: {r.message}),"
                " and its pipeline does not say it was deleted: was it deleted in the CRM by"
                " hand? `connector dead-letters retry` once the order is back"
            )
        else:
            message = f"{r.code}: {r.message} (the subform write of {parent} with its lines)"
        message += self._gave_up(transient_key)
        return {key: ("dead", r.code, message, r.field, record)}

    def _parent_locks_trim(self) -> None:
        """Forget the locks nobody holds or waits for (one per parent key ever written would
        grow without bound)."""
        if len(self._parent_locks) > 10_000:
            for k in [k for k, lock in self._parent_locks.items() if not lock.locked()]:
                del self._parent_locks[k]
