"""Outbox retention (``outbox_retention.prune``): it deletes exactly what it may, in bounded
batches, while the connector reads and writes, and never an event a long transaction commits
late."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import outbox
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.outbox import START, ReadPosition
from connector.outbox_retention import PruneResult, outbox_stats, prune, pruned_bounds

SCHEMA = "connector"
PIPELINES = ("orders", "other")
XIDS = list(range(1000, 1012))
AGES = (0, 600, 3 * 3600, 3 * 86400)  # seconds before now
RETENTIONS = (30, 3600, 86400)  # far from every age: the clock moving does not matter


def make_pipeline(name: str = "orders", table: str = "orders") -> PipelineConfig:
    return PipelineConfig(
        name=name, source_table=table, key_column="id", module="Orders", fields={"status": "S"}
    )


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


# ------------------------------------------------------------------ property: exactly what it may
rows_st = st.lists(
    st.tuples(
        st.sampled_from(PIPELINES),
        st.sampled_from(XIDS),
        st.sampled_from(AGES),
        st.booleans(),  # a snapshot row (chunk_id set)
    ),
    min_size=1,
    max_size=30,
)
checkpoint_st = st.one_of(
    st.none(),
    st.tuples(
        st.integers(0, 32),
        st.lists(st.sampled_from(XIDS), max_size=4, unique=True),
        st.sampled_from(XIDS),  # the horizon (snapshot xmax)
    ),
)
pipeline_st = st.tuples(
    checkpoint_st,
    st.sampled_from([None, "running", "done", "failed"]),  # the pipeline's snapshot status
    st.sampled_from(RETENTIONS),
)


def _position(cp: tuple[int, list[int], int]) -> ReadPosition:
    last_id, listed, horizon = cp
    pending = sorted(x for x in listed if x < horizon)
    return ReadPosition(last_id, (*pending, horizon))


async def _prune_scenario(
    dsn: str,
    rows: list[tuple[str, int, int, bool]],
    per_pipeline: dict[str, tuple[Any, str | None, int]],
    batch: int,
) -> None:
    async with await connect(dsn) as conn:
        await conn.execute(
            "TRUNCATE connector.outbox, connector.checkpoints, connector.snapshots,"
            " connector.outbox_pruned"
        )
        for i, (p, txid, age, snap) in enumerate(rows, start=1):
            await conn.execute(
                "INSERT INTO connector.outbox (id, pipeline, op, key, version, txid, chunk_id,"
                " row, captured_at) VALUES (%s, %s, %s, %s, %s, %s::text::xid8, %s, '{}',"
                " clock_timestamp() - make_interval(secs => %s))",
                (
                    i,
                    p,
                    "snapshot" if snap else "update",
                    str(i),
                    i,
                    str(txid),
                    1 if snap else None,
                    age,
                ),
            )
        expected_kept: set[int] = set()
        for i, (p, txid, age, snap) in enumerate(rows, start=1):
            cp, snap_status, retention = per_pipeline[p]
            passed = cp is not None and _position(cp).passed(i, txid)
            old = age > retention
            held = snap and snap_status not in (None, "done")
            if not (passed and old and not held):
                expected_kept.add(i)
        for p, (cp, snap_status, _) in per_pipeline.items():
            if cp is not None:
                await outbox.save_checkpoint(conn, SCHEMA, p, _position(cp))
            if snap_status is not None:
                await conn.execute(
                    "INSERT INTO connector.snapshots (pipeline, status) VALUES (%s, %s)",
                    (p, snap_status),
                )
        total = 0
        for p, (_, _, retention) in per_pipeline.items():
            res = await prune(conn, SCHEMA, p, timedelta(seconds=retention), batch=batch)
            total += res.rows
            assert res.batches == res.rows // batch + 1
        cur = await conn.execute("SELECT id FROM connector.outbox")
        kept = {int(r[0]) for r in await cur.fetchall()}
        assert kept == expected_kept
        assert total == len(rows) - len(expected_kept)
        for p in PIPELINES:
            gone = [i for i, r in enumerate(rows, start=1) if r[0] == p and i not in kept]
            bounds = await pruned_bounds(conn, SCHEMA, p)
            assert bounds.max_pruned_id == (max(gone) if gone else None)
            mine = [i for i, r in enumerate(rows, start=1) if r[0] == p and i in kept]
            assert bounds.oldest_kept_id == (min(mine) if mine else None)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=rows_st,
    orders=pipeline_st,
    other=pipeline_st,
    batch=st.integers(1, 6),
)
def test_prune_deletes_exactly_what_checkpoint_age_and_snapshot_allow(
    database: str,
    rows: list[tuple[str, int, int, bool]],
    orders: tuple[Any, str | None, int],
    other: tuple[Any, str | None, int],
    batch: int,
) -> None:
    asyncio.run(_prune_scenario(database, rows, {"orders": orders, "other": other}, batch))


# ------------------------------------------------------------------ real transactions
@pytest.fixture
async def db(database: str) -> Any:
    async with await connect(database) as conn:
        await conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, status text)")
        await triggers.install(conn, SCHEMA, make_pipeline())
        yield conn


async def _keys(conn: Any) -> list[str]:
    cur = await conn.execute("SELECT key FROM connector.outbox ORDER BY id")
    return [str(r[0]) for r in await cur.fetchall()]


async def test_prune_never_takes_a_late_commit_before_it_is_read(db: Any) -> None:
    """A long transaction drew offset 1 and commits after later offsets were read and
    checkpointed. Once committed its row is old and below ``last_id``: only the checkpoint's
    pending transactions keep it until a read has delivered it."""
    async with await connect(db.info.dsn) as long_txn:
        await long_txn.execute("BEGIN")
        await long_txn.execute("INSERT INTO orders VALUES (1, 'late')")
        await db.execute("INSERT INTO orders VALUES (2, 'a'), (3, 'b')")
        events, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
        assert [e.key for e in events] == ["2", "3"]
        await outbox.save_checkpoint(db, SCHEMA, "orders", pos)
        assert (await prune(db, SCHEMA, "orders", timedelta(0))).rows == 2
        await long_txn.execute("COMMIT")
    # committed, not read yet: passed by last_id, pending by xid
    assert (await prune(db, SCHEMA, "orders", timedelta(0))).rows == 0
    assert await _keys(db) == ["1"]
    restored = await outbox.load_checkpoint(db, SCHEMA, "orders")
    events, pos = await outbox.read_batch(db, SCHEMA, "orders", restored)
    assert [e.key for e in events] == ["1"]
    await outbox.save_checkpoint(db, SCHEMA, "orders", pos)
    assert (await prune(db, SCHEMA, "orders", timedelta(0))).rows == 1


async def test_prune_keeps_the_replay_window_and_runs_in_bounded_batches(db: Any) -> None:
    await db.execute("INSERT INTO orders SELECT g, 's' FROM generate_series(1, 23) g")
    await db.execute(
        "UPDATE connector.outbox SET captured_at = clock_timestamp() - interval '2 hours'"
        " WHERE key::int <= 20"
    )
    _, pos = await outbox.read_batch(db, SCHEMA, "orders", START)
    await outbox.save_checkpoint(db, SCHEMA, "orders", pos)
    res = await prune(db, SCHEMA, "orders", timedelta(hours=1), batch=5, max_batches=2)
    assert res == PruneResult(10, 2)
    res = await prune(db, SCHEMA, "orders", timedelta(hours=1), batch=5)
    assert res == PruneResult(10, 3)  # 5, 5, then 0 (the last batch finds none)
    assert await _keys(db) == ["21", "22", "23"]  # inside the window: kept though passed
    bounds = await pruned_bounds(db, SCHEMA, "orders")
    assert bounds.max_pruned_id is not None and bounds.oldest_kept_id is not None
    assert bounds.max_pruned_id < bounds.oldest_kept_id
    stats = await outbox_stats(db, SCHEMA, "orders")
    assert stats.rows == 3 and stats.table_bytes > 0 and 0 <= stats.oldest_age_seconds < 3600


async def test_prune_while_writers_readers_and_long_transactions_run(db: Any) -> None:
    """Three writers (some transactions stay open across many reads), a reader that
    checkpoints after every batch and a pruner with retention 0 run together: every committed
    event is delivered exactly once."""
    dsn = db.info.dsn
    rng = random.Random(14)
    committed: list[int] = []
    writers_done = asyncio.Event()

    async def writer(n: int) -> None:
        async with await connect(dsn) as w:
            for t in range(25):
                await w.execute("BEGIN")
                # Keys in ascending order within a transaction: the writers lock rows of
                # `orders` in one order, so they cannot deadlock one another (the test is about
                # the outbox, and a deadlock between the test's own writers failed it once).
                for k in sorted(rng.sample(range(1, 41), rng.randint(1, 4))):
                    await w.execute(
                        "INSERT INTO orders VALUES (%s, %s) ON CONFLICT (id) DO UPDATE"
                        " SET status = EXCLUDED.status",
                        (k, f"w{n}t{t}"),
                    )
                    await asyncio.sleep(rng.random() * 0.01 if n == 0 else 0)
                cur = await w.execute(
                    "SELECT id FROM connector.outbox WHERE txid = pg_current_xact_id()"
                )
                ids = [int(r[0]) for r in await cur.fetchall()]
                if rng.random() < 0.15:
                    await w.execute("ROLLBACK")
                    continue
                await w.execute("COMMIT")
                committed.extend(ids)

    delivered: list[int] = []
    pruned = 0

    async def reader() -> None:
        async with await connect(dsn) as r:
            pos = START
            idle = 0
            while True:
                events, pos = await outbox.read_batch(r, SCHEMA, "orders", pos, limit=7)
                delivered.extend(e.offset for e in events)
                await outbox.save_checkpoint(r, SCHEMA, "orders", pos)
                if writers_done.is_set():
                    idle = idle + 1 if not events else 0
                    if idle >= 3:
                        return
                await asyncio.sleep(0)

    async def pruner() -> None:
        nonlocal pruned
        async with await connect(dsn) as p:
            while not writers_done.is_set():
                pruned += (await prune(p, SCHEMA, "orders", timedelta(0), batch=3)).rows
                await asyncio.sleep(0)

    read_task = asyncio.create_task(reader())
    prune_task = asyncio.create_task(pruner())
    await asyncio.gather(*(writer(n) for n in range(3)))
    writers_done.set()
    await asyncio.wait_for(asyncio.gather(read_task, prune_task), 60)
    assert sorted(delivered) == sorted(committed)
    assert len(set(delivered)) == len(delivered)
    assert pruned > 0
