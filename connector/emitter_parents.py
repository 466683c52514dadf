"""Parents first, at send time (issue 21 part 2b-ii, docs/related-tables.md "Wiring plan"):
``ParentGate`` is a mixin of :class:`connector.emitter.Emitter` that decides, for the writes
of a child pipeline (one with ``type = "lookup"`` fields), which may leave now.

Per send, one query per parent pipeline reads the parents' ``key_state``
(:func:`parent_view`); :func:`connector.parents.parents_first` decides, and:

* ``Send``: the record goes out with each lookup resolved to the parent's CRM id (upsert) or
  with the parent's key and ``find_by`` (Bulk Write: Zoho resolves it);
* ``Wait``: the parent is not in the CRM yet and the child's deadline is not reached: the
  entry goes back pending behind a short fence of its own (``EmitOutcome.later``, as for a
  locked record), its deadline unchanged;
* ``Ask``: at the child's deadline, a parent nobody synced is looked up once by COQL on the
  parent's unique key field (counted in credits): found, the child goes with that id; not
  found, it is held;
* ``Hold``: a dead letter ``PARENT_NOT_SYNCED`` naming the parent in ``error_details``
  (``waiting_for``). The engine re-queues it when that parent is acknowledged
  (:func:`released_children`, ``Engine._release_held``), so the dead letter resolves itself
  on the ordinary acknowledgement path.

While a child waits, it records by when it needs each parent (:func:`record_demand`, the table
``parent_demand``: its deadline less :meth:`ParentGate._send_lead`); the parent pipeline's
engine reads those needs (:func:`parent_demands`, ``engine_read._read_demands``) and plans the
parent with that earlier deadline (the *pull-forward*, docs/related-tables.md).

A pipeline without lookups never reaches any of this (``Emitter._gated`` is False).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from connector import parents as pf
from connector import state
from connector.coalesce import PendingEntry
from connector.config import PipelineConfig
from connector.emitter_outcome import EmitOutcome, _Results
from connector.errors import DataError, TransientError
from connector.events import Op
from connector.latency import LatencyEstimator
from connector.mapping import RecordMapper, SubformMapper
from connector.state_common import AnyConn, _as_dict, _q
from connector.zoho import coql
from connector.zoho.client import ZohoClient

#: How long a child waiting for its parent stays fenced before it is looked at again (at most;
#: never past its own deadline, at least ``WAIT_MIN_S``).
WAIT_MAX_S = 5.0
WAIT_MIN_S = 0.5
#: parents found by COQL (not synced by this connector) remembered per process
ASKED_REMEMBERED = 100_000

Q_PARENT_STATES = """
SELECT key, crm_id, deleted, status, last_error
  FROM {schema}.key_state
 WHERE pipeline = %s AND key = ANY(%s::text[])
"""

# held children of `pipeline` whose parent is in the CRM now (synced, not deleted), and whose
# hold is still the key's latest outcome (its key_state version is the held one)
Q_RELEASED = """
SELECT DISTINCT d.key
  FROM {schema}.dead_letters d
  JOIN {schema}.key_state c
    ON c.pipeline = d.pipeline AND c.key = d.key AND c.version = d.version
  JOIN {schema}.key_state p
    ON p.pipeline = d.error_details #>> '{{waiting_for,pipeline}}'
   AND p.key = d.error_details #>> '{{waiting_for,key}}'
 WHERE d.pipeline = %s AND d.status = 'open' AND d.error_code = %s
   AND p.status = 'synced'
   AND ((NOT p.deleted AND p.crm_id IS NOT NULL) OR (%s AND p.deleted))
 LIMIT %s
"""

# holds of an older version than the key's latest outcome (a newer version was acknowledged,
# or dead-lettered for another reason): that version is never sent, the hold is over
Q_SUPERSEDED = """
UPDATE {schema}.dead_letters d SET status = 'resolved', updated_at = now()
  FROM {schema}.key_state c
 WHERE d.pipeline = %s AND d.status = 'open' AND d.error_code = %s
   AND c.pipeline = d.pipeline AND c.key = d.key AND c.version > d.version
"""


# a waiting child's need (docs/related-tables.md "Pull-forward"): the earliest need is kept
Q_DEMAND = """
INSERT INTO {schema}.parent_demand AS d (pipeline, key, needed_by)
SELECT u.p, u.k, to_timestamp(u.t)
  FROM unnest(%s::text[], %s::text[], %s::float8[]) AS u(p, k, t)
 ORDER BY u.p, u.k
