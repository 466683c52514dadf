"""The emitter's Bulk Write job lifecycle (docs/emitter.md): intent, upload, create, poll or
callback wake-up, result download and application, and resumption after a restart.

``BulkJobs`` is a mixin of :class:`connector.emitter.Emitter`, which holds the state it uses
(declared below for the type checker) and re-exports this module's public names."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from connector import dbpolicy, state
from connector.coalesce import PendingEntry
from connector.config import PipelineConfig
from connector.credits import current_pipeline
from connector.emitter_outcome import EmitOutcome, _Results
from connector.emitter_parents import Gated
from connector.errors import BulkJobGone, DataError, TransientError
from connector.events import ChangeEvent, EventStamp, Op
from connector.latency import BULK_WINDOW, LatencyEstimator
from connector.metrics import Metrics
from connector.parents import RecordRef
from connector.zoho.bulk import BulkJob, BulkRowResult, JobStatus, RowOutcome, build_bulk_zip
from connector.zoho.client import MAX_RECORDS_PER_CALL, ZohoClient

# the emitter's logger: records keep the name they had before the split
log = logging.getLogger("connector.emitter")

CallbackUrl = Callable[[int, str], str]  # (bulk_jobs.id, secret) -> URL the CRM calls back
#: With a callback URL the polls are a safety net and back off to this many times
#: ``bulk_poll_max``: the callback ends the wait at once when it arrives.
CALLBACK_POLL_FACTOR = 4
#: With a callback URL the first safety-net poll comes when the job is this many times its
#: typical (median) duration late, between ``bulk_poll_initial`` and ``bulk_poll_max``. A job
#: whose callback is lost is then measured close to its time on the CRM, not at the first poll
#: 30 s later: such a measurement, above ``max_staleness``, kept every later job out of the plan
#: for the rest of a soak, so none was measured again (the "bulk-estimate trap").
CALLBACK_LATE_FACTOR = 1.5
_OP_VALUE = {op: op.value for op in Op}


class BulkJobs:
    """Bulk Write jobs, durable and fenced (``bulk_jobs``): a mixin of ``Emitter``."""

    pipeline: PipelineConfig
    client: ZohoClient
    pool: AsyncConnectionPool[Any]
    schema: str
    metrics: Metrics | None
    callback_url: CallbackUrl | None
    bulk_poll_initial: float
    bulk_poll_max: float
    latency: LatencyEstimator
    _wake: dict[int, asyncio.Event]
    _transient: dict[str, tuple[float, int]]

    if TYPE_CHECKING:  # defined by Emitter (and its other mixins, SyncFlags and SchemaChecks)

        async def send_upsert(self, entries: Sequence[PendingEntry]) -> EmitOutcome: ...
        async def _check_source_columns(self, entries: Sequence[PendingEntry]) -> None: ...
        async def _check_type_changes(
            self, rejected: Sequence[tuple[PendingEntry, DataError]]
        ) -> None: ...
        def _csv(self, event: ChangeEvent) -> list[str]: ...
        def _csv_layout(self) -> tuple[list[str], list[dict[str, Any]]]: ...
        async def _store(self, res: _Results) -> None: ...
        async def _store_in(self, conn: psycopg.AsyncConnection[Any], res: _Results) -> None: ...
        async def _sync_flags(self, res: _Results) -> None: ...
        def restore_bulk_latency(self, durations: Sequence[tuple[int, float, float]]) -> None: ...
        def _measured_bulk(self, records: int, seconds: float, at: float | None = None) -> None: ...
        def orphan_fence_seconds(self, records: int) -> float: ...
        def _retry_transient(
            self, key: str, code: str | None, *, transient: bool = False
        ) -> bool: ...
        def _later(self, out: EmitOutcome, entry: PendingEntry) -> None: ...
        def _gave_up(self, key: str) -> str: ...
        def _count(self, api: str, outcome: str, n: int = 1) -> None: ...
        def _bulk_gauge(self, delta: int) -> None: ...
        @property
        def _gated(self) -> bool: ...
        async def _gate(
            self,
            entries: Sequence[PendingEntry],
            res: _Results,
            out: EmitOutcome,
            api: str,
            parents_of: Mapping[str, Mapping[str, RecordRef | None]] | None = None,
        ) -> Gated: ...

    # ------------------------------------------------------------------ bulk path
    async def send_bulk(self, entries: Sequence[PendingEntry]) -> EmitOutcome:
        """One planned bulk group (≤ 25,000 keys) as one Bulk Write upsert job. Deletes in the
        group go through the upsert path (the Bulk Write API does not delete). A subform
        pipeline's group goes by update (Zoho's Bulk Write takes no subform column; its
        planner is never offered a job, ``CostModel.bulk_write``: this is a safety net)."""
        if self.pipeline.subform_of is not None:
            return await self.send_upsert(entries)
        token = current_pipeline.set(self.pipeline.name)
        try:
            out = EmitOutcome()
            await self._check_source_columns(entries)
            deletes = [e for e in entries if e.event.op is Op.DELETE]
            if deletes:
                out.merge(await self._send_deletes(deletes))
            rows: list[tuple[PendingEntry, list[str]]] = []
            res = _Results()
            rejected: list[tuple[PendingEntry, DataError]] = []
            writes = [e for e in entries if e.event.op is not Op.DELETE]
            if writes and self._gated:
                # a child pipeline: parents first (issue 21); the job's lookup cells are the
                # parents' keys, resolved by Zoho through find_by once each parent is in the CRM
                writes = [e for e, _ in (await self._gate(writes, res, out, "bulk")).go]
            for e in writes:
                try:
                    rows.append((e, self._csv(e.event)))
                except DataError as exc:
                    rejected.append((e, exc.detached()))  # not exc: see DataError.detached
            await self._check_type_changes(rejected)
            for e, err in rejected:
                res.reject(e.event, err.code, str(err), err.field, "mapping")
                out.done.append(e)
            if res.dead:
                await self._store(res)
                out.dead += len(res.dead)
            if rows:
                out.merge(await self._bulk_job(rows))
            return out
        finally:
            current_pipeline.reset(token)

    async def _send_deletes(self, deletes: Sequence[PendingEntry]) -> EmitOutcome:
        out = EmitOutcome()
        for i in range(0, len(deletes), MAX_RECORDS_PER_CALL):
            out.merge(await self.send_upsert(deletes[i : i + MAX_RECORDS_PER_CALL]))
        return out

    async def _bulk_job(self, rows: Sequence[tuple[PendingEntry, list[str]]]) -> EmitOutcome:
        started = time.monotonic()
        by_key = {e.key: e for e, _ in rows}
        # (stamp_of and Op.value inlined: once per row of the job; issue 19)
        entries = [
            state.BulkEntry(
                e.key,
                EventStamp((ev := e.event).version, ev.source_xid, ev.snapshot),
                _OP_VALUE[ev.op],
                ev.offset,
            )
            for e, _ in rows
        ]
        async with self.pool.connection() as conn:
            job_row = await state.bulk_intent(
                conn, self.schema, self.pipeline.name, "upsert", entries
            )
            # the job may land without our knowing (orphan): what was sent is unknown now
            await state.forget_sent(conn, self.schema, self.pipeline.name, list(by_key))
        self._bulk_gauge(+1)
        try:
            header, mappings = self._csv_layout()
            bulk_file = build_bulk_zip(header, [values for _, values in rows])
            secret = secrets.token_urlsafe(24)
            try:
                file_id = await self.client.upload_bulk_file(bulk_file)
                async with self.pool.connection() as conn:
                    await state.bulk_uploaded(conn, self.schema, job_row, file_id, secret)
            except TransientError as exc:
                # no create call was made: nothing can run on the CRM, hand the entries back
                log.warning(
                    "bulk file not uploaded; entries stay pending",
                    extra={"pipeline": self.pipeline.name, "error": str(exc)},
                )
                async with self.pool.connection() as conn:
                    await state.bulk_finish(conn, self.schema, job_row, state.BulkStatus.ABANDONED)
                return EmitOutcome(retry=[e for e, _ in rows])
            url = self.callback_url(job_row, secret) if self.callback_url else None
            try:
                job_id = await self.client.create_bulk_job(
                    self.pipeline.module,
                    file_id,
                    operation="upsert",
                    find_by=self.pipeline.key_field,
                    field_mappings=mappings,
                    callback_url=url,
                )
            except TransientError as exc:
                # no job id came back, but an attempt may have reached the CRM (a timeout, a
                # lost answer): such a job would write these versions later. The entries are
                # handed back fenced until it can no longer write (its callback, or the bound).
                fence = self.orphan_fence_seconds(len(rows))
                log.warning(
                    "bulk job not created; entries stay pending, fenced",
                    extra={
                        "pipeline": self.pipeline.name,
                        "error": str(exc),
                        "job_row": job_row,
                        "fence_seconds": round(fence, 1),
                    },
                )
                await self._until_stored(lambda conn: self._abandon_fenced(conn, job_row, fence))
                return EmitOutcome(
                    retry=[e for e, _ in rows],
                    fences=[state.BulkFence(job_row, list(by_key), fence)],
                )
            # the job is paid for: its id must be recorded, however long the database is away
            await self._until_stored(
                lambda conn: state.bulk_created(conn, self.schema, job_row, job_id, secret)
            )
            log.info(
                "bulk job created",
                extra={"pipeline": self.pipeline.name, "job_id": job_id, "records": len(rows)},
            )
            return await self._finish_job(job_row, job_id, entries, by_key, started=started)
        finally:
            self._bulk_gauge(-1)
            self._wake.pop(job_row, None)

    async def _finish_job(
        self,
        job_row: int,
        job_id: str,
        entries: Sequence[state.BulkEntry],
        by_key: dict[str, PendingEntry] | None,
        *,
        started: float | None = None,
    ) -> EmitOutcome:
        """Wait for the job (poll, or a callback wake-up), download its result and apply it in
        one transaction with marking the job applied. Transient errors are retried here: the
        job is paid for, its entries stay in flight until its result is known. ``started``
        (monotonic, at intent) when this process ran the whole job: its duration is measured
        and stored (the estimate survives restarts)."""
        wake = self._wake.setdefault(job_row, asyncio.Event())
        poll_initial, poll_max = self.bulk_poll_initial, self.bulk_poll_max
        if self.callback_url is not None:
            # the callback wakes the wait; polls are only the safety net, and each costs a
            # credit ("All other APIs: 1"): the first when the job is late by its typical
            # duration, then backing off (docs/zoho-client.md "Credits")
            typical = self.latency.typical_bulk(len(entries))
            if typical is not None:
                poll_initial = min(poll_max, max(poll_initial, CALLBACK_LATE_FACTOR * typical))
            poll_max = poll_max * CALLBACK_POLL_FACTOR
        delay = 1.0
        while True:
            try:
                job = await self.client.wait_bulk_job(
                    job_id,
                    wake=wake,
                    poll_initial=poll_initial,
                    poll_max=poll_max,
                )
                results = (
                    await self.client.bulk_results(
                        job, [e.key for e in entries], key_column=self.pipeline.key_field
                    )
                    if job.download_url and job.status is JobStatus.COMPLETED
                    else None
                )
                break
            except BulkJobGone as exc:
                return await self._job_gone(job_row, job_id, entries, by_key, exc)
            except TransientError as exc:
                log.warning(
                    "bulk job poll failed; retrying",
                    extra={"pipeline": self.pipeline.name, "job_id": job_id, "error": str(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        duration = None
        if started is not None and job.status is JobStatus.COMPLETED:
            duration = time.monotonic() - started
            self._measured_bulk(len(entries), duration)
        async for attempt in dbpolicy.retrying(
            f"the result of bulk job {job_id}", pipeline=self.pipeline.name
        ):
            with attempt:
                return await self._apply(job_row, job, results, entries, by_key, duration=duration)
        raise AssertionError("unreachable: the policy retries until it returns or raises")

    async def _job_gone(
        self,
        job_row: int,
        job_id: str,
        entries: Sequence[state.BulkEntry],
        by_key: dict[str, PendingEntry] | None,
        exc: BulkJobGone,
    ) -> EmitOutcome:
        """The job or its result file expired on the CRM (a long outage): what it wrote is
        unknown, so its entries are sent again, never failed. The row is abandoned with the
        usual orphan fence (should the CRM still run the job, an older version must not land
        after the re-sent one); after a restart the events are read again from the checkpoint."""
        fence = self.orphan_fence_seconds(len(entries))
        log.warning(
            "bulk job or its result expired on the CRM; its entries are sent again, fenced",
            extra={
                "pipeline": self.pipeline.name,
                "job_id": job_id,
                "error": str(exc),
                "fence_seconds": round(fence, 1),
            },
        )
        await self._until_stored(lambda conn: self._abandon_fenced(conn, job_row, fence))
        keys = [e.key for e in entries]
        retry = [by_key[k] for k in keys if k in by_key] if by_key is not None else []
        return EmitOutcome(retry=retry, fences=[state.BulkFence(job_row, keys, fence)])

    async def _until_stored(
        self, write: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
    ) -> None:
        """Run a state write, retrying while the database is unreachable."""
        async for attempt in dbpolicy.retrying("a state write", pipeline=self.pipeline.name):
            with attempt:
                async with self.pool.connection() as conn:
                    await write(conn)

    async def _apply(
        self,
        job_row: int,
        job: BulkJob,
        results: dict[str, BulkRowResult] | None,
        entries: Sequence[state.BulkEntry],
        by_key: dict[str, PendingEntry] | None,
        *,
        duration: float | None = None,
    ) -> EmitOutcome:
        out = EmitOutcome()
        res = _Results()
        retry_keys: list[str] = []
        later_keys: list[str] = []
        if results is None:
            retry_keys = [e.key for e in entries]
        else:
            # records_emitted_total{api="bulk"}: counted here, added per outcome after the loop,
            # in the order of first occurrence (the same totals before the next await; issue 19)
            counts: dict[str, int] = {}
            transient = self._transient
            for be in entries:
                r = results[be.key]
                event = _entry_event(be, by_key)
                if r.ok:
                    if transient:
                        transient.pop(be.key, None)
                    action = "insert" if r.outcome is RowOutcome.ADDED else "update"
                    res.ack(event, r.record_id, action)
                    counts["success"] = counts.get("success", 0) + 1
                elif r.outcome is RowOutcome.UNPROCESSED:
                    retry_keys.append(be.key)
                elif self._retry_transient(be.key, r.code):
                    later_keys.append(be.key)
                else:
                    message = r.message + self._gave_up(be.key)
                    res.reject(event, r.code or "SKIPPED", message, r.field, "bulk", None)
                    counts["skipped"] = counts.get("skipped", 0) + 1
            for outcome, n in counts.items():
                self._count("bulk", outcome, n)
        async with self.pool.connection() as conn, conn.transaction():
            if job.status is JobStatus.FAILED:
                await state.bulk_failed(conn, self.schema, job_row, "job FAILED")
            else:
                await state.bulk_completed(
                    conn,
                    self.schema,
                    job_row,
                    added=job.added,
                    updated=job.updated,
                    skipped=job.skipped,
                )
            finished = await state.bulk_finish(
                conn, self.schema, job_row, state.BulkStatus.APPLIED, duration=duration
            )
            if finished:
                await self._store_in(conn, res)
        if not finished:
            # an earlier attempt's COMMIT went through although its connection died before
            # the answer (a PostgreSQL restart): the result is stored, nothing more to write
            log.info(
                "bulk job result was already stored",
                extra={"pipeline": self.pipeline.name, "job_id": job.id, "job_row": job_row},
            )
        await self._sync_flags(res)
        if self.metrics is not None:
            outcome = "failed" if job.status is JobStatus.FAILED else "completed"
            self.metrics.bulk_jobs_total.labels(pipeline=self.pipeline.name, outcome=outcome).inc()
        if by_key is not None:
            done_keys = {a.key for a in res.acks} | {d.key for d in res.dead}
            out.done.extend(by_key[k] for k in done_keys if k in by_key)
            out.retry.extend(by_key[k] for k in retry_keys if k in by_key)
            for k in later_keys:
                if k in by_key:
                    self._later(out, by_key[k])
        out.acked += len(res.acks)
        out.dead += len(res.dead)
        out.added += res.added
        out.updated += res.updated
        log.info(
            "bulk job applied",
            extra={
                "pipeline": self.pipeline.name,
                "job_id": job.id,
                "acked": len(res.acks),
                "dead": len(res.dead),
                "retry": len(retry_keys) + len(later_keys),
            },
        )
        return out

    async def recover(self) -> EmitOutcome:
        """Resume the pipeline's open bulk jobs after a restart (call before reading).

        created / running / completed: poll the same job id, download, apply (never
        re-created: it was paid for). intent (no create call was made): abandoned; its events
        are past the checkpoint and are read and planned again. uploaded (the create call may
        have reached the CRM, the id never came back: an *orphan* may run there and write these
        versions later): abandoned with a fence (``bulk_jobs.fence_until``,
        ``orphan_fence_seconds`` from now, when the process that could create it is gone);
        the engine holds its keys back until then or until the orphan's callback."""
        token = current_pipeline.set(self.pipeline.name)
        out = EmitOutcome()
        try:
            async with self.pool.connection() as conn:
                jobs = await state.open_bulk_jobs(conn, self.schema, self.pipeline.name)
                self.restore_bulk_latency(
                    await state.bulk_durations(
                        conn, self.schema, self.pipeline.name, limit=BULK_WINDOW
                    )
                )
            for job in jobs:
                if job.status is state.BulkStatus.INTENT:
                    async with self.pool.connection() as conn:
                        await state.bulk_finish(
                            conn, self.schema, job.id, state.BulkStatus.ABANDONED
                        )
                    log.info(
                        "unpaid bulk job abandoned after restart",
                        extra={"pipeline": self.pipeline.name, "job_row": job.id},
                    )
                    continue
                if job.status is state.BulkStatus.UPLOADED or job.job_id is None:
                    fence = self.orphan_fence_seconds(job.record_count)
                    async with self.pool.connection() as conn:
                        await self._abandon_fenced(conn, job.id, fence)
                    log.warning(
                        "bulk job without a recorded id abandoned after restart; its keys are"
                        " fenced in case the CRM runs it",
                        extra={
                            "pipeline": self.pipeline.name,
                            "job_row": job.id,
                            "fence_seconds": round(fence, 1),
                        },
                    )
                    continue
                log.info(
                    "resuming bulk job",
                    extra={"pipeline": self.pipeline.name, "job_id": job.job_id},
                )
                if self.metrics is not None:
                    self.metrics.bulk_jobs_total.labels(
                        pipeline=self.pipeline.name, outcome="resumed"
                    ).inc()
                self._bulk_gauge(+1)
                try:
                    out.merge(await self._finish_job(job.id, job.job_id, job.entries, None))
                finally:
                    self._bulk_gauge(-1)
                    self._wake.pop(job.id, None)
            return out
        finally:
            current_pipeline.reset(token)

    async def _abandon_fenced(
        self, conn: psycopg.AsyncConnection[Any], job_row: int, seconds: float
    ) -> None:
        await state.bulk_abandon_fenced(conn, self.schema, job_row, seconds)

    def wake_bulk(self, job_row: int) -> bool:
        """A verified callback for ``bulk_jobs.id = job_row``: stop waiting, poll now."""
        event = self._wake.get(job_row)
        if event is None:
            return False
        event.set()
        return True


def _entry_event(be: state.BulkEntry, by_key: dict[str, PendingEntry] | None) -> ChangeEvent:
    """The event a bulk entry carried: the live entry's event, or (after a restart) one
    rebuilt from the stamp recorded at intent (enough for key_state and dead_letters)."""
    if by_key is not None and be.key in by_key:
        return by_key[be.key].event
    from datetime import UTC, datetime

    return ChangeEvent(
        offset=be.outbox_id,
        pipeline="",
        op=Op(be.op),
        key=be.key,
        version=be.stamp.version,
        source_xid=be.stamp.source_xid,
        row=None,
        captured_at=datetime.now(UTC),
        snapshot=be.stamp.snapshot,
    )
