"""The commit timestamp of pgoutput (microseconds since 2000-01-01 UTC) becomes the outbox row's
``captured_at`` through COPY text; the conversion is exact (property test) and PostgreSQL reads
it back as the same instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from connector.capture import pgoutput as po
from connector.capture.logical.stream import _copy_time

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# 1970 .. 2200, in microseconds relative to 2000-01-01
MICROS = st.integers(min_value=-946_684_800_000_000, max_value=6_311_433_600_000_000)


@given(MICROS)
def test_copy_time_is_exact(us: int) -> None:
    parsed = datetime.fromisoformat(_copy_time(us).decode())
    assert parsed == PG_EPOCH + timedelta(microseconds=us)
    assert parsed.utcoffset() == timedelta(0)


async def test_postgres_reads_the_copy_text_as_the_same_instant(database: str) -> None:
    now_us = po.now_pg_us()
    samples = [0, 1, -1, 123_456_789_012_345, now_us]
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for us in samples:
            cur = await conn.execute(
                "SELECT (extract(epoch FROM %s::timestamptz) * 1000000)::int8",
                (_copy_time(us).decode(),),
            )
            row = await cur.fetchone()
            assert row is not None
            assert row[0] == us + po.PG_EPOCH_OFFSET_US
