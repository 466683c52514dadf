"""The demo's single legacy table and its traffic (split from ``connector.demo``):
``create_orders``, the ``orders`` table with realistic rows filled in the server, and
``Workload``, the order system's live changes (new orders, status changes along an order's
life, edits, cancellations, deletes; skewed so some orders change often). Also used by the
end-to-end tests and benchmarks. The three related tables of ``connector demo`` and their
traffic are ``connector/demo_shop.py``."""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

STATUSES = ("New", "Paid", "Shipped", "Delivered", "Cancelled", "Refunded")
NEXT_STATUS = {"New": "Paid", "Paid": "Shipped", "Shipped": "Delivered", "Delivered": "Refunded"}

CREATE_ORDERS = """
CREATE TABLE public.orders (
    id             bigserial PRIMARY KEY,
    order_number   text        NOT NULL UNIQUE,
    customer_email text        NOT NULL,
    status         text        NOT NULL DEFAULT 'New',
    amount         numeric(12,2) NOT NULL,
    quantity       integer     NOT NULL,
    order_date     date        NOT NULL,
    placed_at      timestamptz NOT NULL,
    notes          text,
    is_gift        boolean     NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now()
)
"""

# Realistic rows generated in the server (fast for 50,000 rows): customers reused across
# orders, amounts with cents, most orders delivered, a few cancelled, notes on some.
FILL_ORDERS = """
SELECT setseed(0.42);
INSERT INTO public.orders
       (order_number, customer_email, status, amount, quantity, order_date, placed_at, notes,
        is_gift, updated_at)
SELECT 'SO-' || lpad(g::text, 7, '0'),
       'customer' || (1 + floor(random() * greatest(%(rows)s / 3, 1)))::int || '@example.com',
       (ARRAY['New','Paid','Shipped','Delivered','Delivered','Delivered','Cancelled','Refunded'])
           [1 + floor(random() * 8)::int],
       round((5 + random() * 995)::numeric, 2),
       1 + floor(random() * 5)::int,
       (ts AT TIME ZONE 'UTC')::date,
       ts,
       CASE WHEN random() < 0.2 THEN 'leave at the door' WHEN random() < 0.1 THEN 'gift wrap'
            ELSE NULL END,
       random() < 0.05,
       ts
  FROM (SELECT g, now() - random() * interval '730 days' AS ts
          FROM generate_series(1, %(rows)s) AS g) AS s
"""


