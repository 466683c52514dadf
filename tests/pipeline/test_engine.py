"""The engine in its normal mode (planner-driven waiting) and the delete modes."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import psycopg

from connector.emulator.server import EmulatorHandle
from connector.engine import drain_plan
from connector.planner import PendingKey, PlannerInput
from connector.zoho.client import ZohoClient

from .conftest import (
    FAST,
    EngineFactory,
    assert_crm_matches,
    credits_by_api,
    crm_by_key,
    execute,
    fetch,
    insert_sql,
    pipeline_config,
    wait_for,
)


async def test_run_waits_then_sends_within_max_staleness_and_stops_cleanly(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    pipeline = pipeline_config(max_staleness=timedelta(seconds=3))
    # an upsert round trip assumed at 0.2 s until measured: the deadline leaves ~2.5 s to wait
    options = dataclasses.replace(FAST, default_upsert_latency=0.2)
    engine = await make_engine(client, pipeline, options=options)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    async with await psycopg.AsyncConnection.connect(legacy) as conn:  # one transaction
        await conn.execute(*insert_sql(150))
        await conn.execute("UPDATE public.orders SET status = 'Paid' WHERE id <= 150")
        await conn.commit()
    await wait_for(
        lambda: sum(r.get("Status") == "Paid" for r in emu.records("Orders")) == 150, timeout=30
    )
    # updates coalesced into the inserts, and the
    # 150 records left as one full call of 100 and one of 50 (15 credits, not 30)
    assert credits_by_api(emu) == {"upsert": 15}
    await wait_for(lambda: engine.checkpoint.last_id > 0, timeout=10)
    stop.set()
    await asyncio.wait_for(task, 10)
    await assert_crm_matches(emu, legacy)
    rows = await fetch(
        legacy,
        "SELECT c.last_id = (SELECT max(id) FROM connector.outbox) FROM connector.checkpoints c",
    )
    assert rows == [(True,)]


async def test_flush_all_sends_now(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    engine = await make_engine(client)  # max_staleness 10 min: without a flush nothing would go
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    await execute(legacy, *insert_sql(30))
    await wait_for(lambda: len(engine.coalescer.pending()) == 30)
    assert emu.records("Orders") == []
    engine.flush_all()
    await wait_for(lambda: len(emu.records("Orders")) == 30)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_freshness_fast_sends_within_seconds_not_at_the_deadline(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    # max_staleness 10 min: in economy nothing would leave for ~10 minutes (test above);
    # freshness = "fast" (target 2 s) makes the same 30 rows leave at once, in whole credits
    pipeline = pipeline_config(freshness="fast")
    assert pipeline.freshness == "fast"
    engine = await make_engine(client, pipeline)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    await execute(legacy, *insert_sql(30))
    await wait_for(lambda: len(emu.records("Orders")) == 30, timeout=30)
    assert credits_by_api(emu) == {"upsert": 3}
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_delete_modes(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(20))
    await (await make_engine(client)).drain()
    assert len(emu.records("Orders")) == 20

    # delete: by the CRM id from key_state; and a key whose id is unknown (looked up by COQL)
    await execute(legacy, "UPDATE connector.key_state SET crm_id = NULL WHERE key = '2'")
    await execute(legacy, "DELETE FROM public.orders WHERE id IN (1, 2)")
    await (await make_engine(client)).drain()
    assert set(crm_by_key(emu)) == {str(i) for i in range(3, 21)}
    assert credits_by_api(emu).get("coql") == 1

    # mark: the record stays with Deleted = true
    mark = pipeline_config(delete_mode="mark", delete_mark_field="Deleted")
    await execute(legacy, "DELETE FROM public.orders WHERE id = 3")
    await (await make_engine(client, mark)).drain()
    assert crm_by_key(emu)["3"]["Deleted"] is True

    # ignore: nothing is sent, the key is acknowledged as deleted
    ignore = pipeline_config(delete_mode="ignore")
    before = emu.usage()["totals"]["calls"]
    await execute(legacy, "DELETE FROM public.orders WHERE id = 4")
    await (await make_engine(client, ignore)).drain()
    assert "4" in crm_by_key(emu)
    assert emu.usage()["totals"]["calls"] == before
    rows = await fetch(
        legacy, "SELECT key, deleted FROM connector.key_state WHERE key IN ('1','2','3','4')"
    )
    assert sorted(rows) == [("1", True), ("2", True), ("3", True), ("4", True)]
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]


def test_drain_plan_uses_the_cheapest_api_for_the_size() -> None:
    def inp(n: int, in_flight: int = 0) -> PlannerInput:
        keys = [PendingKey(str(i), float(i), i < in_flight) for i in range(n)]
        return PlannerInput(
            now=1e9,
            pending=keys,
            max_staleness=600,
            credits_left=100_000,
            reserve=1_000,
            concurrency=10,
            upsert_latency=1.0,
            bulk_latency=60.0,
        )

    p = drain_plan(inp(5_000))
    assert (len(p.upserts), len(p.bulk)) == (50, 0)  # tie: upsert
    p = drain_plan(inp(5_001))
    assert (len(p.upserts), [len(b) for b in p.bulk]) == (0, [5_001])
    p = drain_plan(inp(250, in_flight=50))
    assert sorted(len(c) for c in p.upserts) == [100, 100]
    assert not {k for c in p.upserts for k in c} & {str(i) for i in range(50)}


async def test_metrics_follow_the_pipeline(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    from connector.metrics import Metrics

    metrics = Metrics(version="test")
    metrics.add_pipeline("orders", 600)
    await execute(legacy, *insert_sql(120))
    await execute(legacy, "UPDATE public.orders SET status = 'Lost' WHERE id = 7")
    await (await make_engine(client, metrics=metrics)).drain()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"connector_{name}", labels)

    assert value("records_emitted_total", pipeline="orders", api="upsert", outcome="success") == 119
    assert value("records_emitted_total", pipeline="orders", api="upsert", outcome="rejected") == 1
    assert value("dead_letters_total", pipeline="orders", code="INVALID_DATA") == 1
    assert value("dead_letters_open", pipeline="orders") == 1
    assert value("pending_keys", pipeline="orders") == 0
    last = await fetch(legacy, "SELECT max(id) FROM connector.outbox")
    assert value("checkpoint_offset", pipeline="orders") == last[0][0]


async def test_replay_is_idempotent_and_never_stale(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(100))
    await (await make_engine(client)).drain()
    first = await fetch(legacy, "SELECT max(id) FROM connector.outbox")
    await execute(legacy, "UPDATE public.orders SET name = 'second' WHERE id = 1")
    await (await make_engine(client)).drain()
    calls = emu.usage()["totals"]["calls"]

    # plain replay of everything: all acknowledged already, nothing is sent
    report = await (await make_engine(client)).replay()
    assert (report.events, report.sent_keys) == (101, 0)
    assert emu.usage()["totals"]["calls"] == calls

    # the CRM lost its records: resend the first range; key 1's older version is not sent
    emu.reset()
    report = await (await make_engine(client)).replay(to_offset=first[0][0], resend=True)
    assert report.sent_keys == 99
    assert "1" not in crm_by_key(emu)
    report = await (await make_engine(client)).replay(resend=True)
    assert report.sent_keys == 100
    await assert_crm_matches(emu, legacy)
    assert crm_by_key(emu)["1"]["Name"] == "second"
