"""Issue 15 items 4-7 end to end: automations (``trigger``), transient per-record errors,
expired bulk jobs and result STATUS spellings, against the emulator behaving like Zoho."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from connector.emulator import start_emulator
from connector.emulator.records import ALL_TRIGGERS
from connector.emulator.server import EmulatorHandle

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
    pipeline_config,
    wait_for,
)

# ---- item 4: which automations the synced writes run -------------------------------------------


async def test_synced_writes_run_no_automation_by_default(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(5))
    await execute(legacy, "DELETE FROM public.orders WHERE id = 5")
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
    writes = emu.triggers()
    assert {w["api"] for w in writes} == {"upsert"}
    assert all(w["trigger"] == [] for w in writes), writes
    rec = emu.records("Orders")[0]
    assert emu.history("Orders", rec["id"])[-1]["trigger"] == []


async def test_configured_automations_are_asked_for(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    pipeline = pipeline_config(triggers=["workflow", "blueprint"])
    await execute(legacy, *insert_sql(3))
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline)).drain()
        await execute(legacy, "DELETE FROM public.orders WHERE id = 3")
        await (await make_engine(client, pipeline)).drain()
    writes = emu.triggers()
    assert [w["api"] for w in writes] == ["upsert", "delete"]
    assert writes[0]["trigger"] == ["workflow", "blueprint"]
    assert writes[1]["trigger"] == ["workflow"]  # Delete Records: wf_trigger=true
    assert set(writes[0]["trigger"]) < set(ALL_TRIGGERS)


def test_unknown_trigger_value_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"triggers[\s\S]*'workflow', 'approval'"):
        pipeline_config(triggers=["workflows"])


# ---- item 7: result STATUS spellings -----------------------------------------------------------


@pytest.fixture
async def odd_status_emu() -> AsyncIterator[EmulatorHandle]:
    """Result files spell STATUS in words the client has never seen."""
    statuses = {
        "ADDED": "Record Added",
        "UPDATED": "Record Updated",
        "SKIPPED": "skipped",
        "UNPROCESSED": "unprocessed",
    }
    async with start_emulator(emulator_with(result_statuses=statuses)) as handle:
        yield handle


async def test_result_status_spellings_and_unprocessed_rows(
    legacy: str, odd_status_emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    emu = odd_status_emu
    emu.set_faults(unprocessed_rows_next=7)
    await execute(legacy, *insert_sql(6_000))
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
    assert (
        await fetch(legacy, "SELECT error_code, count(*) FROM connector.dead_letters GROUP BY 1")
        == []
    )
    await assert_crm_matches(emu, legacy)
    rows = await fetch(legacy, "SELECT count(*) FROM connector.key_state WHERE status = 'synced'")
    assert rows == [(6_000,)]
    assert emu.usage()["bulk_jobs"] >= 1


# ---- item 6: a bulk job or its result link expired during a long outage ------------------------


@pytest.mark.parametrize(
    ("bulk", "outage"),
    [
        # the job's details are gone (404 RESOURCE_NOT_FOUND) a week after it ended
        ({"queue_seconds": 100.0}, 8 * 86_400.0),
        # the job is still known, its result link is not (403 "Link not valid")
        ({"queue_seconds": 100.0, "result_link_ttl": 50.0, "job_ttl": 1e9}, 1_000.0),
    ],
    ids=["job-expired", "link-expired"],
)
async def test_expired_bulk_job_is_sent_again_after_a_long_outage(
    legacy: str, make_engine: EngineFactory, bulk: dict[str, float], outage: float
) -> None:
    async with start_emulator(emulator_with(**bulk)) as emu:
        await execute(legacy, *insert_sql(6_000))
        fast = dataclasses.replace(
            FAST, drain_timeout=0.05, default_bulk_latency=0.2, orphan_fence_min=0.2
        )
        async with make_client(emu) as client:
            first = asyncio.create_task((await make_engine(client, options=fast)).drain())
            for _ in range(1_000):
                rows = await fetch(legacy, "SELECT status FROM connector.bulk_jobs")
                if rows == [("created",)]:
                    break
                await asyncio.sleep(0.02)
            first.cancel()  # the process dies while the CRM works on the job
            with pytest.raises(asyncio.CancelledError):
                await first
        emu.advance(outage)  # a long outage: the CRM forgets the job or its result
        emu.state.config.bulk.queue_seconds = 0.0  # the job sent again runs at once
        async with make_client(emu) as client:
            await (await make_engine(client, options=fast)).drain()
        jobs = await fetch(legacy, "SELECT status FROM connector.bulk_jobs ORDER BY id")
        assert jobs[0] == ("abandoned",)  # not failed, not retried forever
        await assert_crm_matches(emu, legacy)
        rows = await fetch(
            legacy, "SELECT count(*) FROM connector.key_state WHERE status = 'synced'"
        )
        assert rows == [(6_000,)]
        assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]


# ---- item 5: transient per-record errors -------------------------------------------------------


def _crm_id(emu: EmulatorHandle, key: str) -> str:
    return next(str(r["id"]) for r in emu.records("Orders") if str(r["parent_id"]) == key)


async def test_locked_record_is_retried_until_the_lock_ends(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(3))
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
        emu.lock("Orders", _crm_id(emu, "2"), seconds=2.0)  # an approval that ends soon
        await execute(legacy, "UPDATE public.orders SET name = 'AFTER LOCK'")
        await (await make_engine(client)).drain()
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
    await assert_crm_matches(emu, legacy)
    locked_answers = [w for w in emu.triggers() if w["api"] == "upsert"]
    assert len(locked_answers) >= 3  # first sync, the update, at least one retry of key 2


async def test_lasting_lock_is_dead_lettered_with_the_reason_after_max_staleness(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    pipeline = pipeline_config(max_staleness="2s")
    await execute(legacy, *insert_sql(3))
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline)).drain()
        emu.lock("Orders", _crm_id(emu, "2"))  # locked until someone approves: not today
        await execute(legacy, "UPDATE public.orders SET name = 'AFTER LOCK'")
        await (await make_engine(client, pipeline)).drain()
    dead = await fetch(
        legacy, "SELECT key, error_code, error_message, api FROM connector.dead_letters"
    )
    assert len(dead) == 1
    key, code, message, api = dead[0]
    assert (key, code, api) == ("2", "RECORD_LOCKED", "upsert")
    assert "attempts" in message and "max_staleness" in message
    crm = {str(r["parent_id"]): r["Name"] for r in emu.records("Orders")}
    assert crm["1"] == crm["3"] == "AFTER LOCK"
    assert crm["2"] != "AFTER LOCK"


async def test_bulk_row_of_a_locked_record_is_retried_not_dead_lettered(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(6_000))
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
        locked = _crm_id(emu, "42")
        emu.lock("Orders", locked)
        await execute(legacy, "UPDATE public.orders SET name = name || ' v2'")
        task = asyncio.create_task((await make_engine(client)).drain())
        for _ in range(1_500):  # the update's job is applied with key 42 refused
            applied = await fetch(
                legacy, "SELECT count(*) FROM connector.bulk_jobs WHERE status = 'applied'"
            )
            if applied == [(2,)]:
                break
            await asyncio.sleep(0.02)
        assert applied == [(2,)]
        assert not task.done()  # key 42 is pending again, not dead-lettered
        emu.lock("Orders", locked, unlock=True)  # the approval ends
        await asyncio.wait_for(task, 60)
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
    await assert_crm_matches(emu, legacy)
    assert emu.usage()["bulk_jobs"] == 2


async def test_a_locked_record_does_not_hold_back_the_pipeline(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    """The locked key waits behind a fence of its own (1 s, 2 s, … up to 30 s); the
    pipeline-wide retry backoff (which pauses every other key) is not used."""
    await execute(legacy, *insert_sql(3))
    async with make_client(emu) as client:
        await (await make_engine(client)).drain()
        emu.lock("Orders", _crm_id(emu, "2"))
        await execute(legacy, "UPDATE public.orders SET name = 'v2' WHERE id = 2")
        engine = await make_engine(client)
        task = asyncio.create_task(engine.drain())
        for _ in range(1_500):  # key 2 refused at least twice
            if sum(w["api"] == "upsert" for w in emu.triggers()) >= 3:
                break
            await asyncio.sleep(0.02)
        assert engine._retry_delay == 0.0  # no pipeline-wide backoff
        assert not task.done()
        await execute(legacy, "UPDATE public.orders SET name = 'v2' WHERE id = 3")
        await wait_for(lambda: crm_by_key(emu)["3"]["Name"] == "v2")
        assert crm_by_key(emu)["2"]["Name"] != "v2"  # still locked, still pending
        emu.lock("Orders", _crm_id(emu, "2"), unlock=True)
        await asyncio.wait_for(task, 60)
    await assert_crm_matches(emu, legacy)
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
