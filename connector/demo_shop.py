"""The demo's three related tables and their traffic (issue 21; split from
``connector.demo_workload`` in session 22, moves only): ``create_shop`` makes ``customers``,
``orders`` with ``customer_id`` (a foreign key to customers) and ``order_lines`` (a foreign key
to orders, ``ON DELETE CASCADE``), filled in the server; ``ShopWorkload`` adds to the order
system's live changes (``connector.demo_workload.Workload``) new customers, their edits, orders
moved to another customer and lines added, changed, moved and deleted (each line change
recomputes its order's amount and quantity in the same transaction). A statement that changes
nothing the CRM holds is not recorded as a change (the staleness figures would measure it until
some later write)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from connector.demo_workload import CREATE_ORDERS, Workload

# What the shop sells: (product, unit price). Lines are drawn from it, at its prices.
CATALOGUE: tuple[tuple[str, str], ...] = (
    ("USB-C cable 1 m", "9.90"),
    ("USB-C cable 2 m", "12.90"),
    ("Wireless mouse", "24.50"),
    ("Mechanical keyboard", "89.00"),
    ("27-inch monitor", "279.00"),
    ("Laptop stand", "39.95"),
    ("Webcam 1080p", "59.00"),
    ("Noise-cancelling headphones", "199.00"),
    ("Desk lamp", "34.90"),
    ("Office chair", "249.00"),
    ("HDMI adapter", "14.99"),
    ("Portable SSD 1 TB", "109.00"),
    ("Phone charger 30 W", "19.90"),
    ("Notebook A5, 3-pack", "8.50"),
    ("Ballpoint pens, 10-pack", "4.99"),
    ("Printer paper, 500 sheets", "6.49"),
    ("Coffee mug", "11.00"),
    ("Backpack", "64.00"),
    ("Bluetooth speaker", "45.00"),
    ("Power strip", "21.90"),
)
FIRST_NAMES = (
    "Ada", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tara",
)  # fmt: skip
LAST_NAMES = (
    "Schmidt", "Rossi", "Dubois", "Novak", "Okafor", "Tanaka", "Silva", "Jensen", "Kowalski",
    "Murphy", "Garcia", "Nilsson", "Haddad", "Costa", "Weber", "Larsen", "Ivanova", "Moreau",
)  # fmt: skip
CITIES = (
    "Berlin", "Lisbon", "Dublin", "Lyon", "Turin", "Gdansk", "Aarhus", "Porto", "Vienna",
    "Ghent", "Bilbao", "Brno", "Malmo", "Utrecht", "Cork",
)  # fmt: skip

CREATE_SHOP = f"""
CREATE TABLE public.customers (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    email       text        NOT NULL UNIQUE,
    phone       text,
    city        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
{CREATE_ORDERS.strip()};
ALTER TABLE public.orders ADD COLUMN customer_id bigint REFERENCES public.customers (id);
CREATE INDEX ON public.orders (customer_id);
CREATE TABLE public.order_lines (
    id          bigserial     PRIMARY KEY,
    order_id    bigint        NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    product     text          NOT NULL,
    quantity    integer       NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10,2) NOT NULL,
    updated_at  timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ON public.order_lines (order_id);
"""

# One customer per 5 orders; each order has 1-5 lines from the catalogue; an order's amount
# and quantity are its lines' totals. Generated in the server (fast for 50,000 orders).
FILL_CUSTOMERS = """
INSERT INTO public.customers (name, email, phone, city, created_at, updated_at)
SELECT f || ' ' || l,
       lower(f) || '.' || lower(l) || g || '@example.com',
       '+49 30 ' || lpad((floor(random() * 10000000))::int::text, 7, '0'),
       (%(cities)s::text[])[1 + floor(random() * cardinality(%(cities)s::text[]))::int],
       ts, ts
  FROM (SELECT g,
               (%(first)s::text[])[1 + floor(random() * cardinality(%(first)s::text[]))::int] AS f,
               (%(last)s::text[])[1 + floor(random() * cardinality(%(last)s::text[]))::int] AS l,
               now() - interval '730 days' - random() * interval '365 days' AS ts
          FROM generate_series(1, %(customers)s) AS g) AS s
 ORDER BY g
"""
FILL_SHOP_ORDERS = """
INSERT INTO public.orders
       (order_number, customer_id, customer_email, status, amount, quantity, order_date,
        placed_at, notes, is_gift, updated_at)
SELECT 'SO-' || lpad(g::text, 7, '0'), c.id, c.email,
       (ARRAY['New','Paid','Shipped','Delivered','Delivered','Delivered','Cancelled','Refunded'])
           [1 + floor(random() * 8)::int],
       0, 0,
       (ts AT TIME ZONE 'UTC')::date,
       ts,
       CASE WHEN random() < 0.2 THEN 'leave at the door' WHEN random() < 0.1 THEN 'gift wrap'
            ELSE NULL END,
       random() < 0.05,
       ts
  FROM (SELECT g, now() - random() * interval '730 days' AS ts,
               1 + floor(random() * %(customers)s)::bigint AS customer
          FROM generate_series(1, %(rows)s) AS g) AS s
  JOIN public.customers c ON c.id = s.customer
 ORDER BY g
"""
FILL_LINES = """
INSERT INTO public.order_lines (order_id, product, quantity, unit_price, updated_at)
SELECT x.id, (%(products)s::text[])[p], 1 + floor(random() * 4)::int,
       (%(prices)s::numeric[])[p], x.updated_at
  FROM (SELECT id, updated_at, 1 + floor(random() * 5)::int AS n FROM public.orders) AS x
 CROSS JOIN LATERAL (
       SELECT i, 1 + floor(random() * cardinality(%(products)s::text[]))::int AS p
         FROM generate_series(1, x.n) AS i) AS line
 ORDER BY x.id, line.i
"""
ORDER_TOTALS = """
UPDATE public.orders o SET amount = t.amount, quantity = t.quantity
  FROM (SELECT order_id, sum(quantity * unit_price) AS amount, sum(quantity) AS quantity
          FROM public.order_lines GROUP BY order_id) AS t
 WHERE t.order_id = o.id
"""


def customers_for(orders: int) -> int:
    """About one customer per 5 orders (at least one)."""
    return max(1, orders // 5)


async def create_shop(dsn: str, orders: int) -> dict[str, int]:
    """The demo's three related tables with realistic rows; returns the rows of each."""
    params: dict[str, Any] = {
        "rows": orders,
        "customers": customers_for(orders),
        "first": list(FIRST_NAMES),
        "last": list(LAST_NAMES),
        "cities": list(CITIES),
        "products": [name for name, _ in CATALOGUE],
        "prices": [price for _, price in CATALOGUE],
    }
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(CREATE_SHOP)
        async with conn.transaction():
            await conn.execute("SELECT setseed(0.42)")
            await conn.execute(FILL_CUSTOMERS, params)
            if orders > 0:
                await conn.execute(FILL_SHOP_ORDERS, params)
                await conn.execute(FILL_LINES, params)
                await conn.execute(ORDER_TOTALS)
        counts: dict[str, int] = {}
        for table in SHOP_TABLES:
            ident = sql.Identifier("public", table)
            await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
            row = await cur.fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


SHOP_TABLES = ("customers", "orders", "order_lines")


# The shop's mix of business operations: (share, operation). Order changes as in ``Workload``
# (new orders carry 1-5 lines; an edit changes notes or the gift flag, the totals come from
# the lines); customers and lines a few per cent each.
SHOP_MIX: tuple[tuple[float, str], ...] = (
    (0.15, "insert_order"),
    (0.37, "advance_status"),
    (0.10, "edit_order"),
    (0.08, "cancel_order"),
    (0.04, "delete_order"),
    (0.02, "insert_customer"),
    (0.04, "edit_customer"),
    (0.04, "reparent_order"),
    (0.05, "insert_line"),
    (0.05, "edit_line"),
    (0.03, "move_line"),
    (0.03, "delete_line"),
)

Q_TOTALS = """
UPDATE public.orders o
   SET amount = coalesce(t.amount, 0), quantity = coalesce(t.quantity, 0), updated_at = now()
  FROM (SELECT sum(quantity * unit_price) AS amount, sum(quantity) AS quantity
          FROM public.order_lines WHERE order_id = %(id)s) AS t
 WHERE o.id = %(id)s
   AND (o.amount, o.quantity)
       IS DISTINCT FROM (coalesce(t.amount, 0), coalesce(t.quantity, 0))
"""


class ShopWorkload(Workload):
    """``Workload`` over the three related tables: also new customers (some placing their first
    order in the same transaction), customer edits, orders moved to another customer, and lines
    added, changed, moved to another order and deleted; a line change recomputes the totals of
    each order it touched in the same transaction."""

    def __init__(self, dsn: str, ids: list[int], customer_ids: list[int], *, seed: int = 7) -> None:
        super().__init__(dsn, ids, seed=seed)
        self._customers = sorted(customer_ids)
        self._mix = list(SHOP_MIX)
        self._weights = [w for w, _ in self._mix]

    async def _one(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._ids:
            await self._insert_order(conn)
            return
        (op,) = self._rng.choices([name for _, name in self._mix], self._weights)
        if op == "insert_order":
            await self._insert_order(conn)
        elif op == "insert_customer":
            await self._insert_customer(conn)
        elif op == "edit_customer":
            await self._edit_customer(conn)
        else:
            key = self._pick()
            if key is None:
                return
            await getattr(self, "_" + op)(conn, key)

    def _customer(self) -> int:
        return self._rng.choice(self._customers)

    async def _insert_customer(self, conn: psycopg.AsyncConnection[Any]) -> int:
        rng = self._rng
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        n = self.stats.customer_inserts + 1
        cur = await conn.execute(
            "INSERT INTO public.customers (name, email, phone, city) VALUES (%s, %s, %s, %s)"
            " RETURNING id",
            (
                f"{first} {last}",
                f"{first.lower()}.{last.lower()}.w{self._seed}-{n}@example.com",
                f"+49 30 {rng.randint(0, 9_999_999):07d}",
                rng.choice(CITIES),
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        key = int(row[0])
        self._customers.append(key)
        self.stats.customer_inserts += 1
        self._touch("customers", key)
        return key

    async def _edit_customer(self, conn: psycopg.AsyncConnection[Any]) -> None:
        rng = self._rng
        key = self._customer()
        if rng.random() < 0.5:
            column, value = "phone", f"+49 30 {rng.randint(0, 9_999_999):07d}"
        else:
            column, value = "city", rng.choice(CITIES)
        cur = await conn.execute(
            sql.SQL(
                "UPDATE public.customers SET {col} = %s, updated_at = now()"
                " WHERE id = %s AND {col} IS DISTINCT FROM %s"
            ).format(col=sql.Identifier(column)),
            (value, key, value),
        )
        if cur.rowcount == 0:  # the same value: nothing the CRM holds changes, no change to time
            return
        self.stats.customer_edits += 1
        self._touch("customers", key)

    async def _insert_order(self, conn: psycopg.AsyncConnection[Any]) -> None:
        rng = self._rng
        # one new order in five comes from a new customer, created in the same transaction
        customer = await self._insert_customer(conn) if rng.random() < 0.2 else self._customer()
        lines = [(*rng.choice(CATALOGUE), rng.randint(1, 4)) for _ in range(rng.randint(1, 5))]
        amount = sum(Decimal(price) * qty for _, price, qty in lines)
        cur = await conn.execute(
            "INSERT INTO public.orders (order_number, customer_id, customer_email, status,"
            " amount, quantity, order_date, placed_at, notes, is_gift)"
            " SELECT %s, c.id, c.email, 'New', %s, %s, current_date, now(), %s, %s"
            " FROM public.customers c WHERE c.id = %s RETURNING id",
            (
                f"SO-W{self._seed}-{self.stats.inserts + 1:06d}",
                amount,
                sum(qty for _, _, qty in lines),
                rng.choice([None, None, "call before delivery", "gift wrap"]),
                rng.random() < 0.05,
                customer,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        key = int(row[0])
        async with conn.cursor() as c:
            await c.executemany(
                "INSERT INTO public.order_lines (order_id, product, quantity, unit_price)"
                " VALUES (%s, %s, %s, %s)",
                [(key, product, qty, price) for product, price, qty in lines],
            )
        self._ids.append(key)  # ids only grow: the list stays sorted
        self.stats.inserts += 1
        self._touch("orders", key)
        self._touch("order_lines", key, rows=len(lines))

    async def _edit_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        rng = self._rng
        notes = rng.choice([None, "address changed", "customer called", "rush"])
        gift = rng.random() < 0.1
        cur = await conn.execute(
            "UPDATE public.orders SET notes = %s, is_gift = %s, updated_at = now()"
            " WHERE id = %s AND (notes, is_gift) IS DISTINCT FROM (%s::text, %s::boolean)",
            (notes, gift, key, notes, gift),
        )
        if cur.rowcount == 0:
            if not await self._exists(conn, key):
                self._forget(key)
            return  # the same values: no change the CRM could be late for
        self.stats.edits += 1
        self._touch("orders", key)

    async def _delete_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        cur = await conn.execute(
            "SELECT count(*) FROM public.order_lines WHERE order_id = %s", (key,)
        )
        row = await cur.fetchone()
        lines = int(row[0]) if row else 0
        cur = await conn.execute("DELETE FROM public.orders WHERE id = %s", (key,))  # cascades
        self._forget(key)
        if cur.rowcount == 0:
            return
        self.stats.deletes += 1
        self._touch("orders", key)
        if lines:
            self._touch("order_lines", key, rows=lines)

    async def _reparent_order(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        customer = self._customer()
        cur = await conn.execute(
            "UPDATE public.orders o SET customer_id = c.id, customer_email = c.email,"
            " updated_at = now() FROM public.customers c"
            " WHERE o.id = %s AND c.id = %s AND o.customer_id IS DISTINCT FROM c.id",
            (key, customer),
        )
        if cur.rowcount == 0:
            return
        self.stats.reparents += 1
        self._touch("orders", key)

    async def _totals(self, conn: psycopg.AsyncConnection[Any], *orders: int) -> None:
        for order in orders:
            cur = await conn.execute(Q_TOTALS, {"id": order})
            if cur.rowcount:  # totals unchanged (a line edited to its own quantity): no change
                self._touch("orders", order)

    async def _exists(self, conn: psycopg.AsyncConnection[Any], key: int) -> bool:
        cur = await conn.execute("SELECT 1 FROM public.orders WHERE id = %s", (key,))
        return await cur.fetchone() is not None

    async def _a_line(self, conn: psycopg.AsyncConnection[Any], order: int) -> int | None:
        cur = await conn.execute(
            "SELECT id FROM public.order_lines WHERE order_id = %s ORDER BY id"
            " OFFSET %s LIMIT 1 FOR UPDATE",
            (order, self._rng.randint(0, 4)),
        )
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute(
                "SELECT id FROM public.order_lines WHERE order_id = %s ORDER BY id LIMIT 1"
                " FOR UPDATE",
                (order,),
            )
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def _insert_line(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        product, price = self._rng.choice(CATALOGUE)
        cur = await conn.execute(
            "INSERT INTO public.order_lines (order_id, product, quantity, unit_price)"
            " SELECT id, %s, %s, %s FROM public.orders WHERE id = %s",
            (product, self._rng.randint(1, 4), price, key),
        )
        if cur.rowcount == 0:
            self._forget(key)
            return
        self.stats.line_inserts += 1
        self._touch("order_lines", key)
        await self._totals(conn, key)

    async def _edit_line(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        line = await self._a_line(conn, key)
        if line is None:
            return
        qty = self._rng.randint(1, 6)
        cur = await conn.execute(
            "UPDATE public.order_lines SET quantity = %s, updated_at = now()"
            " WHERE id = %s AND quantity IS DISTINCT FROM %s",
            (qty, line, qty),
        )
        if cur.rowcount == 0:  # its own quantity again: nothing changes
            return
        self.stats.line_edits += 1
        self._touch("order_lines", key)
        await self._totals(conn, key)

    async def _move_line(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        """A line booked on the wrong order moves to another one (e.g. a split shipment)."""
        line = await self._a_line(conn, key)
        target = self._pick()
        if line is None or target is None or target == key:
            return
        cur = await conn.execute(
            "UPDATE public.order_lines l SET order_id = o.id, updated_at = now()"
            " FROM public.orders o WHERE l.id = %s AND o.id = %s",
            (line, target),
        )
        if cur.rowcount == 0:
            self._forget(target)
            return
        self.stats.line_moves += 1
        self._touch("order_lines", key)
        self._touch("order_lines", target, rows=0)
        await self._totals(conn, key, target)

    async def _delete_line(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        line = await self._a_line(conn, key)
        if line is None:
            return
        await conn.execute("DELETE FROM public.order_lines WHERE id = %s", (line,))
        self.stats.line_deletes += 1
        self._touch("order_lines", key)
        await self._totals(conn, key)
