"""Logical capture of a row whose key column is NULL: a MISSING_KEY dead letter written in the
outbox transaction of its batch (invariant 8); the rows around it are captured as usual, a later
update that sets the key is an insert."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from connector.capture import logical

from .helpers import SCHEMA, cleanup, pipeline, running, wait_for, wait_rows


async def dead_letters(dsn: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT pipeline, key, version, source_xid::text AS source_xid, payload, error_code,"
            " error_field, error_message, status FROM connector.dead_letters ORDER BY id"
        )
        return await cur.fetchall()


async def test_a_null_key_row_is_dead_lettered_and_capture_goes_on(database: str) -> None:
    cfg = pipeline(fields=("v", "w"))
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        # a nullable unique key: the replica identity must be FULL to carry it
        await conn.execute("CREATE TABLE orders (id bigint UNIQUE, v text, w int)")
        await conn.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
        await logical.install(conn, SCHEMA, cfg)
        try:
            cap = logical.LogicalCapture(database, SCHEMA, cfg)
            async with running(cap):
                await conn.execute(
                    "INSERT INTO orders VALUES (1, 'a', 1), (NULL, 'b', 2), (3, 'c', 3)"
                )
                await conn.execute("UPDATE orders SET v = 'b2' WHERE id IS NULL")
                await conn.execute("UPDATE orders SET id = 2 WHERE id IS NULL")
                await conn.execute("UPDATE orders SET id = NULL WHERE id = 3")
                await conn.execute("INSERT INTO orders VALUES (4, 'd', 4)")
                rows = await wait_rows(database, 5)

                async def three_letters() -> bool:
                    return len(await dead_letters(database)) >= 3

                await wait_for(three_letters, "3 dead letters")
            letters = await dead_letters(database)
        finally:
            await cleanup(database, cfg)
    assert [(r["op"], r["key"]) for r in rows] == [
        ("insert", "1"),
        ("insert", "3"),
        ("insert", "2"),
        ("delete", "3"),
        ("insert", "4"),
    ]
    assert [(d["key"], d["error_code"], d["status"], d["pipeline"]) for d in letters] == [
        ("", "MISSING_KEY", "open", "orders")
    ] * 3
    assert [d["payload"] for d in letters] == [
        {"id": None, "v": "b", "w": 2},
        {"id": None, "v": "b2", "w": 2},
        {"id": None, "v": "c", "w": 3},
    ]
    for d in letters:
        assert "'id'" in d["error_message"] and "NULL" in d["error_message"]
        assert d["error_field"] == "parent_id"
        assert d["source_xid"] is not None
    by_version = sorted(
        [(r["version"], f"{r['op']}:{r['key']}") for r in rows]
        + [(d["version"], f"dead:{d['payload']['v']}") for d in letters]
    )
    assert [name for _, name in by_version] == [
        "insert:1",
        "dead:b",
        "insert:3",
        "dead:b2",
        "insert:2",
        "delete:3",
        "dead:c",
        "insert:4",
    ]
    # the dead letters carry the source transaction of their row, as outbox rows do
    xids = {r["key"]: r["source_xid"] for r in rows if r["op"] == "insert"}
    assert letters[0]["source_xid"] == xids["1"] == xids["3"]
