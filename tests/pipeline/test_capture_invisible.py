"""Installing capture never changes what the legacy application can do (DESIGN.md invariant 9),
in both capture modes, through the whole pipeline (real PostgreSQL + the CRM emulator):

* two-phase commit keeps working on the captured table (no NOTIFY/LISTEN inside the
  application's transaction), committed-prepared changes reach the CRM, rolled-back ones never;
* writes made under ``session_replication_role = replica`` are captured (trigger mode: the
  trigger is ``ENABLE ALWAYS``), and the connector's own sync-flag write-back still does not
  re-trigger capture.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from connector.capture import logical, triggers
from connector.config import PipelineConfig
from connector.emulator.server import EmulatorHandle
from connector.engine import Engine
from connector.pipeline import build_pipeline

from .conftest import FAST, ORDERS_DDL, SCHEMA, crm_by_key, fetch, make_client, pipeline_config

MODES = ["triggers", "logical"]


@contextlib.asynccontextmanager
async def running_pipeline(
    dsn: str, emu: EmulatorHandle, cfg: PipelineConfig
) -> AsyncIterator[Engine]:
    """Capture (for logical mode, a LogicalCapture task) and an engine running in the
    background until the block ends."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    async with (
        make_client(emu) as client,
        build_pipeline(
            cfg, client=client, state_dsn=dsn, schema=SCHEMA, options=FAST, snapshot_progress=False
        ) as built,
    ):
        engine = built.engine
        if cfg.capture == "logical":
            cap = logical.LogicalCapture(dsn, SCHEMA, cfg, flush_interval=0.02)
            tasks.append(asyncio.create_task(cap.run(stop)))
        tasks.append(asyncio.create_task(engine.run(stop)))
        try:
            yield engine
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def install(dsn: str, cfg: PipelineConfig) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(ORDERS_DDL)
        if cfg.capture == "logical":
            await logical.install(conn, SCHEMA, cfg)
        else:
            await triggers.install(conn, SCHEMA, cfg)


async def uninstall(dsn: str, cfg: PipelineConfig) -> None:
    if cfg.capture == "logical":
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await logical.uninstall(conn, SCHEMA, cfg)


async def wait_crm(emu: EmulatorHandle, want: dict[str, str | None], timeout: float = 60) -> None:
    """Wait until the CRM holds exactly ``want`` (key -> Name; None: absent or deleted)."""

    def now() -> dict[str, str | None]:
        recs = crm_by_key(emu)
        return {
            k: (recs[k]["Name"] if k in recs and not recs[k].get("Deleted") else None) for k in want
        }

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while now() != want:
        if loop.time() > end:
            raise AssertionError(f"CRM {now()} != {want}")
        await asyncio.sleep(0.05)


def insert(key: int, name: str) -> str:
    return f"INSERT INTO public.orders (id, name, status) VALUES ({key}, '{name}', 'New')"


@pytest.mark.parametrize("mode", MODES)
async def test_two_phase_commit_on_the_captured_table(
    database: str, emu: EmulatorHandle, mode: str
) -> None:
    cfg = pipeline_config(capture=mode, max_staleness="1s")
    await install(database, cfg)
    try:
        async with running_pipeline(database, emu, cfg):
            await _prepared_transactions(database, emu)
    finally:
        await uninstall(database, cfg)


async def _prepared_transactions(dsn: str, emu: EmulatorHandle) -> None:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as a,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as b,
    ):
        await a.execute(insert(1, "one"))
        await a.execute(insert(2, "two"))
        await wait_crm(emu, {"1": "one", "2": "two"})
        try:
            # used to fail with "cannot PREPARE a transaction that has executed LISTEN,
            # UNLISTEN, or NOTIFY" once the capture trigger was installed
            await a.execute("BEGIN")
            await a.execute(insert(3, "three"))
            await a.execute("UPDATE public.orders SET name = 'one v2' WHERE id = 1")
            await a.execute("DELETE FROM public.orders WHERE id = 2")
            await a.execute("PREPARE TRANSACTION 'cdc_test_commit'")
            await b.execute("BEGIN")
            await b.execute(insert(4, "four"))
            await b.execute(insert(6, "six"))
            await b.execute("PREPARE TRANSACTION 'cdc_test_rollback'")
        finally:
            # a prepared transaction outlives its session: never leave one behind
            prepared = await fetch(
                dsn, "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'cdc_test%'"
            )
            gids = {g for (g,) in prepared}
            if "cdc_test_commit" in gids:
                await a.execute("COMMIT PREPARED 'cdc_test_commit'")
            if "cdc_test_rollback" in gids:
                await b.execute("ROLLBACK PREPARED 'cdc_test_rollback'")
        assert gids == {"cdc_test_commit", "cdc_test_rollback"}
        await a.execute(insert(5, "sentinel"))  # after both outcomes in the source
        # the rolled-back inserts (4, 6) never reached the CRM
        await wait_crm(
            emu, {"1": "one v2", "2": None, "3": "three", "4": None, "5": "sentinel", "6": None}
        )
    names = await fetch(dsn, "SELECT name FROM public.orders WHERE id = 1")
    assert names == [("one v2",)]


@pytest.mark.parametrize("mode", MODES)
async def test_writes_under_session_replication_role_replica_are_captured(
    database: str, emu: EmulatorHandle, mode: str
) -> None:
    cfg = pipeline_config(capture=mode, max_staleness="1s", sync_flag_column="synced")
    await install(database, cfg)
    try:
        async with running_pipeline(database, emu, cfg):
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as app:
                # how logical-replication apply workers and bulk-load tools write
                await app.execute("SET session_replication_role = replica")
                await app.execute(insert(1, "one"))
                await app.execute(insert(2, "two"))
                await app.execute(insert(3, "three"))
                await app.execute("UPDATE public.orders SET name = 'two v2' WHERE id = 2")
                await app.execute("DELETE FROM public.orders WHERE id = 3")
                await wait_crm(emu, {"1": "one", "2": "two v2", "3": None})

            async def flagged() -> bool:
                rows = await fetch(database, "SELECT count(*) FROM public.orders WHERE synced")
                return bool(rows[0][0] == 2)

            for _ in range(600):
                if await flagged():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the sync flag was not written back")
            await asyncio.sleep(0.5)  # room for a (wrong) re-capture of the flag write
        ops = await fetch(
            database, "SELECT op, key FROM connector.outbox WHERE pipeline = 'orders' ORDER BY id"
        )
        # exactly the application's five writes; the flag write-back was not captured
        assert [tuple(r) for r in ops] == [
            ("insert", "1"),
            ("insert", "2"),
            ("insert", "3"),
            ("update", "2"),
            ("delete", "3"),
        ]
    finally:
        await uninstall(database, cfg)


async def test_the_capture_trigger_fires_always(database: str) -> None:
    cfg = pipeline_config()
    await install(database, cfg)
    rows: list[Any] = await fetch(
        database,
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass"
        " AND NOT tgisinternal",
    )
    assert rows == [("A",), ("A",)]  # the row trigger and the TRUNCATE trigger
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        # an install from before (ENABLE ORIGIN) is switched by the next `connector init`
        await conn.execute(
            f"ALTER TABLE public.orders ENABLE TRIGGER {triggers.trigger_name(SCHEMA, cfg)}"
        )
        await triggers.install(conn, SCHEMA, cfg)
    assert await fetch(
        database,
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass"
        " AND NOT tgisinternal",
    ) == [("A",), ("A",)]
