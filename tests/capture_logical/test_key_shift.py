"""Key changes inside one transaction under a DEFERRABLE unique key, logical mode (issue 14
§4): a row leaving key K while another row of the same transaction already took K must not turn
into a delete of K. The coalesced outbox (newest event per key) must equal the table. (A
deferrable primary key needs REPLICA IDENTITY FULL, or an immediate unique index, in logical
mode: PostgreSQL cannot use a deferrable index as replica identity.)"""

from __future__ import annotations

import random
from typing import Any

import psycopg

from connector import outbox
from connector.capture import logical
from connector.config import PipelineConfig
from tests.capture.test_key_shift import coalesced
from tests.capture_logical.helpers import SCHEMA, running, wait_for

PIPELINE = PipelineConfig(
    name="shift",
    source_table="shift",
    key_column="id",
    module="Orders",
    capture="logical",
    fields={"v": "V"},
)
DDL = (
    "CREATE TABLE shift (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text, n int)",
    "ALTER TABLE shift REPLICA IDENTITY FULL",
)
SENTINEL = 1_000_000


async def _view(dsn: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        events, _ = await outbox.read_batch(conn, SCHEMA, "shift", outbox.START, limit=1_000_000)
        crm = {k: e.row for k, e in coalesced(events).items() if not e.is_delete}
        cur = await conn.execute("SELECT id::text, to_jsonb(s) FROM shift s")
        return crm, {str(k): img for k, img in await cur.fetchall()}


async def _sentinel_seen(dsn: str, n: int) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM connector.outbox WHERE key = %s", (str(SENTINEL + n),)
        )
        row = await cur.fetchone()
        return row is not None and row[0] > 0


def _plan(rng: random.Random, base: int) -> list[list[tuple[str, Any]]]:
    """Transactions of statements over rows base..base+7 (re-keyed by a permutation, in
    chunks, some edited or deleted), as (sql, params) lists."""
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
    txn: list[tuple[str, Any]] = []
    for k in rng.sample(initial, min(2, len(initial))):
        txn.append(("UPDATE shift SET n = n + 1 WHERE v = %s", (f"r{k}",)))
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
    return [setup, txn]


async def test_key_shifts_and_swaps_lose_nothing_in_logical_mode(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for ddl in DDL:
            await conn.execute(ddl)
        await logical.install(conn, SCHEMA, PIPELINE)
        try:
            async with running(logical.LogicalCapture(database, SCHEMA, PIPELINE)):
                # a shift by one in one statement (rows 190..200 -> 191..201, ascending)
                await conn.execute(
                    "INSERT INTO shift SELECT g, 'r' || g, 0 FROM generate_series(185, 200) g"
                )
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
                # random re-keyings, each in one transaction (seeded)
                rng = random.Random(1414)
                for i in range(12):
                    setup, txn = _plan(rng, 1000 + 100 * i)
                    for q, p in setup:
                        await conn.execute(q, p)
                    async with conn.transaction():
                        for q, p in txn:
                            await conn.execute(q, p)
                await conn.execute("INSERT INTO shift VALUES (%s, 'end', 0)", (SENTINEL,))
                await wait_for(lambda: _sentinel_seen(database, 0), "the sentinel row")
            crm, table = await _view(database)
            assert crm == table
            assert "190" not in crm and crm["191"]["v"] == "r190" and crm["201"]["v"] == "r200"
            assert crm["1"]["v"] == "a" and crm["2"]["v"] == "b"
            assert crm["10"]["v"] == "d" and "11" not in crm
        finally:
            await logical.uninstall(conn, SCHEMA, PIPELINE)
