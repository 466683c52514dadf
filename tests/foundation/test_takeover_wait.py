"""The takeover wait is stored once (issue 20): ``checkpoints.crm_quiet_until``, written and read
only through ``state.take_ownership`` / ``state.start_writing`` / ``state.writes_wait_left``.
Migration 0011 folds the v10 column ``writes_after`` into it without ever shortening or starting
a wait. The wait acting end to end: tests/e2e/test_grace_after_kills.py and
tests/e2e/test_every_metric_moves.py (``takeover_wait_seconds_left``)."""

from __future__ import annotations

from typing import Any

import psycopg

from connector import db, state

SCHEMA = "connector"


async def _columns(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'checkpoints'",
        (SCHEMA,),
    )
    return {r[0] for r in await cur.fetchall()}


async def test_migration_keeps_one_column_and_only_lengthens_a_running_wait(
    empty_database: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await db.migrate(conn, SCHEMA, target=10)
        await conn.execute(
            "INSERT INTO connector.checkpoints (pipeline, crm_quiet_until, writes_after) VALUES"
            " ('waiting', now() + interval '10 s', now() + interval '60 s'),"
            " ('wrote', NULL, now() + interval '60 s'),"
            " ('later', now() + interval '90 s', now() + interval '5 s'),"
            " ('never', NULL, NULL)"
        )
        await db.migrate(conn, SCHEMA)
        assert "writes_after" not in await _columns(conn)
        assert "crm_quiet_until" in await _columns(conn)
        cur = await conn.execute(
            "SELECT pipeline, round(extract(epoch FROM crm_quiet_until - now()))::int"
            " FROM connector.checkpoints ORDER BY pipeline"
        )
        assert dict(await cur.fetchall()) == {
            "later": 90,
            "never": None,
            "waiting": 60,  # the later end of the two
            "wrote": None,  # it wrote: a successor waits in full, not until the old record
        }


async def test_take_ownership_start_writing_and_status_read_one_column(
    aconn: psycopg.AsyncConnection[Any],
) -> None:
    async def take(owner: str) -> float:
        return await state.take_ownership(aconn, SCHEMA, "orders", owner, 30.0)

    assert await take("first") == 0.0  # no previous owner
    assert await state.writes_wait_left(aconn, SCHEMA, "orders") is None
    await state.start_writing(aconn, SCHEMA, "orders")
    # "first" was killed (owner still recorded) after it wrote: a full wait
    wait = await take("second")
    assert 29.0 < wait <= 30.0
    left = await state.writes_wait_left(aconn, SCHEMA, "orders")
    assert left is not None and 0 < left <= 30.0
    # "second" was killed during its wait: it never wrote, the same end is kept
    await aconn.execute(
        "UPDATE connector.checkpoints SET crm_quiet_until = crm_quiet_until - interval '20 s'"
    )
    again = await take("third")
    assert 9.0 < again <= 10.0
    await state.start_writing(aconn, SCHEMA, "orders")
    assert await state.writes_wait_left(aconn, SCHEMA, "orders") is None
    assert await state.writes_wait_left(aconn, SCHEMA, "no-such-pipeline") is None
