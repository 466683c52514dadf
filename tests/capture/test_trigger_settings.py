"""The capture trigger and the legacy session's settings (invariant 9, issue 19): whatever the
session's settings, the image is the pinned one and the session's settings are untouched
afterwards; a hostile search_path cannot reach the function. Guards for any change to how the
function pins its settings (its SET clauses: issue 19 measured dropping them, docs/capture.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import outbox
from connector.capture import IMAGE_SETTINGS, triggers
from connector.config import PipelineConfig
from connector.events import Op

SCHEMA = "connector"
PIPELINE = PipelineConfig(
    name="orders",
    source_table="orders",
    key_column="id",
    module="Orders",
    fields={"status": "Status"},
)
DDL = (
    "CREATE TABLE orders (id bigint PRIMARY KEY, status text, at timestamptz, span interval,"
    " raw bytea, ratio float8)"
)
SETTINGS = ("TimeZone", "IntervalStyle", "bytea_output", "extra_float_digits")


async def show_value(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    out = []
    for name in SETTINGS:
        cur = await conn.execute("SELECT current_setting(%s)", (name,))
        out.append((await cur.fetchone())[0])  # type: ignore[index]
    return out


async def _pinned_image(conn: psycopg.AsyncConnection[Any], key: int) -> Any:
    """The row's image as the state schema defines it: to_jsonb under IMAGE_SETTINGS."""
    async with conn.transaction():
        for name, value in IMAGE_SETTINGS:
            await conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        cur = await conn.execute("SELECT to_jsonb(o)::text FROM orders o WHERE id = %s", (key,))
        return (await cur.fetchone())[0]  # type: ignore[index]


async def test_a_hostile_search_path_reaches_nothing_in_the_function(database: str) -> None:
    """Operators and types that shadow pg_catalog's (earlier in the application's search_path)
    are never used by the function; each would fail the write."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(DDL)
        await triggers.install(conn, SCHEMA, PIPELINE)
        await conn.execute("CREATE SCHEMA evil")
        for typ in ("text", "jsonb", "record"):
            await conn.execute(
                f"CREATE FUNCTION evil.boom(a pg_catalog.{typ}, b pg_catalog.{typ})"
                " RETURNS boolean LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$"
            )
            await conn.execute(
                f"CREATE OPERATOR evil.= (LEFTARG = pg_catalog.{typ},"
                f" RIGHTARG = pg_catalog.{typ}, FUNCTION = evil.boom)"
            )
        await conn.execute(
            "CREATE OPERATOR evil.*= (LEFTARG = pg_catalog.record, RIGHTARG = pg_catalog.record,"
            " FUNCTION = evil.boom)"
        )
        for typ in ("text", "jsonb", "int8", "bool"):
            await conn.execute(f"CREATE DOMAIN evil.{typ} AS pg_catalog.int4 CHECK (false)")
    # a fresh session: the function is compiled under the hostile path
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as app:
        await app.execute("SET search_path = evil, pg_catalog, public")
        await app.execute("INSERT INTO orders (id, status) VALUES (1, 'a'), (2, 'b')")
        await app.execute("UPDATE orders SET status = 'c' WHERE id = 1")
        await app.execute("UPDATE orders SET status = status WHERE id = 2")  # no change
        await app.execute("UPDATE orders SET id = 3 WHERE id = 2")
        await app.execute("DELETE FROM orders WHERE id = 1")
        await app.execute("SET search_path = public")
        events, _ = await outbox.read_batch(app, SCHEMA, "orders", outbox.START)
        assert [(e.op, e.key) for e in events] == [
            (Op.INSERT, "1"),
            (Op.INSERT, "2"),
            (Op.UPDATE, "1"),
            (Op.DELETE, "2"),
            (Op.INSERT, "3"),
            (Op.DELETE, "1"),
        ]


# -- property: whatever the session's settings, the image is the pinned one and the session's
# settings are what they were, inside the writing transaction and after it

session_settings = st.fixed_dictionaries(
    {
        "TimeZone": st.sampled_from(
            ["UTC", "Etc/UTC", "Zulu", "Asia/Kolkata", "America/Lima", "Europe/Berlin", "GMT"]
        ),
        "IntervalStyle": st.sampled_from(["postgres", "iso_8601", "sql_standard"]),
        "bytea_output": st.sampled_from(["hex", "escape"]),
        "extra_float_digits": st.integers(-15, 3).map(str),
    }
)


async def _scenario(dsn: str, session: dict[str, str], local: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS orders")
        await conn.execute(DDL)
        await triggers.install(conn, SCHEMA, PIPELINE)
        await conn.execute("TRUNCATE connector.outbox")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app:
        if not local:
            for name, value in session.items():
                await app.execute("SELECT set_config(%s, %s, false)", (name, value))
        before = await show_value(app)
        async with app.transaction():
            if local:
                for name, value in session.items():
                    await app.execute("SELECT set_config(%s, %s, true)", (name, value))
            inside = await show_value(app)
            await app.execute(
                "INSERT INTO orders VALUES (1, 'a', '2024-01-02 03:04:05.5+05:30',"
                " '1 day 02:03:04.5', '\\x00ff'::bytea, 0.1)"
            )
            assert await show_value(app) == inside
            await app.execute("UPDATE orders SET ratio = 1.0 / 3, status = 'b' WHERE id = 1")
            assert await show_value(app) == inside
        assert await show_value(app) == before
        events, _ = await outbox.read_batch(app, SCHEMA, "orders", outbox.START)
        assert [e.op for e in events] == [Op.INSERT, Op.UPDATE]
        cur = await app.execute("SELECT row::text FROM connector.outbox ORDER BY id DESC LIMIT 1")
        captured = (await cur.fetchone())[0]  # type: ignore[index]
        assert captured == await _pinned_image(app, 1), session


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(session=session_settings, local=st.booleans())
def test_images_are_pinned_and_session_settings_untouched(
    database: str, session: dict[str, str], local: bool
) -> None:
    asyncio.run(_scenario(database, session, local))
