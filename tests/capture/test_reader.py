"""The gap-free outbox reader against a real PostgreSQL, with interleaved transactions."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector import outbox, outbox_retention
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.events import Op, SnapshotVisibility
from connector.outbox import START, ReadPosition

SCHEMA = "connector"


def make_pipeline(name: str = "orders", table: str = "orders") -> PipelineConfig:
    return PipelineConfig(
        name=name, source_table=table, key_column="id", module="Orders", fields={"status": "S"}
    )


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def xid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_current_xact_id()::text")
    return int((await cur.fetchone())[0])


@pytest.fixture
async def db(database: str) -> Any:
    async with await connect(database) as conn:
        await conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric);"
            " CREATE TABLE side (id bigint PRIMARY KEY)"
        )
        await triggers.install(conn, SCHEMA, make_pipeline())
        yield conn


async def test_offsets_allocated_in_one_order_committed_in_the_other(db: Any) -> None:
    dsn = db.info.dsn
    async with await connect(dsn) as t1, await connect(dsn) as t2:
        await t1.execute("BEGIN")
        await t2.execute("BEGIN")
        await t1.execute("INSERT INTO orders VALUES (1, 'first offset')")
        await t2.execute("INSERT INTO orders VALUES (2, 'second offset')")
        await t2.execute("COMMIT")
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        assert [e.key for e in events] == ["2"]
        await t1.execute("COMMIT")
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
        assert [e.key for e in events] == ["1"]
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
        assert events == []


async def test_running_transaction_above_snapshot_xmax_is_not_skipped(db: Any) -> None:
    """pg_snapshot_xip leaves out running xids >= xmax. Here T (the higher xid) draws the lower
    offset; U (the lower xid) draws a higher one and commits; the snapshot's xmax is then U+1 <=
    T, so T is not in xip(S) — a reader keeping only xip(S) as pending would skip T's row."""
    dsn = db.info.dsn
    async with await connect(dsn) as u, await connect(dsn) as t:
        await u.execute("BEGIN")
        await u.execute("INSERT INTO side VALUES (1)")  # U gets the lower xid, no outbox row
        xid_u = await xid(u)
        await t.execute("BEGIN")
        await t.execute("INSERT INTO orders VALUES (10, 't')")  # T: higher xid, lower offset
        xid_t = await xid(t)
        await u.execute("INSERT INTO orders VALUES (20, 'u')")  # U: higher offset
        await u.execute("COMMIT")
        assert xid_u < xid_t
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        assert [e.key for e in events] == ["20"]
        # the case under test: T is not listed in xip(S), only covered by the open tail
        assert xid_t not in pos.pending_txids[:-1]
        assert pos.horizon is not None and xid_t >= pos.horizon
        await t.execute("COMMIT")
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
        assert [e.key for e in events] == ["10"]
        assert events[0].source_xid == xid_t


async def test_same_key_out_of_order_carries_higher_version(db: Any) -> None:
    dsn = db.info.dsn
    await db.execute("INSERT INTO orders VALUES (1, 'initial')")
    async with await connect(dsn) as t1, await connect(dsn) as t2:
        await t1.execute("BEGIN")
        await t1.execute("INSERT INTO side VALUES (1)")  # T1 starts first (lower xid)
        xid1 = await xid(t1)
        await t2.execute("UPDATE orders SET status = 'by T2' WHERE id = 1")  # commits
        await t1.execute("UPDATE orders SET status = 'by T1' WHERE id = 1")
        await t1.execute("COMMIT")
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", START)
    updates = [e for e in events if e.op is Op.UPDATE]
    assert [e.row["status"] for e in updates] == ["by T2", "by T1"]  # type: ignore[index]
    by_t1 = next(e for e in updates if e.source_xid == xid1)
    by_t2 = next(e for e in updates if e.source_xid != xid1)
    assert by_t1.source_xid < by_t2.source_xid  # xid order says T1 is older ...
    assert by_t1.version > by_t2.version  # ... the version (commit order) says it is newer
    assert by_t1.newer_than(by_t2)


async def test_rolled_back_transaction_drops_out(db: Any) -> None:
    async with await connect(db.info.dsn) as t:
        await t.execute("BEGIN")
        await t.execute("INSERT INTO orders VALUES (1, 'x')")
        xid_t = await xid(t)
        await db.execute("INSERT INTO orders VALUES (2, 'y')")
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        assert [e.key for e in events] == ["2"]
        assert pos.is_pending(xid_t)
        await t.execute("ROLLBACK")
    events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
    assert events == []
    assert not pos.is_pending(xid_t)


