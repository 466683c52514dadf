"""Capture-time MISSING_KEY dead letters (written by the trigger in the legacy transaction, not
by the emitter) are counted in ``connector_dead_letters_total{code="MISSING_KEY"}`` by a real
``connector run``: once each, including a letter whose transaction commits after a letter with
a larger id, and letters written while no connector ran (counted after the restart)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg

from connector.runtime import GAUGE_INTERVAL
from tests.e2e.helpers import (
    ConnectorProcess,
    checkpoint,
    connector_running,
    emulator,
    prepare,
    wait_in_sync,
)

LINE = 'connector_dead_letters_total{code="MISSING_KEY",pipeline="orders"}'

INSERT_NULL_KEY = (
    "INSERT INTO public.orders (id, order_number, customer_email, amount, quantity,"
    " order_date, placed_at) VALUES (NULL, %s, 'nk@example.com', 1, 1, current_date, now())"
)


async def _nullable_key(dsn: str) -> None:
    """The demo's key column ``id``, unique but nullable (a legacy table with a NULL key)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_pkey")
        await conn.execute("ALTER TABLE public.orders ALTER COLUMN id DROP NOT NULL")
        await conn.execute("ALTER TABLE public.orders ADD CONSTRAINT orders_id_key UNIQUE (id)")


async def _insert_null_key(dsn: str, number: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(INSERT_NULL_KEY, (number,))


async def _total(run: ConnectorProcess) -> float | None:
    _, text = await run.get("/metrics")
    for line in text.splitlines():
        if line.startswith(LINE + " "):
            return float(line.split()[-1])
    return None


async def _checkpoint_well_after_the_letters(dsn: str, run: ConnectorProcess) -> None:
    """Make captured changes until the pipeline's saved checkpoint is at the outbox's last row
    and was saved more than the start-up margin (two gauge refreshes) after every letter."""
    deadline = time.monotonic() + 60
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            run.check_alive()
            await conn.execute("UPDATE public.orders SET notes = now()::text WHERE id = 1")
            await asyncio.sleep(0.5)
            last_id, top = await checkpoint(dsn)
            cur = await conn.execute(
                "SELECT (SELECT updated_at FROM connector.checkpoints WHERE pipeline = 'orders')"
                " > (SELECT max(created_at) FROM connector.dead_letters)"
                " + make_interval(secs => %s)",
                (2 * GAUGE_INTERVAL,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] and last_id >= top:
                return
    raise AssertionError(f"checkpoint never saved after the letters: {await checkpoint(dsn)}")


async def test_missing_key_letters_are_counted_once_even_when_committed_out_of_order(
    database: str, tmp_path: Path
) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=20)
        await _nullable_key(database)
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)  # the initial sync is done: only capture from here
            async with await psycopg.AsyncConnection.connect(database) as late:
                # ``late`` draws its letter id first and commits after a later letter is counted
                await late.execute(INSERT_NULL_KEY, ("NK-late",))
                await _insert_null_key(database, "NK-1")
                await run.wait_metric(f"{LINE} 1.0")
                await late.commit()
            await run.wait_metric(f"{LINE} 2.0")
            await _insert_null_key(database, "NK-2")
            await run.wait_metric(f"{LINE} 3.0")
            assert await _total(run) == 3.0  # none counted twice by the refreshes meanwhile


async def test_letters_written_while_stopped_are_counted_after_the_restart(
    database: str, tmp_path: Path
) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=20)
        await _nullable_key(database)
        # a legacy transaction that stays open across the restart, holding a letter whose id is
        # below the ones the first process counts and the checkpoint passes
        async with await psycopg.AsyncConnection.connect(database) as open_tx:
            async with connector_running(setup, tmp_path, "run1") as run:
                await run.wait_http("/readyz")
                await wait_in_sync(setup, run)
                await open_tx.execute(INSERT_NULL_KEY, ("NK-open",))
                await _insert_null_key(database, "NK-1")
                await run.wait_metric(f"{LINE} 1.0")
                await _checkpoint_well_after_the_letters(database, run)
            await _insert_null_key(database, "NK-while-stopped")
            async with connector_running(setup, tmp_path, "run2") as run:
                # NK-1 was counted by run1 well before the checkpoint: not again; the new one
                # is, and so is NK-open, whose id is below NK-1's but which commits only now
                await run.wait_metric(f"{LINE} 1.0")
                await open_tx.commit()
                await run.wait_metric(f"{LINE} 2.0")
                assert await _total(run) == 2.0
