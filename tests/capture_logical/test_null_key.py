"""Logical capture of a row whose key column is NULL: a MISSING_KEY dead letter written in the
outbox transaction of its batch (invariant 8); the rows around it are captured as usual, a later
update that sets the key is an insert."""

from __future__ import annotations

from connector.capture import logical
from tests.capture.helpers import assert_missing_key_letters, stream_order

from .helpers import SCHEMA, dead_letters_of, installed, pipeline, running, wait_for, wait_rows


async def test_a_null_key_row_is_dead_lettered_and_capture_goes_on(database: str) -> None:
    cfg = pipeline(fields=("v", "w"))
    # a nullable unique key: the replica identity must be FULL to carry it
    async with installed(
        database,
        cfg,
        "CREATE TABLE orders (id bigint UNIQUE, v text, w int)",
        "ALTER TABLE orders REPLICA IDENTITY FULL",
    ) as conn:
        async with running(logical.LogicalCapture(database, SCHEMA, cfg)):
            await conn.execute("INSERT INTO orders VALUES (1, 'a', 1), (NULL, 'b', 2), (3, 'c', 3)")
            await conn.execute("UPDATE orders SET v = 'b2' WHERE id IS NULL")
            await conn.execute("UPDATE orders SET id = 2 WHERE id IS NULL")
            await conn.execute("UPDATE orders SET id = NULL WHERE id = 3")
            await conn.execute("INSERT INTO orders VALUES (4, 'd', 4)")
            rows = await wait_rows(database, 5)

            async def three_letters() -> bool:
                return len(await dead_letters_of(database)) >= 3

            await wait_for(three_letters, "3 dead letters")
        letters = await dead_letters_of(database)
    assert [(r["op"], r["key"]) for r in rows] == [
        ("insert", "1"),
        ("insert", "3"),
        ("insert", "2"),
        ("delete", "3"),
        ("insert", "4"),
    ]
    assert_missing_key_letters(
        letters,
        [
            {"id": None, "v": "b", "w": 2},
            {"id": None, "v": "b2", "w": 2},
            {"id": None, "v": "c", "w": 3},
        ],
    )
    rows_by_version = [(r["version"], f"{r['op']}:{r['key']}") for r in rows]
    assert stream_order(rows_by_version, letters, "v") == [
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
