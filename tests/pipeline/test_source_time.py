"""Staleness runs from the source (DESIGN.md invariant 10): an outbox event's ``captured_at``
(from which the engine's deadlines, the oldest-pending-change age and the outbox lag are
measured) is the legacy transaction's commit time in logical mode (pgoutput's commit
timestamp) and the row's write time in trigger mode, never the time the connector stored it.
The capture is held back after the commit to make the difference visible."""

from __future__ import annotations

import asyncio
from datetime import datetime

import psycopg
import pytest

from connector import outbox
from connector.capture import logical, triggers
from connector.events import ChangeEvent

from .conftest import ORDERS_DDL, SCHEMA, pipeline_config

HOLD = 2.0  # seconds between the source commit and the capture


@pytest.mark.parametrize("mode", ["triggers", "logical"])
async def test_captured_at_is_the_source_time(database: str, mode: str) -> None:
    cfg = pipeline_config(capture=mode)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(ORDERS_DDL)
        if mode == "logical":
            await logical.install(conn, SCHEMA, cfg)
        else:
            await triggers.install(conn, SCHEMA, cfg)
        try:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO public.orders (id, name) VALUES (1, 'one')")
            cur = await conn.execute("SELECT clock_timestamp()")
            written = (await cur.fetchone() or [None])[0]
            await asyncio.sleep(0.3)
            await conn.execute("COMMIT")
            cur = await conn.execute("SELECT clock_timestamp()")
            committed = (await cur.fetchone() or [None])[0]
            assert isinstance(written, datetime) and isinstance(committed, datetime)
            await asyncio.sleep(HOLD)  # the capture is held (logical: not streaming yet)
            stop = asyncio.Event()
            task = None
            if mode == "logical":
                cap = logical.LogicalCapture(database, SCHEMA, cfg, flush_interval=0.02)
                task = asyncio.create_task(cap.run(stop))
            try:
                events: list[ChangeEvent] = []
                for _ in range(600):
                    events, _pos = await outbox.read_batch(conn, SCHEMA, "orders", outbox.START)
                    if events:
                        break
                    await asyncio.sleep(0.05)
                cur = await conn.execute("SELECT clock_timestamp()")
                read_at = (await cur.fetchone() or [None])[0]
                assert isinstance(read_at, datetime)
            finally:
                stop.set()
                if task is not None:
                    await asyncio.wait_for(task, 30)
            assert [e.key for e in events] == ["1"]
            stamp = events[0].captured_at
            # the engine's clock for this change starts at the source, not at the capture
            assert stamp <= committed
            if mode == "triggers":
                assert stamp <= written  # the row's write time, earlier still
            else:
                assert stamp > written  # the commit, after the write
            count, age = await outbox.outbox_lag(conn, SCHEMA, "orders", outbox.START)
            assert count == 1 and age >= HOLD
        finally:
            if mode == "logical":
                await logical.uninstall(conn, SCHEMA, cfg)
