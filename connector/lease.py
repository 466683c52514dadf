"""The pipeline lease: a session advisory lock on a dedicated connection, one owner per
pipeline; the others are hot standbys. Split from ``connector.runtime`` (issue 20), which
re-exports these names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg

log = logging.getLogger("connector.runtime")


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
