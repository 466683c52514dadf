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
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import db, state
from connector.config import PipelineConfig, Secrets, Settings
from connector.dbpolicy import best_effort
from connector.errors import (
    ConfigError,
    ConnectorError,
    PermanentError,
    SchemaChanged,
    TransientError,
)
from connector.metrics import Metrics, status_class
from connector.server import HttpServer, ProbeResult, build_app, callback_url

if TYPE_CHECKING:
    from connector import state

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1

GAUGE_INTERVAL = 5.0
HTTP_RETRY_INTERVAL = 10.0  # seconds between tries of an HTTP port that was in use
CREDIT_FLUSH_INTERVAL = 2.0
RETENTION_MAX_INTERVAL = 60.0  # the retention task runs every min(this, shortest retention / 2)
RETENTION_MIN_INTERVAL = 1.0
RETENTION_PASS_BATCHES = 20  # batches (of outbox.PRUNE_BATCH rows) per pool connection


# --------------------------------------------------------------------------- supervision primitives
@dataclass(frozen=True, slots=True)
class TaskFailure:
    name: str
    error: BaseException | None  # None: the task returned although it should run until stopped

    def describe(self) -> str:
        if self.error is None:
            return f"task {self.name!r} ended unexpectedly"
        return f"task {self.name!r} failed: {type(self.error).__name__}: {self.error}"