def _rows_examined(plan: Any) -> int:
    """Rows produced plus rows filtered out by every node of an EXPLAIN ANALYZE plan."""
    total = 0
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        loops = node.get("Actual Loops", 1)
        total += node.get("Actual Rows", 0) * loops
        total += node.get("Rows Removed by Filter", 0) + node.get(
            "Rows Removed by Index Recheck", 0
        )
        stack.extend(node.get("Plans", []))
    return total


async def _late_query_cost(conn: psycopg.AsyncConnection[Any], pos: ReadPosition) -> int:
    listed = [str(x) for x in pos.pending_txids[:-1]]
    query = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + outbox.late_rows_query(SCHEMA)
    cur = await conn.execute(query, ("orders", pos.last_id, listed, str(pos.pending_txids[-1])))
    plan = (await cur.fetchone())[0]
    return _rows_examined(plan if not isinstance(plan, str) else json.loads(plan))


async def test_open_transactions_do_not_stall_and_reads_stay_flat(db: Any, pg_cluster: Any) -> None:
    dsn = db.info.dsn
    # a backlog so that the planner prefers indexes and a scan would show in the counts
    await db.execute(
        "INSERT INTO orders SELECT g, 'seed' FROM generate_series(1000, 30999) g;"
        " ANALYZE connector.outbox"
    )
    pos = START
    while True:
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos, limit=10_000)
        if not events:
            break
    other_db = f"other_{uuid.uuid4().hex[:8]}"
    async with await connect(pg_cluster.dsn("postgres")) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other_db)))
    try:
        async with (
            await connect(pg_cluster.dsn(other_db)) as elsewhere,
            await connect(dsn) as legacy_open,
            await connect(dsn) as writer,
        ):
            await elsewhere.execute("CREATE TABLE t (i int)")
            await elsewhere.execute("BEGIN")
            await elsewhere.execute("INSERT INTO t VALUES (1)")
            xid_elsewhere = await xid(elsewhere)
            await legacy_open.execute("BEGIN")
            await legacy_open.execute("INSERT INTO orders VALUES (1, 'open')")
            xid_open = await xid(legacy_open)

            per_round = 25
            costs: list[int] = []
            for rnd in range(20):
                keys = [str(1000 + (rnd * per_round + i) % 30000) for i in range(per_round)]
                for k in keys:
                    await writer.execute(
                        "UPDATE orders SET status = %s WHERE id = %s", (f"r{rnd}", int(k))
                    )
                costs.append(await _late_query_cost(db, pos))
                events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
                # committed after the open transactions began: delivered without waiting
                assert sorted(e.key for e in events) == sorted(keys)
                assert pos.is_pending(xid_open) and pos.is_pending(xid_elsewhere)
            # flat: each read examines about the rows written since the previous one, not the
            # rows written since the open transactions began (20 x 25 = 500) nor the backlog
            assert max(costs) <= 2 * per_round + 10, costs
            assert max(costs[10:]) <= max(costs[:10]) + 5, costs

            await legacy_open.execute("COMMIT")
            events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
            assert [(e.key, e.source_xid) for e in events] == [("1", xid_open)]
            await elsewhere.execute("COMMIT")
            events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos)
            assert events == []
            assert not pos.is_pending(xid_open) and not pos.is_pending(xid_elsewhere)
    finally:
        async with await connect(pg_cluster.dsn("postgres")) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other_db))
            )


async def test_limit_pages_without_duplicates(db: Any) -> None:
    await db.execute("INSERT INTO orders SELECT g, 's' FROM generate_series(1, 10) g")
    pos = START
    seen: list[int] = []
    for _ in range(10):
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", pos, limit=3)
        assert len(events) <= 3
        seen += [e.offset for e in events]
    assert len(seen) == 10 and seen == sorted(set(seen))


async def test_pipelines_are_separate(db: Any) -> None:
    await db.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text)")
    await triggers.install(db, SCHEMA, make_pipeline("customers", "customers"))
    await db.execute("INSERT INTO orders VALUES (1, 'o')")
    await db.execute("INSERT INTO customers VALUES (1, 'c')")
    a, _ = await outbox.read_batch(db, SCHEMA, "orders", START)
    b, _ = await outbox.read_batch(db, SCHEMA, make_pipeline("customers", "customers"), START)
    assert [e.pipeline for e in a] == ["orders"] and [e.pipeline for e in b] == ["customers"]


