"""The demo's workload (connector/demo_workload.py) records, for the staleness figures, only the
changes that change what the CRM holds: a statement that leaves a row's synced columns as they
were is not captured (the trigger and the logical filter skip it), so a change recorded for it
would be measured until some later write of the record (session 22: the demo's 57 s "staleness"
of orders was a line edited to its own quantity)."""

from __future__ import annotations

import random

import psycopg

from connector.demo_shop import ShopWorkload, create_shop


class _Fixed(random.Random):
    """randint always answers ``value``; everything else as a seeded Random."""

    def __init__(self, value: int) -> None:
        super().__init__(7)
        self.value = value

    def randint(self, a: int, b: int) -> int:
        return self.value


async def _workload(dsn: str) -> tuple[ShopWorkload, int, int]:
    await create_shop(dsn, 20)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        order, line = await (
            await conn.execute("SELECT order_id, id FROM public.order_lines ORDER BY id LIMIT 1")
        ).fetchone() or (0, 0)
        await conn.execute(
            "UPDATE public.order_lines SET quantity = 3 WHERE order_id = %s", (order,)
        )
        ids = [r[0] for r in await (await conn.execute("SELECT id FROM public.orders")).fetchall()]
        customers = [
            r[0] for r in await (await conn.execute("SELECT id FROM public.customers")).fetchall()
        ]
    return ShopWorkload(dsn, ids, customers), int(order), int(line)


async def test_a_line_edited_to_its_own_quantity_is_no_change(database: str) -> None:
    wl, order, _ = await _workload(database)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        wl._rng = _Fixed(3)  # the quantity every line of the order already has
        wl._touched = {}
        async with conn.transaction():
            await wl._edit_line(conn, order)
        assert wl._touched == {} and wl.stats.line_edits == 0
        wl._rng = _Fixed(5)
        async with conn.transaction():
            await wl._edit_line(conn, order)
        assert wl.stats.line_edits == 1
        assert set(wl._touched) == {"order_lines", "orders"}  # the line, and the totals moved


async def test_totals_that_do_not_move_are_no_change_of_the_order(database: str) -> None:
    wl, order, _ = await _workload(database)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        wl._touched = {}
        async with conn.transaction():
            await wl._totals(conn, order)  # the lines were set to 3 each: the totals move
        assert wl._touched == {"orders": [str(order)]}
        wl._touched = {}
        async with conn.transaction():
            await wl._totals(conn, order)  # recomputed from the same lines: the same totals
        assert "orders" not in wl._touched
