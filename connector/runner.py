"""One pipeline in this process (:class:`PipelineRunner`): standby until it owns the lease,
then the engine (and logical capture), watched; drained on stop, restarted on a RESTARTABLE
failure. Split from ``connector.runtime`` (issue 20), which re-exports these names; the
runner sees the runtime through :class:`RunnerHost` (no import back: no cycle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import db, state
from connector.dbpolicy import best_effort
from connector.errors import PermanentError, SchemaChanged, TransientError
from connector.lease import LeaseLost, PipelineLease

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from connector.capture.logical import LogicalCapture
    from connector.config import PipelineConfig, Settings
    from connector.config_secrets import Secrets
    from connector.engine import Engine
    from connector.metrics import Metrics
    from connector.pipeline import Pipeline

log = logging.getLogger("connector.runtime")


class RunnerHost(Protocol):
    """What a :class:`PipelineRunner` uses of its :class:`connector.runtime.Runtime`."""

    settings: Settings
    secrets: Secrets
    schema: str
    metrics: Metrics
    mode: Literal["run", "snapshot"]
    lease_retry: float
    owner: str

    @property
    def pool(self) -> AsyncConnectionPool[Any]: ...

    @property
    def stopping(self) -> asyncio.Event: ...

    def open_pipeline(self, pipeline: PipelineConfig) -> AbstractAsyncContextManager[Pipeline]: ...

    def build_capture(self, pipeline: PipelineConfig) -> LogicalCapture: ...

    async def run_engine(
        self, engine: Engine, pipeline: PipelineConfig, stop: asyncio.Event, runner: PipelineRunner
    ) -> None: ...


# failures of a pipeline that restart it (back to standby, backoff) instead of ending the process
RESTARTABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    TransientError,
    LeaseLost,
    OSError,
)


class PipelineRunner:
    """One pipeline in this process: standby until it owns the lease, then the engine."""

    def __init__(self, runtime: RunnerHost, pipeline: PipelineConfig) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.state: Literal[
            "standby", "starting", "waiting", "running", "draining", "stopped", "failed"
        ] = "standby"
        # monotonic end of the takeover wait (``_engine_after_grace``), None when not waiting
        self.wait_until: float | None = None
        # what of the capture objects is gone (``Runtime.check_capture``), "" when all is there
        self.capture_missing = ""
        # set while the engine runs (built after the takeover wait: ``_engine_after_grace``)
        self.engine: Engine | None = None
        self.capture: LogicalCapture | None = None
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
        return engine.wake_bulk(job_row_id) if engine is not None else False

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
                    # checkpoint until the operator fixes the mapping and restarts. The
                    # reason is stored before the state says "failed": whoever sees the
                    # failure (`status`, /readyz, a test) finds its reason too (invariant 11;
                    # CI caught a restart where the state was read between the two)
                    log.error(
                        "pipeline stopped by a schema change: %s",
                        exc,
                        extra={"pipeline": name, "column": exc.column},
                    )
                    rt.metrics.schema_change_stops_total.labels(pipeline=name).inc()
                    await self._record_halt(exc)
                    self.state = "failed"
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
                except Exception:
                    if not rt.stopping.is_set():
                        self.state = "failed"  # not restartable: the process reports it
                    raise
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

    async def _engine_after_grace(self, pstop: asyncio.Event, grace: float) -> None:
        """Build the pipeline (``Runtime.open_pipeline``: its pool, emitter and engine) and run
        the engine, ``grace`` seconds late when the previous owner did not stop
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
        async with rt.open_pipeline(self.pipeline) as built:
            self.engine = built.engine
            try:
                await rt.run_engine(built.engine, self.pipeline, pstop, self)
            finally:
                self.engine = None

    async def _own(self, grace: float = 0.0) -> bool:
        """Run the pipeline while the lease is held. True when the runner is finished (stop
        requested, or snapshot mode done); False to go back to standby (lease lost).
        ``grace``: seconds before the first CRM write (``_record_owner``,
        ``_engine_after_grace``)."""
        rt = self.runtime
        name = self.pipeline.name
        self.state = "starting"
        pstop = asyncio.Event()
        tasks: dict[str, asyncio.Task[Any]] = {}
        tasks["engine"] = asyncio.create_task(
            self._engine_after_grace(pstop, grace), name=f"{name}:engine"
        )
        if self.pipeline.capture == "logical":
            capture = self.capture = rt.build_capture(self.pipeline)
            tasks["capture"] = asyncio.create_task(capture.run(pstop), name=f"{name}:capture")
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
                    # the state is set by `run`, once it has handled the error (a schema
                    # change's reason is stored first; a restartable one means "standby")
                    await _cancel([t for k, t in tasks.items() if k != "engine"])
                    raise exc
                if rt.mode == "snapshot":
                    await _cancel(tasks.values())
                    await self._record_clean_stop()
                    self.finished.set()
                    return True
                await _cancel(tasks.values())
                raise PermanentError(f"pipeline {name}: engine stopped unexpectedly")
            capture_task = tasks.get("capture")
            if capture_task is not None and capture_task in done and not rt.stopping.is_set():
                exc = capture_task.exception()
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