async def test_checkpoints_only_move_forward(db: Any) -> None:
    assert await outbox.load_checkpoint(db, SCHEMA, "orders") == START
    p1 = ReadPosition(10, (100, 105, 110))
    p2 = ReadPosition(20, (105, 120))
    p2_later = ReadPosition(20, (130,))
    await outbox.save_checkpoint(db, SCHEMA, "orders", p1, events_passed=5)
    assert await outbox.load_checkpoint(db, SCHEMA, "orders") == p1
    await outbox.save_checkpoint(db, SCHEMA, "orders", p2, events_passed=7)
    await outbox.save_checkpoint(db, SCHEMA, "orders", p1, events_passed=100)  # stale: ignored
    assert await outbox.load_checkpoint(db, SCHEMA, "orders") == p2
    await outbox.save_checkpoint(db, SCHEMA, "orders", p2_later, events_passed=1)
    await outbox.save_checkpoint(db, SCHEMA, "orders", p2, events_passed=100)  # older horizon
    assert await outbox.load_checkpoint(db, SCHEMA, "orders") == p2_later
    cur = await db.execute("SELECT events_passed FROM connector.checkpoints")
    assert (await cur.fetchone())[0] == 13
    assert p2_later.not_behind(p2) and not p1.not_behind(p2)


async def test_checkpoint_resume_keeps_late_rows(db: Any) -> None:
    async with await connect(db.info.dsn) as t:
        await t.execute("BEGIN")
        await t.execute("INSERT INTO orders VALUES (1, 'late')")
        await db.execute("INSERT INTO orders VALUES (2, 'early')")
        _, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        await outbox.save_checkpoint(db, SCHEMA, "orders", pos, events_passed=1)
        await t.execute("COMMIT")
    restored = await outbox.load_checkpoint(db, SCHEMA, "orders")
    assert restored == pos
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", restored)
    assert [e.key for e in events] == ["1"]


async def test_prune_keeps_what_the_checkpoint_has_not_passed(db: Any) -> None:
    await db.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text)")
    await triggers.install(db, SCHEMA, make_pipeline("customers", "customers"))
    await db.execute("INSERT INTO customers VALUES (1, 'no checkpoint')")
    await db.execute("INSERT INTO orders VALUES (1, 'passed'), (2, 'passed')")
    async with await connect(db.info.dsn) as t:
        await t.execute("BEGIN")
        await t.execute("INSERT INTO orders VALUES (3, 'pending')")
        await db.execute("INSERT INTO orders VALUES (4, 'passed')")
        _, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        await outbox.save_checkpoint(db, SCHEMA, "orders", pos)
        await t.execute("COMMIT")
    await db.execute("INSERT INTO orders VALUES (5, 'not read yet')")
    assert (await outbox_retention.prune(db, SCHEMA, "orders", timedelta(hours=1))).rows == 0
    assert (await outbox_retention.prune(db, SCHEMA, "customers", timedelta(0))).rows == 0
    assert (await outbox_retention.prune(db, SCHEMA, "orders", timedelta(0))).rows == 3
    cur = await db.execute("SELECT pipeline, key FROM connector.outbox ORDER BY id")
    assert await cur.fetchall() == [("customers", "1"), ("orders", "3"), ("orders", "5")]
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", pos)
    assert sorted(e.key for e in events) == ["3", "5"]


async def test_read_range_filters(db: Any) -> None:
    await db.execute("INSERT INTO orders SELECT g, 's' FROM generate_series(1, 12) g")
    await db.execute("UPDATE orders SET status = 't' WHERE id = 3")
    pages = [p async for p in outbox.read_range(db, SCHEMA, "orders", batch=5)]
    assert [len(p) for p in pages] == [5, 5, 3]
    offsets = [e.offset for p in pages for e in p]
    assert offsets == sorted(offsets)
    sub = [
        e
        async for p in outbox.read_range(
            db, SCHEMA, "orders", from_offset=offsets[2], to_offset=offsets[5]
        )
        for e in p
    ]
    assert [e.offset for e in sub] == offsets[2:6]
    by_key = [e async for p in outbox.read_range(db, SCHEMA, "orders", key="3") for e in p]
    assert [e.op for e in by_key] == [Op.INSERT, Op.UPDATE]
    none = [
        p
        async for p in outbox.read_range(
            db, SCHEMA, "orders", until=datetime(2000, 1, 1, tzinfo=UTC)
        )
    ]
    assert none == []
    since = [
        p
        async for p in outbox.read_range(
            db, SCHEMA, "orders", since=datetime(2000, 1, 1, tzinfo=UTC)
        )
    ]
    assert sum(len(p) for p in since) == 13


