"""Logical capture against a real PostgreSQL: images, TOAST, schema change, deletes, crash,
heartbeat, uninstall."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector.capture import logical
from connector.errors import ConfigError

from .helpers import (
    ORDERS_DDL,
    SCHEMA,
    cleanup,
    installed,
    outbox,
    pipeline,
    running,
    wait_for,
    wait_rows,
)

AWKWARD = """
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    v text,
    big text,
    amount numeric(38,10),
    ts timestamptz,
    d date,
    flag boolean,
    doc jsonb,
    tags text[],
    nums int[],
    raw bytea,
    f8 float8,
    ival interval,
    u uuid
)
"""


async def _images(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    await conn.execute("SET TimeZone = 'UTC'")
    cur = await conn.execute("SELECT id::text, to_jsonb(t)::text FROM orders t")
    return {k: json.loads(v) for k, v in await cur.fetchall()}


def _last_per_key(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        out[r["key"]] = json.loads(r["row_text"]) if r["op"] != "delete" else None
    return {k: v for k, v in out.items() if v is not None}


async def test_awkward_values_and_toast_round_trip(database: str) -> None:
    cfg = pipeline()
    big = "é" + "x" * 1_000_000 + "🎉"
    async with installed(
        database, cfg, AWKWARD, "ALTER TABLE orders ALTER COLUMN big SET STORAGE EXTERNAL"
    ) as conn:
        cap = logical.LogicalCapture(database, SCHEMA, cfg)
        async with running(cap):
            await conn.execute(
                "INSERT INTO orders VALUES (1, %s, %s, %s, '2024-01-02 03:04:05.123456+02',"
                " '2024-02-29', true, %s, %s, %s, %s, 1e100, '1 day 02:03:04',"
                " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')",
                (
                    'emoji 😀 rtl שלום "quoted" \\ back\nnl\ttab',
                    big,
                    "1234567890123456789012345678.0123456789",
                    psycopg.types.json.Jsonb({"a": [1, 2.5, None], "b": {"c": "ü"}}),
                    ["x", None, "NULL", 'q"u,o{t}e', ""],
                    [1, None, 3],
                    b"\x00\x01\xff",
                ),
            )
            await conn.execute("INSERT INTO orders (id) VALUES (2)")  # all NULLs
            await conn.execute(
                "INSERT INTO orders (id, amount, ts, d, f8, nums) VALUES"
                " (3, -0.0000000001, 'infinity', '0044-03-15 BC', 'NaN', '{{1,2},{3,4}}')"
            )
            # the 1 MB value stays TOASTed and unchanged: pgoutput sends 'u' for it
            await conn.execute("UPDATE orders SET v = 'changed' WHERE id = 1")
            await wait_rows(database, 4)
        rows = await outbox(database)
        # a fresh process (empty cache) must still complete the image: from the source row
        await conn.execute("UPDATE orders SET flag = false WHERE id = 1")
        cap2 = logical.LogicalCapture(database, SCHEMA, cfg)
        async with running(cap2):
            rows = await wait_rows(database, 5)
        assert cap.stats.toast_cache_hits >= 1
        assert cap2.stats.toast_fetches >= 1
        expected = await _images(conn)
        assert _last_per_key(rows) == expected
        # every stored image compares equal as jsonb too (normalisation of numbers etc.)
        cur = await conn.execute(
            "SELECT count(*) FROM connector.outbox o JOIN orders t ON o.key = t.id::text"
            " WHERE o.id = (SELECT max(id) FROM connector.outbox o2 WHERE o2.key = o.key)"
            " AND o.row <> to_jsonb(t)"
        )
        assert (await cur.fetchone()) == (0,)
        big_row = next(r for r in rows if r["op"] == "update" and r["key"] == "1")
        assert big_row["row"]["big"] == big


async def test_commit_order_batching_and_source_xid(database: str) -> None:
    cfg = pipeline()
    async with installed(
        database,
        cfg,
        ORDERS_DDL,
        "CREATE TABLE other (id int)",
    ) as conn:
        async with await psycopg.AsyncConnection.connect(database) as t1:
            # T1 takes its xid first, commits last: outbox order must be commit order
            await t1.execute("INSERT INTO other VALUES (1)")
            cur = await t1.execute("SELECT pg_current_xact_id()::text")
            t1_xid = (await cur.fetchone())[0]
            await conn.execute("INSERT INTO orders VALUES (1, 'from T2')")
            await t1.execute("UPDATE orders SET v = 'from T1' WHERE id = 1")
            await t1.commit()
        cap = logical.LogicalCapture(database, SCHEMA, cfg, batch_rows=100_000)
        async with running(cap):
            rows = await wait_rows(database, 2)
        assert [r["row"]["v"] for r in rows] == ["from T2", "from T1"]
        assert rows[1]["source_xid"] == t1_xid
        assert rows[0]["source_lsn"] < rows[1]["source_lsn"] or len(rows[0]["source_lsn"]) < len(
            rows[1]["source_lsn"]
        )
        assert cap.stats.outbox_commits >= 1


class Crash(Exception):
    pass


async def test_crash_between_outbox_commit_and_confirm(database: str) -> None:
    """Issue test 5: the consumer dies after the outbox commit and before the slot confirm;
    after a restart there is neither a loss nor a duplicate."""
    cfg = pipeline()
    async with installed(database, cfg, ORDERS_DDL) as conn:
        for i in range(50):
            await conn.execute("INSERT INTO orders VALUES (%s, 'x')", (i,))

        async def die(lsn: int) -> None:
            raise Crash(lsn)

        cap = logical.LogicalCapture(database, SCHEMA, cfg, after_outbox_commit=die)
        stop = asyncio.Event()
        with pytest.raises(Crash):
            await asyncio.wait_for(cap.run(stop), 30)
        stored = await outbox(database)
        assert stored  # the outbox transaction committed
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn < (SELECT last_commit_lsn FROM"
            " connector.capture_state) FROM pg_replication_slots WHERE slot_name = %s",
            (logical.object_name(SCHEMA, "orders"),),
        )
        assert (await cur.fetchone()) == (True,)  # the slot was not confirmed
        for i in range(50, 60):
            await conn.execute("INSERT INTO orders VALUES (%s, 'y')", (i,))
        cap2 = logical.LogicalCapture(database, SCHEMA, cfg)
        # ask for the whole slot, as after a server crash that rewound it: the stored
        # commits come again and must be dropped by the consumer
        cap2.request_stored_lsn = False
        async with running(cap2):
            rows = await wait_rows(database, 60)
            await asyncio.sleep(0.3)  # let any (wrong) duplicate arrive
            rows = await outbox(database)
        assert sorted(int(r["key"]) for r in rows) == list(range(60))
        assert cap2.stats.skipped_replays == len(stored)


async def test_server_restart_reconnects(database: str, pg_cluster: Any) -> None:
    if pg_cluster.server is None:
        pytest.skip("needs the embedded cluster")
    cfg = pipeline()
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(ORDERS_DDL)
        await logical.install(conn, SCHEMA, cfg)
    cap = logical.LogicalCapture(database, SCHEMA, cfg, max_backoff=0.5)
    try:
        async with running(cap):
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute("INSERT INTO orders VALUES (1, 'a')")
            await wait_rows(database, 1)
            pg_cluster.server.kill()  # crash: the slot may go back, replays are dropped
            pg_cluster.server.start()
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute("INSERT INTO orders VALUES (2, 'b')")
            await wait_rows(database, 2)
            await asyncio.sleep(0.3)
        rows = await outbox(database)
        assert [r["key"] for r in rows] == ["1", "2"]
        assert cap.stats.reconnects >= 1
    finally:
        await cleanup(database, cfg)


async def test_heartbeat_advances_slot_when_only_other_tables_change(database: str) -> None:
    cfg = pipeline()
    name = logical.object_name(SCHEMA, "orders")
    async with installed(
        database,
        cfg,
        ORDERS_DDL,
        "CREATE TABLE busy (id serial, pad text)",
    ) as conn:
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
        before = (await cur.fetchone())[0]
        cap = logical.LogicalCapture(
            database, SCHEMA, cfg, heartbeat_interval=0.2, status_interval=0.2
        )
        async with running(cap):
            await conn.execute("INSERT INTO busy (pad) SELECT 'x' FROM generate_series(1, 1000)")
            # the insert position: pg_current_wal_lsn() is the *write* position, which need not
            # have moved yet under synchronous_commit = off (seen: equal to the slot's `before`)
            cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
            written = (await cur.fetchone())[0]

            async def advanced() -> bool:
                c = await conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (written, name),
                )
                return bool((await c.fetchone())[0])

            await wait_for(advanced, "confirmed_flush_lsn to pass the busy table's WAL")

            # a keepalive's status update may confirm past the busy WAL before the first
            # heartbeat is due (both 0.2 s after the stream starts): wait for it, don't race it
            async def beat() -> bool:
                return cap.stats.heartbeats >= 1

            await wait_for(beat, "a heartbeat while only the other table changes")
        assert await outbox(database) == []
        lag = await logical.slot_lag_bytes(conn, SCHEMA, cfg)
        assert lag is not None and lag >= 0
        assert before != written


async def test_install_checks_and_uninstall(database: str) -> None:
    cfg = pipeline()
    name = logical.object_name(SCHEMA, "orders")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(ConfigError) as e:
            await logical.install(conn, SCHEMA, cfg)
        assert "pipelines['orders'].source_table" in str(e.value)
        await conn.execute("CREATE TABLE orders (id int, v text, k int UNIQUE)")
        with pytest.raises(ConfigError) as e:
            await logical.install(conn, SCHEMA, pipeline(key="nope"))
        assert "pipelines['orders'].key_column" in str(e.value)
        with pytest.raises(ConfigError) as e:
            await logical.install(conn, SCHEMA, cfg)
        assert "pipelines['orders'].key_column" in str(e.value) and "not unique" in str(e.value)
        with pytest.raises(ConfigError) as e:  # unique, but deletes would not carry it
            await logical.install(conn, SCHEMA, pipeline(key="k"))
        assert "replica identity" in str(e.value)
        await conn.execute("ALTER TABLE orders ADD PRIMARY KEY (id)")
        await logical.install(conn, SCHEMA, cfg)
        # a publication made by an earlier version (no publish_via_partition_root) is upgraded
        await conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = false)").format(
                sql.Identifier(name)
            )
        )
        await logical.install(conn, SCHEMA, cfg)  # idempotent, and an upgrade
        cur = await conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", [name])
        assert await cur.fetchone() == (True,)
        assert await logical.slot_lag_bytes(conn, SCHEMA, cfg) is not None
        cap = logical.LogicalCapture(database, SCHEMA, cfg, max_backoff=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(cap.run(stop))
        await conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        await wait_rows(database, 1)
        # uninstall while the capture is streaming: the walsender is terminated; the capture
        # either sees the stop first or, reconnecting, refuses clearly as it is not installed
        await logical.uninstall(conn, SCHEMA, cfg)
        await asyncio.sleep(0.5)
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        except ConfigError as exc:
            assert "not installed" in str(exc)
        assert cap.stats.reconnects >= 1
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s),"
            " (SELECT count(*) FROM pg_publication WHERE pubname = %s),"
            " (SELECT count(*) FROM connector.capture_state)",
            (name, name),
        )
        assert await cur.fetchone() == (0, 0, 0)
        assert await logical.slot_lag_bytes(conn, SCHEMA, cfg) is None
        await logical.uninstall(conn, SCHEMA, cfg)  # idempotent


@pytest.mark.db  # starts a PostgreSQL of its own
async def test_refuses_without_wal_level_logical(tmp_path: Any) -> None:
    from connector.pgembed import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "replica", settings={"wal_level": "replica"})
    server.start()
    try:
        async with await psycopg.AsyncConnection.connect(server.dsn(), autocommit=True) as conn:
            await conn.execute(ORDERS_DDL)
            with pytest.raises(ConfigError) as e:
                await logical.install(conn, SCHEMA, pipeline())
        assert "pipelines['orders'].capture" in str(e.value)
        assert "wal_level = logical" in str(e.value) and "'replica'" in str(e.value)
    finally:
        server.stop("immediate")


@contextlib.asynccontextmanager
async def _publication_dropped_under_capture(
    database: str,
) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], logical.LogicalCapture, str]]:
    """Capture streaming on ``orders``; row 1 captured; then the publication is dropped and
    row 2 written in the gap. Yields (connection, capture, object name); stops the capture."""
    cfg = pipeline()
    name = logical.object_name(SCHEMA, "orders")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
        await logical.install(conn, SCHEMA, cfg)
        cap = logical.LogicalCapture(database, SCHEMA, cfg, max_backoff=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(cap.run(stop))
        try:
            await conn.execute("INSERT INTO orders VALUES (1, 'a')")
            await wait_rows(database, 1)
            await conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
            await conn.execute("INSERT INTO orders VALUES (2, 'b')")  # in the gap
            yield conn, cap, name
        finally:
            stop.set()
            with contextlib.suppress(ConfigError, TimeoutError):
                await asyncio.wait_for(task, 30)


async def _stream(database: str) -> tuple[logical.LogicalCapture, asyncio.Event, Any]:
    cap = logical.LogicalCapture(database, SCHEMA, pipeline(), max_backoff=0.2)
    stop = asyncio.Event()
    return cap, stop, asyncio.create_task(cap.run(stop))


async def test_a_dropped_publication_is_named_in_the_reconnect_warning(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A DBA drops the publication under the streaming capture: the walsender fails on the
    next change, and each reconnect warning carries the server's own words (which object is
    missing), not only an error class (invariant 11: the operator is never left guessing)."""
    async with _publication_dropped_under_capture(database) as (_, cap, name):
        deadline = asyncio.get_running_loop().time() + 30
        while cap.stats.reconnects < 1:
            assert asyncio.get_running_loop().time() < deadline, "no reconnect"
            await asyncio.sleep(0.05)
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost, caplog.text
    assert any(name in m and "does not exist" in m for m in lost), lost


