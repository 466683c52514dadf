"""The capture's own writes carry its replication origin and the walsender skips them before
decoding (``origin 'none'``); without that (filter off, or another origin on the server) the
capture keeps decoding them, and changes written under another origin are still captured."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from connector.capture import logical

from .helpers import ORDERS_DDL, SCHEMA, installed, pipeline, running, wait_for, wait_rows

SLOT = logical.object_name(SCHEMA, "orders")
PAD = "x" * 300


async def _slot_stats(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    cur = await conn.execute(
        "SELECT total_txns, total_bytes FROM pg_stat_replication_slots WHERE slot_name = %s",
        (SLOT,),
    )
    row = await cur.fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


async def _decoded_for(
    conn: psycopg.AsyncConnection[Any],
    database: str,
    cap: logical.LogicalCapture,
    first: int,
    total: int,
) -> tuple[int, int]:
    """Insert 400 rows (40 source transactions), wait until they are in the outbox and the slot
    has been confirmed past the outbox's own WAL; the slot's (transactions, bytes) decoded."""
    before = await _slot_stats(conn)
    async with running(cap):
        for t in range(40):
            await conn.execute(
                "INSERT INTO orders SELECT i, %s FROM generate_series(%s::int, %s::int) i",
                (PAD, first + t * 10, first + t * 10 + 9),
            )
        await wait_rows(database, total)
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        written = (await cur.fetchone())[0]  # type: ignore[index]

        async def passed() -> bool:
            c = await conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (written, SLOT),
            )
            return bool((await c.fetchone())[0])  # type: ignore[index]

        await wait_for(passed, "the slot to be confirmed past the outbox writes")
    after = await _slot_stats(conn)
    return after[0] - before[0], after[1] - before[1]


async def test_own_outbox_writes_are_not_decoded(database: str) -> None:
    cfg = pipeline(filter_own_writes=True)
    async with installed(database, cfg, ORDERS_DDL) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = %s",
            (logical.origin_name(SLOT),),
        )
        assert await cur.fetchone() == (1,)
        opts: dict[str, Any] = {"heartbeat_interval": 0.2, "status_interval": 0.2}
        without = logical.LogicalCapture(database, SCHEMA, cfg, **opts)
        without.filter_own_writes = False
        txns_without, bytes_without = await _decoded_for(conn, database, without, 1, 400)
        assert not without.origin_filter and without.origin_fallback_reason is None
        with_origin = logical.LogicalCapture(database, SCHEMA, cfg, **opts)
        txns_with, bytes_with = await _decoded_for(conn, database, with_origin, 1001, 800)
        assert with_origin.origin_filter and with_origin.origin_fallback_reason is None
        rows = await wait_rows(database, 800)
        assert len(rows) == 800 and len({r["key"] for r in rows}) == 800
        # the same 40 source transactions either way; only the fallback also decodes the
        # outbox transactions (each at least as large as the source rows it holds)
        assert txns_without > txns_with >= 40
        assert bytes_with * 1.6 < bytes_without, (bytes_with, bytes_without)
    async with await psycopg.AsyncConnection.connect(database) as c:
        cur = await c.execute(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = %s",
            (logical.origin_name(SLOT),),
        )
        assert await cur.fetchone() == (0,)  # uninstall dropped it


@pytest.fixture
async def other_origin(database: str) -> Any:
    """A replication origin that is not the connector's (as a subscription creates)."""
    name = "another_replication_tool"
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        yield conn, name
        await conn.execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin"
            " WHERE roname = %s",
            (name,),
        )


