"""Trigger capture of a row whose key column is NULL: a MISSING_KEY dead letter (invariant 8),
written by the trigger in the legacy transaction; a later update that sets the key is an insert;
the rows around it are captured as usual."""

from __future__ import annotations

from connector.capture import triggers

from .helpers import dead_letters
from .test_triggers import SCHEMA, connect, make_pipeline

NULLABLE_KEY_DDL = "CREATE TABLE orders (id bigint UNIQUE, status text, amount numeric)"


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