async def test_capture_resumes_after_init_recreates_a_dropped_publication(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL < 18 a change decoded while the publication was missing stops pgoutput at
    the same position on every reconnect, even once the publication exists again. `connector
    init` (``install``) finds that, advances the slot past it, and says which range it skipped
    and that `connector verify --repair` re-captures it; the running capture resumes by itself."""
    async with _publication_dropped_under_capture(database) as (conn, cap, name):
        await asyncio.sleep(1)
        stuck_at = cap.stats.reconnects
        await logical.install(conn, SCHEMA, pipeline())  # what `connector init` does
        await conn.execute("INSERT INTO orders VALUES (3, 'c')")
        rows = await asyncio.wait_for(wait_rows(database, 2), 15)  # 1 and 3; 2 needs verify
        assert [r["key"] for r in rows] == ["1", "3"]
        assert stuck_at >= 1
    skipped = [r for r in caplog.records if "NOT captured" in r.getMessage()]
    assert len(skipped) == 1, caplog.text
    message = skipped[0].getMessage()
    assert name in message and "--repair" in message and "orders" in message


async def test_init_skips_nothing_when_no_change_was_made_without_the_publication(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The slot outlived its publication but nothing was written meanwhile: the changes still
    pending on the slot (made before the drop, connector stopped) decode, so `connector init`
    leaves the slot where it is and the capture delivers them all."""
    cfg = pipeline()
    name = logical.object_name(SCHEMA, "orders")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
        await logical.install(conn, SCHEMA, cfg)
        await conn.execute("INSERT INTO orders VALUES (1, 'a'), (2, 'b')")  # pending on the slot
        before = await logical.slot_status(conn, SCHEMA, cfg)
        await conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
        await logical.install(conn, SCHEMA, cfg)
        after = await logical.slot_status(conn, SCHEMA, cfg)
        assert before is not None and after is not None
        assert after.confirmed_flush_lsn == before.confirmed_flush_lsn  # not advanced
        _, stop, task = await _stream(database)
        try:
            rows = await asyncio.wait_for(wait_rows(database, 2), 15)
            assert sorted(r["key"] for r in rows) == ["1", "2"]
        finally:
            stop.set()
            with contextlib.suppress(ConfigError, TimeoutError):
                await asyncio.wait_for(task, 30)
    assert not [r for r in caplog.records if "NOT captured" in r.getMessage()], caplog.text