async def test_outbox_lag(db: Any) -> None:
    assert await outbox.outbox_lag(db, SCHEMA, "orders", START) == (0, 0.0)
    await db.execute("INSERT INTO orders VALUES (1, 'a'), (2, 'b')")
    count, age = await outbox.outbox_lag(db, SCHEMA, "orders", START)
    assert count == 2 and age >= 0
    async with await connect(db.info.dsn) as t:
        await t.execute("BEGIN")
        await t.execute("INSERT INTO orders VALUES (3, 'late')")
        _, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        assert (await outbox.outbox_lag(db, SCHEMA, "orders", pos))[0] == 0
        await t.execute("COMMIT")
    assert (await outbox.outbox_lag(db, SCHEMA, "orders", pos))[0] == 1


async def test_snapshot_rows_carry_their_visibility(db: Any) -> None:
    cur = await db.execute(
        "INSERT INTO connector.snapshot_chunks (pipeline, chunk_no, snapshot, rows)"
        " VALUES ('orders', 1, pg_current_snapshot(), 1) RETURNING id, snapshot::text"
    )
    chunk_id, snap = await cur.fetchone()
    await db.execute(
        "INSERT INTO connector.outbox (pipeline, op, key, version, chunk_id, row)"
        " VALUES ('orders', 'snapshot', '9', 1, %s, '{\"id\": 9, \"amount\": 1.10}')",
        (chunk_id,),
    )
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", START)
    assert len(events) == 1
    assert events[0].op is Op.SNAPSHOT
    assert events[0].snapshot == SnapshotVisibility.parse(snap)
    assert events[0].row == {"id": 9, "amount": Decimal("1.10")}


def test_load_row_keeps_every_digit() -> None:
    row = outbox.load_row('{"a": 0.1, "b": 12345678901234567890.123456789, "c": 3}')
    assert row == {"a": Decimal("0.1"), "b": Decimal("12345678901234567890.123456789"), "c": 3}
    assert isinstance(row["c"], int)


async def test_newest_rows_leaves_out_the_keys_whose_newest_row_the_caller_holds(db: Any) -> None:
    """The catch-up read-ahead (engine_read): each key's newest committed row, except where
    that row is one of the offsets the caller already holds; offsets that are not a key's
    newest row exclude nothing."""
    for i in range(1, 7):
        await db.execute("INSERT INTO orders VALUES (%s, 'v1')", (i,))
    await db.execute("UPDATE orders SET status = 'v2' WHERE id IN (1, 2, 3)")
    await db.execute("UPDATE orders SET status = 'v3' WHERE id = 1")
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", START)
    newest = {e.key: e.offset for e in events}  # read in offset order: the last one stays
    oldest = {e.key: e.offset for e in reversed(events)}
    keys = [str(i) for i in range(1, 8)]  # "7" has no row at all

    got = await outbox.newest_rows(db, SCHEMA, "orders", keys)
    assert {k: e.offset for k, e in got.items()} == newest
    assert got["1"].row == {"id": 1, "status": "v3", "amount": None}

    held = [newest["1"], newest["4"], oldest["2"], oldest["3"], 10**12]
    got = await outbox.newest_rows(db, SCHEMA, "orders", keys, held)
    assert {k: e.offset for k, e in got.items()} == {
        k: off for k, off in newest.items() if k not in ("1", "4")
    }
    # everything held: nothing comes back, however many offsets are held
    many = [e.offset for e in events] + list(range(10**9, 10**9 + 30_000))
    assert await outbox.newest_rows(db, SCHEMA, "orders", keys, many) == {}


async def test_newest_rows_is_never_run_as_a_prepared_statement(db: Any) -> None:
    """psycopg prepares a query run 5 times on one connection, and PostgreSQL may then use a
    generic plan, made without the arrays' contents: the exclusion ``<> ALL(offsets)`` then
    compares each row with every offset (34 s instead of 0.5-1 s for 25,000 keys in the
    session-15 soak, whose drain crawled through a 1 M-event backlog). The read-ahead runs
    once per batch on the reader's connection, so it must stay unprepared."""
    await db.execute("INSERT INTO orders SELECT g, 'v1' FROM generate_series(1, 20) g")
    events, _ = await outbox.read_batch(db, SCHEMA, "orders", START)
    for _ in range(12):
        await outbox.newest_rows(db, SCHEMA, "orders", ["1", "2"], [e.offset for e in events])
    cur = await db.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s", ("%LATERAL%",)
    )
    assert (await cur.fetchone())[0] == 0