class TaskSupervisor:
    """Named, referenced, watched tasks (pgqueuer's task manager, procrastinate's monitor)."""

    def __init__(self, name: str = "runtime") -> None:
        self._name = name
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.failure: TaskFailure | None = None
        self.failed = asyncio.Event()
        self._closing = False

    def spawn(
        self, name: str, coro: Coroutine[Any, Any, Any], *, may_return: bool = False
    ) -> asyncio.Task[Any]:
        """Start ``coro`` as task ``name``; a failure (or, unless ``may_return``, a return
        before :meth:`close`) is recorded and sets :attr:`failed`."""
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise RuntimeError(f"task {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._done(name, t, may_return))
        return task

    def _done(self, name: str, task: asyncio.Task[Any], may_return: bool) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and (may_return or self._closing):
            return
        if self._closing and exc is None:
            return
        if self.failure is None:
            self.failure = TaskFailure(name, exc)
            log.error(
                self.failure.describe(),
                exc_info=exc if exc is not None else None,
                extra={"task": name},
            )
        self.failed.set()

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def task(self, name: str) -> asyncio.Task[Any] | None:
        return self._tasks.get(name)

    async def cancel(self, names: list[str] | None = None, timeout: float = 5.0) -> None:
        """Cancel the named tasks (all by default) and wait for them to finish."""
        targets = [t for n, t in self._tasks.items() if names is None or n in names]
        for t in targets:
            t.cancel()
        if targets:
            done, pending = await asyncio.wait(targets, timeout=timeout)
            for t in pending:
                log.error("task did not stop after cancellation", extra={"task": t.get_name()})
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    log.warning(
                        "task raised while being cancelled: %s",
                        type(exc).__name__,
                        extra={"task": t.get_name()},
                    )

    async def wait(self, names: list[str], timeout: float) -> list[str]:
        """Wait for the named tasks to finish by themselves; returns those still running."""
        targets = [t for n, t in self._tasks.items() if n in names]
        if not targets:
            return []
        _, pending = await asyncio.wait(targets, timeout=timeout)
        return [t.get_name() for t in pending]

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        await self.cancel(None, timeout)


@contextlib.contextmanager
def on_stop_signals(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call ``callback(sig)`` on SIGTERM / SIGINT while inside the block; restore afterwards."""
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in sigs}
    installed: list[signal.Signals] = []
    try:
        for s in sigs:
            try:
                loop.add_signal_handler(s, callback, s)
                installed.append(s)
            except (NotImplementedError, RuntimeError, ValueError):
                # not the main thread (tests running the runtime in a thread): no handler
                pass
        yield
    finally:
        for s in installed:
            loop.remove_signal_handler(s)
            prev = previous[s]
            if prev is not None:
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(s, prev)


class LeaseLost(Exception):
    """The advisory-lock connection was lost: ownership can no longer be proved."""


class PipelineLease:
    """A session-level advisory lock on a dedicated connection (one owner per pipeline)."""

    def __init__(
        self,
        dsn: str,
        key: int,
        *,
        name: str,
        owner: str,
        retry_interval: float = 1.0,
        check_interval: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._key = key
        self._name = name
        self._owner = owner
        self._retry = retry_interval
        self._check = check_interval
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.held = False

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            application_name=f"connector-lease-{self._name}"[:63],
            connect_timeout=5,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )

    async def acquire(self, stop: asyncio.Event, on_wait: Callable[[], None] | None = None) -> bool:
        """Wait until the lock is ours (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await self._connect()
                cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    self.held = True
                    log.info(
                        "pipeline lease acquired: this process owns the pipeline",
                        extra={"pipeline": self._name, "owner": self._owner},
                    )
                    return True
                if not announced:
                    log.info(
                        "pipeline owned by another process; waiting as hot standby",
                        extra={"pipeline": self._name},
                    )
                    announced = True
                    if on_wait is not None:
                        on_wait()
            except psycopg.OperationalError as exc:
                log.warning(
                    "lease connection failed; retrying: %s",
                    type(exc).__name__,
                    extra={"pipeline": self._name},
                )
                await self._drop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._retry)
        return False

    async def try_acquire(self) -> bool:
        """One attempt: True if the lock is now ours (then :meth:`release` it)."""
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
        row = await cur.fetchone()
        self.held = bool(row is not None and row[0])
        if not self.held:
            await self._drop()
        return self.held

    async def watch(self) -> None:
        """Return never while the lock connection is healthy; raise :class:`LeaseLost`."""
        while True:
            await asyncio.sleep(self._check)
            conn = self._conn
            if conn is None or conn.closed:
                self.held = False
                raise LeaseLost(f"pipeline {self._name}: lease connection closed")
            try:
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=max(self._check, 2.0))
            except (psycopg.Error, TimeoutError) as exc:
                self.held = False
                await self._drop()
                raise LeaseLost(
                    f"pipeline {self._name}: lease connection lost ({type(exc).__name__})"
                ) from None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def release(self) -> None:
        if self._conn is not None and not self._conn.closed and self.held:
            with contextlib.suppress(psycopg.Error):
                await self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self.held = False
        await self._drop()


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


# failures of a pipeline that restart it (back to standby, backoff) instead of ending the process
RESTARTABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    TransientError,
    LeaseLost,
    OSError,
)


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


