"""The runtime's probes (``/healthz``, ``/readyz``: :class:`connector.server.Probe`), its
metric gauges and its side tasks (credit ledger, gauge refresh, outbox retention), as
:class:`ProbesAndGauges`, a base class of :class:`connector.runtime.Runtime`. Split from
``connector.runtime`` (issue 20), which re-exports the interval constants."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.errors import ConnectorError, TransientError
from connector.metrics import Metrics, status_class
from connector.runner import PipelineRunner
from connector.server import ProbeResult
from connector.startup_wait import CHECK_NAME, StartupWait
from connector.supervision import TaskSupervisor

if TYPE_CHECKING:
    from connector import state
    from connector.emitter import CreditRecorder
    from connector.zoho.client import ZohoClient

log = logging.getLogger("connector.runtime")

GAUGE_INTERVAL = 5.0
CREDIT_FLUSH_INTERVAL = 2.0
RETENTION_MAX_INTERVAL = 60.0  # the retention task runs every min(this, shortest retention / 2)
RETENTION_MIN_INTERVAL = 1.0
RETENTION_PASS_BATCHES = 20  # batches (of outbox_retention.PRUNE_BATCH rows) per pool connection

# --------------------------------------------------------------------------- composition

# ZohoClient api names → the bounded ``api`` label of connector_api_calls_total
_API_LABELS = {
    "get_records": "get",
    "bulk_job": "bulk_status",
    "users": "other",
    "org": "other",
}


def _api_label(api: str) -> str:
    from connector.metrics import CALL_APIS

    label = _API_LABELS.get(api, api)
    return label if label in CALL_APIS else "other"


def _retry_cause(status: int) -> str | None:
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    if status == 0:
        return "connection"
    if status == 401:
        return "invalid_token"
    return None


async def capture_missing(src: psycopg.AsyncConnection[Any], schema: str, p: PipelineConfig) -> str:
    """What of the pipeline's capture objects is missing on the source ("" when none): the
    enabled trigger (trigger mode), or the replication slot and the publication (logical)."""
    from connector.capture.logical import object_name
    from connector.capture.triggers import trigger_name

    if p.capture == "triggers":
        cur = await src.execute(
            "SELECT count(*) FROM pg_catalog.pg_trigger"
            " WHERE tgrelid = pg_catalog.to_regclass(%s) AND tgname = %s AND tgenabled <> 'D'",
            (psycopg.sql.Identifier(*p.table_parts).as_string(src), trigger_name(schema, p)),
        )
        row = await cur.fetchone()
        return "" if row and row[0] else "trigger"
    name = object_name(schema, p.name)
    cur = await src.execute(
        "SELECT (SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name = %s),"
        "       (SELECT count(*) FROM pg_catalog.pg_publication WHERE pubname = %s)",
        (name, name),
    )
    row = await cur.fetchone()
    counts = tuple(row) if row else (0, 0)
    return " and ".join(w for w, n in zip(("slot", "publication"), counts, strict=True) if not n)


class ProbesAndGauges:
    """Probes, gauges and side tasks of :class:`connector.runtime.Runtime` (its base class)."""

    # set by Runtime.__init__
    settings: Settings
    secrets: Secrets
    schema: str
    pipelines: list[PipelineConfig]
    metrics: Metrics
    supervisor: TaskSupervisor
    runners: dict[str, PipelineRunner]
    _client: ZohoClient | None
    _credits: CreditRecorder | None
    _token_refreshes_seen: int
    _missing_key: dict[str, state.MissingKeyTally]
    startup: StartupWait

    if TYPE_CHECKING:

        @property
        def pool(self) -> AsyncConnectionPool[Any]: ...

        @property
        def client(self) -> ZohoClient: ...

    # ---------------------------------------------------------------- probes (server.Probe)
    def health(self) -> ProbeResult:
        if self.supervisor.failure is not None:
            return ProbeResult(False, {"status": "failed", "reason": self.supervisor.failure.name})
        return ProbeResult(True, {"status": "ok"})

    async def readiness(self) -> ProbeResult:
        checks: dict[str, Any] = {}
        ok = True
        try:
            async with asyncio.timeout(3):
                async with self.pool.connection() as conn:
                    await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except (psycopg.Error, PoolTimeout, TimeoutError) as exc:
            checks["database"] = type(exc).__name__
            ok = False
        try:
            async with asyncio.timeout(5):
                await self.client.tokens.get()
            checks["token"] = "ok"
        except (ConnectorError, TimeoutError) as exc:
            checks["token"] = (
                "timeout"
                if isinstance(exc, TimeoutError)
                else "accounts_unreachable"
                if isinstance(exc, TransientError)
                else "invalid_token"
            )
            ok = False
        waiting_line = self.startup.readiness_line()
        if waiting_line is not None:
            # the start-up CRM checks have not passed (waiting on 429 / 5xx / unreachable)
            checks[CHECK_NAME] = waiting_line
            ok = False
        pipelines = {n: r.state for n, r in self.runners.items() if r.owned or r.state == "failed"}
        role = "owner" if pipelines else "standby"
        if any(s not in ("running", "starting") for s in pipelines.values()):
            ok = False
        checks["pipelines"] = pipelines
        waiting = {
            n: round(max(r.wait_until - time.monotonic(), 0.0), 1)
            for n, r in self.runners.items()
            if r.owned and r.wait_until is not None
        }
        if waiting:
            # after an unclean takeover: capturing, but no CRM write until the wait is over
            checks["waiting_for_previous_owner_seconds"] = waiting
        gone = {
            n: r.capture_missing for n, r in self.runners.items() if r.owned and r.capture_missing
        }
        if gone:
            # capture was removed under a running pipeline (`connector uninstall --force`, a DBA)
            checks["capture_missing"] = gone
            ok = False
        if ok:
            return ProbeResult(True, {"status": "ready", "role": role, "pipelines": pipelines})
        return ProbeResult(False, {"status": "not ready", "role": role, "checks": checks})

    def wake_bulk(self, pipeline: str, job_row_id: int) -> bool:
        runner = self.runners.get(pipeline)
        return runner.wake_bulk(job_row_id) if runner is not None else False

    # ---------------------------------------------------------------- side tasks
    def _on_call(  # noqa: PLR0917 (the client's CallHook contract)
        self,
        api: str,
        records: int,
        credits: int,
        latency_s: float,
        status: int,
        remaining: int | None,
    ) -> None:
        m = self.metrics
        label = _api_label(api)
        m.api_calls_total.labels(api=label, status=status_class(status or None)).inc()
        m.api_request_duration_seconds.labels(api=label).observe(latency_s)
        if credits > 0:
            m.api_credits_spent_total.labels(api=label).inc(credits)
        cause = _retry_cause(status)
        if cause is not None:
            m.api_retries_total.labels(api=label, cause=cause).inc()
        if remaining is not None:
            m.api_credits_remaining.set(remaining)

    async def _credit_loop(self) -> None:
        """Write the queued credit-ledger rows (the client hook is synchronous)."""
        while True:
            await asyncio.sleep(CREDIT_FLUSH_INTERVAL)
            await self._flush_credits()

    async def _flush_credits(self) -> None:
        if self._credits is None:
            return
        try:
            await self._credits.flush_pending(self.pool, self.schema)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("credit ledger write failed; will retry: %s", type(exc).__name__)

    async def _gauge_loop(self) -> None:
        while True:
            try:
                await self.update_gauges()
                ready = await self.readiness()
                self.metrics.ready.set(1 if ready.ok else 0)
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("periodic gauges failed: %s", type(exc).__name__)
            await asyncio.sleep(GAUGE_INTERVAL)

    def retention_interval(self) -> float:
        """Seconds between retention passes: half the shortest retention of the pipelines,
        within [RETENTION_MIN_INTERVAL, RETENTION_MAX_INTERVAL]."""
        shortest = min(p.retention.total_seconds() for p in self.pipelines)
        return min(RETENTION_MAX_INTERVAL, max(RETENTION_MIN_INTERVAL, shortest / 2))

    async def _retention_loop(self) -> None:
        """The ``outbox-retention`` task: for each pipeline this process owns, delete the
        outbox rows its ``retention`` lets go (``outbox_retention.prune``: passed by the checkpoint,
        captured longer ago than ``retention``, not of an unfinished snapshot; 5,000 rows per
        transaction), then export the outbox gauges. A database error is logged and retried
        on the next pass (pruning late is safe; the alert ConnectorOutboxNotPruned watches)."""
        interval = self.retention_interval()
        # the first pass once the pipelines have had a moment to take their leases
        await asyncio.sleep(min(interval, GAUGE_INTERVAL))
        while True:
            try:
                await self.prune_outbox()
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("outbox retention pass failed; will retry: %s", type(exc).__name__)
            await asyncio.sleep(interval)

    async def prune_outbox(self) -> None:
        """One retention pass over the pipelines this process owns."""
        from connector import outbox_retention

        m = self.metrics
        for name, runner in self.runners.items():
            if not runner.owned:
                continue
            retention = runner.pipeline.retention
            pruned = batches = 0
            while True:
                # a pool connection is held for at most RETENTION_PASS_BATCHES batches
                async with self.pool.connection() as conn:
                    res = await outbox_retention.prune(
                        conn, self.schema, name, retention, max_batches=RETENTION_PASS_BATCHES
                    )
                pruned += res.rows
                batches += res.batches
                if res.rows:
                    m.outbox_pruned_events_total.labels(pipeline=name).inc(res.rows)
                if res.rows < RETENTION_PASS_BATCHES * outbox_retention.PRUNE_BATCH:
                    break
            if pruned:
                log.info(
                    "outbox retention: pruned %d event(s)",
                    pruned,
                    extra={"pipeline": name, "batches": batches},
                )
            async with self.pool.connection() as conn:
                stats = await outbox_retention.outbox_stats(conn, self.schema, name)
            m.outbox_events.labels(pipeline=name).set(stats.rows)
            m.outbox_oldest_event_age_seconds.labels(pipeline=name).set(stats.oldest_age_seconds)
            m.outbox_bytes.set(stats.table_bytes)

    async def update_gauges(self) -> None:
        """Database-derived gauges of the pipelines this process owns (and client gauges)."""
        from connector import state
        from connector.status import pipeline_status

        m = self.metrics
        client = self._client
        if client is not None:
            m.api_concurrency_limit.set(client.limiter.limit)
            m.api_in_flight_requests.set(client.limiter.in_flight)
            refreshes = int(client.tokens.refreshes)
            if refreshes > self._token_refreshes_seen:
                m.token_refreshes_total.labels(outcome="success").inc(
                    refreshes - self._token_refreshes_seen
                )
                self._token_refreshes_seen = refreshes
        async with self.pool.connection() as conn:
            spent = await state.credits_spent(conn, self.schema)
            remaining = await state.last_remaining(conn, self.schema)
            budget = self.settings.crm.daily_credit_budget
            left = remaining if remaining is not None else max(budget - spent, 0)
            m.api_credits_remaining.set(left)
            m.api_credits_below_reserve.set(1 if left < self.settings.crm.credit_reserve else 0)
            for name, runner in self.runners.items():
                if not runner.owned and name in self._missing_key:
                    continue
                # the first call, owner or not, sets where this process counts from
                await self._count_missing_key_letters(conn, runner.pipeline)
                if not runner.owned:
                    continue
                await self.check_capture(runner)
                doc = await pipeline_status(conn, self.settings, runner.pipeline)
                cap = doc["capture"]
                m.outbox_lag_events.labels(pipeline=name).set(cap["lag_events"])
                m.outbox_lag_seconds.labels(pipeline=name).set(cap["lag_seconds"])
                m.replication_slot_lag_bytes.labels(pipeline=name).set(cap["slot_lag_bytes"] or 0)
                m.checkpoint_offset.labels(pipeline=name).set(doc["checkpoint"]["offset"])
                m.dead_letters_open.labels(pipeline=name).set(doc["dead_letters_open"])
                m.truncates_open.labels(pipeline=name).set(len(doc["truncates_held"]))
                bulk = doc["bulk_jobs"]
                m.bulk_jobs_in_flight.labels(pipeline=name).set(bulk["in_flight"])
                m.bulk_job_oldest_age_seconds.labels(pipeline=name).set(
                    bulk["oldest_age_seconds"] or 0
                )
                # pending_keys and the oldest pending change's age come from the engine's
                # coalescer (it knows what is in flight), not from this query

    async def check_capture(self, runner: PipelineRunner) -> None:
        """Is the pipeline's capture still installed on the source (trigger; or slot and
        publication)? Sets ``runner.capture_missing``, ``connector_capture_missing`` and
        /readyz; logs an ERROR when it goes missing and an INFO when it is back."""
        p = runner.pipeline
        try:
            async with asyncio.timeout(5):
                async with await psycopg.AsyncConnection.connect(
                    self.secrets.dsn, autocommit=True
                ) as src:
                    missing = await capture_missing(src, self.schema, p)
        except (psycopg.Error, OSError, TimeoutError):
            return  # the source is unreachable: not this check's to say (the capture fails)
        if missing and not runner.capture_missing:
            log.error(
                "capture is gone (%s missing): no change of %s is captured; run `connector"
                " init` to reinstall it (changes made meanwhile need `connector verify --repair`)",
                missing,
                p.source_table,
                extra={"pipeline": p.name},
            )
        elif runner.capture_missing and not missing:
            log.info("capture is installed again", extra={"pipeline": p.name})
        runner.capture_missing = missing
        self.metrics.capture_missing.labels(pipeline=p.name).set(1 if missing else 0)

    async def _count_missing_key_letters(
        self, conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig
    ) -> None:
        """Count the MISSING_KEY letters written at capture time (by the trigger or the
        decoder, never through the emitter) into ``dead_letters_total``, once each in this
        process. The first call for a pipeline (at start-up) counts those created after its
        last saved checkpoint, less two refresh intervals (they may have been written while no
        process ran; the previous process may have counted some: docs/operations.md)."""
        from connector import state

        tally = self._missing_key.get(pipeline.name)
        if tally is None:
            tally = self._missing_key[pipeline.name] = state.MissingKeyTally()
        new = await state.count_missing_key_letters(
            conn,
            self.schema,
            pipeline.name,
            tally,
            trigger=pipeline.capture == "triggers",
            margin=2 * GAUGE_INTERVAL,
        )
        if new:
            self.metrics.dead_letters_total.labels(pipeline=pipeline.name, code="MISSING_KEY").inc(
                new
            )
