"""A DEFERRABLE primary key is not a replica identity (PostgreSQL uses only an immediate primary
key by default): `init` in logical mode must refuse it with the fix, install nothing, and leave
the legacy application's UPDATE/DELETE working (DESIGN.md invariant 9). The two fixes it names
are accepted and capture updates and deletes."""

from __future__ import annotations

import psycopg
import pytest

from connector.capture import logical
from connector.errors import ConfigError

from .helpers import SCHEMA, installed, pipeline, running, wait_rows

DEFERRABLE = "CREATE TABLE orders (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text)"


async def test_init_refuses_a_deferrable_primary_key(database: str) -> None:
    cfg = pipeline()
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(DEFERRABLE)
        await conn.execute("INSERT INTO orders VALUES (1, 'a'), (2, 'b')")
        with pytest.raises(ConfigError) as info:
            await logical.install(conn, SCHEMA, cfg)
        text = str(info.value)
        assert "DEFERRABLE" in text and "capture" in text
        assert "REPLICA IDENTITY USING INDEX" in text and "REPLICA IDENTITY FULL" in text
        # nothing installed, and the application still updates, deletes and swaps keys
        cur = await conn.execute("SELECT count(*) FROM pg_publication")
        assert (await cur.fetchone()) == (0,)
        cur = await conn.execute("SELECT count(*) FROM pg_replication_slots")
        assert (await cur.fetchone()) == (0,)
        await conn.execute("UPDATE orders SET id = 3 - id")  # a key swap: needs DEFERRABLE
        await conn.execute("DELETE FROM orders WHERE id = 1")
        cur = await conn.execute("SELECT id, v FROM orders")
        assert await cur.fetchall() == [(2, "a")]


@pytest.mark.parametrize(
    "fix",
    [
        "ALTER TABLE orders REPLICA IDENTITY FULL",
        "CREATE UNIQUE INDEX orders_id_immediate ON orders (id);"
        " ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_id_immediate",
    ],
)
async def test_the_named_fixes_are_accepted(database: str, fix: str) -> None:
    cfg = pipeline()
    async with installed(database, cfg, DEFERRABLE, fix) as conn:
        async with running(logical.LogicalCapture(database, SCHEMA, cfg, flush_interval=0.02)):
            await conn.execute("INSERT INTO orders VALUES (1, 'a'), (2, 'b')")
            await conn.execute("UPDATE orders SET v = 'b2' WHERE id = 2")
            await conn.execute("DELETE FROM orders WHERE id = 1")
            rows = await wait_rows(database, 4)
        assert [(r["op"], r["key"]) for r in rows] == [
            ("insert", "1"),
            ("insert", "2"),
            ("update", "2"),
            ("delete", "1"),
        ]
