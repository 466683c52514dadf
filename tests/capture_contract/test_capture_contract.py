"""The capture contract: what every capture mode ("triggers", "logical") must write into the
outbox for the reader and the engine. Each case runs once per mode (the ``capture`` fixture,
tests/capture_contract/conftest.py); docs/capture.md states the contract in words. Mode-specific
behaviour (trigger install/upgrade, slot and origin administration, TOAST, decoder) stays in
tests/capture/ and tests/capture_logical/."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector import outbox
from connector.errors import ConfigError
from connector.events import ChangeEvent, Op
from tests.capture.helpers import assert_missing_key_letters, stream_order
from tests.capture.test_key_shift import coalesced

from .conftest import Capture

ORDERS_DDL = (
    "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(38,10), note text)"
)


def ops(events: list[ChangeEvent]) -> list[tuple[str, str]]:
    return [(e.op.value, e.key) for e in events]


async def current_xid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_current_xact_id()::text")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def table_images(conn: psycopg.AsyncConnection[Any], table: str = "orders") -> dict[str, Any]:
    cur = await conn.execute(
        sql.SQL("SELECT id::text, to_jsonb(t)::text FROM {} t").format(sql.Identifier(table))
    )
    return {k: outbox.load_row(v) for k, v in await cur.fetchall()}


async def test_inserts_updates_deletes_and_key_changes_carry_row_images_and_stamps(
    capture: Capture,
) -> None:
    await capture.install(ORDERS_DDL)
    conn = capture.conn
    await conn.execute("INSERT INTO orders (id, status, amount) VALUES (1, 'new', 10.5)")
    await conn.execute("INSERT INTO orders (id) VALUES (2)")
    await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
    await conn.execute("DELETE FROM orders WHERE id = 2")
    events = await capture.all_events(4)
    assert ops(events) == [("insert", "1"), ("insert", "2"), ("update", "1"), ("delete", "2")]
    full = {"id": 1, "status": "new", "amount": Decimal("10.5"), "note": None}
    assert events[0].row == full
    assert events[1].row == {"id": 2, "status": None, "amount": None, "note": None}
    assert events[2].row == {**full, "status": "paid"}
    # a delete carries the old image; logical mode under REPLICA IDENTITY DEFAULT only its key
    old = {"id": 2, "status": None, "amount": None, "note": None}
    assert events[3].row == (old if capture.mode == "triggers" else {"id": 2})
    # stamps: the version is the outbox position, increasing in commit order
    assert [e.version for e in events] == [e.offset for e in events]
    assert [e.version for e in events] == sorted({e.version for e in events})
    assert len({e.source_xid for e in events}) == 4  # four autocommit transactions
    assert all(e.pipeline == "orders" and e.captured_at is not None for e in events)

    # a multi-row transaction keeps its statement order under one source_xid
    async with conn.transaction():
        await conn.execute("INSERT INTO orders (id, status) VALUES (5, 'c'), (3, 'a'), (4, 'b')")
        await conn.execute("UPDATE orders SET status = 'a2' WHERE id = 3")
        await conn.execute("DELETE FROM orders WHERE id = 5")
        await conn.execute("UPDATE orders SET status = 'b2' WHERE id = 4")
        xid = await current_xid(conn)
    events = (await capture.all_events(10))[4:]
    assert ops(events) == [
        ("insert", "5"),
        ("insert", "3"),
        ("insert", "4"),
        ("update", "3"),
        ("delete", "5"),
        ("update", "4"),
    ]
    assert {e.source_xid for e in events} == {xid}
    versions = [e.version for e in events]
    assert versions == sorted(set(versions))  # per-key order within the transaction too
    assert events[3].row is not None and events[3].row["status"] == "a2"

    # a key change is a delete of the old key (its old image) then an insert of the new key
    await conn.execute("UPDATE orders SET id = 7, status = 'moved' WHERE id = 4")
    events = (await capture.all_events(12))[10:]
    assert ops(events) == [("delete", "4"), ("insert", "7")]
    old4: dict[str, Any] = {"id": 4, "status": "b2", "amount": None, "note": None}
    assert events[0].row == (old4 if capture.mode == "triggers" else {"id": 4})
    assert events[1].row == {**old4, "id": 7, "status": "moved"}
    assert events[0].version < events[1].version


async def test_late_commits_reach_the_reader_once_newer_and_rollbacks_leave_nothing(
    capture: Capture,
) -> None:
    """T1 writes first (its xid and, in trigger mode, its outbox id are the lower) and commits
    last: its change of key 1 must carry a higher version than T2's (commit order), and a reader
    that read before T1 committed gets T1's events afterwards, exactly once (no gap, no
    duplicate)."""
    await capture.install(ORDERS_DDL)
    async with await psycopg.AsyncConnection.connect(capture.dsn) as t1:
        await t1.execute("INSERT INTO orders (id, status) VALUES (2, 'by T1')")
        xid1 = await current_xid(t1)
        await capture.conn.execute("INSERT INTO orders (id, status) VALUES (1, 'by T2')")
        first, position = await capture.events(1)
        assert ops(first) == [("insert", "1")]
        await t1.execute("UPDATE orders SET status = 'by T1' WHERE id = 1")
        await t1.commit()
    later, position = await capture.events(2, position)
    assert sorted(ops(later)) == [("insert", "2"), ("update", "1")]
    by_t1 = next(e for e in later if e.key == "1")
    assert by_t1.source_xid == xid1 < first[0].source_xid  # xid order says T1 is older ...
    assert by_t1.version > first[0].version  # ... the version (commit order) says newer
    assert by_t1.newer_than(first[0])

    # rollbacks leave nothing: neither a rolled-back transaction nor a rolled-back savepoint
    conn = capture.conn
    async with await psycopg.AsyncConnection.connect(capture.dsn) as other:
        await other.execute("INSERT INTO orders (id, status) VALUES (3, 'rolled back')")
        await other.rollback()
    async with conn.transaction():
        await conn.execute("INSERT INTO orders (id, status) VALUES (4, 'kept')")
        try:
            async with conn.transaction():  # a savepoint, rolled back
                await conn.execute("INSERT INTO orders (id, status) VALUES (5, 'sub')")
                await conn.execute("UPDATE orders SET status = 'sub' WHERE id = 4")
                raise RuntimeError
        except RuntimeError:
            pass
    await conn.execute("INSERT INTO orders (id, status) VALUES (9, 'sentinel')")
    rest, _ = await capture.events(2, position)
    assert ops(rest) == [("insert", "4"), ("insert", "9")]  # each once, nothing rolled back
    assert rest[0].row is not None and rest[0].row["status"] == "kept"


async def test_a_null_key_is_a_missing_key_dead_letter_and_capture_goes_on(
    capture: Capture,
) -> None:
    await capture.install(
        "CREATE TABLE orders (id bigint UNIQUE, status text, amount numeric)", replica_full=True
    )
    conn = capture.conn
    await conn.execute(
        "INSERT INTO orders (id, status, amount) VALUES (1, 'a', 1), (NULL, 'b', 2), (3, 'c', 3)"
    )
    await conn.execute("UPDATE orders SET status = 'b2' WHERE id IS NULL")  # still no key
    await conn.execute("UPDATE orders SET id = 2 WHERE id IS NULL")  # the key is set: insert
    await conn.execute("UPDATE orders SET id = NULL WHERE id = 3")  # the key goes: delete
    await conn.execute("DELETE FROM orders WHERE id IS NULL")  # never in the CRM: nothing
    await conn.execute("INSERT INTO orders VALUES (4, 'd', 4)")
    events = await capture.all_events(5)
    letters = await capture.dead_letters(3)
    assert ops(events) == [
        ("insert", "1"),
        ("insert", "3"),
        ("insert", "2"),
        ("delete", "3"),
        ("insert", "4"),
    ]
    assert_missing_key_letters(
        letters,
        [
            {"id": None, "status": "b", "amount": 2},
            {"id": None, "status": "b2", "amount": 2},
            {"id": None, "status": "c", "amount": 3},
        ],
    )
    # versions come from the outbox sequence: the letters sit in stream order among events
    assert stream_order(
        [(e.version, f"{e.op.value}:{e.key}") for e in events], letters, "status"
    ) == [
        "insert:1",
        "dead:b",
        "insert:3",
        "dead:b2",
        "insert:2",
        "delete:3",
        "dead:c",
        "insert:4",
    ]
    assert int(letters[0]["source_xid"]) == events[0].source_xid == events[1].source_xid


SENTINEL = 1_000_000


def _rekey_plan(rng: random.Random, base: int) -> tuple[list[Any], list[Any]]:
    """Rows base..base+7 re-keyed by a permutation in up to four statements of one
    transaction, some edited first or deleted last, as (sql, params) lists."""
    keys = list(range(base, base + 8))
    initial = sorted(rng.sample(keys, rng.randint(1, 8)))
    perm = keys[:]
    rng.shuffle(perm)
    new = dict(zip(keys, perm, strict=True))
    chunks = [rng.randint(0, 3) for _ in keys]
    order = list(range(4))
    if rng.random() < 0.5:
        order.reverse()
    setup = [("INSERT INTO shift VALUES (%s, %s, 0)", (k, f"r{k}")) for k in initial]
    txn: list[Any] = [
        ("UPDATE shift SET n = n + 1 WHERE v = %s", (f"r{k}",))
        for k in rng.sample(initial, min(2, len(initial)))
    ]
    for s in order:
        moves = [(f"r{k}", new[k]) for i, k in enumerate(keys) if k in initial and chunks[i] == s]
        if moves:
            txn.append(
                (
                    "UPDATE shift SET id = m.new FROM unnest(%s::text[], %s::int[]) m(v, new)"
                    " WHERE shift.v = m.v",
                    ([m[0] for m in moves], [m[1] for m in moves]),
                )
            )
    for k in rng.sample(initial, rng.randint(0, min(2, len(initial)))):
        txn.append(("DELETE FROM shift WHERE v = %s", (f"r{k}",)))
    return setup, txn


async def test_key_shifts_and_swaps_under_a_deferrable_key_lose_nothing(capture: Capture) -> None:
    """Issue 14 §4: a row leaving key K while another row of the same transaction already took
    K must not turn into a delete of K: the coalesced outbox (newest event per key) equals the
    table. (Logical mode needs REPLICA IDENTITY FULL for a deferrable key: its init says so.)"""
    await capture.install(
        "CREATE TABLE shift (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text, n int)",
        replica_full=True,
        name="shift",
        source_table="shift",
        fields={"v": "V"},
    )
    conn = capture.conn
    # a shift by one in one statement (rows 190..200 -> 191..201, ascending), the key checked
    # at the end of the statement (as DEFERRABLE INITIALLY IMMEDIATE)
    await conn.execute("INSERT INTO shift SELECT g, 'r' || g, 0 FROM generate_series(185, 200) g")
    async with conn.transaction():
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await conn.execute("UPDATE shift SET id = id + 1 WHERE id BETWEEN 190 AND 200")
    # a swap in one statement and a swap in two statements
    await conn.execute("INSERT INTO shift VALUES (1, 'a', 0), (2, 'b', 0)")
    await conn.execute("UPDATE shift SET id = 3 - id WHERE id IN (1, 2)")
    async with conn.transaction():
        await conn.execute("UPDATE shift SET id = 2 WHERE v = 'b'")
        await conn.execute("UPDATE shift SET id = 1 WHERE v = 'a'")
    # a duplicate taken over, then the old row deleted
    await conn.execute("INSERT INTO shift VALUES (10, 'c', 0), (11, 'd', 0)")
    async with conn.transaction():
        await conn.execute("UPDATE shift SET id = 10 WHERE v = 'd'")
        await conn.execute("UPDATE shift SET n = 7 WHERE v = 'c'")
        await conn.execute("DELETE FROM shift WHERE v = 'c'")
    rng = random.Random(1414)  # random re-keyings, each in one transaction (seeded)
    for i in range(12):
        setup, txn = _rekey_plan(rng, 1000 + 100 * i)
        for q, p in setup:
            await conn.execute(q, p)
        async with conn.transaction():
            for q, p in txn:
                await conn.execute(q, p)
    await conn.execute("INSERT INTO shift VALUES (%s, 'end', 0)", (SENTINEL,))

    events = await capture.all_events(1)
    while not any(e.key == str(SENTINEL) for e in events):  # commit order: the sentinel is last
        events = await capture.all_events(len(events) + 1)
    crm: dict[str, Any] = {k: e.row for k, e in coalesced(events).items() if not e.is_delete}
    assert crm == await table_images(conn, "shift")
    assert "190" not in crm and crm["191"]["v"] == "r190" and crm["201"]["v"] == "r200"
    assert crm["1"]["v"] == "a" and crm["2"]["v"] == "b"
    assert crm["10"]["v"] == "d" and "11" not in crm


async def test_table_statements_schema_changes_and_truncate(capture: Capture) -> None:
    """Images follow the table at each change: an added column appears, a dropped mapped
    column is absent — which is what the emitter's schema-change halt keys on
    (Emitter._check_source_columns: a mapped column missing from an image). A TRUNCATE is one
    event in its place."""
    await capture.install(ORDERS_DDL)
    conn = capture.conn
    async with await psycopg.AsyncConnection.connect(capture.dsn, autocommit=True) as other:
        await conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
        await other.execute("INSERT INTO orders (id, status) VALUES (2, 'b')")  # cached plan
        await conn.execute("ALTER TABLE orders ADD COLUMN channel text DEFAULT 'web'")
        await other.execute("UPDATE orders SET status = 'c' WHERE id = 2")
        await conn.execute("INSERT INTO orders (id, status, channel) VALUES (3, 'd', 'shop')")
        await conn.execute("ALTER TABLE orders DROP COLUMN amount")  # a mapped column
        await other.execute("UPDATE orders SET channel = 'phone' WHERE id = 1")
    events = await capture.all_events(5)
    rows = [e.row or {} for e in events]
    assert ops(events) == [
        ("insert", "1"),
        ("insert", "2"),
        ("update", "2"),
        ("insert", "3"),
        ("update", "1"),
    ]
    assert "channel" not in rows[0] and "channel" not in rows[1]
    assert rows[2]["channel"] == "web" and rows[3]["channel"] == "shop"
    assert rows[4] == {"id": 1, "status": "a", "note": None, "channel": "phone"}

    # TRUNCATE: one ``truncate`` event (key '', no row) in its place in the stream; what it does
    # downstream is the pipeline's ``on_truncate`` (connector/truncate.py)
    await conn.execute("TRUNCATE orders")
    await conn.execute("INSERT INTO orders (id, status) VALUES (4, 'e')")
    events = (await capture.all_events(7))[4:]
    assert ops(events) == [("update", "1"), ("truncate", ""), ("insert", "4")]
    assert events[1].op is Op.TRUNCATE and events[1].row is None
    assert events[0].version < events[1].version < events[2].version


async def test_awkward_values_round_trip_whatever_the_writer_session(capture: Capture) -> None:
    await capture.install(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(38,10),"
        " at timestamptz, naive timestamp, day date, flag boolean, doc jsonb, tags text[],"
        " nums int[], raw bytea, big text, ratio float8, span interval, u uuid)"
    )
    big = "é" * 300_000 + "x" * 400_000  # ~1 MB of UTF-8, TOASTed
    async with await psycopg.AsyncConnection.connect(capture.dsn, autocommit=True) as writer:
        # the writer's session settings must not change the images
        await writer.execute(
            "SET TimeZone = 'Asia/Kolkata'; SET IntervalStyle = 'iso_8601';"
            " SET bytea_output = 'escape'; SET extra_float_digits = 3; SET DateStyle = 'German'"
        )
        insert = (
            "INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s,"
            " %s, %s, %s)"
        )
        await writer.execute(
            insert,
            (
                1,
                '😀 RTL: مرحبا שלום "q" \\ back\nnl\ttab',
                Decimal("1234567890123456789012345678.0123456789"),
                "2024-01-02 03:04:05.123456+05:30",
                "2024-02-29 23:59:59.999999",
                "2024-02-29",
                True,
                '{"a": [1, 2.50, null, "😀"], "b": {"c": 1e-7}}',
                ["a", None, "NULL", 'q"u,o{t}e', ""],
                [1, None, 3],
                b"\x00\xff\x10'\\",
                big,
                0.1,
                "1 day 02:03:04.5",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
        )
        await writer.execute(insert, (2, *([None] * 14)))
        await writer.execute(
            insert,
            (
                3,
                "",
                Decimal("-0.0000000001"),
                "infinity",
                "-infinity",
                "0044-03-15 BC",
                False,
                "null",
                [],
                [],
                b"",
                "",
                -1e308,
                "-1 mons",
                None,
            ),
        )
        await writer.execute("UPDATE orders SET status = 'changed' WHERE id = 1")  # big unchanged
    events = await capture.all_events(4)
    assert ops(events) == [("insert", "1"), ("insert", "2"), ("insert", "3"), ("update", "1")]
    await capture.conn.execute("SET TimeZone = 'UTC'")
    latest = {e.key: e.row for e in events}
    assert latest == await table_images(capture.conn)
    # the stored text too (numeric scale, key order, escapes): as to_jsonb writes it
    cur = await capture.conn.execute(
        "SELECT o.key, o.row::text = to_jsonb(t)::text FROM connector.outbox o"
        " JOIN orders t ON t.id::text = o.key"
        " WHERE o.id IN (SELECT max(id) FROM connector.outbox GROUP BY key) ORDER BY o.key"
    )
    assert await cur.fetchall() == [("1", True), ("2", True), ("3", True)]
    row1 = latest["1"]
    assert row1 is not None and row1["big"] == big
    assert str(row1["amount"]) == "1234567890123456789012345678.0123456789"
    assert row1["at"] == "2024-01-01T21:34:05.123456+00:00"
    assert row1["raw"] == "\\x00ff10275c"
    assert row1["span"] == "1 day 02:03:04.5"


async def test_invisible_to_the_legacy_application(capture: Capture) -> None:
    """DESIGN.md invariant 9: capture sends no NOTIFY in the application's transaction (a
    transaction that did cannot be prepared), so two-phase commit keeps working; an application
    role with no privilege on the state schema and a hostile session keeps writing; writes under
    ``session_replication_role = replica`` are captured too; its NULL-key row is a dead letter
    all the same (trigger mode: the SECURITY DEFINER function writes it, not the role)."""
    await capture.install(
        "CREATE TABLE orders (id bigint UNIQUE, status text, amount numeric)", replica_full=True
    )
    conn = capture.conn
    gid = f"contract-{uuid.uuid4().hex[:8]}"
    role = f"app_{uuid.uuid4().hex[:8]}"
    await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        await conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {}").format(
                sql.Identifier(role)
            )
        )
        info = psycopg.conninfo.conninfo_to_dict(capture.dsn)
        info["user"] = role
        app_dsn = psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
        async with await psycopg.AsyncConnection.connect(app_dsn, autocommit=True) as app:
            await app.execute("SET search_path = pg_temp, public; SET TimeZone = 'America/Lima'")
            await app.execute("BEGIN")
            await app.execute("INSERT INTO orders (id, status) VALUES (1, 'prepared')")
            await app.execute("UPDATE orders SET status = 'prepared2' WHERE id = 1")
            await app.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
            await conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
            await app.execute("INSERT INTO orders (id, status) VALUES (2, 'plain')")
            async with app.transaction():
                await app.execute("DELETE FROM orders WHERE id = 2")
            await app.execute("INSERT INTO orders (id, status) VALUES (NULL, 'no key')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute("SELECT 1 FROM connector.outbox")
        async with conn.transaction():  # as a replication apply worker or a bulk loader does
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("INSERT INTO orders (id, status) VALUES (3, 'replica')")
        events = await capture.all_events(5)
        assert ops(events) == [
            ("insert", "1"),
            ("update", "1"),
            ("insert", "2"),
            ("delete", "2"),
            ("insert", "3"),
        ]
        assert events[1].row is not None and events[1].row["status"] == "prepared2"
        assert events[0].source_xid == events[1].source_xid
        letters = await capture.dead_letters(1)
        assert [(d["error_code"], d["payload"]["status"]) for d in letters] == [
            ("MISSING_KEY", "no key")
        ]
    finally:
        cur = await conn.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,))
        if await cur.fetchone():
            await conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
        await conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_noop_and_ignored_column_updates_emit_nothing(capture: Capture) -> None:
    """An UPDATE that changes nothing, or only ``ignore_columns``, is no event. Logical mode can
    tell only with REPLICA IDENTITY FULL (the old image); without it such updates are emitted
    (docs/capture-logical.md) and the emitter acknowledges an unchanged record without a call."""
    await capture.install(ORDERS_DDL, replica_full=True, ignore_columns=("note",))
    conn = capture.conn
    await conn.execute("INSERT INTO orders (id, status, note) VALUES (1, 'new', 'a')")
    await conn.execute("UPDATE orders SET status = status WHERE id = 1")  # no change
    await conn.execute("UPDATE orders SET note = 'b' WHERE id = 1")  # ignored column only
    await conn.execute("UPDATE orders SET amount = NULL WHERE id = 1")  # NULL -> NULL
    await conn.execute("UPDATE orders SET status = 'paid', note = 'c' WHERE id = 1")
    await conn.execute("INSERT INTO orders (id, status) VALUES (9, 'sentinel')")
    events = await capture.all_events(3)
    assert ops(events) == [("insert", "1"), ("update", "1"), ("insert", "9")]
    assert events[1].row is not None
    assert events[1].row["status"] == "paid" and events[1].row["note"] == "c"


# -- the tables a mode may not be able to capture: refused clearly at install, or captured ----


async def _install_or_refusal(capture: Capture, *ddl: str) -> ConfigError | None:
    try:
        await capture.install(*ddl)
    except ConfigError as exc:
        assert exc.key == "pipelines['orders'].source_table"
        return exc
    return None


async def test_a_stored_generated_column_is_in_the_image(capture: Capture) -> None:
    """The image is the whole row as ``to_jsonb`` has it, stored generated columns included
    (a mapped generated column would otherwise be missing from every image)."""
    capture.known_gap(
        "logical",
        "finding: pgoutput of PostgreSQL < 18 does not send generated columns, so logical"
        " images lack them (a mapped one is missing from every image: MISSING_COLUMN per"
        " Emitter._check_source_columns)",
    )
    await capture.install(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric,"
        " shout text GENERATED ALWAYS AS (upper(status)) STORED)"
    )
    await capture.conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
    events = await capture.all_events(1)
    assert events[0].row == {"id": 1, "status": "a", "amount": None, "shout": "A"}


async def test_an_unlogged_table_is_captured_or_refused_clearly(capture: Capture) -> None:
    refused = await _install_or_refusal(
        capture, "CREATE UNLOGGED TABLE orders (id int PRIMARY KEY, status text, amount numeric)"
    )
    if refused is None:
        await capture.conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a')")
        assert ops(await capture.all_events(1)) == [("insert", "1")]
    else:
        assert "UNLOGGED" in str(refused)


async def test_a_partitioned_table_is_captured_or_refused_clearly(capture: Capture) -> None:
    refused = await _install_or_refusal(
        capture,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric)"
        " PARTITION BY RANGE (id)",
        "CREATE TABLE orders_a PARTITION OF orders FOR VALUES FROM (0) TO (100)",
        "CREATE TABLE orders_b PARTITION OF orders FOR VALUES FROM (100) TO (200)",
    )
    if refused is not None:
        assert "partition" in str(refused).lower()
        return
    await capture.conn.execute("INSERT INTO orders (id, status) VALUES (1, 'a'), (150, 'b')")
    await capture.conn.execute("UPDATE orders SET id = 120 WHERE id = 1")  # moves partition
    events = await capture.all_events(4)
    assert ops(events) == [("insert", "1"), ("insert", "150"), ("delete", "1"), ("insert", "120")]
