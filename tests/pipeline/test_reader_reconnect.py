"""The engine's outbox reader reconnects through the one retry policy (connector/dbpolicy.py):
a killed reader connection is logged once, without the driver's message, and the changes
committed meanwhile reach the CRM; a stop during the outage ends the engine promptly."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import psycopg
import pytest

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import EngineFactory, execute, insert_sql, pipeline_config, wait_for

LOST = "outbox read failed; reconnecting (AdminShutdown/57P01)"


async def _kill_others(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )


async def test_the_reader_reconnects_after_its_connection_is_killed(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = await make_engine(client, pipeline_config(max_staleness=timedelta(seconds=1)))
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(engine.run(stop))
        await execute(legacy, *insert_sql(5))
        await wait_for(lambda: len(emu.records("Orders")) == 5, timeout=30)

        async def killed() -> None:
            while not any(r.getMessage() == LOST for r in caplog.records):
                assert not task.done(), task
                await _kill_others(legacy)
                await asyncio.sleep(0.1)

        await asyncio.wait_for(killed(), 30)
        await execute(legacy, *insert_sql(5, start=6))
        await wait_for(lambda: len(emu.records("Orders")) == 10, timeout=60)
        stop.set()
        await asyncio.wait_for(task, 20)
    assert "terminating connection" not in caplog.text  # the class and SQLSTATE, not the text
