"""A seeded workload of concurrent transactions on the legacy ``orders`` table, with its own
record of what it committed.

The sequence of operations depends only on the seed (never on time or on the connector), so a
fault-free run of the same seed commits the same transactions: the credit comparison runs both
side by side. Operations: inserts, updates, deletes, re-inserts of a deleted key, multi-row
transactions, rollbacks, pairs of transactions committing out of order (the first one to write
commits last), long transactions left open for hundreds of operations (they also write), and
"mass updates" that touch every row at once (a legacy batch job: the connector sends them with a
Bulk Write job). PostgreSQL restarts happen at operation indices known in advance; no
transaction is open across one (the hook runs between operations).

Orders have lines (issue 21: rows of the subform ``Orders.Lines``): lines are inserted, changed,
moved to another order and deleted in transactions of their own, and go with their order when
it is deleted (a foreign key ``ON DELETE CASCADE``); the end state is checked against the table,
not modelled here.

Orders name customers (issue 21: a lookup to the customer's CRM record). A few name a customer
that is inserted only later, by a later operation (the child waits for its parent, or is held
and released); some name none; customers are inserted and updated in their own transactions
and never deleted; every customer named is inserted before the run ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from tests.chaos.model import (
    COLUMNS,
    CUSTOMER_COLUMNS,
    KeySlot,
    Row,
    invalid_reason,
    make_customer,
    make_row,
)

log = logging.getLogger(__name__)

TABLE_DDL = """
CREATE TABLE public.orders (
    id             bigint PRIMARY KEY,
    name           text,
    customer_email text,
    status         text,
    amount         numeric(12, 2),
    quantity       integer,
    order_date     date,
    placed_at      timestamptz,
    notes          text,
    is_gift        boolean,
    rev            bigint NOT NULL,
    customer_id    bigint,
    customer_ref   text
);
CREATE TABLE public.customers (
    id             bigint PRIMARY KEY,
    name           text NOT NULL,
    rev            bigint NOT NULL
);
-- an order's lines go with it (ON DELETE CASCADE), as a legacy schema with a foreign key has it
CREATE TABLE public.order_lines (
    id             bigint PRIMARY KEY,
    order_id       bigint REFERENCES public.orders (id) ON DELETE CASCADE,
    product        text NOT NULL,
    qty            integer NOT NULL
);
CREATE INDEX ON public.order_lines (order_id);
"""

_INSERT = sql.SQL("INSERT INTO public.orders ({}) VALUES ({})").format(
    sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
    sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
)
_UPDATE = sql.SQL("UPDATE public.orders SET {} WHERE id = %s").format(
    sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in COLUMNS if c != "id")
)
_C_INSERT = "INSERT INTO public.customers (id, name, rev) VALUES (%s, %s, %s)"
_C_UPDATE = "UPDATE public.customers SET name = %s, rev = %s WHERE id = %s"
_C_SELECT = "SELECT id, name, rev FROM public.customers"


class KeySet:
    """A set with O(1) random choice and removal."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def add(self, k: int) -> None:
        if k not in self.pos:
            self.pos[k] = len(self.items)
            self.items.append(k)

    def discard(self, k: int) -> None:
        i = self.pos.pop(k, None)
        if i is None:
            return
        last = self.items.pop()
        if last != k:
            self.items[i] = last
            self.pos[last] = i

    def __contains__(self, k: object) -> bool:
        return k in self.pos

    def __len__(self) -> int:
        return len(self.items)

    def choice(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]


@dataclass
class WorkloadStats:
    ops: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    reinserts: int = 0
    multi_row: int = 0
    rollbacks: int = 0
    out_of_order: int = 0
    long_open: int = 0
    mass_updates: int = 0
    bad_writes: int = 0
    uncertain: int = 0  # operations hit by a connection error; their keys were re-read
    row_writes: int = 0
    customer_inserts: int = 0
    customer_updates: int = 0
    line_writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Holder:
    """A transaction left open: its writes are done, its commit (or rollback) comes later."""

    conn: psycopg.AsyncConnection[Any]
    close_at: int
    commit: bool
    writes: dict[int, Row] = field(default_factory=dict)
    kind: str = "long"


