"""The composition root and supervisor of ``connector run``.

One :class:`Runtime` owns the event loop's work: it opens the state pool (failing fast), the CRM
client and the HTTP server, checks each pipeline's mapping against the CRM (bad configuration:
``ConfigError``, exit 2), then runs one supervised task per pipeline:

* the task first takes the pipeline's **lease** (a session advisory lock on a dedicated
  connection, :class:`PipelineLease`); while another process holds it,
  this one is a hot standby and retries every second;
* once owner, it starts the pipeline's engine (reader → coalescer → planner → emitter, plus the
  initial sync when the pipeline was never synced and ``snapshot = "auto"``), logical capture
  for ``capture = "logical"``, and a watch of the lease connection. If that connection is lost
  the pipeline is stopped at once (ownership can no longer be proved) and the task goes back to
  standby;
* any task that dies stops the whole process with a clear log line and exit code 1.

SIGTERM / SIGINT (handlers installed as a context manager that restores the previous ones):
stop reading, let in-flight work finish for at most ``server.drain_timeout``, cancel the rest,
release the leases, exit 0. The checkpoint only ever passes acknowledged events, so whatever was
cancelled is re-read by the next owner.

Shutdown order is the reverse of start-up (an ``AsyncExitStack``): pipelines, side tasks, HTTP
server, CRM client, pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import db, state
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.errors import ConfigError, ConnectorError, PermanentError, TransientError
from connector.lease import LeaseLost, PipelineLease
from connector.metrics import Metrics
from connector.probes import (
    CREDIT_FLUSH_INTERVAL,
    GAUGE_INTERVAL,
    RETENTION_MAX_INTERVAL,
    RETENTION_MIN_INTERVAL,
    RETENTION_PASS_BATCHES,
    ProbesAndGauges,
    capture_missing,
)
from connector.runner import RESTARTABLE, PipelineRunner
from connector.server import HttpServer, build_app, callback_url
from connector.startup_wait import StartupBackoff, StartupWait
from connector.supervision import TaskFailure, TaskSupervisor, on_stop_signals

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from connector import state
    from connector.capture.logical import LogicalCapture
    from connector.emitter import CreditRecorder
    from connector.engine import Engine
    from connector.pipeline import Pipeline
    from connector.zoho.client import ZohoClient

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1

HTTP_RETRY_INTERVAL = 10.0  # seconds between tries of an HTTP port that was in use


class Runtime(ProbesAndGauges):
    """``connector run`` (and ``connector snapshot``, ``mode="snapshot"``)."""

    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        *,
        pipelines: list[str] | None = None,
        metrics: Metrics | None = None,
        mode: Literal["run", "snapshot"] = "run",
        restart_snapshot: bool = False,
        serve_http: bool = True,
        handle_signals: bool = True,
        lease_retry: float = 1.0,
        owner: str | None = None,
        snapshot_progress: bool | None = False,
        engine_options: dict[str, Any] | None = None,
        startup_backoff: StartupBackoff | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.schema = settings.database.state_schema
        self.pipelines = (
            [settings.pipeline(n) for n in pipelines] if pipelines else list(settings.pipelines)
        )
        self.metrics = metrics or Metrics()
        self.mode = mode
        self.restart_snapshot = restart_snapshot
        self.serve_http = serve_http
        self.handle_signals = handle_signals
        self.lease_retry = lease_retry
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.snapshot_progress = snapshot_progress
        self.engine_options = dict(engine_options or {})
        self.supervisor = TaskSupervisor()
        self.runners: dict[str, PipelineRunner] = {}
        self.http: HttpServer | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._client: ZohoClient | None = None
        self._credits: CreditRecorder | None = None
        self._stopping: asyncio.Event | None = None
        self._token_refreshes_seen = 0
        # per pipeline: the capture-time MISSING_KEY letters counted (update_gauges)
        self._missing_key: dict[str, state.MissingKeyTally] = {}
        self.stop_signal: signal.Signals | None = None
        self._bind_later = False  # the HTTP port was in use at start (``_bind_when_free``)
        # the start-up CRM checks wait out 429 / 5xx / unreachable (connector.startup_wait)
        self.startup = StartupWait(self.metrics, startup_backoff)

    # ---------------------------------------------------------------- accessors
    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        assert self._pool is not None, "runtime not started"
        return self._pool

    @property
    def client(self) -> ZohoClient:
        assert self._client is not None, "runtime not started"
        return self._client

    @property
    def stopping(self) -> asyncio.Event:
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self.stopping.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("second %s: still draining", sig.name)
            return
        self.stop_signal = sig
        log.info("%s received: draining", sig.name)
        self.stopping.set()

    # ---------------------------------------------------------------- composition
    def open_pipeline(self, pipeline: PipelineConfig) -> AbstractAsyncContextManager[Pipeline]:
        """One pipeline's parts (``connector.pipeline.build_pipeline``) on this runtime's
        client and credit recorder: its own state pool and emitter, opened here and closed
        when the block ends (one engine session of a runner)."""
        from connector.engine import EngineOptions
        from connector.pipeline import build_pipeline

        public = self.settings.server.public_url
        crm = self.settings.crm
        return build_pipeline(
            pipeline,
            client=self.client,
            state_dsn=self.secrets.state_dsn,
            source_dsn=self.secrets.dsn,
            schema=self.schema,
            credits=self._credits,
            metrics=self.metrics,
            daily_credit_budget=crm.daily_credit_budget,
            credit_reserve=crm.credit_reserve,
            callback_url=partial(callback_url, public) if public else None,
            options=EngineOptions(
                drain_timeout=self.settings.server.drain_timeout.total_seconds(),
                **self.engine_options,
            ),
            snapshot_progress=self.snapshot_progress,
            parents={p.name: p for p in self.settings.pipelines},
        )

    def build_capture(self, pipeline: PipelineConfig) -> LogicalCapture:
        from connector.capture.logical import LogicalCapture

        return LogicalCapture(
            self.secrets.dsn, self.schema, pipeline, state_dsn=self.secrets.state_dsn
        )

    async def run_engine(
        self, engine: Engine, pipeline: PipelineConfig, stop: asyncio.Event, runner: PipelineRunner
    ) -> None:
        """The engine's life in this process: initial sync when needed, then streaming."""
        if self.mode == "snapshot":
            await engine.run_snapshot(stop, restart=self.restart_snapshot)
            return
        await engine.run(stop)

    # ---------------------------------------------------------------- start-up checks
    async def check_mappings(self) -> None:
        """Refuse to start (exit 2, the key named) when a pipeline's mapping cannot work: the
        module is not one of the org's, a CRM field does not fit, or a SOURCE column is missing
        or of a type its CRM field cannot take."""
        from connector.mapping_check import check_mapping, check_source_columns

        parents = {q.name: q for q in self.settings.pipelines}  # what lookups name
        for p in self.pipelines:
            try:
                await check_mapping(self.client, p, parents)
            except PermanentError as exc:
                # the field metadata could not be read: is the module one of the org's? (the
                # module list needs ZohoCRM.settings.modules.READ, a scope the connector does
                # not otherwise need: read only here, and said when it is missing)
                try:
                    modules: list[str] | None = await self.client.modules()
                except TransientError:
                    raise  # the CRM is not answering now: the start-up wait tries again
                except ConnectorError:
                    modules = None
                where = f"pipelines[{p.name!r}].module"
                if modules is not None and p.module not in modules:
                    raise ConfigError(
                        where,
                        f"the CRM has no module {p.module!r}; its modules: {', '.join(modules)}",
                    ) from None
                if modules is None:
                    raise ConfigError(
                        where,
                        f"cannot read the fields of module {p.module!r} ({exc}); check its API"
                        " name (with the scope ZohoCRM.settings.modules.READ the org's modules"
                        " are listed here)",
                    ) from None
                raise
        async with await psycopg.AsyncConnection.connect(self.secrets.dsn) as conn:
            for p in self.pipelines:
                try:
                    await check_source_columns(conn, p)
                except ConfigError as exc:
                    if not await self._has_run(p):
                        raise  # a mapping that never matched the table: refuse (exit 2)
                    # the table changed under a pipeline that ran with it (a column dropped,
                    # renamed or retyped): that pipeline alone stops with the column named
                    # (SchemaChanged, `status`, /readyz), the others run (docs/operations.md)
                    log.error(
                        "pipeline %s: its source table changed since it last ran (%s); the "
                        "pipeline will stop, its changes are held",
                        p.name,
                        exc,
                    )
                missing = await capture_missing(conn, self.schema, p)
                if missing:
                    raise ConnectorError(
                        f"pipeline {p.name}: capture ({p.capture}) is not installed on"
                        f" {p.source_table} ({missing} missing); run `connector init` first"
                    )

    async def _has_run(self, p: PipelineConfig) -> bool:
        """True when the pipeline ran before against its table (a type baseline or a halt is
        stored), so a mapping mismatch now is a schema change, not a configuration mistake."""
        async with await psycopg.AsyncConnection.connect(self.secrets.state_dsn) as conn:
            cur = await conn.execute(
                db.render(
                    "SELECT EXISTS (SELECT 1 FROM {schema}.source_column_types WHERE pipeline = %s)"
                    " OR EXISTS (SELECT 1 FROM {schema}.pipeline_halts WHERE pipeline = %s)",
                    self.schema,
                ),
                (p.name, p.name),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    # ---------------------------------------------------------------- main
    async def run(self) -> int:
        """Run until stopped (signal, ``request_stop``) or a task dies. Returns the exit code."""
        from connector.engine_wiring import chain_credits
        from connector.zoho import PgTokenStore, ZohoClient

        settings = self.settings
        for p in self.pipelines:
            self.metrics.add_pipeline(
                p.name, p.max_staleness.total_seconds(), p.retention.total_seconds()
            )
        self.metrics.set_credit_config(
            settings.crm.daily_credit_budget, settings.crm.credit_reserve, settings.crm.concurrency
        )
        async with contextlib.AsyncExitStack() as stack:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                self.secrets.state_dsn,
                open=False,
                min_size=2,
                max_size=settings.database.pool_size,
                kwargs={"autocommit": True, "application_name": "connector"},
                name="connector-state",
                # a connection broken by a server restart is replaced, not handed out
                check=AsyncConnectionPool.check_connection,
            )
            try:
                await pool.open(wait=True, timeout=15)
            except PoolTimeout:
                await pool.close()
                raise ConnectorError(
                    "cannot connect to the state database (database.dsn / state_dsn): "
                    "no connection within 15 s; check the server, the network and the role"
                ) from None
            stack.push_async_callback(pool.close)
            self._pool = pool
            await self._check_schema()

            client = ZohoClient.from_config(
                settings.crm,
                client_secret=self.secrets.client_secret,
                refresh_token=self.secrets.refresh_token,
                on_call=self._on_call,
                # one access token shared by the replicas and the CLI (Zoho: 10 per 10 minutes)
                token_store=PgTokenStore(self.secrets.state_dsn, self.schema),
            )
            # the credit recorder shared by every pipeline's engine, then the metrics hook
            self._credits = stack.enter_context(chain_credits(client))
            await client.open()
            stack.push_async_callback(client.aclose)
            self._client = client

            if self.serve_http:
                app = build_app(self, self.metrics, pool, self.schema)
                self.http = HttpServer(app, settings.server.host, settings.server.port)
                try:
                    await self.http.start()
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    # a second process of the same configuration on this host (a hot
                    # standby): it stands by without HTTP and binds once the port is free
                    self._bind_later = True
                    log.warning(
                        "port %s on %s is in use (another connector on this host?): running"
                        " without the HTTP server (no /metrics, /healthz, /readyz) and trying"
                        " the port again every %.0fs; give each process its own port with"
                        " `connector run --port N` (env CONNECTOR_PORT)",
                        settings.server.port,
                        settings.server.host,
                        HTTP_RETRY_INTERVAL,
                    )
                stack.push_async_callback(self.http.stop)
            stack.push_async_callback(self._flush_credits)
            stack.push_async_callback(self.supervisor.close)

            signals = (
                on_stop_signals(self._on_signal)
                if self.handle_signals
                else contextlib.nullcontext()
            )
            with signals:
                # after the HTTP server and the signal handlers: /readyz says why it waits
                if not await self.startup.run(self.check_mappings, self.stopping, client=client):
                    return EXIT_OK  # SIGTERM / SIGINT while waiting for the CRM
                return await self._supervise()
        return EXIT_FAILURE  # pragma: no cover (the block returns)

    async def _bind_when_free(self) -> None:
        """Try the HTTP port again until it is free (the other process on this host ended)."""
        assert self.http is not None
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HTTP_RETRY_INTERVAL)
            if self.stopping.is_set():
                return
            try:
                await self.http.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._bind_later = False
            log.info("the HTTP port is free again: serving /metrics, /healthz, /readyz")
            return

    async def _check_schema(self) -> None:
        async with self.pool.connection() as conn:
            version = await db.schema_version(conn, self.schema)
        latest = max(m.version for m in db.migrations())
        if version < latest:
            raise ConfigError(
                "database.state_schema",
                f"state schema {self.schema!r} is at version {version}, expected {latest}; "
                "run `connector init`",
            )

    async def _supervise(self) -> int:
        sup = self.supervisor
        for p in self.pipelines:
            runner = PipelineRunner(self, p)
            self.runners[p.name] = runner
            sup.spawn(f"pipeline:{p.name}", runner.run(), may_return=True)
        sup.spawn("gauges", self._gauge_loop())
        if self._bind_later:
            sup.spawn("http-bind", self._bind_when_free(), may_return=True)
        sup.spawn("credit-ledger", self._credit_loop())
        if self.mode == "run":
            sup.spawn("outbox-retention", self._retention_loop())
        log.info(
            "connector running",
            extra={
                "pipelines": [p.name for p in self.pipelines],
                "port": self.http.port if self.http else None,
                "owner": self.owner,
            },
        )
        waiters: list[asyncio.Task[Any]] = [
            asyncio.create_task(self.stopping.wait(), name="wait:stop"),
            asyncio.create_task(sup.failed.wait(), name="wait:failure"),
        ]
        if self.mode == "snapshot":
            waiters.append(
                asyncio.create_task(
                    _all_set([r.finished for r in self.runners.values()]), name="wait:snapshot"
                )
            )
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.stopping.set()
        # pipelines drain by themselves (they watch ``stopping``); give them the drain time
        names = [f"pipeline:{p.name}" for p in self.pipelines]
        drain = self.settings.server.drain_timeout.total_seconds()
        still = await sup.wait(names, timeout=drain + 5)
        if still:
            log.error("pipelines did not stop in time; cancelling", extra={"tasks": still})
        await sup.close()
        if sup.failure is not None:
            log.error("connector stopped because %s", sup.failure.describe())
            return EXIT_FAILURE
        log.info("connector stopped cleanly")
        return EXIT_OK


async def _all_set(events: list[asyncio.Event]) -> None:
    for e in events:
        await e.wait()


# split out of this module (issue 20: supervision, lease, runner, probes); re-exported for the
# code and tests that import them from here
__all__ = [
    "CREDIT_FLUSH_INTERVAL",
    "EXIT_FAILURE",
    "EXIT_OK",
    "GAUGE_INTERVAL",
    "HTTP_RETRY_INTERVAL",
    "RESTARTABLE",
    "RETENTION_MAX_INTERVAL",
    "RETENTION_MIN_INTERVAL",
    "RETENTION_PASS_BATCHES",
    "LeaseLost",
    "PipelineLease",
    "PipelineRunner",
    "Runtime",
    "TaskFailure",
    "TaskSupervisor",
    "capture_missing",
    "on_stop_signals",
]
