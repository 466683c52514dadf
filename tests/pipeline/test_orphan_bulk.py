"""A bulk job whose create call reached the CRM but whose id was never recorded (the process
died, or the create's answer was lost) may still run on the CRM: an *orphan*. Its keys are
fenced until it can no longer write (its callback, or a bound from its size and the measured
bulk rate), then the newest version is sent (invariant 2). Also: the initial sync's chunk goes
by one bulk job whatever the staleness budget, and the bulk estimate survives a restart
(invariant 6)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from connector import state
from connector.costs import CostModel
from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.engine import Engine
from connector.errors import TransientError
from connector.snapshot import Snapshotter
from connector.zoho.client import ZohoClient

from .conftest import (
    FAST,
    EngineFactory,
    assert_crm_matches,
    crm_by_key,
    emulator_with,
    execute,
    fetch,
    insert_sql,
    make_client,
    paid_by_api,
    pipeline_config,
    wait_for,
)

# bulk pays from 100 records with this price: the first run sends 300 rows by one job
CHEAP_BULK = CostModel(bulk_job_credits=10)
# no bulk job measured yet: the fence is 3 × 1 s
FENCE_3S = dataclasses.replace(
    FAST, default_bulk_latency=1.0, orphan_fence_factor=3.0, orphan_fence_min=0.5
)


@pytest.fixture
async def slow_emu() -> AsyncIterator[EmulatorHandle]:
    """Bulk jobs stay queued until the test moves the emulator clock."""
    async with start_emulator(emulator_with(queue_seconds=100.0)) as handle:
        yield handle


def _dies_after_create(client: ZohoClient, created: asyncio.Event) -> None:
    """The create call reaches the CRM; the process dies before the job id is stored."""
    original = client.create_bulk_job

    async def create(*args: Any, **kwargs: Any) -> str:
        await original(*args, **kwargs)
        created.set()
        await asyncio.Event().wait()  # killed here
        raise AssertionError("unreachable")

    client.create_bulk_job = create  # type: ignore[method-assign]


def _answer_lost(client: ZohoClient) -> None:
    """The create call reaches the CRM but its answer never comes back (every time)."""
    original = client.create_bulk_job

    async def create(*args: Any, **kwargs: Any) -> str:
        await original(*args, **kwargs)
        raise TransientError("bulk_create: timeout")

    client.create_bulk_job = create  # type: ignore[method-assign]


async def _orphan(legacy: str, emu: EmulatorHandle, make_engine: EngineFactory) -> int:
    """300 rows, then a run that dies right after creating their bulk job: the orphan."""
    await execute(legacy, *insert_sql(300))
    created = asyncio.Event()
    async with make_client(emu) as client:
        _dies_after_create(client, created)
        first = asyncio.create_task((await make_engine(client, cost=CHEAP_BULK)).drain())
        await asyncio.wait_for(created.wait(), 30)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    rows = await fetch(legacy, "SELECT id, status, job_id FROM connector.bulk_jobs")
    assert [(r[1], r[2]) for r in rows] == [("uploaded", None)]
    return int(rows[0][0])


def _history_names(emu: EmulatorHandle, key: str) -> list[Any]:
    rec = crm_by_key(emu)[key]
    return [h["values"].get("Name") for h in emu.history("Orders", rec["id"])]


def _sent_or_fenced(engine: Engine, key: str) -> bool:
    fenced = getattr(engine.coalescer, "fenced", lambda: set())()
    return engine.coalescer.acked(key) is not None or key in fenced


async def test_orphan_job_never_lands_after_a_newer_version(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = slow_emu
    await _orphan(legacy, emu, make_engine)
    await execute(legacy, "UPDATE public.orders SET name = 'NEWER' WHERE id = 42")
    async with make_client(emu) as client:
        engine = await make_engine(client, options=FENCE_3S)
        task = asyncio.create_task(engine.drain())
        # the restarted engine has either sent key 42 already or holds it back
        await wait_for(lambda: _sent_or_fenced(engine, "42"))
        emu.advance(200)  # now the orphan runs on the CRM and writes its (older) rows
        await asyncio.wait_for(task, 60)
    await asyncio.sleep(0.2)
    emu.advance(200)
    names = _history_names(emu, "42")
    assert names[-1] == "NEWER", names  # the orphan's Rev 1 never lands after Rev 2
    await assert_crm_matches(emu, legacy)
    status = await fetch(legacy, "SELECT status FROM connector.bulk_jobs ORDER BY id")
    assert [s for (s,) in status] == ["abandoned"]


async def test_orphan_callback_releases_the_fence_early(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = slow_emu
    job_row = await _orphan(legacy, emu, make_engine)
    secret = await fetch(legacy, "SELECT callback_secret FROM connector.bulk_jobs")
    assert secret[0][0]  # stored before the create call: the orphan's callback is recognised
    await execute(legacy, "UPDATE public.orders SET name = 'NEWER' WHERE id = 42")
    long_fence = dataclasses.replace(FAST, default_bulk_latency=600.0)
    async with make_client(emu) as client:
        engine = await make_engine(client, options=long_fence)
        task = asyncio.create_task(engine.drain())
        await wait_for(lambda: "42" in engine.coalescer.fenced())
        assert engine.coalescer.acked("42") is None
        emu.advance(200)  # the orphan finishes; the CRM calls back
        assert engine.wake_bulk(job_row)
        await asyncio.wait_for(task, 30)  # far sooner than the 1,800 s bound
    assert _history_names(emu, "42")[-1] == "NEWER"
    await assert_crm_matches(emu, legacy)
    over = await fetch(
        legacy, "SELECT fence_until <= now() FROM connector.bulk_jobs WHERE id = %s", (job_row,)
    )
    assert over == [(True,)]  # a restart does not fence it again


async def test_orphan_callback_before_the_fence_is_set_ends_it(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    """The callback came while the restarted engine was still recovering: the fence that
    recover then sets is already over."""
    emu = slow_emu
    job_row = await _orphan(legacy, emu, make_engine)
    emu.advance(200)  # the orphan finishes
    async with await psycopg.AsyncConnection.connect(legacy, autocommit=True) as conn:
        await state.bulk_unfence(conn, "connector", job_row)  # what Engine.wake_bulk stores
    await execute(legacy, "UPDATE public.orders SET name = 'NEWER' WHERE id = 42")
    long_fence = dataclasses.replace(FAST, default_bulk_latency=600.0)
    async with make_client(emu) as client:
        engine = await make_engine(client, options=long_fence)
        await asyncio.wait_for(engine.drain(), 30)  # not held for the 1,800 s bound
    assert _history_names(emu, "42")[-1] == "NEWER"
    await assert_crm_matches(emu, legacy)


async def test_fence_survives_a_restart(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = slow_emu
    await _orphan(legacy, emu, make_engine)
    await execute(legacy, "UPDATE public.orders SET name = 'NEWER' WHERE id = 42")
    long_fence = dataclasses.replace(FAST, default_bulk_latency=600.0)
    async with make_client(emu) as client:
        second = asyncio.create_task((await make_engine(client, options=long_fence)).drain())
        await asyncio.sleep(0.5)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        engine = await make_engine(client, options=long_fence)
        third = asyncio.create_task(engine.drain())
        await wait_for(lambda: "42" in engine.coalescer.fenced())
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
    assert "NEWER" not in [r.get("Name") for r in emu.records("Orders")]


async def test_create_answer_lost_fences_until_the_bound(
    legacy: str, slow_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = slow_emu
    await execute(legacy, *insert_sql(300))
    async with make_client(emu) as client:
        _answer_lost(client)
        engine = await make_engine(client, options=FENCE_3S, cost=CHEAP_BULK)
        task = asyncio.create_task(engine.drain())
        await wait_for(lambda: "42" in engine.coalescer.fenced())
        await execute(legacy, "UPDATE public.orders SET name = 'NEWER' WHERE id = 42")
        emu.advance(200)  # the orphan runs
        del client.create_bulk_job  # the CRM answers again
        while not task.done():  # and runs the next job at once
            emu.advance(200)
            await asyncio.sleep(0.1)
        await task
    assert _history_names(emu, "42")[-1] == "NEWER"
    await assert_crm_matches(emu, legacy)


async def test_snapshot_chunk_goes_by_one_bulk_job_under_a_short_staleness_budget(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    """10 s of staleness, no bulk job measured yet (default 120 s): the chunk of 6,000 rows
    still goes as one job (500 credits), not by upsert (600)."""
    await execute(legacy, *insert_sql(6_000))
    # rows that were there before capture was installed: only the initial sync has them
    await execute(legacy, "DELETE FROM connector.outbox")
    pipeline = pipeline_config(snapshot="auto", max_staleness="10s")
    async with make_client(emu) as client:
        engine = await make_engine(client, pipeline)
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(stop))
        await wait_for(lambda: engine.snapshot_report is not None, 60)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert paid_by_api(emu) == {"bulk_write_job": 500}
    await assert_crm_matches(emu, legacy)


async def test_chunk_written_before_a_restart_goes_as_one_job_when_read_in_parts(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    """The chunk was written by a run that died; it is an hour old now (overdue for a live
    change) and the reader takes it in three parts. It still goes as one bulk job: the
    initial sync has no staleness deadline, and a partly read chunk does not leave alone."""
    await execute(legacy, *insert_sql(6_000))
    # rows that were there before capture was installed: only the initial sync has them
    await execute(legacy, "DELETE FROM connector.outbox")
    pipeline = pipeline_config(snapshot="auto", max_staleness="10s")
    snap = Snapshotter(pipeline, source_dsn=legacy, state_dsn=legacy, schema="connector")
    await snap.prepare()
    chunk = await snap.read_chunk()
    assert chunk is not None and chunk.rows == 6_000
    await execute(legacy, "UPDATE connector.outbox SET captured_at = now() - interval '1 hour'")
    async with make_client(emu) as client:
        engine = await make_engine(
            client, pipeline, options=dataclasses.replace(FAST, read_limit=2_000)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(stop))
        await wait_for(lambda: engine.snapshot_report is not None, 60)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert paid_by_api(emu) == {"bulk_write_job": 500}
    await assert_crm_matches(emu, legacy)


async def test_bulk_estimate_survives_a_restart_and_checkpoint_counts_events(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(6_000))
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
        rows = await fetch(legacy, "SELECT duration_seconds FROM connector.bulk_jobs")
        assert len(rows) == 1 and rows[0][0] is not None and rows[0][0] > 0
        engine = await make_engine(client)
        await engine.drain()
        assert engine.emitter is not None
        assert engine.emitter.bulk_latency == pytest.approx(rows[0][0])
    passed = await fetch(legacy, "SELECT events_passed FROM connector.checkpoints")
    assert passed == [(6_000,)]


async def test_sending_resumes_when_the_crm_credits_come_back(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    """The CRM said 0 credits remaining; without calls that reading never changes. After the
    probe interval the engine tries again and delivers once the allowance is back."""
    ledger = emu.state.ledger
    ledger.set_used(ledger.allowance)  # the allowance is spent
    await execute(legacy, *insert_sql(10))
    options = dataclasses.replace(FAST, credit_probe_interval=0.3, retry_backoff_max=0.5)
    async with make_client(emu) as client:
        engine = await make_engine(client, pipeline_config(max_staleness="1s"), options=options)
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(stop))
        await wait_for(lambda: client.credits_remaining == 0 and engine._retry_delay > 0)
        await asyncio.sleep(1.0)  # the engine has planned with 0 credits left meanwhile
        ledger.set_used(0)  # the CRM's window rolled on
        await wait_for(lambda: len(emu.records("Orders")) == 10, 30)
        stop.set()
        await asyncio.wait_for(task, 30)
    await assert_crm_matches(emu, legacy)