RestartHook = Callable[[int], Awaitable[None]]


class Workload:
    def __init__(
        self,
        dsn: str,
        seed: int,
        *,
        initial_rows: int = 30_000,
        rate: float = 20.0,
        bad_rate: float = 0.03,
        mass_update_every: int = 1_500,
        restart_points: tuple[int, ...] = (),
        restart_hook: RestartHook | None = None,
        on_mass_update: Callable[[int], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.seed = seed
        self.rng = random.Random(f"workload:{seed}")
        self.initial_rows = initial_rows
        self.rate = rate
        self.bad_rate = bad_rate
        self.mass_update_every = mass_update_every
        self.restart_points = tuple(sorted(restart_points))
        self.restart_hook = restart_hook
        self.on_mass_update = on_mass_update
        self.slots: dict[int, KeySlot] = {}
        self.live = KeySet()
        self.deleted = KeySet()
        self.locked: set[int] = set()
        self.hot: list[int] = []
        self.next_id = 1
        self.holders: list[Holder] = []
        self.stats = WorkloadStats()
        # (wall clock just after the commit returned, key, Rev; None: deleted) of every valid
        # order row committed live and every delete: the staleness check measures each until
        # the CRM holds it or something newer
        self.committed_at: list[tuple[float, int, int | None]] = []
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # customers: committed rows, their keys (for a seeded choice), the highest rev each
        # reached, and those named by an order but not inserted yet (oldest first)
        self.customers: dict[int, Row] = {}
        self.customer_keys: list[int] = []
        self.customer_rev: dict[int, int] = {}
        self.pending_customers: list[int] = []
        self.next_customer = 1
        # order lines: ids handed out so far (a line may be gone: its write then changes nothing)
        self.next_line = 1

    # ------------------------------------------------------------------ model
    def expected_rows(self) -> dict[int, Row]:
        """What the table must hold: every live key with its last committed row."""
        return {k: s.row for k, s in self.slots.items() if s.row is not None}

    def expected_customers(self) -> dict[int, Row]:
        return dict(self.customers)

    def _pick_customer(self) -> int | None:
        """The customer a new order version names: none (5 %), one not inserted yet (1 %, or
        when there is no customer yet), else a committed one."""
        r = self.rng.random()
        if r < 0.05:
            return None
        if r < 0.06 or not self.customer_keys:
            c = self.next_customer
            self.next_customer += 1
            self.pending_customers.append(c)
            return c
        return self.rng.choice(self.customer_keys)

    def _new_customer(self, key: int) -> Row:
        rev = self.customer_rev.get(key, 0) + 1
        self.customer_rev[key] = rev
        return make_customer(key, rev)

    def _commit_customer(self, key: int, row: Row | None) -> None:
        if row is None:
            return
        if key not in self.customers:
            self.customer_keys.append(key)
        self.customers[key] = row
        self.customer_rev[key] = max(self.customer_rev.get(key, 0), int(row["rev"]))
        if key in self.pending_customers:
            self.pending_customers.remove(key)

    def _new_row(self, key: int, bad_rate: float | None = None) -> Row:
        slot = self.slots.get(key)
        rev = (slot.max_rev if slot else 0) + 1
        row = make_row(
            key,
            rev,
            self.rng,
            self.bad_rate if bad_rate is None else bad_rate,
            self._pick_customer(),
        )
        if slot is None:
            self.slots[key] = KeySlot(None, rev)
        else:
            slot.max_rev = rev
        self.stats.row_writes += 1
        if invalid_reason(row) is not None:
            self.stats.bad_writes += 1
        return row

    def _commit_model(self, writes: dict[int, Row | None], *, at: float | None = None) -> None:
        """The model after a commit; ``at``: when it returned (a live commit; not the initial
        rows, nor a resync after a lost connection, whose commit moment is unknown)."""
        for k, row in writes.items():
            if at is not None and row is None:
                self.committed_at.append((at, k, None))
            elif at is not None and row is not None and invalid_reason(row) is None:
                self.committed_at.append((at, k, int(row["rev"])))
            slot = self.slots.setdefault(k, KeySlot(None, 0))
            slot.row = row
            if row is not None:
                slot.max_rev = max(slot.max_rev, int(row["rev"]))
                self.live.add(k)
                self.deleted.discard(k)
            else:
                self.live.discard(k)
                self.deleted.add(k)

    def _pick_live(self) -> int | None:
        for _ in range(20):
            if not len(self.live):
                return None
            if self.hot and self.rng.random() < 0.5:
                k = self.rng.choice(self.hot)
            else:
                k = self.live.choice(self.rng)
            if k in self.live and k not in self.locked:
                return k
        return None

    # ------------------------------------------------------------------ setup
    async def create(self) -> None:
        """Create the tables and fill them: ``initial_rows`` orders naming one of
        ``initial_rows // 100`` customers (at least 20) or none or one inserted later (COPY)."""
        customers: list[Row] = []
        for _ in range(max(20, self.initial_rows // 100)):
            c = self.next_customer
            self.next_customer += 1
            customers.append(self._new_customer(c))
        for c_row in customers:  # before the orders are made: they name these
            self._commit_customer(int(c_row["id"]), c_row)
        rows: list[Row] = []
        for _ in range(self.initial_rows):
            k = self.next_id
            self.next_id += 1
            rows.append(self._new_row(k, bad_rate=min(self.bad_rate, 0.01)))
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(TABLE_DDL)
            async with conn.cursor() as cur:
                copy_c = sql.SQL("COPY public.customers ({}) FROM STDIN").format(
                    sql.SQL(", ").join(map(sql.Identifier, CUSTOMER_COLUMNS))
                )
                async with cur.copy(copy_c) as copy:
                    for c in customers:
                        await copy.write_row([c[k] for k in CUSTOMER_COLUMNS])
                copy_sql = sql.SQL("COPY public.orders ({}) FROM STDIN").format(
                    sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
                )
                async with cur.copy(copy_sql) as copy:
                    for r in rows:
                        await copy.write_row([r[c] for c in COLUMNS])
                copy_l = "COPY public.order_lines (id, order_id, product, qty) FROM STDIN"
                async with cur.copy(copy_l) as copy:
                    for r in rows[: min(2_000, len(rows))]:  # two lines each
                        for _ in range(2):
                            line = self.next_line
                            self.next_line += 1
                            await copy.write_row([line, r["id"], f"p{line}", 1 + line % 9])
            await conn.execute("ANALYZE public.orders")
            await conn.execute("ANALYZE public.customers")
            await conn.execute("ANALYZE public.order_lines")
        self._commit_model({int(r["id"]): r for r in rows})
        self.hot = self.live.items[: min(200, len(self.live))]

    # ------------------------------------------------------------------ connections
    async def _main(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn)
        return self._conn

    async def close(self) -> None:
        for h in self.holders:
            await h.conn.close()
        self.holders.clear()
        self.locked.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _resync(self, keys: set[int]) -> None:
        """After a connection error: the table says what was committed."""
        self.stats.uncertain += 1
        for attempt in range(60):
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
                    cur = await conn.execute(
                        sql.SQL("SELECT {} FROM public.orders WHERE id = ANY(%s)").format(
                            sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
                        ),
                        (sorted(keys),),
                    )
                    found = {
                        int(r[0]): dict(zip(COLUMNS, r, strict=True)) for r in await cur.fetchall()
                    }
                break
            except psycopg.OperationalError:
                await asyncio.sleep(0.5 + attempt * 0.1)
        else:
            raise RuntimeError("the workload cannot reach PostgreSQL for 30 s")
        self._commit_model({k: found.get(k) for k in keys})

    async def _resync_customers(self, keys: set[int]) -> None:
        """After a connection error on a customer write: the table says what was committed."""
        self.stats.uncertain += 1
        for attempt in range(60):
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
                    cur = await conn.execute(_C_SELECT + " WHERE id = ANY(%s)", (sorted(keys),))
                    found = {
                        int(r[0]): dict(zip(CUSTOMER_COLUMNS, r, strict=True))
                        for r in await cur.fetchall()
                    }
                break
            except psycopg.OperationalError:
                await asyncio.sleep(0.5 + attempt * 0.1)
        else:
            raise RuntimeError("the workload cannot reach PostgreSQL for 30 s")
        for k in keys:
            self._commit_customer(k, found.get(k))

    async def _customer_txn(self, key: int, row: Row) -> None:
        """Insert or update one customer in a transaction of its own."""
        conn = await self._main()
        try:
            async with conn.transaction():
                if key in self.customers:
                    await conn.execute(_C_UPDATE, (row["name"], row["rev"], key))
                else:
                    await conn.execute(_C_INSERT, (key, row["name"], row["rev"]))
        except psycopg.OperationalError:
            await self._drop_main()
            await self._resync_customers({key})
            return
        self._commit_customer(key, row)

    async def _customer_step(self) -> None:
        """A customer named by an order but not inserted yet is inserted (most often), or a
        committed customer is updated."""
        if self.pending_customers and (self.rng.random() < 0.7 or not self.customer_keys):
            for key in list(self.pending_customers[:3]):  # the oldest few, one txn each
                self.stats.customer_inserts += 1
                await self._customer_txn(key, self._new_customer(key))
            return
        if self.customer_keys:
            key = self.rng.choice(self.customer_keys)
            self.stats.customer_updates += 1
        else:
            return
        await self._customer_txn(key, self._new_customer(key))

    async def _line_step(self) -> None:
        """One transaction on order lines: 1-3 new lines of a live order (40 %), a line's
        quantity raised (30 %), a line moved to another live order (15 %) or deleted (15 %).
        A line picked may be gone (deleted, or with its order): the statement changes nothing.
        A line written for an order deleted meanwhile fails on the foreign key: rolled back."""
        r = self.rng.random()
        qty = self.rng.randint(1, 99)
        picked = self.rng.randrange(1, self.next_line) if self.next_line > 1 else 0
        if r < 0.4 or not picked:
            order = self._pick_live()
            if order is None:
                return
            ids = list(range(self.next_line, self.next_line + self.rng.randint(1, 3)))
            self.next_line += len(ids)
            stmts = [
                (
                    "INSERT INTO public.order_lines (id, order_id, product, qty)"
                    " VALUES (%s, %s, %s, %s)",
                    (i, order, f"p{i}", qty),
                )
                for i in ids
            ]
        elif r < 0.7:  # a line's quantity only grows: the history check reads an older set
            # written after a newer one as a quantity that went down (checker.check_line_history)
            step = self.rng.randint(1, 9)
            stmts = [("UPDATE public.order_lines SET qty = qty + %s WHERE id = %s", (step, picked))]
        elif r < 0.85:
            order = self._pick_live()
            if order is None:
                return
            stmts = [("UPDATE public.order_lines SET order_id = %s WHERE id = %s", (order, picked))]
        else:
            stmts = [("DELETE FROM public.order_lines WHERE id = %s", (picked,))]
        conn = await self._main()
        self.stats.line_writes += 1
        try:
            async with conn.transaction():
                for q, params in stmts:
                    await conn.execute(q, params)
        except psycopg.OperationalError:
            await self._drop_main()
        except psycopg.errors.ForeignKeyViolation:
            pass  # the order was deleted by a transaction committed since it was picked

    async def _insert_pending_customers(self) -> None:
        """At the end of a run: every customer an order named exists (a connection error
        leaves a customer pending; it is tried again, up to 20 passes)."""
        for _ in range(20):
            for key in list(self.pending_customers):
                self.stats.customer_inserts += 1
                await self._customer_txn(key, self._new_customer(key))
            if not self.pending_customers:
                return
        raise RuntimeError(f"customers still not inserted: {self.pending_customers[:10]}")

    # ------------------------------------------------------------------ operations
    async def _write(
        self, conn: psycopg.AsyncConnection[Any], key: int, row: Row | None, *, exists: bool
    ) -> None:
        if row is None:
            await conn.execute("DELETE FROM public.orders WHERE id = %s", (key,))
        elif exists:
            await conn.execute(_UPDATE, [*(row[c] for c in COLUMNS if c != "id"), key])
        else:
            await conn.execute(_INSERT, [row[c] for c in COLUMNS])

    def _plan_writes(self, n: int) -> dict[int, Row | None]:
        """``n`` writes on distinct keys (updates mostly, some inserts and deletes)."""
        writes: dict[int, Row | None] = {}
        for _ in range(n):
            r = self.rng.random()
            if r < 0.2:
                k = self.next_id
                self.next_id += 1
                writes[k] = self._new_row(k)
                self.stats.inserts += 1
                continue
            k_or_none = self._pick_live()
            if k_or_none is None or k_or_none in writes:
                continue
            if r < 0.9:
                writes[k_or_none] = self._new_row(k_or_none)
                self.stats.updates += 1
            else:
                writes[k_or_none] = None
                self.stats.deletes += 1
        return writes

    async def _txn(self, writes: dict[int, Row | None], *, rollback: bool = False) -> None:
        conn = await self._main()
        try:
            async with conn.transaction() as tx:
                for k, row in writes.items():
                    await self._write(conn, k, row, exists=k in self.live)
                if rollback:
                    raise psycopg.Rollback(tx)
        except psycopg.OperationalError:
            await self._drop_main()
            await self._resync(set(writes))
            return
        if not rollback:
            self._commit_model(writes, at=time.time())

    async def _drop_main(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def _clamp(self, i: int, close_at: int) -> int:
        for r in self.restart_points:
            if i < r <= close_at:
                return r - 1
        return close_at

    async def _open_holder(self, i: int, kind: str, close_at: int, commit: bool) -> None:
        close_at = self._clamp(i, close_at)
        n = 1 if kind == "out_of_order" else self.rng.randint(1, 3)
        writes: dict[int, Row] = {}
        for _ in range(n):
            if self.rng.random() < 0.25:
                k = self.next_id
                self.next_id += 1
            else:
                k_or_none = self._pick_live()
                if k_or_none is None:
                    continue
                k = k_or_none
            if k not in writes:
                writes[k] = self._new_row(k)
        if close_at <= i or not writes:
            return
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn)
            for k, row in writes.items():
                await self._write(conn, k, row, exists=k in self.live)
        except psycopg.OperationalError:
            self.stats.uncertain += 1  # never committed: nothing to record
            return
        self.locked |= set(writes)
        self.holders.append(Holder(conn, close_at, commit, writes, kind))
        if kind == "out_of_order":
            self.stats.out_of_order += 1
        else:
            self.stats.long_open += 1

    async def _close_holders(self, i: int, *, all_: bool = False) -> None:
        for h in [h for h in self.holders if all_ or h.close_at <= i]:
            self.holders.remove(h)
            self.locked -= set(h.writes)
            try:
                if h.commit:
                    await h.conn.commit()
                else:
                    await h.conn.rollback()
                    self.stats.rollbacks += 1
            except psycopg.OperationalError:
                await self._resync(set(h.writes))
                continue
            finally:
                await h.conn.close()
            if h.commit:
                self._commit_model(dict(h.writes), at=time.time())

    async def _mass_update(self, n: int) -> None:
        note = f"batch {n} of seed {self.seed}"
        locked = sorted(self.locked)
        conn = await self._main()
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE public.orders SET rev = rev + 1, notes = %s WHERE id <> ALL(%s)",
                    (note, locked),
                )
        except psycopg.OperationalError:
            await self._drop_main()
            await self._resync(set(self.live.items))
            return
        at = time.time()
        for k in list(self.live.items):
            if k in self.locked:
                continue
            slot = self.slots[k]
            assert slot.row is not None
            row = dict(slot.row, rev=int(slot.row["rev"]) + 1, notes=note)
            slot.row = row
            slot.max_rev = max(slot.max_rev, int(row["rev"]))
            if invalid_reason(row) is None:
                self.committed_at.append((at, k, int(row["rev"])))
        self.stats.mass_updates += 1
        self.stats.row_writes += len(self.live) - len(locked)
        if self.on_mass_update is not None:
            self.on_mass_update(n)

    async def step(self, i: int) -> None:
        """Operation number ``i``."""
        self.stats.ops += 1
        if i in self.restart_points:
            await self._close_holders(i, all_=True)  # none by construction (see _clamp)
            if self.restart_hook is not None:
                await self._drop_main()
                await self.restart_hook(i)
        await self._close_holders(i)
        if self.mass_update_every and i > 0 and i % self.mass_update_every == 0:
            await self._mass_update(i // self.mass_update_every)
            return
        if self.rng.random() < 0.06:
            await self._customer_step()
            return
        if self.rng.random() < 0.06:
            await self._line_step()
            return
        r = self.rng.random()
        if r < 0.25:
            k = self.next_id
            self.next_id += 1
            self.stats.inserts += 1
            await self._txn({k: self._new_row(k)})
        elif r < 0.65:
            k_or_none = self._pick_live()
            if k_or_none is not None:
                self.stats.updates += 1
                await self._txn({k_or_none: self._new_row(k_or_none)})
        elif r < 0.73:
            k_or_none = self._pick_live()
            if k_or_none is not None:
                self.stats.deletes += 1
                await self._txn({k_or_none: None})
        elif r < 0.77:
            if len(self.deleted):
                k = self.deleted.choice(self.rng)
                self.stats.reinserts += 1
                await self._txn({k: self._new_row(k)})
        elif r < 0.87:
            self.stats.multi_row += 1
            await self._txn(self._plan_writes(self.rng.randint(2, 5)))
        elif r < 0.92:
            self.stats.rollbacks += 1
            await self._txn(self._plan_writes(self.rng.randint(1, 3)), rollback=True)
        elif r < 0.96:
            if len(self.holders) < 4:
                await self._open_holder(i, "out_of_order", i + self.rng.randint(1, 3), True)
        elif len(self.holders) < 4:
            life = self.rng.randint(100, 400)
            await self._open_holder(i, "long", i + life, self.rng.random() < 0.9)

    async def run(self, ops: int, stop: asyncio.Event | None = None) -> int:
        """``ops`` operations at ``rate`` per second (catching up after a pause: the same
        operations whatever the timing); then every open transaction is closed as planned.
        Returns the operations run."""
        start = time.monotonic()
        i = 0
        try:
            while i < ops and not (stop and stop.is_set()):
                await self.step(i)
                i += 1
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            # finish the open transactions as they were planned (commit or roll back)
            await self._close_holders(i, all_=True)
            await self._insert_pending_customers()
        finally:
            await self.close()
        return i

    async def table_rows(self) -> dict[int, Row]:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(
                sql.SQL("SELECT {} FROM public.orders").format(
                    sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
                )
            )
            return {int(r[0]): dict(zip(COLUMNS, r, strict=True)) for r in await cur.fetchall()}

    async def table_customers(self) -> dict[int, Row]:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(_C_SELECT)
            return {
                int(r[0]): dict(zip(CUSTOMER_COLUMNS, r, strict=True)) for r in await cur.fetchall()
            }

    async def table_lines(self) -> dict[int, list[tuple[str, int]]]:
        """Each order's lines (product, qty) in line-key order, from the table."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(
                "SELECT order_id, product, qty FROM public.order_lines"
                " WHERE order_id IS NOT NULL ORDER BY order_id, id"
            )
            out: dict[int, list[tuple[str, int]]] = {}
            for order, product, qty in await cur.fetchall():
                out.setdefault(int(order), []).append((str(product), int(qty)))
            return out
