"""Trigger-mode capture against a real PostgreSQL: events, images, refusals, privileges."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
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


async def test_insert_update_delete_are_captured(orders: Any) -> None:
    conn, _ = orders
    await conn.execute("INSERT INTO orders (id, status, amount) VALUES (1, 'new', 10.5)")
    await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
    await conn.execute("DELETE FROM orders WHERE id = 1")
    events = await read_all(conn)
    assert [(e.op, e.key) for e in events] == [
        (Op.INSERT, "1"),
        (Op.UPDATE, "1"),
        (Op.DELETE, "1"),
    ]
    assert all(e.version == e.offset for e in events)
    assert events[0].version < events[1].version < events[2].version
    assert events[1].row is not None and events[1].row["status"] == "paid"
    assert events[2].row is not None and events[2].row["status"] == "paid"  # old image
    assert events[0].row is not None and events[0].row["amount"] == Decimal("10.5")
    cur = await conn.execute("SELECT txid = source_xid FROM connector.outbox")
    assert all(r[0] for r in await cur.fetchall())


async def test_noop_and_ignored_column_updates_emit_nothing(database: str) -> None:
    async with await connect(database) as conn:
        await conn.execute(ORDERS_DDL)
        p = make_pipeline(ignore_columns=("note", "updated_at"))
        await triggers.install(conn, SCHEMA, p)
        await conn.execute("INSERT INTO orders (id, status, note) VALUES (1, 'new', 'a')")
        await conn.execute("UPDATE orders SET status = status WHERE id = 1")  # no change
        await conn.execute("UPDATE orders SET note = 'b', updated_at = now() WHERE id = 1")
        await conn.execute("UPDATE orders SET amount = NULL WHERE id = 1")  # NULL -> NULL
        await conn.execute("UPDATE orders SET status = 'paid', note = 'c' WHERE id = 1")
        events = await read_all(conn)
        assert [e.op for e in events] == [Op.INSERT, Op.UPDATE]
        assert events[1].row is not None
        assert events[1].row["status"] == "paid" and events[1].row["note"] == "c"


async def test_key_change_is_delete_then_insert(orders: Any) -> None:
    conn, _ = orders
    await conn.execute("INSERT INTO orders (id, status) VALUES (1, 'new')")
    await conn.execute("UPDATE orders SET id = 2, status = 'moved' WHERE id = 1")
    events = await read_all(conn)
    assert [(e.op, e.key) for e in events] == [
        (Op.INSERT, "1"),
        (Op.DELETE, "1"),
        (Op.INSERT, "2"),
    ]
    assert events[1].row is not None and events[1].row["status"] == "new"
    assert events[2].row is not None and events[2].row["status"] == "moved"
    assert events[1].version < events[2].version


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


@pytest.mark.parametrize(
    ("ddl", "kw", "key", "words"),
    [
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
    ],
)
async def test_install_refuses_bad_configuration(
    database: str, ddl: str | None, kw: dict[str, Any], key: str, words: str
) -> None:
    async with await connect(database) as conn:
        if ddl:
            await conn.execute(ddl)
        p = make_pipeline(**kw)
        with pytest.raises(ConfigError) as exc:
            await triggers.install(conn, SCHEMA, p)
        assert exc.value.key == key
        assert words in str(exc.value)
        cur = await conn.execute(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'connector'"
        )
        assert (await cur.fetchone())[0] == 0  # nothing left behind


async def test_unique_index_without_primary_key_is_accepted(database: str) -> None:
    async with await connect(database) as conn:
        await conn.execute(
            "CREATE TABLE orders (id bigint, status text, amount numeric);"
            " CREATE UNIQUE INDEX ON orders (id)"
        )
        p = make_pipeline()
        await triggers.install(conn, SCHEMA, p)
        await conn.execute("INSERT INTO orders VALUES (1, 'a', 1), (NULL, 'no key', 2)")
        await conn.execute("UPDATE orders SET id = 3 WHERE id IS NULL")  # NULL -> key: insert
        await conn.execute("UPDATE orders SET id = NULL WHERE id = 1")  # key -> NULL: delete
        events = await read_all(conn)
        assert [(e.op, e.key) for e in events] == [
            (Op.INSERT, "1"),
            (Op.INSERT, "3"),
            (Op.DELETE, "1"),
        ]


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


async def test_awkward_values_round_trip(database: str) -> None:
    async with await connect(database) as conn:
        await conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(38,10),"
            " at timestamptz, naive timestamp, day date, flag boolean, doc jsonb, tags text[],"
            " nums int[], raw bytea, big text, ratio float8, span interval)"
        )
        await triggers.install(conn, SCHEMA, make_pipeline())
        big = "é" * 300_000 + "x" * 400_000  # ~1 MB of UTF-8
        writer = await connect(database)
        # the writer's session settings must not change the images
        await writer.execute(
            "SET TimeZone = 'Asia/Kolkata'; SET IntervalStyle = 'iso_8601';"
            " SET bytea_output = 'escape'; SET extra_float_digits = 3"
        )
        rows = [
            (
                1,
                "😀 emoji and RTL: مرحبا بالعالم שלום",
                Decimal("1234567890123456789012345678.0123456789"),
                "2024-01-02 03:04:05.123456+05:30",
                "2024-02-29 23:59:59.999999",
                "2024-02-29",
                True,
                '{"a": [1, 2.50, null, "😀"], "b": {"c": 1e-7}}',
                ["a", None, 'q"uote', "ü"],
                [1, None, 3],
                b"\x00\xff\x10'\\",
                big,
                0.1,
                "1 day 02:03:04.5",
            ),
            (2, None, None, None, None, None, None, None, None, None, None, None, None, None),
            (
                3,
                "",
                Decimal("-0.0000000001"),
                "infinity",
                "-infinity",
                "0001-01-01",
                False,
                "null",
                [],
                [],
                b"",
                "",
                -1e308,
                "-1 mons",
            ),
        ]
        for r in rows:
            await writer.execute(
                "INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s,"
                " %s, %s, %s)",
                r,
            )
        await writer.execute("UPDATE orders SET status = 'changed' WHERE id = 1")  # big unchanged
        await writer.close()
        events = await read_all(conn)
        assert [(e.op, e.key) for e in events] == [
            (Op.INSERT, "1"),
            (Op.INSERT, "2"),
            (Op.INSERT, "3"),
            (Op.UPDATE, "1"),
        ]
        await conn.execute("SET TimeZone = 'UTC'")
        cur = await conn.execute(
            "SELECT o.id, o.row::text = to_jsonb(t)::text, to_jsonb(t)::text"
            " FROM connector.outbox o JOIN orders t ON t.id::text = o.key"
            " WHERE o.id IN (SELECT max(id) FROM connector.outbox GROUP BY key) ORDER BY o.id"
        )
        checked = await cur.fetchall()
        assert len(checked) == 3
        for _, same, direct in checked:
            assert same
        direct_by_key = {str(outbox.load_row(d)["id"]): outbox.load_row(d) for _, _, d in checked}
        latest = {e.key: e for e in events}
        for key, ev in latest.items():
            assert ev.row == direct_by_key[key]
        row1 = latest["1"].row
        assert row1 is not None
        assert row1["big"] == big
        assert row1["amount"] == Decimal("1234567890123456789012345678.0123456789")
        assert str(row1["amount"]) == "1234567890123456789012345678.0123456789"
        assert row1["at"] == "2024-01-01T21:34:05.123456+00:00"
        assert row1["day"] == "2024-02-29"
        assert row1["raw"] == "\\x00ff10275c"
        assert row1["tags"] == ["a", None, 'q"uote', "ü"]
        assert row1["doc"] == {"a": [1, Decimal("2.50"), None, "😀"], "b": {"c": Decimal("1E-7")}}
        assert row1["span"] == "1 day 02:03:04.5"
        assert row1["ratio"] == Decimal("0.1")
        assert latest["2"].row == {
            "id": 2,
            **{k: None for k in direct_by_key["2"] if k != "id"},
        }
        assert latest["3"].row is not None and latest["3"].row["amount"] == Decimal("-1E-10")


async def test_add_column_while_capturing(orders: Any) -> None:
    conn, _ = orders
    other = await connect(conn.info.dsn)
    try:
        await conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
        # a session that already ran the trigger (cached plan) keeps capturing correctly
        await other.execute("INSERT INTO orders (id, status) VALUES (2, 'b')")
        await conn.execute("ALTER TABLE orders ADD COLUMN channel text DEFAULT 'web'")
        await other.execute("UPDATE orders SET status = 'c' WHERE id = 2")
        await conn.execute("INSERT INTO orders (id, status, channel) VALUES (3, 'd', 'shop')")
        await conn.execute("ALTER TABLE orders DROP COLUMN note")
        await other.execute("UPDATE orders SET channel = 'phone' WHERE id = 1")
    finally:
        await other.close()
    events = await read_all(conn)
    rows = [e.row for e in events]
    assert all(r is not None for r in rows)
    assert "channel" not in rows[0] and "channel" not in rows[1]  # type: ignore[operator]
    assert rows[2]["channel"] == "web"  # type: ignore[index]
    assert rows[3]["channel"] == "shop"  # type: ignore[index]
    assert rows[4]["channel"] == "phone" and "note" not in rows[4]  # type: ignore[index,operator]


async def test_application_role_needs_no_privilege_on_the_state_schema(
    orders: Any,
) -> None:
    conn, _ = orders
    role = f"app_{uuid.uuid4().hex[:8]}"
    await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        await conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {}").format(
                sql.Identifier(role)
            )
        )
        info = psycopg.conninfo.conninfo_to_dict(conn.info.dsn)
        info["user"] = role
        async with await connect(psycopg.conninfo.make_conninfo(**info)) as app:  # type: ignore[arg-type]
            # a hostile search_path and time zone in the application session change nothing
            await app.execute("SET search_path = pg_temp, public; SET TimeZone = 'America/Lima'")
            await app.execute(
                "INSERT INTO orders (id, status, updated_at) VALUES (7, 'x', '2024-05-05 10:00Z')"
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute("SELECT * FROM connector.outbox")
        events = await read_all(conn)
        assert [(e.op, e.key) for e in events] == [(Op.INSERT, "7")]
        assert events[0].row is not None
        assert events[0].row["updated_at"] == "2024-05-05T10:00:00+00:00"
    finally:
        await conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_the_trigger_sends_no_notify(orders: Any) -> None:
    """No NOTIFY inside the application's transaction (DESIGN.md invariant 9): it would make
    PREPARE TRANSACTION fail and serialise every commit on the notify queue's lock."""
    conn, _ = orders
    await conn.execute("LISTEN connector_outbox")
    await conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
    got = [n async for n in conn.notifies(timeout=0.3)]
    assert got == []
    cur = await conn.execute(
        "SELECT prosrc FROM pg_proc WHERE proname = 'capture_orders'"
        " AND pronamespace = 'connector'::regnamespace"
    )
    row = await cur.fetchone()
    assert row is not None and "notify" not in row[0].lower()


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