async def _write_under(database: str, origin: str, key: int) -> None:
    """An insert into the source table by a session that has ``origin`` set up (as a
    subscription's apply worker writes)."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        await conn.execute("INSERT INTO orders VALUES (%s, 'replicated')", (key,))
        await conn.execute("SELECT pg_replication_origin_session_reset()")


async def test_no_filter_while_another_origin_exists(
    database: str, other_origin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conn, name = other_origin
    cfg = pipeline(filter_own_writes=True)
    await conn.execute("SELECT pg_replication_origin_create(%s)", (name,))
    async with installed(database, cfg, ORDERS_DDL):
        cap = logical.LogicalCapture(database, SCHEMA, cfg)
        with caplog.at_level(logging.INFO, logger="connector.capture.logical"):
            async with running(cap):
                await _write_under(database, name, 1)
                rows = await wait_rows(database, 1)
        assert rows[0]["key"] == "1" and rows[0]["row"]["v"] == "replicated"
        assert not cap.origin_filter
        assert cap.origin_fallback_reason is not None and name in cap.origin_fallback_reason
        said = [r for r in caplog.records if "does not filter its own writes" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO


async def test_another_origin_appearing_turns_the_filter_off(
    database: str, other_origin: Any
) -> None:
    conn, name = other_origin
    cfg = pipeline(filter_own_writes=True)
    async with installed(database, cfg, ORDERS_DDL):
        cap = logical.LogicalCapture(database, SCHEMA, cfg, origin_check_interval=0.1)
        async with running(cap):
            await conn.execute("INSERT INTO orders VALUES (1, 'local')")
            await wait_rows(database, 1)
            assert cap.origin_filter
            await conn.execute("SELECT pg_replication_origin_create(%s)", (name,))

            async def fell_back() -> bool:
                return cap.origin_fallback_reason is not None and cap.stats.reconnects >= 1

            await wait_for(fell_back, "the capture to restart without the origin filter")
            await _write_under(database, name, 2)
            rows = await wait_rows(database, 2)
        assert [r["key"] for r in rows] == ["1", "2"]
        assert not cap.origin_filter


async def test_heartbeat_comes_back_with_the_filter(database: str) -> None:
    """The heartbeat goes out on the untagged source connection, so origin 'none' keeps it."""
    cfg = pipeline(filter_own_writes=True)
    async with installed(database, cfg, ORDERS_DDL):
        cap = logical.LogicalCapture(database, SCHEMA, cfg, heartbeat_interval=0.2)

        async def came_back() -> bool:
            return cap.stats.heartbeats_received >= 1

        async with running(cap):
            await wait_for(came_back, "a heartbeat to come back through the slot")
            assert cap.origin_filter


async def test_origin_held_elsewhere_falls_back(database: str) -> None:
    """A session still holding the origin (a cut-off old connector) never blocks the capture."""
    cfg = pipeline(filter_own_writes=True)
    async with installed(database, cfg, ORDERS_DDL) as conn:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as holder:
            await holder.execute(
                "SELECT pg_replication_origin_session_setup(%s)", (logical.origin_name(SLOT),)
            )
            cap = logical.LogicalCapture(database, SCHEMA, cfg)
            async with running(cap):
                await conn.execute("INSERT INTO orders VALUES (1, 'a')")
                await wait_rows(database, 1)
            assert not cap.origin_filter
            assert cap.origin_fallback_reason is not None
            assert "in use" in cap.origin_fallback_reason


async def test_the_filter_is_off_by_default(database: str) -> None:
    """Without ``filter_own_writes`` (the default) no origin is created, the capture does not
    tag its writes, and it says nothing about origins: a write under any origin is captured."""
    cfg = pipeline()
    assert cfg.filter_own_writes is False
    async with installed(database, cfg, ORDERS_DDL) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = %s",
            (logical.origin_name(SLOT),),
        )
        assert await cur.fetchone() == (0,)
        cap = logical.LogicalCapture(database, SCHEMA, cfg, heartbeat_interval=0.2)
        async with running(cap):
            await conn.execute("INSERT INTO orders VALUES (1, 'a')")
            await wait_rows(database, 1)
        assert not cap.origin_filter and cap.origin_fallback_reason is None