async def create_orders(dsn: str, rows: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(CREATE_ORDERS)
        if rows > 0:
            async with conn.transaction():
                await conn.execute("SELECT setseed(0.42)")
                await conn.execute(FILL_ORDERS.split(";", 1)[1], {"rows": rows})
        await conn.execute("ANALYZE public.orders")


# --------------------------------------------------------------------------- live workload


@dataclass
class WorkloadStats:
    inserts: int = 0
    status_changes: int = 0
    edits: int = 0
    cancellations: int = 0
    deletes: int = 0
    # the shop's operations (ShopWorkload; 0 for the orders-only workload)
    customer_inserts: int = 0
    customer_edits: int = 0
    reparents: int = 0
    line_inserts: int = 0
    line_edits: int = 0
    line_moves: int = 0
    line_deletes: int = 0
    commits: int = 0
    # (commit time.monotonic(), key) of every change, for staleness measurement: orders by
    # order key, customers by customer key, lines by the key of each order whose line set the
    # change altered
    changes: list[tuple[float, str]] = field(default_factory=list)
    customer_changes: list[tuple[float, str]] = field(default_factory=list)
    line_changes: list[tuple[float, str]] = field(default_factory=list)
    # rows written per table (a new order with 3 lines is 1 order row and 3 line rows; an
    # order deleted with 3 lines by the cascade, 1 and 3): what one call per change would pay
    rows_changed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Business operations committed (each one transaction)."""
        return (
            self.inserts
            + self.status_changes
            + self.edits
            + self.cancellations
            + self.deletes
            + self.customer_inserts
            + self.customer_edits
            + self.reparents
            + self.line_inserts
            + self.line_edits
            + self.line_moves
            + self.line_deletes
        )

    def rows(self, table: str) -> int:
        return self.rows_changed.get(table, 0)


class Workload:
    """A skewed order-life workload: 20% of the changes go to a small hot set of orders."""

    def __init__(self, dsn: str, ids: list[int], *, seed: int = 7) -> None:
        self._dsn = dsn
        self._ids = sorted(ids)
        self._seed = seed
        self._rng = random.Random(seed)
        self._hot: list[int] = self._rng.sample(self._ids, min(len(self._ids), 50))
        self.stats = WorkloadStats()
        # keys touched by the transaction being built: table -> keys (see ``_commit``)
        self._touched: dict[str, list[str]] = {}

    def _pick(self) -> int | None:
        if not self._ids:
            return None
        r = self._rng.random()
        if r < 0.2 and self._hot:
            return self._rng.choice(self._hot)
        if r < 0.6:
            # recent orders change more than old ones
            tail = self._ids[-max(1, len(self._ids) // 20) :]
            return self._rng.choice(tail)
        return self._rng.choice(self._ids)

    def _forget(self, key: int) -> None:
        i = bisect.bisect_left(self._ids, key)
        if i < len(self._ids) and self._ids[i] == key:
            self._ids.pop(i)
        if key in self._hot:
            self._hot.remove(key)

    def _touch(self, table: str, key: int | str, rows: int = 1) -> None:
        self._touched.setdefault(table, []).append(str(key))
        self.stats.rows_changed[table] = self.stats.rows_changed.get(table, 0) + rows

    async def _one(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One business operation, in one transaction (it ``_touch``-es what it changed)."""
        r = self._rng.random()
        if r < 0.2 or not self._ids:
            await self._insert_order(conn)
            return
        key = self._pick()
        if key is None:
            return
        if r < 0.65:
            await self._advance_status(conn, key)
        elif r < 0.85:
            await self._edit_order(conn, key)
        elif r < 0.95:
            await self._cancel_order(conn, key)
        else:
            await self._delete_order(conn, key)

    async def _insert_order(self, conn: psycopg.AsyncConnection[Any]) -> None:
        rng = self._rng
        cur = await conn.execute(
            "INSERT INTO public.orders (order_number, customer_email, status, amount,"
            " quantity, order_date, placed_at, notes, is_gift)"
            " VALUES (%s, %s, 'New', %s, %s, current_date, now(), %s, %s) RETURNING id",
            (
                f"SO-W{self._seed}-{self.stats.inserts + 1:06d}",
                f"customer{rng.randint(1, 5000)}@example.com",
                f"{rng.uniform(5, 1000):.2f}",
                rng.randint(1, 5),
                rng.choice([None, None, "call before delivery", "gift wrap"]),
                rng.random() < 0.05,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        key = int(row[0])
        self._ids.append(key)  # ids only grow: the list stays sorted
        self.stats.inserts += 1
        self._touch("orders", key)

    async def _advance_status(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        cur = await conn.execute("SELECT status FROM public.orders WHERE id = %s", (key,))
        row = await cur.fetchone()
        if row is None:
            self._forget(key)
            return
        nxt = NEXT_STATUS.get(str(row[0]))
        if nxt is None:
            return
        await conn.execute(
            "UPDATE public.orders SET status = %s, updated_at = now() WHERE id = %s", (nxt, key)
        )
        self.stats.status_changes += 1
        self._touch("orders", key)

    async def _edit_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        rng = self._rng
        await conn.execute(
            "UPDATE public.orders SET quantity = %s, amount = %s, notes = %s,"
            " updated_at = now() WHERE id = %s",
            (
                rng.randint(1, 9),
                f"{rng.uniform(5, 1000):.2f}",
                rng.choice([None, "address changed", "customer called", "rush"]),
                key,
            ),
        )
        self.stats.edits += 1
        self._touch("orders", key)

    async def _cancel_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        cur = await conn.execute(
            "UPDATE public.orders SET status = 'Cancelled', updated_at = now()"
            " WHERE id = %s AND status IN ('New', 'Paid')",
            (key,),
        )
        if cur.rowcount == 0:
            return
        self.stats.cancellations += 1
        self._touch("orders", key)

    async def _delete_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        cur = await conn.execute("DELETE FROM public.orders WHERE id = %s", (key,))
        self._forget(key)
        if cur.rowcount == 0:
            return
        self.stats.deletes += 1
        self._touch("orders", key)

    async def _commit(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._touched = {}
        async with conn.transaction():
            await self._one(conn)
        now = time.monotonic()
        self.stats.commits += 1
        lists = {
            "orders": self.stats.changes,
            "customers": self.stats.customer_changes,
            "order_lines": self.stats.line_changes,
        }
        for table, keys in self._touched.items():
            lists[table].extend((now, k) for k in dict.fromkeys(keys))

    async def run_count(self, n: int) -> None:
        """Commit ``n`` business operations as fast as possible."""
        async with await psycopg.AsyncConnection.connect(self._dsn) as conn:
            for _ in range(n):
                await self._commit(conn)

    async def run(self, duration: float, rate: float, stop: asyncio.Event | None = None) -> None:
        """Commit about ``rate`` changes per second for ``duration`` seconds."""
        interval = 1.0 / rate if rate > 0 else 1.0
        async with await psycopg.AsyncConnection.connect(self._dsn) as conn:
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < duration and not (stop and stop.is_set()):
                await self._commit(conn)
                n += 1
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
