"""Initial sync (issue 6): never stale while live changes race the chunks, resumable after
interruptions without paying twice, the same row image as capture."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import psycopg
import pytest

from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.snapshot import Snapshotter

from .conftest import (
    SCHEMA,
    EngineFactory,
    assert_crm_matches,
    credits_by_api,
    emulator_with,
    execute,
    fetch,
    insert_sql,
    make_client,
    paid_by_api,
    pipeline_config,
)

ROWS = int(os.environ.get("CONNECTOR_SNAPSHOT_ROWS", "20000"))


async def _preexisting(dsn: str, n: int) -> None:
    """n rows that were in the table before capture started (their events are dropped)."""
    await execute(dsn, *insert_sql(n))
    await execute(dsn, "DELETE FROM connector.outbox")


async def _writer(dsn: str, n: int, ops: int, seed: int) -> None:
    rnd = random.Random(seed)
    next_id = n + 1
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(ops):
            kind = rnd.random()
            key = rnd.randint(1, n)
            if kind < 0.3:
                await conn.execute(*insert_sql(1, start=next_id, tag=f"live{i}"))
                next_id += 1
            elif kind < 0.85:
                await conn.execute(
                    "UPDATE public.orders SET name = %s, status = 'Delivered' WHERE id = %s",
                    (f"updated {i}", key),
                )
            else:
                await conn.execute("DELETE FROM public.orders WHERE id = %s", (key,))
            if i % 5 == 0:
                await asyncio.sleep(0.005)


async def test_snapshot_with_a_concurrent_writer_ends_equal_row_for_row(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await _preexisting(legacy, ROWS)
    pipeline = pipeline_config(snapshot="auto")
    async with make_client(emu) as client:
        engine = await make_engine(client, pipeline)
        writer = asyncio.create_task(_writer(legacy, ROWS, 400, seed=1))
        await engine.drain()
        await writer
        await (await make_engine(client, pipeline)).drain()  # whatever the writer did last

    await assert_crm_matches(emu, legacy)
    # every field, not only the name: compare the CRM against the legacy table row for row
    rows = await fetch(
        legacy,
        "SELECT id::text, customer_email, quantity, to_char(order_date, 'YYYY-MM-DD'), is_gift"
        " FROM public.orders",
    )
    crm = {str(r["parent_id"]): r for r in emu.records("Orders")}
    for key, email, qty, day, gift in rows:
        rec = crm[key]
        assert (rec["Customer_Email"], rec["Quantity"], rec["Order_Date"], rec["Is_Gift"]) == (
            email,
            qty,
            day,
            gift,
        ), key
    status = await fetch(legacy, "SELECT status, rows_read, report FROM connector.snapshots")
    assert status[0][0] == "done"
    read = await fetch(legacy, "SELECT sum(rows) FROM connector.snapshot_chunks")
    assert status[0][1] == read[0][0]
    assert abs(status[0][1] - ROWS) <= 400  # the writer inserted and deleted meanwhile
    report = status[0][2]
    assert set(report) >= {"rows_read", "sent", "added", "updated", "skipped", "credits"}
    assert report["skipped"] == 0
    assert emu.usage()["bulk_jobs"] >= 1  # the backlog went by Bulk Write


@pytest.fixture
async def slow_emu() -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(emulator_with(queue_seconds=100.0)) as handle:
        yield handle


async def _created_jobs(dsn: str) -> int:
    rows = await fetch(dsn, "SELECT count(*) FROM connector.bulk_jobs WHERE job_id IS NOT NULL")
    return int(rows[0][0])


async def test_snapshot_interrupted_three_times_resumes_exactly(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = slow_emu
    n, chunk = 24_000, 6_000  # 4 chunks, each above break-even
    await _preexisting(legacy, n)
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=chunk)
    for interruption in range(1, 4):
        async with make_client(emu) as client:
            task = asyncio.create_task((await make_engine(client, pipeline)).drain())
            for _ in range(2_000):
                if await _created_jobs(legacy) >= interruption:
                    break
                await asyncio.sleep(0.02)
            # never cancel at an unplanned point: the chunk's job is created and recorded
            assert await _created_jobs(legacy) == interruption
            task.cancel()  # killed while the chunk's bulk job runs (often mid ledger flush)
            with pytest.raises(asyncio.CancelledError):
                await task
        emu.advance(200)

    async def advance() -> None:
        while True:
            emu.advance(200)
            await asyncio.sleep(0.02)

    ticker = asyncio.create_task(advance())
    try:
        async with make_client(emu) as client:
            await (await make_engine(client, pipeline)).drain()
    finally:
        ticker.cancel()

    await assert_crm_matches(emu, legacy)
    chunks = await fetch(legacy, "SELECT count(*) FROM connector.snapshot_chunks")
    assert chunks == [(4,)]
    assert emu.usage()["bulk_jobs"] == 4
    assert paid_by_api(emu) == {"bulk_write_job": 500 * 4}  # no chunk paid twice
    rows = await fetch(legacy, "SELECT status, rows_read, report FROM connector.snapshots")
    assert rows[0][0] == "done"
    assert rows[0][1] == n
    assert rows[0][2]["sent"] == n and rows[0][2]["added"] == n
    # the ledger agrees with the CRM (jobs and their 1-credit side calls): no 500 written twice
    assert rows[0][2]["credits"] == sum(credits_by_api(emu).values())


async def test_snapshot_row_image_equals_the_captured_image(legacy: str) -> None:
    await execute(
        legacy,
        "INSERT INTO public.orders VALUES (1, 'a \"quoted\" name', 'x@example.org', 'New',"
        " 12345678.90, 3, '2024-02-29', '2024-03-01 12:34:56.789+05:30', E'multi\\nline',"
        " true, false)",
    )
    pipeline = pipeline_config(snapshot="auto")
    snap = Snapshotter(pipeline, source_dsn=legacy, state_dsn=legacy, schema=SCHEMA)
    await snap.prepare()
    chunk = await snap.read_chunk()
    assert chunk is not None and chunk.rows == 1
    assert await snap.read_chunk() is None
    rows = await fetch(legacy, "SELECT op, row FROM connector.outbox WHERE key = '1' ORDER BY id")
    assert [r[0] for r in rows] == ["insert", "snapshot"]
    assert rows[0][1] == rows[1][1]


async def test_a_column_named_like_the_alias_does_not_replace_the_row_image(legacy: str) -> None:
    """The snapshot (and verify, the sync flag, the logical re-reads) read ``to_jsonb(t) FROM
    <table> t``: with a column named ``t`` that is the column's value, not the row, so every
    snapshot image was a bare number. ``t.*`` is always the whole row."""
    await execute(legacy, "ALTER TABLE public.orders ADD COLUMN t int")
    await execute(
        legacy,
        "INSERT INTO public.orders VALUES (1, 'n', 'x@example.org', 'New', 1.5, 1,"
        " '2024-02-29', '2024-03-01 12:00:00+00', 'm', false, false, 7)",
    )
    pipeline = pipeline_config(snapshot="auto")
    snap = Snapshotter(pipeline, source_dsn=legacy, state_dsn=legacy, schema=SCHEMA)
    await snap.prepare()
    chunk = await snap.read_chunk()
    assert chunk is not None and chunk.rows == 1
    rows = await fetch(legacy, "SELECT op, row FROM connector.outbox WHERE key = '1' ORDER BY id")
    assert [r[0] for r in rows] == ["insert", "snapshot"]
    assert rows[1][1] == rows[0][1] and rows[1][1]["t"] == 7


async def test_snapshot_refuses_without_capture(database: str) -> None:
    from connector.errors import PermanentError

    await execute(database, "CREATE TABLE public.orders (id bigint PRIMARY KEY, name text)")
    snap = Snapshotter(
        pipeline_config(snapshot="auto"), source_dsn=database, state_dsn=database, schema=SCHEMA
    )
    with pytest.raises(PermanentError, match="capture is not installed"):
        await snap.prepare()


async def test_snapshot_rejections_are_dead_lettered_and_fixed_rows_arrive(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    n = 6_000
    bad = list(range(50, 1_050, 50))  # 20 keys
    await execute(legacy, *insert_sql(n))
    await execute(legacy, "UPDATE public.orders SET status = 'Lost' WHERE id = ANY(%s)", (bad,))
    await execute(legacy, "DELETE FROM connector.outbox")
    pipeline = pipeline_config(snapshot="auto")
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline)).drain()
        letters = await fetch(
            legacy,
            "SELECT key::int, error_code, error_field FROM connector.dead_letters"
            " WHERE status = 'open' ORDER BY key::int",
        )
        assert [r[0] for r in letters] == bad
        assert {(r[1], r[2]) for r in letters} == {("INVALID_DATA", "Status")}
        report = (await fetch(legacy, "SELECT report FROM connector.snapshots"))[0][0]
        assert (report["sent"], report["skipped"]) == (n - 20, 20)

        await execute(legacy, "UPDATE public.orders SET status = 'New' WHERE id = ANY(%s)", (bad,))
        await (await make_engine(client, pipeline)).drain()
    await assert_crm_matches(emu, legacy)
    rows = await fetch(legacy, "SELECT status, count(*) FROM connector.dead_letters GROUP BY 1")
    assert rows == [("resolved", 20)]


async def test_progress_is_logged_once_per_chunk_without_a_terminal(
    legacy: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from connector.snapshot import SnapshotProgress

    await _preexisting(legacy, 2_500)
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=1_000)
    snap = Snapshotter(
        pipeline,
        source_dsn=legacy,
        state_dsn=legacy,
        schema=SCHEMA,
        progress=SnapshotProgress("orders", terminal=False),
    )
    with caplog.at_level(logging.INFO, logger="connector.snapshot"):
        row = await snap.run()
    lines = [r for r in caplog.records if r.getMessage() == "snapshot chunk"]
    assert [(r.chunk, r.rows_done) for r in lines] == [(1, 1_000), (2, 2_000), (3, 2_500)]  # type: ignore[attr-defined]
    assert row.rows_read == 2_500 and row.chunks_done == 3 and row.status == "running"
    report = await snap.finish()
    assert report["rows_read"] == 2_500 and report["chunks"] == 3


async def test_rich_progress_bar_on_a_terminal(legacy: str) -> None:
    from connector.snapshot import SnapshotProgress

    await _preexisting(legacy, 1_500)
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=1_000)
    progress = SnapshotProgress("orders", terminal=True)
    snap = Snapshotter(
        pipeline, source_dsn=legacy, state_dsn=legacy, schema=SCHEMA, progress=progress
    )
    row = await snap.run()
    assert row.rows_read == 1_500
    assert progress._progress is None  # started, updated per chunk, stopped


async def test_run_snapshot_restart_resyncs_everything(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await _preexisting(legacy, 300)
    pipeline = pipeline_config(snapshot="auto")
    async with make_client(emu) as client:
        first = await (await make_engine(client, pipeline)).run_snapshot()
        assert first is not None and (first["rows_read"], first["sent"]) == (300, 300)
        emu.reset()  # the CRM lost everything
        await execute(legacy, "UPDATE public.orders SET name = 'after' WHERE id = 5")
        second = await (await make_engine(client, pipeline)).run_snapshot(restart=True)
    assert second is not None and second["rows_read"] == 300
    await assert_crm_matches(emu, legacy)
    chunks = await fetch(legacy, "SELECT chunk_no FROM connector.snapshot_chunks ORDER BY 1")
    assert chunks == [(1,), (2,)]  # the first snapshot's chunk is kept (ordering of old rows)


async def test_credits_written_once_when_a_cancel_lands_on_the_ledger_commit(database: str) -> None:
    """The interrupted snapshot's report once said 2,500 credits for 4 jobs (the CRM counted
    2,000): the engine was cancelled while the ledger flush of a job's 500 was committing.
    psycopg then cancels the COMMIT on the server, reads its answer and raises; the rows were
    stored but re-queued, and the shutdown's flush wrote them again. Here the COMMIT waits on
    a lock held by the test (a deferred trigger), and goes through even when cancelled: the
    state the race leaves when the server commits before the cancel arrives."""
    from connector.emitter import CreditRecorder, acting_for

    await execute(
        database,
        "CREATE FUNCTION public.commit_waits() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL;"
        " EXCEPTION WHEN query_canceled THEN RETURN NULL; END $$",
    )
    await execute(
        database,
        "CREATE CONSTRAINT TRIGGER commit_waits AFTER INSERT ON connector.credit_ledger"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.commit_waits()",
    )
    recorder = CreditRecorder()
    with acting_for("orders"):
        recorder("bulk_create", 0, 500, 0.1, 200, None)
    async with (
        await psycopg.AsyncConnection.connect(database, autocommit=True) as holder,
        await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
    ):
        await holder.execute("SELECT pg_advisory_lock(4242)")
        flush = asyncio.create_task(recorder.flush(conn, SCHEMA))
        waiting: list[tuple[object, ...]] = []
        for _ in range(1_000):  # until the flush's COMMIT waits on the lock
            waiting = await fetch(
                database,
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
                " AND NOT granted",
            )
            if waiting or flush.done():
                break
            await asyncio.sleep(0.01)
        assert waiting, "the ledger flush never reached its COMMIT"
        flush.cancel()
        await holder.execute("SELECT pg_advisory_unlock(4242)")
        with pytest.raises(asyncio.CancelledError):
            await flush
        await recorder.flush(conn, SCHEMA)  # what the engine's shutdown does next
    rows = await fetch(database, "SELECT api, credits FROM connector.credit_ledger")
    assert rows == [("bulk_create", 500)]
    assert recorder.pending() == 0


async def test_snapshot_ends_at_the_rows_there_when_it_started_while_inserts_go_on(
    legacy: str,
) -> None:
    """New orders keep arriving at growing keys while the initial sync runs: it reads the
    2,500 rows that were there at its first chunk and ends; the rows inserted since are in the
    outbox as live inserts (captured), not read again. Before migration 13 each chunk found
    the rows inserted while the previous one was sent, and under a steady insert stream the
    snapshot never ended (session 20's soak: still running after 22 minutes, the order lines'
    initial sync waiting for it)."""
    await _preexisting(legacy, 2_500)
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=1_000)
    snap = Snapshotter(pipeline, source_dsn=legacy, state_dsn=legacy, schema=SCHEMA)
    next_id = 10_001
    chunks = 0

    async def meanwhile(chunk: object) -> None:  # 300 new orders while each chunk is sent
        nonlocal next_id, chunks
        chunks += 1
        if chunks <= 6:
            await execute(legacy, *insert_sql(300, start=next_id, tag="live"))
            next_id += 300

    row = await snap.run(chunk_sent=meanwhile)
    assert (row.rows_read, row.chunks_done) == (2_500, 3)
    live = await fetch(
        legacy,
        "SELECT count(*) FROM connector.outbox WHERE op = 'insert' AND key::bigint > 10000",
    )
    assert live[0][0] == 900  # 3 chunks × 300: captured live, not read by the snapshot
    # restarted, it reads the table as it is then (the bound is taken again)
    await snap.prepare(restart=True)
    row = await snap.run()
    assert row.rows_read == 2_500 + 900