ON CONFLICT (pipeline, key) DO UPDATE SET needed_by = least(d.needed_by, excluded.needed_by)
"""

# needs that are over: the parent is in the CRM, or the moment named passed an hour ago
Q_DEMAND_PRUNE = """
DELETE FROM {schema}.parent_demand d
 WHERE d.pipeline = %s
   AND (d.needed_by < now() - interval '1 hour'
        OR EXISTS (SELECT 1 FROM {schema}.key_state k
                    WHERE k.pipeline = d.pipeline AND k.key = d.key AND k.status = 'synced'
                      AND NOT k.deleted AND k.crm_id IS NOT NULL))
"""

Q_DEMANDS = """
SELECT key, extract(epoch FROM needed_by)::float8 AS needed_by
  FROM {schema}.parent_demand
 WHERE pipeline = %s
 LIMIT %s
"""


async def record_demand(conn: AnyConn, schema: str, needs: Mapping[pf.RecordRef, float]) -> None:
    """Waiting children need these parents in the CRM by these moments (epoch seconds): kept
    per parent, the earliest wins."""
    if not needs:
        return
    refs = sorted(needs)
    await conn.execute(
        _q(Q_DEMAND, schema),
        ([r.pipeline for r in refs], [r.key for r in refs], [needs[r] for r in refs]),
    )


async def parent_demands(conn: AnyConn, schema: str, pipeline: str, limit: int) -> dict[str, float]:
    """Keys of ``pipeline`` that waiting children need in the CRM, each with the moment (epoch
    seconds); needs that are over are deleted first."""
    await conn.execute(_q(Q_DEMAND_PRUNE, schema), (pipeline,))
    cur = await conn.execute(_q(Q_DEMANDS, schema), (pipeline, limit))
    out: dict[str, float] = {}
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out[str(row["key"])] = float(row["needed_by"])
    return out


async def parent_view(
    conn: AnyConn, schema: str, refs: Sequence[pf.RecordRef]
) -> dict[pf.RecordRef, pf.ParentState]:
    """What ``key_state`` says of each parent: synced with a CRM id → ``Synced``; deleted →
    ``Deleted``; its newest change dead-lettered (``failed``) → ``Dead``. A parent with no row
    (or pending, or synced without an id) is left out: :func:`~connector.parents.parents_first`
    takes it as ``Unknown``."""
    by_pipeline: dict[str, list[str]] = {}
    for ref in refs:
        by_pipeline.setdefault(ref.pipeline, []).append(ref.key)
    view: dict[pf.RecordRef, pf.ParentState] = {}
    for pipeline, keys in by_pipeline.items():
        cur = await conn.execute(_q(Q_PARENT_STATES, schema), (pipeline, sorted(set(keys))))
        for r in await cur.fetchall():
            row = _as_dict(cur, r)
            ref = pf.RecordRef(pipeline, row["key"])
            if row["deleted"]:
                view[ref] = pf.Deleted()
            elif row["status"] == "failed":
                view[ref] = pf.Dead(row["last_error"] or "its newest change was refused")
            elif row["status"] == "synced" and row["crm_id"] is not None:
                view[ref] = pf.Synced(str(row["crm_id"]))
    return view


async def released_children(
    conn: AnyConn, schema: str, pipeline: str, limit: int, *, deleted_parents: bool = False
) -> list[str]:
    """Keys of ``pipeline`` held ``PARENT_NOT_SYNCED`` (open dead letters) whose parent is in
    the CRM now and whose hold is the key's latest outcome: the engine sends their newest
    version again. Holds superseded by a newer outcome of their key are resolved first (else
    a hold of an older version, behind a newer one dead-lettered for a data reason, would
    release the key again and again). ``deleted_parents`` (a subform pipeline): a parent
    deleted since releases its children too, as their lines need no write any more (a lookup
    child would only be held again: "is deleted")."""
    await conn.execute(_q(Q_SUPERSEDED, schema), (pipeline, pf.PARENT_NOT_SYNCED))
    cur = await conn.execute(
        _q(Q_RELEASED, schema), (pipeline, pf.PARENT_NOT_SYNCED, deleted_parents, limit)
    )
    return sorted(str(_as_dict(cur, r)["key"]) for r in await cur.fetchall())


@dataclass(frozen=True, slots=True)
class Gated:
    """The entries that may leave now, each with its decision (the lookups' CRM ids)."""

    go: list[tuple[PendingEntry, pf.Send]]


class ParentGate:
    """Parents first for a child pipeline's writes: a mixin of ``Emitter``."""

    pipeline: PipelineConfig
    pool: AsyncConnectionPool[Any]
    schema: str
    client: ZohoClient
    mapper: RecordMapper
    parents: Mapping[str, PipelineConfig]
    _backoff_tag: int
    _found: dict[pf.RecordRef, str]  # parents found by COQL: their CRM ids
    latency: LatencyEstimator

    if TYPE_CHECKING:  # defined by the mixin SubformWrites

        def _lines_mapper(self) -> SubformMapper: ...

    @property
    def _gated(self) -> bool:
        """Whether this pipeline maps a lookup (only then is anything here run)."""
        return bool(self.mapper.lookup_columns)

    async def _gate(
        self,
        entries: Sequence[PendingEntry],
        res: _Results,
        out: EmitOutcome,
        api: str,
        parents_of: Mapping[str, Mapping[str, pf.RecordRef | None]] | None = None,
    ) -> Gated:
        """Split ``entries`` (writes; deletes and rows without an image pass through with an
        empty decision) into those that may leave now and those that wait (``out.later``, a
        fence each) or are held (a ``PARENT_NOT_SYNCED`` dead letter in ``res``, the entry in
        ``out.done``). ``parents_of``: key → (field → parent) when the caller knows the parents
        (a subform pipeline's lines: ``emitter_subform``), else the lookups of each row."""
        now = datetime.now(UTC).timestamp()
        children: list[pf.ChildChange] = []
        passing: list[PendingEntry] = []  # nothing to decide: the mapper has the last word
        by_key: dict[str, PendingEntry] = {}
        for e in entries:
            named = self._named_parents(e) if parents_of is None else parents_of.get(e.key)
            if named is None:
                passing.append(e)
                continue
            by_key[e.key] = e
            children.append(pf.ChildChange(e.key, self._deadline(e), named))
        go: list[tuple[PendingEntry, pf.Send]] = [(e, pf.Send(e.key, {}, {})) for e in passing]
        if not children:
            return Gated(go)
        refs = sorted({r for c in children for r in c.parents.values() if r is not None})
        async with self.pool.connection() as conn:
            view = await parent_view(conn, self.schema, refs)
        result = pf.parents_first(children, view, now=now, flush_interval=0.0)
        if result.ask:
            asked = await self._ask(result.ask, view)
            if asked is None:  # the CRM is away: everything asked waits, as for a transient
                for a in result.of(pf.Ask):
                    self._wait(out, by_key[a.key], WAIT_MAX_S)
                result = pf.GateResult(tuple(d for d in result.decisions if not _is_ask(d)))
            else:
                view = {**view, **asked}
                asking = {a.key for a in result.of(pf.Ask)}
                again = [c for c in children if c.key in asking]
                redone = pf.parents_first(again, view, now=now, flush_interval=0.0)
                result = pf.GateResult(
                    (*(d for d in result.decisions if not _is_ask(d)), *redone.decisions)
                )
        needs: dict[pf.RecordRef, float] = {}  # parents to pull forward: by when
        for d in result.decisions:
            e = by_key[d.key]
            if isinstance(d, pf.Send):
                go.append((e, d))
            elif isinstance(d, pf.Wait):
                self._wait(out, e, self._deadline(e) - now)
                by = self._deadline(e) - self._send_lead()
                for ref in d.parents:
                    needs[ref] = min(needs.get(ref, math.inf), by)
            elif isinstance(d, pf.Hold):
                if isinstance(view.get(d.parent, pf.Unknown()), pf.Unknown):
                    needs[d.parent] = min(needs.get(d.parent, math.inf), now)  # late: at once
                res.reject(
                    e.event,
                    pf.PARENT_NOT_SYNCED,
                    d.message + "; sent again once the parent is in the CRM",
                    d.field,
                    api,
                    details={"waiting_for": {"pipeline": d.parent.pipeline, "key": d.parent.key}},
                )
                out.done.append(e)
            else:  # an Ask left after asking cannot happen: the view now knows every parent
                raise AssertionError(f"undecided child {d!r}")
        if needs:
            async with self.pool.connection() as conn:
                await record_demand(conn, self.schema, needs)
        return Gated(go)

    async def foresee(self, conn: AnyConn, entries: Sequence[PendingEntry]) -> int:
        """Parents pulled forward when their children are read, not when they are sent: each
        live write names its parents (lookups, or a line's order); those not in the CRM yet
        (``parent_view`` leaves them out: a new customer, a new order) are needed by the
        child's deadline less :meth:`_send_lead`, recorded as at send time
        (:func:`record_demand`). Without it a child planned at its latest moment (economy)
        first asks at its deadline: too late for the pull, so the lines of every new order
        were held ``PARENT_NOT_SYNCED`` and sent again by themselves, after the bound (the
        session-22 demo). Returns how many parents were pulled. Nothing for a pipeline that
        names no parent."""
        if not self._gated and self.pipeline.subform_of is None:
            return 0
        lead = self._send_lead()
        wants: dict[pf.RecordRef, float] = {}
        for e in entries:
            if e.live_at is None:  # initial-sync rows: no deadline (dependency order instead)
                continue
            by = self._deadline(e) - lead
            for ref in self._parents_now(e):
                wants[ref] = min(wants.get(ref, math.inf), by)
        if not wants:
            return 0
        view = await parent_view(conn, self.schema, sorted(wants))
        needs = {ref: by for ref, by in wants.items() if ref not in view}
        await record_demand(conn, self.schema, needs)
        return len(needs)

    def _parents_now(self, e: PendingEntry) -> list[pf.RecordRef]:
        """The parents a write names now: its lookups' or, a line, its order (the order a
        line left is in the CRM already, or its set needs no write)."""
        row = e.event.row
        if e.event.op is Op.DELETE or row is None:
            return []
        if self.pipeline.subform_of is None:
            return [r for r in (self._named_parents(e) or {}).values() if r is not None]
        mapper = self._lines_mapper()
        if mapper.parent_column not in row:
            return []
        try:
            key = mapper.parent_key(dict(row))
        except DataError:
            return []
        return [] if key is None else [pf.RecordRef(mapper.parent.name, key)]

    def _named_parents(self, e: PendingEntry) -> dict[str, pf.RecordRef | None] | None:
        """Lookup field → the parent the entry's row names (None: NULL); None when there is
        nothing to decide (a delete, no image, a key the mapper refuses: it dead-letters it)."""
        row = e.event.row
        if e.event.op is Op.DELETE or row is None:
            return None
        named: dict[str, pf.RecordRef | None] = {}
        try:
            for column, api, parent in self.mapper.lookup_columns:
                key = self.mapper.parent_key(row, column)
                named[api] = None if key is None else pf.RecordRef(parent, key)
        except DataError:
            return None
        return named

    def _deadline(self, e: PendingEntry) -> float:
        """The entry's deadline (epoch seconds): its staleness clock + ``max_staleness``."""
        since = e.live_at or e.oldest_at
        return since.timestamp() + self.pipeline.max_staleness.total_seconds()

    def _send_lead(self) -> float:
        """How long before its deadline a waiting child needs its parent in the CRM: the
        longest wait before it looks again (``WAIT_MAX_S``), then one upsert call (the high
        percentile the planner uses) and the pipeline's ``retry_allowance``."""
        return WAIT_MAX_S + self.latency.upsert() + self.pipeline.retry_allowance.total_seconds()

    def _wait(self, out: EmitOutcome, e: PendingEntry, seconds: float) -> None:
        """Back to pending behind a fence of its own (a negative tag, as ``_later``)."""
        self._backoff_tag -= 1
        fence = min(WAIT_MAX_S, max(WAIT_MIN_S, seconds if math.isfinite(seconds) else 0.0))
        out.later.append(e)
        out.fences.append(state.BulkFence(self._backoff_tag, [e.key], fence))

    async def _ask(
        self, refs: Sequence[pf.RecordRef], view: Mapping[pf.RecordRef, pf.ParentState]
    ) -> dict[pf.RecordRef, pf.ParentState] | None:
        """Each unknown parent looked up once by COQL on its pipeline's unique key field, up to
        50 keys a query (``in``: COQL's limit): found → ``Synced`` (its id), not found →
        ``Unknown(asked=True)``; None when the CRM could not be asked (transient). A value
        COQL cannot compare safely holds the child. Found ids are remembered (up to
        ``ASKED_REMEMBERED``): a parent created in the CRM by other means is asked for once."""
        out: dict[pf.RecordRef, pf.ParentState] = {}
        by_pipeline: dict[str, list[str]] = {}
        for ref in refs:
            crm_id = self._found.get(ref)
            if crm_id is not None:
                out[ref] = pf.Synced(crm_id)
                continue
            try:
                coql.string(ref.key, field=ref.pipeline)
            except coql.CoqlValueError as exc:
                out[ref] = pf.Dead(f"cannot be looked up in the CRM: {exc}")
                continue
            by_pipeline.setdefault(ref.pipeline, []).append(ref.key)
        for pipeline, keys in by_pipeline.items():
            parent = self.parents[pipeline]
            for i in range(0, len(keys), coql.IN_MAX_VALUES):
                part = keys[i : i + coql.IN_MAX_VALUES]
                query = coql.select(
                    parent.module,
                    ["id", parent.key_field],
                    where=coql.one_of(parent.key_field, part),
                    limit=max(len(part) * 2, 10),
                )
                try:
                    rows = await self.client.coql(query)
                except TransientError:
                    return None
                found = {
                    str(r.get(parent.key_field)): str(r["id"])
                    for r in rows
                    if r.get("id") is not None
                }
                for key in part:
                    ref = pf.RecordRef(pipeline, key)
                    if key in found:
                        out[ref] = pf.Synced(found[key])
                        if len(self._found) < ASKED_REMEMBERED:
                            self._found[ref] = found[key]
                    else:
                        out[ref] = pf.Unknown(asked=True)
        return out


def _is_ask(d: pf.Decision) -> bool:
    return isinstance(d, pf.Ask)
