from __future__ import annotations

import psycopg

from connector.capture import logical

from .helpers import SCHEMA, cleanup, pipeline, running, wait_rows


async def test_insert_update_delete_roundtrip(database: str) -> None:
    cfg = pipeline()
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
        await logical.install(conn, SCHEMA, cfg)
        try:
            cap = logical.LogicalCapture(database, SCHEMA, cfg)
            async with running(cap):
                await conn.execute("INSERT INTO orders VALUES (1, 'a'), (2, NULL)")
                await conn.execute("UPDATE orders SET v = 'b' WHERE id = 1")
                await conn.execute("DELETE FROM orders WHERE id = 2")
                rows = await wait_rows(database, 4)
            assert [(r["op"], r["key"], r["row"]) for r in rows] == [
                ("insert", "1", {"id": 1, "v": "a"}),
                ("insert", "2", {"id": 2, "v": None}),
                ("update", "1", {"id": 1, "v": "b"}),
                ("delete", "2", {"id": 2}),
            ]
            assert all(r["id"] == r["version"] for r in rows)
        finally:
            await cleanup(database, cfg)
