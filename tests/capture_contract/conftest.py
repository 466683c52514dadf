"""The capture contract harness: one :class:`Capture` per test, parametrized over the capture
modes (``capture_mode`` in "triggers", "logical"). A contract case drives the legacy
application's writes through ``capture.conn`` and reads back what the mode wrote into the outbox
the way the reader does (:func:`connector.outbox.read_batch`). In the style of eventsourcing's
recorder contract test cases: every capture mode must pass every case in this package."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector import outbox
from connector.capture import logical, triggers
from connector.config import PipelineConfig
from connector.events import ChangeEvent
from tests.capture.helpers import dead_letters

SCHEMA = "connector"
MODES = ("triggers", "logical")
WAIT_SECONDS = 30.0


class Capture:
    """One capture mode installed on a fresh database. ``conn`` is the legacy application's
    autocommit connection (a superuser: the state schema is readable through it too)."""

    def __init__(self, mode: str, dsn: str, conn: psycopg.AsyncConnection[Any]) -> None:
        self.mode = mode
        self.dsn = dsn
        self.conn = conn
        self.pipeline: PipelineConfig | None = None
        self.request: pytest.FixtureRequest | None = None
        self._stack = contextlib.AsyncExitStack()

    async def install(self, *ddl: str, replica_full: bool = False, **kw: Any) -> PipelineConfig:
        """Run ``ddl``, install this mode's capture of the ``orders`` pipeline (``kw`` overrides
        the config) and, in logical mode, start the stream consumer. ``replica_full`` sets
        REPLICA IDENTITY FULL in logical mode (what its ``init`` asks for on a nullable or
        deferrable key); trigger mode does not need it."""
        base: dict[str, Any] = {
            "name": "orders",
            "source_table": "orders",
            "key_column": "id",
            "module": "Orders",
            "fields": {"status": "Status", "amount": "Amount"},
            "capture": self.mode,
        }
        base.update(kw)
        cfg = PipelineConfig(**base)
        self.pipeline = cfg
        for statement in ddl:
            await self.conn.execute(statement)
        if self.mode == "triggers":
            await triggers.install(self.conn, SCHEMA, cfg)
            return cfg
        if replica_full:
            await self.conn.execute(
                sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(
                    sql.Identifier(*cfg.source_table.split("."))
                )
            )
        await logical.install(self.conn, SCHEMA, cfg)
        self._stack.push_async_callback(self._uninstall, cfg)
        await self._stack.enter_async_context(
            _running(logical.LogicalCapture(self.dsn, SCHEMA, cfg, flush_interval=0.02))
        )
        return cfg

    def known_gap(self, mode: str, reason: str) -> None:
        """Mark the running case as a known contract gap of ``mode`` (a finding: strict xfail,
        so the case turns red once the gap is closed and the mark must go)."""
        if self.mode == mode:
            assert self.request is not None
            self.request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    async def _uninstall(self, cfg: PipelineConfig) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await logical.uninstall(conn, SCHEMA, cfg)

    async def close(self) -> None:
        await self._stack.aclose()

    async def events(
        self, n: int, position: outbox.ReadPosition = outbox.START, deadline: float = WAIT_SECONDS
    ) -> tuple[list[ChangeEvent], outbox.ReadPosition]:
        """The pipeline's events after ``position`` as the reader reads them, once ``n`` are
        there (trigger mode writes them in the application's transaction; logical mode after
        the commit is decoded). A case that must show that nothing was captured commits a
        sentinel write last and waits for it: commit order makes everything before it visible."""
        assert self.pipeline is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            events, after = await outbox.read_batch(
                self.conn, SCHEMA, self.pipeline.name, position, limit=1_000_000
            )
            if len(events) >= n:
                return events, after
            if loop.time() > end:
                raise AssertionError(
                    f"{self.mode}: {len(events)} of {n} events after {WAIT_SECONDS}s"
                )
            await asyncio.sleep(0.02)

    async def all_events(self, n: int, deadline: float = WAIT_SECONDS) -> list[ChangeEvent]:
        return (await self.events(n, deadline=deadline))[0]

    async def dead_letters(self, n: int) -> list[dict[str, Any]]:
        """The dead letters, once ``n`` are there."""
        loop = asyncio.get_running_loop()
        end = loop.time() + WAIT_SECONDS
        while len(letters := await dead_letters(self.conn)) < n:
            if loop.time() > end:
                raise AssertionError(f"{self.mode}: {len(letters)} of {n} dead letters")
            await asyncio.sleep(0.02)
        return letters


@contextlib.asynccontextmanager
async def _running(capture: logical.LogicalCapture) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(capture.run(stop), name="contract-logical-capture")
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, WAIT_SECONDS)
        finally:
            if not task.done():
                task.cancel()


@pytest.fixture(params=MODES)
def capture_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def capture(
    database: str, capture_mode: str, request: pytest.FixtureRequest
) -> AsyncIterator[Capture]:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        harness = Capture(capture_mode, database, conn)
        harness.request = request
        try:
            yield harness
        finally:
            await harness.close()
