"""Nothing lost across a PostgreSQL restart while the engine runs (invariant 1)."""

from __future__ import annotations

import asyncio

import pytest

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import (
    EngineFactory,
    assert_crm_matches,
    execute,
    fetch,
    insert_sql,
    wait_for,
)


async def _execute_retrying(dsn: str, *args: object) -> None:
    for _ in range(200):
        try:
            await execute(dsn, *args)  # type: ignore[arg-type]
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError("the database did not come back")


async def test_postgres_restart_while_running(
    pg_cluster: object,
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
) -> None:
    server = getattr(pg_cluster, "server", None)
    if server is None:
        pytest.skip("needs the embedded cluster (CONNECTOR_TEST_DSN is set)")
    engine = await make_engine(client)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    await execute(legacy, *insert_sql(300))
    await wait_for(lambda: len(engine.coalescer.pending()) == 300)
    engine.flush_all()
    await wait_for(lambda: len(emu.records("Orders")) == 300)

    await asyncio.to_thread(server.restart, "fast")
    await _execute_retrying(legacy, *insert_sql(200, start=301))
    # the new rows are read after the restart (acks that could not be stored during it are
    # pending again: nothing lost, they are simply sent again)
    new = {str(i) for i in range(301, 501)}
    await wait_for(lambda: new <= set(engine.coalescer.pending()), timeout=60)
    assert not task.done()
    engine.flush_all()
    await wait_for(lambda: len(emu.records("Orders")) == 500, timeout=60)
    await wait_for(lambda: engine.checkpoint.last_id >= 500, timeout=30)
    stop.set()
    await asyncio.wait_for(task, 30)
    await assert_crm_matches(emu, legacy)
    rows = await fetch(
        legacy,
        "SELECT c.last_id = (SELECT max(id) FROM connector.outbox) FROM connector.checkpoints c",
    )
    assert rows == [(True,)]