class PipelineRunner:
    """One pipeline in this process: standby until it owns the lease, then the engine."""

    def __init__(self, runtime: Runtime, pipeline: PipelineConfig) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.state: Literal[
            "standby", "starting", "waiting", "running", "draining", "stopped", "failed"
        ] = "standby"
        # monotonic end of the takeover wait (``_engine_after_grace``), None when not waiting
        self.wait_until: float | None = None
        # what of the capture objects is gone (``Runtime.check_capture``), "" when all is there
        self.capture_missing = ""
        self.engine: Any = None
        self.capture: Any = None
        self.lease = PipelineLease(
            runtime.secrets.state_dsn,
            db.advisory_key(runtime.schema, "pipeline", pipeline.name),
            name=pipeline.name,
            owner=runtime.owner,
            retry_interval=runtime.lease_retry,
        )
        self.finished = asyncio.Event()  # snapshot mode: the work asked for is done

    @property
    def owned(self) -> bool:
        return self.lease.held and self.state in ("starting", "waiting", "running", "draining")

    def wake_bulk(self, job_row_id: int) -> bool:
        engine = self.engine
        return bool(engine.wake_bulk(job_row_id)) if engine is not None else False

    async def run(self) -> None:
        rt = self.runtime
        name = self.pipeline.name
        up = rt.metrics.pipeline_up.labels(pipeline=name)
        backoff = 1.0
        try:
            while not rt.stopping.is_set():
                self.state = "standby"
                up.set(0)
                if not await self.lease.acquire(rt.stopping):
                    return
                started = time.monotonic()
                try:
                    grace = await self._record_owner()
                    done = await self._own(grace)
                except SchemaChanged as exc:
                    # this pipeline only: the others go on; its events stay behind the
                    # checkpoint until the operator fixes the mapping and restarts
                    self.state = "failed"
                    log.error(
                        "pipeline stopped by a schema change: %s",
                        exc,
                        extra={"pipeline": name, "column": exc.column},
                    )
                    rt.metrics.schema_change_stops_total.labels(pipeline=name).inc()
                    await self._record_halt(exc)
                    return
                except RESTARTABLE as exc:
                    # the database (or the CRM, after the client's own retries) went away:
                    # nothing unacknowledged is checkpointed, so start the pipeline again
                    # (and let a standby have it meanwhile) instead of ending the process
                    done = False
                    if time.monotonic() - started > 60:
                        backoff = 1.0
                    log.warning(
                        "pipeline interrupted (%s); restarting it in %.0fs",
                        type(exc).__name__,
                        backoff,
                        extra={"pipeline": name},
                    )
                    self.state = "standby"
                    await self.lease.release()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(rt.stopping.wait(), backoff)
                    backoff = min(backoff * 2, 30.0)
                finally:
                    up.set(0)
                    await self.lease.release()
                if done:
                    return
        finally:
            self.state = "stopped" if self.state != "failed" else "failed"

    async def _record_owner(self) -> float:
        """Record this process as the pipeline's owner; returns how many seconds to wait before
        the first CRM write. 0 when the previous owner stopped cleanly (it cleared ``owner``
        after draining) or there was none and no earlier wait is still running. When it was
        killed, lost the database, or is this process restarting the pipeline, requests it had
        in flight may still be applied by the CRM (see ``_own``): the wait ends
        ``crm.request_timeout`` after this takeover (``checkpoints.crm_quiet_until``) — unless
        the previous owner never wrote (it was killed during its own wait: the column is still
        set), then it ends when that earlier wait would have ended. Before, every restart
        waited the full timeout again, and kills a few seconds apart kept the pipeline from
        writing for minutes (issue 14: the chaos stack's outbox lag)."""
        rt = self.runtime
        timeout = rt.settings.crm.request_timeout.total_seconds()
        async with rt.pool.connection() as conn:
            wait = await state.take_ownership(
                conn, rt.schema, self.pipeline.name, rt.owner, timeout
            )
            await conn.execute(
                db.render("DELETE FROM {schema}.pipeline_halts WHERE pipeline = %s", rt.schema),
                (self.pipeline.name,),
            )
        return wait

    async def _start_writing(self) -> None:
        """Just before the engine's first CRM write: this owner may now have requests in flight
        (a successor must wait a full ``crm.request_timeout`` again). Not suppressed: without
        it a successor could wait too little, so no write happens unless it is stored."""
        rt = self.runtime
        async with rt.pool.connection() as conn:
            await state.start_writing(conn, rt.schema, self.pipeline.name)

    async def _record_halt(self, exc: SchemaChanged) -> None:
        """Keep why the pipeline stopped, for `connector status` (cleared on the next start)."""
        name = self.pipeline.name
        await self._best_effort_write(
            "the halt's reason",
            (
                "INSERT INTO {schema}.pipeline_halts (pipeline, reason, column_name,"
                " message) VALUES (%s, 'schema_changed', %s, %s)"
                " ON CONFLICT (pipeline) DO UPDATE SET reason = EXCLUDED.reason,"
                " column_name = EXCLUDED.column_name, message = EXCLUDED.message,"
                " halted_at = now()",
                (name, exc.column, str(exc)),
            ),
            # the next start takes the column's type as it is then (the operator's fix)
            (
                "DELETE FROM {schema}.source_column_types WHERE pipeline = %s AND column_name = %s",
                (name, exc.column),
            ),
        )

    async def _record_clean_stop(self) -> None:
        """The pipeline drained and stopped with nothing in flight: the next owner need not
        wait (``_record_owner``)."""
        await self._best_effort_write(
            "the clean stop",
            (
                "UPDATE {schema}.checkpoints SET owner = NULL WHERE pipeline = %s AND owner = %s",
                (self.pipeline.name, self.runtime.owner),
            ),
        )

    async def _best_effort_write(self, what: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Bookkeeping whose loss costs only information: run ``statements`` (``{schema}``
        substituted) in one transaction; a database failure is logged by
        ``dbpolicy.best_effort`` and the runner carries on."""
        rt = self.runtime
        async with (
            best_effort(what, self.pipeline.name),
            rt.pool.connection() as conn,
            conn.transaction(),
        ):
            for text, params in statements:
                await conn.execute(db.render(text, rt.schema), params)

    async def _engine_after_grace(self, engine: Any, pstop: asyncio.Event, grace: float) -> None:
        """Start the engine, ``grace`` seconds late when the previous owner did not stop
        cleanly: an upsert it had sent may still be in the CRM's hands (an emulator latency
        spike held one for seconds in the 60-minute soak), and if this process sent a newer
        version of the same record first, that older request would land after it (invariant
        2). The client gives up on a request after ``crm.request_timeout``; so does this wait.
        Capture is not delayed, only writes to the CRM."""
        rt = self.runtime
        name = self.pipeline.name
        if grace > 0:
            log.warning(
                "the previous owner did not stop cleanly: waiting %.0fs (crm.request_timeout"
                " from the last takeover after an owner that wrote) for requests it may have"
                " had in flight before writing to the CRM",
                grace,
                extra={"pipeline": name},
            )
            # `status` says why changes wait meanwhile; /readyz is not ready; a gauge counts
            self.wait_until = time.monotonic() + grace
            rt.metrics.takeover_wait_seconds.labels(pipeline=name).set(grace)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pstop.wait(), grace)
            finally:
                self.wait_until = None
                rt.metrics.takeover_wait_seconds.labels(pipeline=name).set(0)
                if self.state == "waiting":
                    self.state = "running"
            if pstop.is_set():
                return
            log.warning(
                "the wait for the previous owner's requests is over: writing to the CRM",
                extra={"pipeline": name},
            )
        await self._start_writing()
        await rt.run_engine(engine, self.pipeline, pstop, self)

    async def _own(self, grace: float = 0.0) -> bool:
        """Run the pipeline while the lease is held. True when the runner is finished (stop
        requested, or snapshot mode done); False to go back to standby (lease lost).
        ``grace``: seconds before the first CRM write (``_record_owner``,
        ``_engine_after_grace``)."""
        rt = self.runtime
        name = self.pipeline.name
        self.state = "starting"
        pstop = asyncio.Event()
        self.engine = rt.build_engine(self.pipeline)
        tasks: dict[str, asyncio.Task[Any]] = {}
        tasks["engine"] = asyncio.create_task(
            self._engine_after_grace(self.engine, pstop, grace), name=f"{name}:engine"
        )
        if self.pipeline.capture == "logical":
            self.capture = rt.build_capture(self.pipeline)
            tasks["capture"] = asyncio.create_task(self.capture.run(pstop), name=f"{name}:capture")
        tasks["lease"] = asyncio.create_task(self.lease.watch(), name=f"{name}:lease")
        stop_wait = asyncio.create_task(rt.stopping.wait(), name=f"{name}:stop-wait")
        self.state = "running" if grace <= 0 else "waiting"
        rt.metrics.pipeline_up.labels(pipeline=name).set(1)
        log.info("pipeline running", extra={"pipeline": name, "capture": self.pipeline.capture})
        try:
            done, _ = await asyncio.wait(
                [*tasks.values(), stop_wait], return_when=asyncio.FIRST_COMPLETED
            )
            lease_task = tasks["lease"]
            if lease_task in done:
                exc = lease_task.exception()
                # lost ownership: stop now, without draining (another process may own it)
                log.error(
                    "lost the pipeline lease; stopping the pipeline immediately and going back"
                    " to standby",
                    extra={"pipeline": name, "reason": str(exc) if exc else "watch ended"},
                )
                self.state = "stopped"
                await _cancel(tasks.values())
                return False
            engine_task = tasks["engine"]
            if engine_task in done and not rt.stopping.is_set():
                exc = engine_task.exception()
                if exc is not None:
                    self.state = "failed"
                    await _cancel([t for k, t in tasks.items() if k != "engine"])
                    raise exc
                if rt.mode == "snapshot":
                    await _cancel(tasks.values())
                    await self._record_clean_stop()
                    self.finished.set()
                    return True
                self.state = "failed"
                await _cancel(tasks.values())
                raise PermanentError(f"pipeline {name}: engine stopped unexpectedly")
            capture_task = tasks.get("capture")
            if capture_task is not None and capture_task in done and not rt.stopping.is_set():
                exc = capture_task.exception()
                self.state = "failed"
                await _cancel([t for k, t in tasks.items() if k != "capture"])
                if exc is not None:
                    raise exc
                raise PermanentError(f"pipeline {name}: capture stopped unexpectedly")
            # graceful stop: stop reading, drain in-flight work within drain_timeout
            self.state = "draining"
            pstop.set()
            work = [t for k, t in tasks.items() if k != "lease"]
            drain = rt.settings.server.drain_timeout.total_seconds()
            started = time.monotonic()
            lease_task = tasks["lease"]
            pending = set(work)
            while pending and not lease_task.done():
                left = drain - (time.monotonic() - started)
                if left <= 0:
                    break
                _, pending = await asyncio.wait(
                    [*pending, lease_task], timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(lease_task)
            if lease_task.done() and pending:
                log.error(
                    "lost the pipeline lease while draining; abandoning in-flight work now",
                    extra={"pipeline": name},
                )
            elif pending:
                log.warning(
                    "drain timeout: abandoning in-flight work (it stays in the outbox and is"
                    " re-sent by the next owner)",
                    extra={"pipeline": name, "tasks": sorted(t.get_name() for t in pending)},
                )
            else:
                log.info(
                    "pipeline drained",
                    extra={"pipeline": name, "seconds": round(time.monotonic() - started, 2)},
                )
                await self._record_clean_stop()
            await _cancel(tasks.values())
            for t in work:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    log.error(
                        "pipeline task failed while draining: %s",
                        type(exc).__name__,
                        extra={"pipeline": name, "task": t.get_name()},
                    )
            self.state = "stopped"
            return True
        finally:
            for t in (*tasks.values(), stop_wait):
                t.cancel()  # no-op for finished tasks; never leave one behind if we are cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait
            self.engine = None
            self.capture = None


async def _cancel(tasks: Any) -> None:
    """Cancel until done: a task whose clean-up awaits (a drain in a ``finally``) is cancelled
    again, so that "stop now" means now. A task that still runs after that is logged."""
    tasks = list(tasks)
    for _ in range(5):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=2)
    for t in tasks:
        if not t.done():
            log.error("task did not stop after repeated cancellation", extra={"task": t.get_name()})
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" warning


class Runtime:
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
        self._client: Any = None
        self._credits: Any = None
        self._stopping: asyncio.Event | None = None
        self._token_refreshes_seen = 0
        # per pipeline: the capture-time MISSING_KEY letters counted (update_gauges)
        self._missing_key: dict[str, state.MissingKeyTally] = {}
        self.stop_signal: signal.Signals | None = None
        self._bind_later = False  # the HTTP port was in use at start (``_bind_when_free``)

    # ---------------------------------------------------------------- accessors
    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        assert self._pool is not None, "runtime not started"
        return self._pool

    @property
    def client(self) -> Any:
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
    def build_engine(self, pipeline: PipelineConfig) -> Any:
        from connector.engine import Engine, EngineOptions

        public = self.settings.server.public_url
        crm = self.settings.crm
        return Engine(
            pipeline,
            client=self.client,
            state_dsn=self.secrets.state_dsn,
            source_dsn=self.secrets.dsn,
            schema=self.schema,
            metrics=self.metrics,
            daily_credit_budget=crm.daily_credit_budget,
            credit_reserve=crm.credit_reserve,
            callback_url=partial(callback_url, public) if public else None,
            credit_recorder=self._credits,
            options=EngineOptions(
                drain_timeout=self.settings.server.drain_timeout.total_seconds(),
                **self.engine_options,
            ),
            snapshot_progress=self.snapshot_progress,
        )

    def build_capture(self, pipeline: PipelineConfig) -> Any:
        from connector.capture.logical import LogicalCapture

        return LogicalCapture(
            self.secrets.dsn, self.schema, pipeline, state_dsn=self.secrets.state_dsn
        )

    async def run_engine(
        self, engine: Any, pipeline: PipelineConfig, stop: asyncio.Event, runner: PipelineRunner
    ) -> None:
        """The engine's life in this process: initial sync when needed, then streaming."""
        if self.mode == "snapshot":
            await engine.run_snapshot(stop, restart=self.restart_snapshot)
            return
        await engine.run(stop)

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
        outbox rows its ``retention`` lets go (``outbox.prune``: passed by the checkpoint,
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
        from connector import outbox

        m = self.metrics
        for name, runner in self.runners.items():
            if not runner.owned:
                continue
            retention = runner.pipeline.retention
            pruned = batches = 0
            while True:
                # a pool connection is held for at most RETENTION_PASS_BATCHES batches
                async with self.pool.connection() as conn:
                    res = await outbox.prune(
                        conn, self.schema, name, retention, max_batches=RETENTION_PASS_BATCHES
                    )
                pruned += res.rows
                batches += res.batches
                if res.rows:
                    m.outbox_pruned_events_total.labels(pipeline=name).inc(res.rows)
                if res.rows < RETENTION_PASS_BATCHES * outbox.PRUNE_BATCH:
                    break
            if pruned:
                log.info(
                    "outbox retention: pruned %d event(s)",
                    pruned,
                    extra={"pipeline": name, "batches": batches},
                )
            async with self.pool.connection() as conn:
                stats = await outbox.outbox_stats(conn, self.schema, name)
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

    # ---------------------------------------------------------------- start-up checks
    async def check_mappings(self) -> None:
        """Refuse to start (exit 2, the key named) when a pipeline's mapping cannot work: the
        module is not one of the org's, a CRM field does not fit, or a SOURCE column is missing
        or of a type its CRM field cannot take."""
        from connector.mapping import check_mapping, check_source_columns

        for p in self.pipelines:
            try:
                await check_mapping(self.client, p)
            except PermanentError as exc:
                # the field metadata could not be read: is the module one of the org's? (the
                # module list needs ZohoCRM.settings.modules.READ, a scope the connector does
                # not otherwise need: read only here, and said when it is missing)
                try:
                    modules: list[str] | None = await self.client.modules()
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
        from connector.emitter import CreditRecorder
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

            self._credits = CreditRecorder(chain=self._on_call)
            client = ZohoClient.from_config(
                settings.crm,
                client_secret=self.secrets.client_secret,
                refresh_token=self.secrets.refresh_token,
                on_call=self._credits,
                # one access token shared by the replicas and the CLI (Zoho: 10 per 10 minutes)
                token_store=PgTokenStore(self.secrets.state_dsn, self.schema),
            )
            await client.open()
            stack.push_async_callback(client.aclose)
            self._client = client
            await self.check_mappings()

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
