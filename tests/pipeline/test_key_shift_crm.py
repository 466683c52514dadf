"""Key shift and swap under a DEFERRABLE primary key, through to the CRM (issue 14 §4), in both
capture modes: `UPDATE orders SET id = id + 1 WHERE id BETWEEN 5 AND 20` and a swap of two keys
used to delete live records from the CRM; the CRM must equal the table."""

from __future__ import annotations

import psycopg
import pytest

from connector.capture import logical, triggers
from connector.emulator import start_emulator
from connector.pipeline import build_pipeline
from tests.capture_logical.helpers import running, wait_for
from tests.pipeline.conftest import (
    FAST,
    ORDERS_DDL,
    SCHEMA,
    assert_crm_matches,
    insert_sql,
    make_client,
    pipeline_config,
)

SHIFTS = [
    "UPDATE public.orders SET id = id + 1 WHERE id BETWEEN 5 AND 20",
    "UPDATE public.orders SET id = 3 - id WHERE id IN (1, 2)",
]


async def _max_outbox(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT coalesce(max(id), 0) FROM connector.outbox")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_shift_and_swap_under_a_deferrable_key_reach_the_crm(
    database: str, capture: str
) -> None:
    cfg = pipeline_config(capture=capture)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(ORDERS_DDL)
        await conn.execute(
            "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey,"
            " ADD PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED"
        )
        if capture == "triggers":
            await triggers.install(conn, SCHEMA, cfg)
        else:
            await conn.execute("ALTER TABLE public.orders REPLICA IDENTITY FULL")
            await logical.install(conn, SCHEMA, cfg)
        async with start_emulator() as emu, make_client(emu) as client:

            async def sync(*writes: str) -> None:
                if capture == "triggers":
                    for w in writes:
                        await conn.execute(w)
                else:
                    async with running(logical.LogicalCapture(database, SCHEMA, cfg)):
                        before = await _max_outbox(database)
                        for w in writes:
                            await conn.execute(w)
                        # a sentinel row, inserted and deleted after the writes: once its
                        # delete is in the outbox, so is everything before it
                        await conn.execute("INSERT INTO public.orders (id, name) VALUES (999, 'x')")
                        await conn.execute("DELETE FROM public.orders WHERE id = 999")
                        await wait_for(lambda: _deleted_999(conn, before), "the sentinel")
                async with build_pipeline(
                    cfg, client=client, state_dsn=database, schema=SCHEMA, options=FAST
                ) as built:
                    await built.engine.drain()

            q, params = insert_sql(20)
            await conn.execute(q, params)
            await sync()
            await assert_crm_matches(emu, database)
            await sync(*SHIFTS)
            await assert_crm_matches(emu, database)
        if capture == "logical":
            await logical.uninstall(conn, SCHEMA, cfg)


async def _deleted_999(conn: psycopg.AsyncConnection[object], after: int) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM connector.outbox WHERE key = '999' AND op = 'delete' AND id > %s",
        (after,),
    )
    return await cur.fetchone() is not None
