from __future__ import annotations

import psycopg


async def test_wal_level_is_logical(aconn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    cur = await aconn.execute("SHOW wal_level")
    assert await cur.fetchone() == ("logical",)


async def test_state_schema_present(aconn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    cur = await aconn.execute("SELECT to_regclass('connector.outbox') IS NOT NULL")
    assert await cur.fetchone() == (True,)
