"""Trigger-mode capture against a real PostgreSQL: events, images, refusals, privileges."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector import outbox
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.errors import ConfigError
from connector.events import ChangeEvent, Op

SCHEMA = "connector"


def make_pipeline(**kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {
        "name": "orders",
        "source_table": "orders",
        "key_column": "id",
        "module": "Orders",
        "fields": {"status": "Status", "amount": "Amount"},
    }
    base.update(kw)
    return PipelineConfig(**base)


ORDERS_DDL = (
    "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(38,10),"
    " note text, updated_at timestamptz DEFAULT now())"
)


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def read_all(conn: psycopg.AsyncConnection[Any], name: str = "orders") -> list[ChangeEvent]:
    events, _ = await outbox.read_batch(conn, SCHEMA, name, outbox.START, limit=100_000)
    return events


@pytest.fixture
async def orders(database: str) -> Any:
    async with await connect(database) as conn:
        await conn.execute(ORDERS_DDL)
        p = make_pipeline()
        await triggers.install(conn, SCHEMA, p)
        yield conn, p


async def test_install_twice_is_a_noop_and_uninstall_removes_everything(orders: Any) -> None:
    conn, p = orders
    assert await triggers.is_installed(conn, SCHEMA, p)
    await triggers.install(conn, SCHEMA, p)
    cur = await conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal"
    )
    assert (await cur.fetchone())[0] == 2  # the row trigger and the TRUNCATE trigger
    await conn.execute("INSERT INTO orders (id, status) VALUES (1, 'x')")
    assert len(await read_all(conn)) == 1  # one event, not two
    cur = await conn.execute("SELECT mode FROM connector.capture_state WHERE pipeline = 'orders'")
    assert (await cur.fetchone())[0] == "triggers"

    await triggers.uninstall(conn, SCHEMA, p)
    await triggers.uninstall(conn, SCHEMA, p)  # idempotent
    assert not await triggers.is_installed(conn, SCHEMA, p)
    cur = await conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal"
    )
    assert (await cur.fetchone())[0] == 0
    cur = await conn.execute(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'connector' AND p.proname = ANY(%s)",
        ([triggers.function_name(p), triggers.truncate_function_name(p)],),
    )
    assert (await cur.fetchone())[0] == 0
    cur = await conn.execute("SELECT count(*) FROM connector.capture_state")
    assert (await cur.fetchone())[0] == 0
    await conn.execute("INSERT INTO orders (id, status) VALUES (2, 'y')")
    assert len(await read_all(conn)) == 1  # nothing new captured
    # uninstall also works when the table is gone
    await conn.execute("DROP TABLE orders")
    await triggers.uninstall(conn, SCHEMA, p)
    assert not await triggers.is_installed(conn, SCHEMA, p)


async def test_reinstall_applies_new_ignore_columns(orders: Any) -> None:
    conn, _ = orders
    await conn.execute("INSERT INTO orders (id, status, note) VALUES (1, 'new', 'a')")
    await triggers.install(conn, SCHEMA, make_pipeline(ignore_columns=("note",)))
    await conn.execute("UPDATE orders SET note = 'b' WHERE id = 1")
    assert [e.op for e in await read_all(conn)] == [Op.INSERT]


REFUSALS: list[tuple[str | None, dict[str, Any], str, str]] = [
    (None, {}, "pipelines['orders'].source_table", "does not exist"),
    (ORDERS_DDL, {"key_column": "nope"}, "pipelines['orders'].key_column", "does not exist"),
    (
        ORDERS_DDL,
        {"fields": {"status": "Status", "missing_col": "X"}},
        "pipelines['orders'].fields['missing_col']",
        "does not exist",
    ),
    (
        ORDERS_DDL,
        {"ignore_columns": ("ghost",)},
        "pipelines['orders'].ignore_columns",
        "does not exist",
    ),
    (
        "CREATE TABLE orders (id bigint, status text, amount numeric)",
        {},
        "pipelines['orders'].key_column",
        "unique index",
    ),
    (
        "CREATE TABLE orders (id bigint, status text, amount numeric, UNIQUE (id, status))",
        {},
        "pipelines['orders'].key_column",
        "unique index",
    ),
    (
        "CREATE TABLE orders (id bigint, status text, amount numeric);"
        " CREATE UNIQUE INDEX ON orders (id) WHERE status <> 'x'",
        {},
        "pipelines['orders'].key_column",
        "unique index",
    ),
    (
        "CREATE TABLE base (id bigint PRIMARY KEY, status text, amount numeric);"
        " CREATE VIEW orders AS SELECT * FROM base",
        {},
        "pipelines['orders'].source_table",
        "not a table",
    ),
]


async def test_install_refuses_bad_configuration(database: str) -> None:
    """Each refusal in turn, on one database (the tables of a case are dropped after it)."""
    async with await connect(database) as conn:
        for ddl, kw, key, words in REFUSALS:
            if ddl:
                await conn.execute(ddl)
            p = make_pipeline(**kw)
            with pytest.raises(ConfigError) as exc:
                await triggers.install(conn, SCHEMA, p)
            assert exc.value.key == key, ddl
            assert words in str(exc.value), ddl
            cur = await conn.execute(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'connector'"
            )
            assert (await cur.fetchone())[0] == 0, ddl  # nothing left behind
            # base's CASCADE takes the view of the last case
            await conn.execute("DROP TABLE IF EXISTS base CASCADE; DROP TABLE IF EXISTS orders")


async def test_hostile_identifiers(database: str) -> None:
    table = 'Ord"ers; DROP TABLE x'
    async with await connect(database) as conn:
        await conn.execute("CREATE TABLE x (i int)")
        await conn.execute('CREATE SCHEMA "we\'ird"')
        await conn.execute(
            sql.SQL("CREATE TABLE {} ({} bigint PRIMARY KEY, {} text)").format(
                sql.Identifier("we'ird", table), sql.Identifier('i"d'), sql.Identifier("no'te")
            )
        )
        p = make_pipeline(
            source_table=f"we'ird.{table}",
            key_column='i"d',
            fields={"no'te": "Note"},
        )
        await triggers.install(conn, SCHEMA, p)
        assert await triggers.is_installed(conn, SCHEMA, p)
        t = sql.Identifier("we'ird", table)
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'it''s \"quoted\"')").format(t))
        await conn.execute(sql.SQL("UPDATE {} SET {} = 2").format(t, sql.Identifier('i"d')))
        events = await read_all(conn)
        assert [(e.op, e.key) for e in events] == [
            (Op.INSERT, "1"),
            (Op.DELETE, "1"),
            (Op.INSERT, "2"),
        ]
        assert events[0].row == {'i"d': 1, "no'te": 'it\'s "quoted"'}
        await triggers.uninstall(conn, SCHEMA, p)
        assert not await triggers.is_installed(conn, SCHEMA, p)
        cur = await conn.execute("SELECT to_regclass('x') IS NOT NULL")
        assert (await cur.fetchone())[0]


async def test_the_watcher_wakes_on_committed_rows_only(orders: Any) -> None:
    conn, _ = orders
    position = outbox.START

    async with outbox.OutboxWatcher(
        conn.info.dsn, SCHEMA, "orders", lambda: position, min_interval=0.01, max_interval=0.08
    ) as watcher:
        assert not await watcher.wait(0.1)
        while watcher.polls < 4:
            await watcher.wait(0.05)
        assert watcher.interval == 0.08  # idle: backed off to the bound, not beyond
        async with await connect(conn.info.dsn) as w:
            await w.set_autocommit(False)
            await w.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
            assert not await watcher.wait(0.3)  # not committed: nothing to read yet
            await w.commit()
        assert await watcher.wait(10)
        events, position = await outbox.read_batch(conn, SCHEMA, "orders", position)
        assert [e.key for e in events] == ["1"]
        # a poll that started before the read may still wake the reader once (harmless); any
        # poll that starts after it finds nothing unread
        n = watcher.polls
        while watcher.polls < n + 2:
            watcher.event.clear()
            await asyncio.sleep(0.01)
        assert not await watcher.wait(0.3)
        # another pipeline's rows do not wake it
        await conn.execute(
            "INSERT INTO connector.outbox (pipeline, op, key, version) VALUES ('other', 'insert',"
            " '9', 1)"
        )
        assert not await watcher.wait(0.3)
