"""Values the CRM cannot hold never stop the pipeline (issue 14 §4, invariant 8), in both
capture modes: an integral numeric of 2^64 or more anywhere in the row image (mapped or not),
``1E+20`` for an integer field, ``infinity`` timestamps and NaN become dead letters with their
reason, their payload stored losslessly, and every other row reaches the CRM."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import psycopg
import pytest
from psycopg.types.json import set_json_loads

from connector import operate, state
from connector.capture import logical, triggers
from connector.outbox import load_json
from tests.capture_logical.helpers import running, wait_for
from tests.pipeline.conftest import (
    FIELDS,
    SCHEMA,
    drain_into_a_new_emulator,
    pipeline_config,
)

DDL = (
    "CREATE TABLE public.orders (id bigint PRIMARY KEY, name text NOT NULL, amount numeric,"
    " quantity float8, placed_at timestamptz, big numeric)"
)
FIELDS_X: dict[str, Any] = {
    "name": FIELDS["name"],
    "amount": {"field": "Amount", "type": "currency"},
    "quantity": {"field": "Quantity", "type": "integer"},
    "placed_at": {"field": "Placed_At", "type": "datetime"},
}
WRITES = [
    # every row holds an unmapped integral numeric beyond 64 bits
    "INSERT INTO public.orders SELECT g, 'Order ' || g, g + 0.5, g, now(), 18446744073709551616"
    " FROM generate_series(1, 20) g",
    "UPDATE public.orders SET quantity = 1E+20 WHERE id = 3",
    "UPDATE public.orders SET placed_at = 'infinity' WHERE id = 4",
    "UPDATE public.orders SET amount = 'NaN' WHERE id = 5",
    "UPDATE public.orders SET quantity = 18446744073709551616 WHERE id = 6",
    "UPDATE public.orders SET big = repeat('9', 5000)::numeric WHERE id = 7",
    "UPDATE public.orders SET placed_at = '-infinity' WHERE id = 8",
    "UPDATE public.orders SET big = repeat('8', 5000)::numeric WHERE id = 4",
]
EXPECTED = {
    "3": "NUMBER_OUT_OF_RANGE",
    "4": "DATE_OUT_OF_RANGE",
    "5": "NOT_A_NUMBER",
    "6": "NUMBER_OUT_OF_RANGE",
    "8": "DATE_OUT_OF_RANGE",
}


async def _outbox_has(dsn: str, n: int) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM connector.outbox")
        row = await cur.fetchone()
        return row is not None and row[0] >= n


async def _check(database: str, capture: str) -> None:
    pipeline = pipeline_config(fields=FIELDS_X, capture=capture)
    records = await drain_into_a_new_emulator(database, pipeline)
    crm = {str(r["parent_id"]): r for r in records}
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute(
            "SELECT key, error_code, error_field, error_message, payload->>'big'"
            " FROM connector.dead_letters"
        )
        letters = {k: (code, field, msg, big) for k, code, field, msg, big in await cur.fetchall()}
    assert {k: v[0] for k, v in letters.items()} == EXPECTED
    assert letters["3"][1] == "Quantity" and letters["4"][1] == "Placed_At"
    assert all(msg for _, _, msg, _ in letters.values())
    assert letters["3"][3] == "18446744073709551616"  # the payload keeps every digit
    assert set(crm) == {str(k) for k in range(1, 21)} - set(EXPECTED)
    assert crm["7"]["Quantity"] == 7 and crm["2"]["Amount"] == 2.5
    # `dead-letters list --json` / `show` print such payloads with every digit
    async with await psycopg.AsyncConnection.connect(database) as conn:
        set_json_loads(load_json, conn)
        rows = await state.list_dead_letters(conn, SCHEMA, "orders", "open")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        operate._dump([operate._dl_json(r) for r in rows])
    text = out.getvalue()
    assert '"big": 18446744073709551616' in text and "8" * 5000 in text


async def test_extreme_values_are_dead_letters_in_trigger_mode(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(DDL)
        await triggers.install(conn, SCHEMA, pipeline_config(fields=FIELDS_X))
        for w in WRITES:
            await conn.execute(w)
    await _check(database, "triggers")


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
async def test_extreme_values_are_dead_letters_in_logical_mode(
    database: str, identity: str
) -> None:
    cfg = pipeline_config(fields=FIELDS_X, capture="logical")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(DDL)
        await conn.execute(f"ALTER TABLE public.orders REPLICA IDENTITY {identity}")
        await logical.install(conn, SCHEMA, cfg)
        try:
            async with running(logical.LogicalCapture(database, SCHEMA, cfg)):
                for w in WRITES:
                    await conn.execute(w)
                await wait_for(lambda: _outbox_has(database, 20 + len(WRITES) - 1), "outbox")
            await _check(database, "logical")
        finally:
            await logical.uninstall(conn, SCHEMA, cfg)
