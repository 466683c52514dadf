"""The engine's orphan fences (docs/emitter.md): keys a bulk job abandoned without its id may
still write on the CRM wait until the fence's bound or the job's callback.

``OrphanFences`` is a mixin of :class:`connector.engine.Engine`, which holds the state it uses
(declared below for the type checker). Split from ``connector.engine`` (issue 20)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from connector import state
from connector.coalesce import Coalescer
from connector.config import PipelineConfig
from connector.engine_common import Clock

# the engine's logger: records keep the name they had before the split
log = logging.getLogger("connector.engine")


class OrphanFences:
    """Fences of orphan bulk jobs (``bulk_jobs.fence_until``): a mixin of ``Engine``."""

    pipeline: PipelineConfig
    schema: str
    clock: Clock
    coalescer: Coalescer
    _pool: AsyncConnectionPool[Any] | None
    _fences: dict[int, float]
    _side_tasks: set[asyncio.Task[None]]

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
        self._fences[job] = max(self._fences.get(job, 0.0), self.clock.now() + seconds)
        if job < 0:  # not a job: a retry after a transient answer, or a child waiting for its
            # parent (negative tags, ``Emitter._later`` / ``ParentGate._wait``): one line per
            # key and attempt would drown the log, and "a bulk job" would be wrong
            log.debug(
                "keys wait before they are tried again",
                extra={"pipeline": self.pipeline.name, "keys": len(keys), "seconds": seconds},
            )
            return
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
