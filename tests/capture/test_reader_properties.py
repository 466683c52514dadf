"""Property: over random interleavings of concurrent transactions on several connections, with
reads interleaved, the reader delivers exactly the committed changes, each once per pass, and
per key the versions follow commit order."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import outbox
from connector.capture import triggers
from connector.config import PipelineConfig
from connector.events import ChangeEvent
from connector.outbox import START

SCHEMA = "connector"
CONNS = 3
KEYS = 5

Step = tuple[Any, ...]

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, CONNS - 1),
            st.integers(0, KEYS - 1),
            st.sampled_from(["upsert", "upsert", "delete"]),
            st.integers(0, 2),
        ),
        st.tuples(st.just("side"), st.integers(0, CONNS - 1)),
        st.tuples(st.just("commit"), st.integers(0, CONNS - 1)),
        st.tuples(st.just("rollback"), st.integers(0, CONNS - 1)),
        st.tuples(st.just("read"), st.integers(1, 4)),
    ),
    min_size=5,
    max_size=45,
)


@dataclass
class Txn:
    overlay: dict[int, str | None] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)


PIPELINE = PipelineConfig(
    name="orders", source_table="orders", key_column="id", module="Orders", fields={"status": "S"}
)


async def _setup(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, status text);"
            " CREATE TABLE IF NOT EXISTS side (id bigserial PRIMARY KEY)"
        )
        await triggers.install(conn, SCHEMA, PIPELINE)
        # the outbox last: TRUNCATE of the captured table is itself captured (a truncate event)
        await conn.execute(
            "TRUNCATE orders, side; TRUNCATE connector.outbox; DELETE FROM connector.checkpoints"
        )


async def _scenario(dsn: str, schedule: list[Step], finals: list[bool]) -> None:
    await _setup(dsn)
    writers = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(CONNS)]
    reader = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        for w in writers:
            await w.execute("SET lock_timeout = '5s'")  # a model mistake fails, never hangs
        committed: dict[int, str] = {}
        open_txns: dict[int, Txn] = {}
        commit_order: list[tuple[int, Txn]] = []  # (xid, txn)
        delivered: list[ChangeEvent] = []
        pos = START

        async def begin(i: int) -> Txn:
            if i not in open_txns:
                await writers[i].execute("BEGIN")
                open_txns[i] = Txn()
            return open_txns[i]

        async def finish(i: int, commit: bool) -> None:
            txn = open_txns.pop(i, None)
            if txn is None:
                return
            cur = await writers[i].execute("SELECT pg_current_xact_id_if_assigned()::text")
            x = (await cur.fetchone())[0]
            await writers[i].execute("COMMIT" if commit else "ROLLBACK")
            if commit:
                for k, v in txn.overlay.items():
                    if v is None:
                        committed.pop(k, None)
                    else:
                        committed[k] = v
                if txn.events:
                    commit_order.append((int(x), txn))

        async def read(limit: int) -> None:
            nonlocal pos
            events, pos = await outbox.read_batch(reader, SCHEMA, "orders", pos, limit=limit)
            await outbox.save_checkpoint(reader, SCHEMA, "orders", pos, len(events))
            assert await outbox.load_checkpoint(reader, SCHEMA, "orders") == pos
            delivered.extend(events)

        for step in schedule:
            kind = step[0]
            if kind == "write":
                _, i, key, action, value = step
                if any(key in t.touched for j, t in open_txns.items() if j != i):
                    continue  # would wait for another open transaction's row lock
                txn = await begin(i)
                current = txn.overlay[key] if key in txn.overlay else committed.get(key)
                new = f"v{value}"
                if action == "upsert" and current is None:
                    await writers[i].execute("INSERT INTO orders VALUES (%s, %s)", (key, new))
                    txn.events.append(("insert", str(key), new))
                    txn.overlay[key] = new
                    txn.touched.add(key)
                elif action == "upsert":
                    await writers[i].execute(
                        "UPDATE orders SET status = %s WHERE id = %s", (new, key)
                    )
                    if new != current:
                        txn.events.append(("update", str(key), new))
                    txn.overlay[key] = new
                    txn.touched.add(key)
                elif current is not None:
                    await writers[i].execute("DELETE FROM orders WHERE id = %s", (key,))
                    txn.events.append(("delete", str(key), current))
                    txn.overlay[key] = None
                    txn.touched.add(key)
            elif kind == "side":
                await begin(step[1])
                await writers[step[1]].execute("INSERT INTO side DEFAULT VALUES")
            elif kind in ("commit", "rollback"):
                await finish(step[1], kind == "commit")
            else:
                await read(step[1])
        for i, commit in zip(range(CONNS), finals, strict=True):
            await finish(i, commit)
        for _ in range(3):
            await read(1000)

        # nothing twice per pass
        offsets = [e.offset for e in delivered]
        assert len(offsets) == len(set(offsets))
        # delivered = committed changes (rolled-back ones never appear)
        got = Counter((e.op.value, e.key, e.row["status"]) for e in delivered)  # type: ignore[index]
        want = Counter(ev for _, t in commit_order for ev in t.events)
        assert got == want
        # per key: version order = commit order (and statement order inside a transaction)
        for key in {e.key for e in delivered}:
            by_version = sorted((e for e in delivered if e.key == key), key=lambda e: e.version)
            seq = [(e.op.value, e.row["status"]) for e in by_version]  # type: ignore[index]
            expected = [(op, v) for _, t in commit_order for (op, k, v) in t.events if k == key]
            assert seq == expected
            xids = [e.source_xid for e in by_version]
            order = {x: n for n, (x, _) in enumerate(commit_order)}
            assert [order[x] for x in xids] == sorted(order[x] for x in xids)
        # the table and the replayed events agree
        cur = await reader.execute("SELECT id, status FROM orders")
        assert dict(await cur.fetchall()) == committed
    finally:
        for w in writers:
            await w.close()
        await reader.close()


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=steps, finals=st.lists(st.booleans(), min_size=CONNS, max_size=CONNS))
def test_random_interleavings_are_delivered_exactly(
    database: str, schedule: list[Step], finals: list[bool]
) -> None:
    asyncio.run(_scenario(database, schedule, finals))
