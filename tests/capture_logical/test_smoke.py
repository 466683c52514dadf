from __future__ import annotations

from connector.capture import logical

from .helpers import ORDERS_DDL, SCHEMA, installed, pipeline, running, wait_rows


async def test_insert_update_delete_roundtrip(database: str) -> None:
    cfg = pipeline()
    async with installed(database, cfg, ORDERS_DDL) as conn:
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
