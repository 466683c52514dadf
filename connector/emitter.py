"""Runs the planner's decisions against the CRM and records every outcome (docs/emitter.md).

* **Upsert** (≤ 100 records per call, ``duplicate_check_fields = [key_field]``): each record's
  answer is an acknowledgement (``key_state``: CRM id, version stamp, ``synced``) or a dead
  letter with the CRM's code, field and message; the rest of the call proceeds.
* **Unconvertible values** (``DataError`` from the mapper) are dead-lettered without a call.
* **Deletes** follow ``delete_mode``: ``delete`` through the Delete Records API with the CRM id
  from ``key_state`` (looked up by key with COQL when unknown); ``mark`` upserts
  ``delete_mark_field = true``; ``ignore`` acknowledges without a call.
* **Bulk Write** jobs are durable and fenced: ``bulk_jobs`` records each job from intent (its
  entries: key, stamp, op, outbox id) through upload (file id), creation (job id, callback
  secret: 500 credits are spent here), completion and application of the result. A job whose id
  was recorded is only ever polled again, never re-created: after a restart, ``recover`` resumes
  it by id; ``intent`` / ``uploaded`` jobs were never paid for and are abandoned (their events
  are re-read from the checkpoint).
* **Transient failures** (``TransientError`` after the client's own retries) hand the entries
  back (``EmitOutcome.retry``); nothing is dead-lettered for a transient cause.

The emitter never decides what is newer: the coalescer fences keys in flight, and the engine
calls ``Coalescer.complete`` with the outcome (acknowledged and dead-lettered entries are
``done``: their reader batches resolve and the checkpoint may pass them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from connector import state
from connector.coalesce import PendingEntry
from connector.config import PipelineConfig
from connector.credits import CreditRecorder, acting_for, current_pipeline, http_seconds
from connector.crm_values import dumps_json
from connector.emitter_bulk import CALLBACK_POLL_FACTOR, BulkJobs, CallbackUrl
from connector.emitter_outcome import EmitOutcome, _Results
from connector.emitter_parents import ParentGate
from connector.emitter_schema import SchemaChecks, SourceConnections
from connector.emitter_subform import SubformWrites
from connector.emitter_syncflag import SyncFlags
from connector.errors import DataError, TransientError
from connector.events import ChangeEvent, Op
from connector.latency import LatencyEstimator
from connector.mapping import LookupResolver, RecordMapper, SubformMapper
from connector.metrics import Metrics
from connector.parents import PARENT_NOT_SYNCED, RecordRef, Send
from connector.zoho import coql
from connector.zoho.client import MAX_RECORDS_PER_CALL, RecordResult, ZohoClient
from connector.zoho.codes import TRANSIENT_RECORD_CODES

# the names other modules import from here, some now defined in the split-out modules
# (credits, emitter_bulk, emitter_outcome, emitter_schema, emitter_syncflag)
__all__ = [
    "CALLBACK_POLL_FACTOR",
    "CallbackUrl",
    "CreditRecorder",
    "EmitOutcome",
    "Emitter",
    "RejectionLog",
    "acting_for",
    "current_pipeline",
    "http_seconds",
    "record_hash",
]

log = logging.getLogger(__name__)

# A delete of an id the CRM no longer has: the wanted end state is already there.
_GONE_CODES = frozenset({"INVALID_DATA", "RECORD_NOT_FOUND", "RESOURCE_NOT_FOUND"})


def record_hash(record: dict[str, Any]) -> bytes:
    """What ``key_state.sent_hash`` holds: blake2b-128 of the JSON record as sent."""
    return hashlib.blake2b(dumps_json(record), digest_size=16).digest()


class Emitter(BulkJobs, SyncFlags, SchemaChecks, ParentGate, SubformWrites):
    """Sends entries of one pipeline to the CRM and records the outcomes in the state schema."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        client: ZohoClient,
        pool: AsyncConnectionPool[Any],
        schema: str = "connector",
        mapper: RecordMapper | None = None,
        metrics: Metrics | None = None,
        source_dsn: str | None = None,
        callback_url: CallbackUrl | None = None,
        bulk_poll_initial: float = 2.0,
        bulk_poll_max: float = 30.0,
        default_bulk_latency: float = 120.0,
        orphan_fence_factor: float = 3.0,
        orphan_fence_min: float = 5.0,
        parents: Mapping[str, PipelineConfig] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.pool = pool
        self.schema = schema
        # the pipelines this one's lookup fields name (parents first: emitter_parents.py)
        self.parents: Mapping[str, PipelineConfig] = parents or {}
        self._found: dict[RecordRef, str] = {}  # parents found by COQL (emitter_parents)
        self.mapper = mapper or RecordMapper(pipeline, parents=self.parents)
        self.metrics = metrics
        self.rejections = RejectionLog(pipeline.name)
        self.source_dsn = source_dsn
        self.source_connections = SourceConnections()  # bounded one-shot source connections
        self.callback_url = callback_url
        self.bulk_poll_initial = bulk_poll_initial
        self.bulk_poll_max = bulk_poll_max
        self._wake: dict[int, asyncio.Event] = {}
        self._mark_mapped = pipeline.delete_mark_field in {
            m.field for m in pipeline.fields.values()
        }
        self.default_bulk_latency = default_bulk_latency
        self.orphan_fence_factor = orphan_fence_factor
        self.orphan_fence_min = orphan_fence_min
        self.upsert_latency: float | None = None  # EWMA of an upsert call, seconds
        self._start_types: dict[str, str] = {}  # mapped column -> source type at start
        self.bulk_latency: float | None = None  # EWMA of a bulk job, intent to applied
        self.bulk_records: float | None = None  # EWMA of the records of those jobs
        # keys answered with a transient per-record code (RECORD_LOCKED, …): (first answer,
        # attempts), monotonic; retried until max_staleness has passed, then dead-lettered
        self._transient: dict[str, tuple[float, int]] = {}
        self._backoff_tag = 0  # fence tags of those retries: negative, never a bulk_jobs id
        # the planner's inputs: high percentiles, bulk by job size (connector/latency.py)
        self.latency = LatencyEstimator(default_bulk=default_bulk_latency)
        # records_emitted_total children bound once (see _count)
        self._emitted: dict[tuple[str, str], Any] = {}
        self._emitted_of: Metrics | None = None
        # a subform pipeline's writes (emitter_subform): its mapper and parent column type,
        # and a lock per parent key
        self._subform: tuple[SubformMapper, str] | None = None
        self._parent_locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ estimates
    def restore_bulk_latency(self, durations: Sequence[tuple[int, float, float]]) -> None:
        """Seed the bulk estimates from jobs measured by earlier runs ((records, seconds,
        measured at), oldest first, ``state.bulk_durations``): a restart does not forget them,
        and they keep their age (connector/latency.py, ``bulk_fresh_for``). They replace the
        ones held: a run of the same engine again (a standby's next turn) restores them all,
        and each would otherwise count twice."""
        self.latency.forget_bulk()
        for records, seconds, at in durations:
            self._measured_bulk(records, seconds, at)

    def _measured_bulk(self, records: int, seconds: float, at: float | None = None) -> None:
        """A job measured at ``at`` (epoch seconds; now when None)."""
        self.bulk_latency = _ewma(self.bulk_latency, seconds)
        self.bulk_records = _ewma(self.bulk_records, float(max(records, 1)))
        self.latency.observe_bulk(records, seconds, time.time() if at is None else at)

    def orphan_fence_seconds(self, records: int) -> float:
        """How long the keys of a job that may run on the CRM unknown to us (its create call
        may have reached the CRM, its id never came back) are held back: ``orphan_fence_factor``
        × the expected duration of a job of that size (measured latency, scaled by records when
        the job is larger than the measured ones; the default latency when nothing was measured
        yet), at least ``orphan_fence_min``. Counted from the moment the process that could
        have created the job is known to be gone (or its create call to have returned)."""
        latency = self.bulk_latency if self.bulk_latency is not None else self.default_bulk_latency
        per_job = self.bulk_records or float(records or 1)
        expected = latency * max(1.0, records / max(per_job, 1.0))
        return max(self.orphan_fence_min, self.orphan_fence_factor * expected)

    # ------------------------------------------------------------------ upsert path
    async def send_upsert(self, entries: Sequence[PendingEntry]) -> EmitOutcome:
        """One planned upsert group (≤ 100 keys): upserts, marks and deletes as the ops say."""
        token = current_pipeline.set(self.pipeline.name)
        try:
            out = EmitOutcome()
            res = _Results()
            await self._check_source_columns(entries)
            if self.pipeline.subform_of is not None:  # lines: each parent written whole
                await self._send_lines(entries, res, out)
                return await self._finish(res, out)
            deletes = [e for e in entries if e.event.op is Op.DELETE]
            upserts = [e for e in entries if e.event.op is not Op.DELETE]
            records: list[tuple[PendingEntry, dict[str, Any], str]] = []
            hashes: dict[str, bytes] = {}
            rejected: list[tuple[PendingEntry, DataError]] = []
            sends: dict[str, Send] = {}
            if upserts and self._gated:  # a child pipeline: parents first (issue 21)
                gated = await self._gate(upserts, res, out, "upsert")
                upserts = [e for e, _ in gated.go]
                sends = {e.key: d for e, d in gated.go}
            for e in upserts:
                try:
                    send = sends.get(e.key)
                    records.append(
                        (e, self._json(e.event, send.resolve if send else None), "upsert")
                    )
                except DataError as exc:
                    rejected.append((e, exc.detached()))  # not exc: see DataError.detached
            await self._check_type_changes(rejected)
            for e, err in rejected:
                res.reject(e.event, err.code, str(err), err.field, "mapping")
                out.done.append(e)
            if records or deletes:
                records = await self._unchanged(records, deletes, hashes, res, out)
            if deletes:
                if self.pipeline.delete_mode == "mark":
                    # as with 'delete', a key that never reached the CRM needs no mark: the mark
                    # is an upsert, which would insert a ghost record (or fail on a mandatory
                    # field, MANDATORY_NOT_FOUND) for it (issue 14 §4)
                    found, sub = await self._in_crm(deletes, res, "mark")
                    out.merge(sub)
                    for e, _ in found:
                        records.append((e, self._mark_record(e.event), "mark"))
                elif self.pipeline.delete_mode == "ignore":
                    for e in deletes:
                        res.ack(e.event, None)
                        out.done.append(e)
                else:
                    sub = await self._delete(deletes, res)
                    out.merge(sub)
            for i in range(0, len(records), MAX_RECORDS_PER_CALL):
                part = records[i : i + MAX_RECORDS_PER_CALL]
                started = time.monotonic()
                timing = http_seconds.set([])
                try:
                    results = await self.client.upsert(
                        self.pipeline.module,
                        [r for _, r, _ in part],
                        [self.pipeline.key_field],
                        trigger=self.pipeline.triggers,
                    )
                except TransientError as exc:
                    log.warning(
                        "upsert failed after retries; entries stay pending",
                        extra={"pipeline": self.pipeline.name, "error": str(exc)},
                    )
                    out.retry.extend(e for e, _, _ in part)
                    continue
                finally:
                    seen = http_seconds.get()
                    http_seconds.reset(timing)
                # the answering HTTP call (the client reports it without the slot wait); the
                # whole await only when no CreditRecorder hook saw the call
                took = seen[-1] if seen else time.monotonic() - started
                self.upsert_latency = _ewma(self.upsert_latency, took)
                self.latency.observe_upsert(took)
                # records_emitted_total: counted here, added per (api, outcome) after the loop
                # (the same totals before the next await; issue 19)
                counts: dict[tuple[str, str], int] = {}
                transient = self._transient
                for (e, record, api), r in zip(part, results, strict=True):
                    if r.ok and not transient:
                        pass  # what _retry_transient(e.key, None) decides: nothing to forget
                    elif self._retry_transient(e.key, None if r.ok else r.code):
                        self._later(out, e)  # locked or busy now: sent again after a backoff
                        continue
                    counted = (api, "success" if r.ok else "rejected")
                    counts[counted] = counts.get(counted, 0) + 1
                    if r.ok:
                        res.ack(
                            e.event, r.id, r.action, hashes.get(e.key) if api == "upsert" else None
                        )
                    else:
                        message = _message(r) + self._gave_up(e.key)
                        res.reject(e.event, r.code, message, r.field, api, record, r.details)
                    out.done.append(e)
                for (api, outcome), n in counts.items():
                    self._count(api, outcome, n)
            return await self._finish(res, out)
        finally:
            current_pipeline.reset(token)

    async def _finish(self, res: _Results, out: EmitOutcome) -> EmitOutcome:
        """Store the group's outcomes and count them in ``out``."""
        await self._store(res)
        out.acked += len(res.acks)
        out.dead += len(res.dead)
        out.added += res.added
        out.updated += res.updated
        return out

    async def _unchanged(
        self,
        records: list[tuple[PendingEntry, dict[str, Any], str]],
        deletes: Sequence[PendingEntry],
        hashes: dict[str, bytes],
        res: _Results,
        out: EmitOutcome,
    ) -> list[tuple[PendingEntry, dict[str, Any], str]]:
        """Drop the live upserts whose mapped record is the one the CRM last acknowledged for
        the key (only unmapped columns changed, issue 17 item 8): acknowledged without a call,
        counted as ``unchanged``. Fills ``hashes`` (key -> record hash) for the others.

        The stored hash of every key about to be written is cleared first: if the write's
        outcome is lost (a kill, a timeout after the request left), the CRM may hold the new
        record, and an unchanged-looking later change must not be skipped."""
        for e, record, _ in records:
            hashes[e.key] = record_hash(record)
        keys = [e.key for e, _, _ in records] + [e.key for e in deletes]
        async with self.pool.connection() as conn:
            known = await state.key_states(conn, self.schema, self.pipeline.name, keys)
        keep: list[tuple[PendingEntry, dict[str, Any], str]] = []
        for item in records:
            e = item[0]
            ks = known.get(e.key)
            if (
                ks is not None
                and not ks.deleted
                and ks.sent_hash is not None
                and e.event.op in (Op.INSERT, Op.UPDATE)
                and ks.sent_hash == hashes[e.key]
            ):
                res.ack(e.event, ks.crm_id, None, ks.sent_hash)
                self._count("upsert", "unchanged")
                out.done.append(e)
            else:
                keep.append(item)
        written = [e.key for e, _, _ in keep] + [e.key for e in deletes]
        forget = [k for k in written if (ks := known.get(k)) is not None and ks.sent_hash]
        if forget:
            async with self.pool.connection() as conn:
                await state.forget_sent(conn, self.schema, self.pipeline.name, forget)
        return keep

    async def _delete(self, entries: Sequence[PendingEntry], res: _Results) -> EmitOutcome:
        """delete_mode 'delete': Delete Records API with the CRM ids (≤ 100 per call)."""
        targets, out = await self._in_crm(entries, res, "delete")
        for i in range(0, len(targets), MAX_RECORDS_PER_CALL):
            part = targets[i : i + MAX_RECORDS_PER_CALL]
            try:
                results = await self.client.delete(
                    self.pipeline.module,
                    [c for _, c in part],
                    wf_trigger="workflow" in self.pipeline.triggers,
                )
            except TransientError:
                out.retry.extend(e for e, _ in part)
                continue
            for (e, crm_id), r in zip(part, results, strict=True):
                if self._retry_transient(e.key, None if r.ok else r.code):
                    self._later(out, e)
                    continue
                if r.ok or r.code in _GONE_CODES:
                    res.ack(e.event, crm_id)
                    self._count("delete", "success")
                else:
                    message = _message(r) + self._gave_up(e.key)
                    res.reject(
                        e.event, r.code, message, r.field, "delete", {"id": crm_id}, r.details
                    )
                    self._count("delete", "rejected")
                out.done.append(e)
        return out

    async def _in_crm(
        self, entries: Sequence[PendingEntry], res: _Results, api: str
    ) -> tuple[list[tuple[PendingEntry, str]], EmitOutcome]:
        """The deletes whose key has a CRM record, with its id (from key_state, else looked up
        by key with COQL); the others never reached the CRM and are acknowledged at once."""
        out = EmitOutcome()
        async with self.pool.connection() as conn:
            known = await state.key_states(
                conn, self.schema, self.pipeline.name, [e.key for e in entries]
            )
        targets: list[tuple[PendingEntry, str]] = []
        for e in entries:
            ks = known.get(e.key)
            # an id acknowledged with a delete is the deleted record's: a record the key has
            # now was created later (a re-insert whose ack was lost with its owner), look it up
            crm_id = ks.crm_id if ks is not None and not ks.deleted else None
            if crm_id is None:
                try:
                    crm_id = await self._lookup_id(e.key)
                except TransientError:
                    out.retry.append(e)
                    continue
                except coql.CoqlValueError as exc:  # not found safely: never "not in the CRM"
                    res.reject(e.event, exc.code, str(exc), exc.field, api)
                    self._count(api, "rejected")
                    out.done.append(e)
                    continue
            if crm_id is None:  # never reached the CRM: nothing to delete or mark
                res.ack(e.event, None)
                self._count(api, "success")
                out.done.append(e)
            else:
                targets.append((e, crm_id))
        return targets, out

    async def _lookup_id(self, key: str) -> str | None:
        p = self.pipeline
        rows = await self.client.coql(
            coql.select(p.module, ["id"], where=coql.equals(p.key_field, key), limit=1)
        )
        return str(rows[0]["id"]) if rows and rows[0].get("id") is not None else None

    # ------------------------------------------------------------------ transient record codes
    def _retry_transient(self, key: str, code: str | None, *, transient: bool = False) -> bool:
        """True when the key's answer is a transient per-record code (``TRANSIENT_RECORD_CODES``,
        or any code the caller says is ``transient``) and its first such answer is less than
        ``max_staleness`` ago: the entry goes back to pending (the engine's retry backoff
        spaces the attempts). False otherwise; the attempts stay counted for :meth:`_gave_up`."""
        if code not in TRANSIENT_RECORD_CODES and not transient:
            self._transient.pop(key, None)
            return False
        now = time.monotonic()
        first, attempts = self._transient.get(key, (now, 0))
        self._transient[key] = (first, attempts + 1)
        return now - first < self.pipeline.max_staleness.total_seconds()

    def _later(self, out: EmitOutcome, entry: PendingEntry) -> None:
        """Hand ``entry`` back behind a fence of its own: 1 s after the first transient
        answer, doubling up to 30 s (the engine releases the fence on time; the rest of the
        pipeline is not held back, unlike ``retry``)."""
        _, attempts = self._transient.get(entry.key, (0.0, 1))
        self._backoff_tag -= 1
        seconds = min(30.0, 2.0 ** (attempts - 1))
        out.later.append(entry)
        out.fences.append(state.BulkFence(self._backoff_tag, [entry.key], seconds))

    def _gave_up(self, key: str) -> str:
        """The reason appended to a dead letter after transient retries ('' if none)."""
        tried = self._transient.pop(key, None)
        if tried is None:
            return ""
        first, attempts = tried
        return (
            f" (still refused after {attempts} attempts over {time.monotonic() - first:.0f}s,"
            " the pipeline's max_staleness)"
        )

    # ------------------------------------------------------------------ internals
    def _json(self, event: ChangeEvent, resolve: LookupResolver | None = None) -> dict[str, Any]:
        if event.row is None:
            raise DataError("MISSING_ROW", "the event carries no row image")
        record = self.mapper.to_json(event.row, resolve)
        mark = self.pipeline.delete_mark_field
        if self.pipeline.delete_mode == "mark" and mark and not self._mark_mapped:
            record[mark] = False
        return record

    def _mark_record(self, event: ChangeEvent) -> dict[str, Any]:
        mark = self.pipeline.delete_mark_field
        assert mark is not None
        return {self.pipeline.key_field: event.key, mark: True}

    def _csv(self, event: ChangeEvent) -> list[str]:
        if event.row is None:
            raise DataError("MISSING_ROW", "the event carries no row image")
        values = self.mapper.to_csv_values(event.row)
        if self._extra_mark_column():
            values.append("false")
        return values

    def _extra_mark_column(self) -> bool:
        return bool(
            self.pipeline.delete_mode == "mark"
            and self.pipeline.delete_mark_field
            and not self._mark_mapped
        )

    def _csv_layout(self) -> tuple[list[str], list[dict[str, Any]]]:
        header = list(self.mapper.csv_header())
        mappings = self.mapper.field_mappings()
        if self._extra_mark_column():
            assert self.pipeline.delete_mark_field is not None
            mappings.append({"api_name": self.pipeline.delete_mark_field, "index": len(header)})
            header.append(self.pipeline.delete_mark_field)
        return header, mappings

    async def _store(self, res: _Results) -> None:
        if not res.acks and not res.dead:
            return
        async with self.pool.connection() as conn, conn.transaction():
            await self._store_in(conn, res)
        await self._sync_flags(res)

    async def _store_in(self, conn: psycopg.AsyncConnection[Any], res: _Results) -> None:
        name = self.pipeline.name
        # a key both acknowledged and dead-lettered in one result cannot happen (one entry per
        # key); dead letters first so that an ack's resolution wins if it ever did
        await state.record_dead_letters(conn, self.schema, name, res.dead)
        await state.record_acks(conn, self.schema, name, res.acks)
        await state.add_snapshot_counts(
            conn,
            self.schema,
            name,
            sent=res.snapshot_sent,
            added=res.snapshot_added,
            updated=res.snapshot_updated,
            skipped=res.snapshot_skipped,
        )
        if self.metrics is not None:
            for d in res.dead:
                self.metrics.dead_letters_total.labels(pipeline=name, code=d.code).inc()
        self.rejections.log(res.dead)

    def _count(self, api: str, outcome: str, n: int = 1) -> None:
        # called once per record: the labelled child is bound once per (metrics, api, outcome)
        # (prometheus_client's labels() validates and locks on every call; issue 19)
        if self.metrics is not None:
            child = self._emitted.get((api, outcome))
            if child is None or self._emitted_of is not self.metrics:
                if self._emitted_of is not self.metrics:
                    self._emitted.clear()
                    self._emitted_of = self.metrics
                child = self.metrics.records_emitted_total.labels(
                    pipeline=self.pipeline.name, api=api, outcome=outcome
                )
                self._emitted[(api, outcome)] = child
            child.inc(n)

    def _bulk_gauge(self, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.bulk_jobs_in_flight.labels(pipeline=self.pipeline.name).inc(delta)


class RejectionLog:
    """One WARNING per record the CRM rejected (pipeline, key, code, field, API; never the
    record's values), at most ``burst`` lines per ``window`` seconds; the rest are counted and
    summarised (by code) in one line once the window is over, with the next rejection or
    ``flush``."""

    def __init__(self, pipeline: str, *, burst: int = 10, window: float = 60.0) -> None:
        self.pipeline = pipeline
        self.burst = burst
        self.window = window
        self._start = -math.inf
        self._logged = 0
        self._suppressed: dict[str, int] = {}

    def log(self, letters: Sequence[state.DeadLetter], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.flush(now)
        for d in letters:
            if self._logged < self.burst:
                self._logged += 1
                log.warning(
                    (
                        "a record waits for its parent: key %s, %s%s; dead-lettered until the"
                        " parent is in the CRM, then sent by itself (see: connector dead-letters"
                        " list)"
                        if d.code == PARENT_NOT_SYNCED
                        else "the CRM rejected a record: key %s, %s%s; dead-lettered"
                        " (see: connector dead-letters list)"
                    ),
                    d.key,
                    d.code,
                    f" on field {d.field}" if d.field else "",
                    extra={
                        "pipeline": self.pipeline,
                        "key": d.key,
                        "code": d.code,
                        "field": d.field,
                        "api": d.api,
                    },
                )
            else:
                self._suppressed[d.code] = self._suppressed.get(d.code, 0) + 1

    def flush(self, now: float | None = None) -> None:
        """Start a new window when the current one is over, summarising what it held back."""
        now = time.monotonic() if now is None else now
        if now - self._start < self.window:
            return
        if self._suppressed:
            n = sum(self._suppressed.values())
            codes = ", ".join(f"{c} x{k}" for c, k in sorted(self._suppressed.items()))
            log.warning(
                "the CRM rejected %d more record(s) in the last %.0fs, not logged one by one"
                " (%s); see: connector dead-letters list",
                n,
                now - self._start,
                codes,
                extra={"pipeline": self.pipeline, "rejected": n},
            )
        self._start = now
        self._logged = 0
        self._suppressed = {}


def _message(r: RecordResult) -> str:
    return r.message or r.code


def _ewma(prev: float | None, sample: float, alpha: float = 0.2) -> float:
    return sample if prev is None else (1 - alpha) * prev + alpha * sample
