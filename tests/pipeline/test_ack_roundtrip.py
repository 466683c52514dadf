"""``state.record_acks`` stores exactly what it is given (issue 19 sends ``sent_hash`` as a
binary ``bytea[]`` parameter instead of text): any bytes (NUL, backslashes, quotes, braces,
empty), NULL hashes, a batch of only NULLs, snapshots and wide xids come back from
``key_states`` unchanged, and a later ack overwrites an earlier one."""

from __future__ import annotations

import asyncio
import itertools

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import state
from connector.events import EventStamp, SnapshotVisibility

SCHEMA = "connector"
_run = itertools.count()

_hashes = st.one_of(
    st.none(),
    st.binary(max_size=24),
    st.sampled_from([b"", b"\x00", b"\\", b'"', b"{}", b",", b"NULL", b"\\x00\\"]),
)
_snapshots = st.sampled_from(
    [None, SnapshotVisibility(100, 100), SnapshotVisibility(100, 105, frozenset({101, 103}))]
)
_pg_text = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
_acks = st.lists(
    st.tuples(
        st.text(_pg_text, min_size=1, max_size=6),
        st.one_of(st.none(), st.text(_pg_text, max_size=8)),
        st.integers(1, 2**62),
        st.integers(1, 2**63 - 1),
        _snapshots,
        st.booleans(),
        _hashes,
    ),
    max_size=12,
    unique_by=lambda t: t[0],
)


async def _roundtrip(dsn: str, batches: list[list[state.Ack]], pipeline: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        expected: dict[str, state.Ack] = {}
        for acks in batches:
            await state.record_acks(conn, SCHEMA, pipeline, acks)
            expected.update({a.key: a for a in acks})
        got = await state.key_states(conn, SCHEMA, pipeline, list(expected))
    assert set(got) == set(expected)
    for key, a in expected.items():
        ks = got[key]
        assert ks.sent_hash == a.sent_hash
        assert ks.stamp == a.stamp
        assert ks.deleted == a.deleted
        assert ks.status == "synced"
        assert ks.crm_id == a.crm_id  # the first ack of each key here never has a stored id


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(_acks, min_size=1, max_size=3))
def test_record_acks_roundtrip(database: str, batches: list[list[tuple[object, ...]]]) -> None:
    pipeline = f"p{next(_run)}"
    acks: list[list[state.Ack]] = []
    seen_id: dict[str, str | None] = {}
    for batch in batches:
        out = []
        for key, crm_id, version, xid, snap, deleted, sent_hash in batch:
            # coalesce(new, stored): once a key has an id, a NULL keeps it (as the query says)
            cid = crm_id if crm_id is not None else seen_id.get(str(key))
            if cid is not None:
                seen_id[str(key)] = cid  # type: ignore[assignment]
            out.append(
                state.Ack(
                    key=str(key),
                    stamp=EventStamp(int(version), int(xid), snap),  # type: ignore[call-overload, arg-type]
                    crm_id=cid,  # type: ignore[arg-type]
                    deleted=bool(deleted),
                    sent_hash=sent_hash,  # type: ignore[arg-type]
                )
            )
        acks.append(out)
    asyncio.run(_roundtrip(database, acks, pipeline))


def test_record_acks_all_null_hashes_in_one_batch(database: str) -> None:
    acks = [state.Ack(key=str(i), stamp=EventStamp(i, 7), crm_id=f"c{i}") for i in range(1, 50)]
    asyncio.run(_roundtrip(database, [acks], "bulk-like"))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.text(_pg_text, min_size=1, max_size=6),
            st.integers(1, 2**63 - 1),
            st.integers(1, 2**64 - 1),
            _snapshots,
            st.sampled_from(["insert", "update", "delete", "snapshot"]),
            st.integers(1, 2**63 - 1),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_bulk_intent_entries_roundtrip(database: str, raw: list[tuple[object, ...]]) -> None:
    """The entries a bulk job records at intent (issue 19 writes them with orjson) come back
    as they were written: keys of any text, versions, xids up to 2^64 - 1, snapshots."""
    entries = [
        state.BulkEntry(str(k), EventStamp(int(v), int(x), s), str(op), int(o))  # type: ignore[call-overload, arg-type]
        for k, v, x, s, op, o in raw
    ]
    pipeline = f"b{next(_run)}"

    async def go() -> list[state.BulkEntry]:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await state.bulk_intent(conn, SCHEMA, pipeline, "upsert", entries)
            jobs = await state.open_bulk_jobs(conn, SCHEMA, pipeline)
        assert len(jobs) == 1
        return jobs[0].entries

    assert asyncio.run(go()) == entries
