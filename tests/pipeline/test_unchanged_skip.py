"""Updates that change only unmapped columns cost no credits (issue 17 item 8): the emitter
compares the mapped record with the one the CRM last acknowledged for the key (a hash kept in
key_state.sent_hash) and acknowledges identical ones without a call, counted as
connector_records_emitted_total{api="upsert", outcome="unchanged"}. A re-capture (verify
--repair, replay, dead-letters retry) always sends."""

from __future__ import annotations

from typing import Any

import psycopg

from connector.capture import triggers
from connector.emulator.server import EmulatorHandle
from connector.metrics import Metrics
from connector.verify import recapture
from connector.zoho import ZohoClient
from tests.pipeline.conftest import (
    FIELDS,
    SCHEMA,
    EngineFactory,
    crm_by_key,
    execute,
    fetch,
    insert_sql,
    pipeline_config,
)

# "notes" is left unmapped (and not in ignore_columns): the trigger captures its changes
PIPELINE = pipeline_config(fields={k: v for k, v in FIELDS.items() if k != "notes"})


def upsert_usage(emu: EmulatorHandle) -> tuple[int, int]:
    u: dict[str, Any] = emu.usage()["by_api"].get("upsert", {})
    return int(u.get("calls", 0)), int(u.get("credits", 0))


def unchanged(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "connector_records_emitted_total",
        {"pipeline": "orders", "api": "upsert", "outcome": "unchanged"},
    )
    return value or 0.0


async def test_unmapped_only_updates_spend_no_credits(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    async with await psycopg.AsyncConnection.connect(legacy, autocommit=True) as conn:
        await triggers.install(conn, SCHEMA, PIPELINE)
    await execute(legacy, *insert_sql(10))
    metrics = Metrics()
    await (await make_engine(client, PIPELINE, metrics=metrics)).drain()
    assert len(crm_by_key(emu)) == 10
    calls, credits = upsert_usage(emu)
    assert calls >= 1

    # only the unmapped column changes: nothing is sent, every key is acknowledged
    await execute(legacy, "UPDATE public.orders SET notes = 'internal ' || id")
    await (await make_engine(client, PIPELINE, metrics=metrics)).drain()
    assert upsert_usage(emu) == (calls, credits)
    assert unchanged(metrics) == 10
    pending = await fetch(
        legacy,
        "SELECT count(*) FROM connector.outbox o JOIN connector.key_state k USING (pipeline, key)"
        " WHERE o.version > k.version",
    )
    assert pending == [(0,)]  # acknowledged: key_state holds the newest versions

    # a mapped column changes: sent
    await execute(legacy, "UPDATE public.orders SET name = 'Renamed', notes = 'x' WHERE id = 1")
    await (await make_engine(client, PIPELINE, metrics=metrics)).drain()
    assert upsert_usage(emu)[0] == calls + 1
    assert crm_by_key(emu)["1"]["Name"] == "Renamed"
    assert unchanged(metrics) == 10

    # someone edits the CRM record; a re-capture (verify --repair) sends the identical record
    store = emu.state.store("Orders")
    rid = next(r for r, rec in store.records.items() if str(rec["parent_id"]) == "2")
    store.records[rid]["Name"] = "edited in the CRM"
    await recapture(
        pipeline=PIPELINE, keys=["2"], source_dsn=legacy, state_dsn=legacy, schema=SCHEMA
    )
    await (await make_engine(client, PIPELINE, metrics=metrics)).drain()
    assert upsert_usage(emu)[0] == calls + 2
    assert crm_by_key(emu)["2"]["Name"] != "edited in the CRM"


async def test_a_delete_forgets_the_hash(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    """A delete (or a bulk write: any ack without a hash) clears what was last sent."""
    async with await psycopg.AsyncConnection.connect(legacy, autocommit=True) as conn:
        await triggers.install(conn, SCHEMA, PIPELINE)
    await execute(legacy, *insert_sql(3))
    await (await make_engine(client, PIPELINE)).drain()
    assert await fetch(
        legacy, "SELECT count(*) FROM connector.key_state WHERE sent_hash IS NOT NULL"
    ) == [(3,)]
    await execute(legacy, "DELETE FROM public.orders WHERE id = 3")
    await (await make_engine(client, PIPELINE)).drain()
    assert await fetch(legacy, "SELECT sent_hash FROM connector.key_state WHERE key = '3'") == [
        (None,)
    ]


class Killed(Exception):
    """The process died right after the CRM applied a write (its answer never stored)."""


async def test_a_write_whose_outcome_was_lost_is_never_skipped_after(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    async with await psycopg.AsyncConnection.connect(legacy, autocommit=True) as conn:
        await triggers.install(conn, SCHEMA, PIPELINE)
    await execute(legacy, *insert_sql(1))
    await (await make_engine(client, PIPELINE)).drain()
    original = crm_by_key(emu)["1"]["Name"]

    # B is written to the CRM, then the process dies before storing the answer
    real = client.upsert

    async def upsert_then_die(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise Killed

    client.upsert = upsert_then_die  # type: ignore[method-assign]
    await execute(legacy, "UPDATE public.orders SET name = 'B' WHERE id = 1")
    try:
        await (await make_engine(client, PIPELINE)).drain()
    except Exception:
        pass
    client.upsert = real  # type: ignore[method-assign]
    assert crm_by_key(emu)["1"]["Name"] == "B"

    # back to the acknowledged record A: the CRM holds B, so it must be sent
    await execute(legacy, "UPDATE public.orders SET name = %s WHERE id = 1", (original,))
    await (await make_engine(client, PIPELINE)).drain()
    assert crm_by_key(emu)["1"]["Name"] == original
