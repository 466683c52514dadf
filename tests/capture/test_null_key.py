"""Trigger capture of a row whose key column is NULL: a MISSING_KEY dead letter (invariant 8),
written by the trigger in the legacy transaction; a later update that sets the key is an insert;
the rows around it are captured as usual."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from connector.capture import triggers
from connector.events import Op

from .test_triggers import SCHEMA, connect, make_pipeline, read_all

NULLABLE_KEY_DDL = "CREATE TABLE orders (id bigint UNIQUE, status text, amount numeric)"


async def dead_letters(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT pipeline, key, version, source_xid::text AS source_xid, payload, error_code,"
        " error_field, error_message, status FROM connector.dead_letters ORDER BY id"
    )
    return await cur.fetchall()


async def test_a_null_key_row_is_dead_lettered_and_capture_goes_on(database: str) -> None:
    async with await connect(database) as conn:
        await conn.execute(NULLABLE_KEY_DDL)
        await triggers.install(conn, SCHEMA, make_pipeline())
        await conn.execute(
            "INSERT INTO orders (id, status, amount)"
            " VALUES (1, 'a', 1), (NULL, 'b', 2), (3, 'c', 3)"
        )
        await conn.execute("UPDATE orders SET status = 'b2' WHERE id IS NULL")  # still no key
        await conn.execute("UPDATE orders SET id = 2 WHERE id IS NULL")  # the key is set
        await conn.execute("UPDATE orders SET id = NULL WHERE id = 3")  # the key is removed
        await conn.execute("DELETE FROM orders WHERE id IS NULL")  # never in the CRM: nothing
        events = await read_all(conn)
        letters = await dead_letters(conn)
        cur = await conn.execute("SELECT pg_current_xact_id()::text")
        row = await cur.fetchone()
        assert row is not None
    assert [(e.op, e.key) for e in events] == [
        (Op.INSERT, "1"),
        (Op.INSERT, "3"),
        (Op.INSERT, "2"),  # setting the key later syncs the row as an insert
        (Op.DELETE, "3"),  # removing the key: the CRM record of the old key goes
    ]
    assert [(d["key"], d["error_code"], d["status"], d["pipeline"]) for d in letters] == [
        ("", "MISSING_KEY", "open", "orders")
    ] * 3
    assert [d["payload"] for d in letters] == [
        {"id": None, "status": "b", "amount": 2},
        {"id": None, "status": "b2", "amount": 2},
        {"id": None, "status": "c", "amount": 3},
    ]
    for d in letters:
        assert "'id'" in d["error_message"] and "NULL" in d["error_message"]
        assert d["error_field"] == "parent_id"
        assert d["source_xid"] is not None
    # versions come from the outbox sequence, in stream order among the events
    by_version = sorted(
        [(e.version, f"{e.op.value}:{e.key}") for e in events]
        + [(d["version"], f"dead:{d['payload']['status']}") for d in letters]
    )
    assert [name for _, name in by_version] == [
        "insert:1",
        "dead:b",
        "insert:3",
        "dead:b2",
        "insert:2",
        "delete:3",
        "dead:c",
    ]


async def test_the_application_needs_no_privilege_for_the_dead_letter(database: str) -> None:
    """The SECURITY DEFINER function writes the dead letter, not the application's role."""
    role = "app_nullkey"
    async with await connect(database) as conn:
        await conn.execute(NULLABLE_KEY_DDL)
        await triggers.install(conn, SCHEMA, make_pipeline())
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.execute(f"CREATE ROLE {role} NOSUPERUSER")
        try:
            await conn.execute(f"GRANT INSERT ON orders TO {role}")
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                await conn.execute("INSERT INTO orders (id, status) VALUES (NULL, 'x')")
            letters = await dead_letters(conn)
        finally:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
    assert [(d["error_code"], d["payload"]["status"]) for d in letters] == [("MISSING_KEY", "x")]
