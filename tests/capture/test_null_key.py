"""Trigger capture of a row whose key column is NULL: a MISSING_KEY dead letter (invariant 8),
written by the trigger in the legacy transaction; a later update that sets the key is an insert;
the rows around it are captured as usual."""

from __future__ import annotations

from connector.capture import triggers
from connector.events import Op

from .helpers import assert_missing_key_letters, dead_letters, stream_order
from .test_triggers import SCHEMA, connect, make_pipeline, read_all

NULLABLE_KEY_DDL = "CREATE TABLE orders (id bigint UNIQUE, status text, amount numeric)"


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
    assert_missing_key_letters(
        letters,
        [
            {"id": None, "status": "b", "amount": 2},
            {"id": None, "status": "b2", "amount": 2},
            {"id": None, "status": "c", "amount": 3},
        ],
    )
    # versions come from the outbox sequence, in stream order among the events
    events_by_version = [(e.version, f"{e.op.value}:{e.key}") for e in events]
    assert stream_order(events_by_version, letters, "status") == [
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
