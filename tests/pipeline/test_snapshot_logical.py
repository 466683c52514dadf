"""The initial sync in logical mode: live changes decoded from the WAL race the chunks; the
same ordering rule (source xid visible in the chunk's snapshot) keeps the CRM never stale."""

from __future__ import annotations

import asyncio

import psycopg

from connector.capture import logical
from connector.emulator.server import EmulatorHandle
from connector.pipeline import build_pipeline

from .conftest import (
    FAST,
    ORDERS_DDL,
    SCHEMA,
    assert_crm_matches,
    execute,
    fetch,
    insert_sql,
    make_client,
    pipeline_config,
)
from .test_snapshot import _writer

ROWS = 8_000


async def test_logical_mode_snapshot_with_a_concurrent_writer(
    database: str, emu: EmulatorHandle
) -> None:
    pipeline = pipeline_config(capture="logical", snapshot="auto")
    await execute(database, ORDERS_DDL)
    await execute(database, *insert_sql(ROWS))  # before capture: only the snapshot has them
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await logical.install(conn, SCHEMA, pipeline)

    stop_capture = asyncio.Event()
    capture = asyncio.create_task(
        logical.LogicalCapture(database, SCHEMA, pipeline).run(stop_capture)
    )
    try:
        async with (
            make_client(emu) as client,
            build_pipeline(
                pipeline,
                client=client,
                state_dsn=database,
                schema=SCHEMA,
                options=FAST,
                snapshot_progress=False,
            ) as built,
        ):
            engine = built.engine
            writer = asyncio.create_task(_writer(database, ROWS, 300, seed=2))
            await engine.drain()
            await writer
            # a sentinel marks the end of the writer's changes in the WAL
            await execute(database, *insert_sql(1, start=10_000_000))
            for _ in range(1_500):
                got = await fetch(database, "SELECT 1 FROM connector.outbox WHERE key = '10000000'")
                if got:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("logical capture did not deliver the sentinel")
            async with build_pipeline(
                pipeline, client=client, state_dsn=database, schema=SCHEMA, options=FAST
            ) as again:
                await again.engine.drain()
    finally:
        stop_capture.set()
        await asyncio.wait_for(capture, 30)

    await assert_crm_matches(emu, database)
    status = await fetch(database, "SELECT status FROM connector.snapshots")
    assert status == [("done",)]
    live = await fetch(database, "SELECT count(*) FROM connector.outbox WHERE op <> 'snapshot'")
    assert live[0][0] > 0  # live changes did race the snapshot
