"""Issue 6: the engine's memory does not grow with the table. Acknowledged stamps that the
checkpoint has passed are a bounded cache of ``key_state`` (reloaded before an event of a
forgotten key is judged, so nothing stale or already acknowledged is sent again)."""

from __future__ import annotations

import dataclasses

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import (
    FAST,
    EngineFactory,
    assert_crm_matches,
    credits_by_api,
    execute,
    fetch,
    insert_sql,
    pipeline_config,
)

CACHE = 50


async def test_acked_stamps_stay_bounded_and_are_reloaded_from_key_state(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(1_200))
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=400)
    options = dataclasses.replace(FAST, acked_cache=CACHE)
    engine = await make_engine(client, pipeline, options=options)
    report = await engine.run_snapshot()
    assert report is not None and report["sent"] == 1_200
    assert engine.coalescer.acked_size() <= CACHE  # not one stamp per key of the table
    await execute(legacy, "UPDATE public.orders SET name = name || ' v2' WHERE id <= 300")
    await engine.drain()
    assert engine.coalescer.acked_size() <= CACHE
    await assert_crm_matches(emu, legacy)

    # every event read again (checkpoint dropped): each key's stamp is reloaded from key_state
    # before its events are judged, so nothing is sent again
    credits = credits_by_api(emu)
    await execute(legacy, "DELETE FROM connector.checkpoints")
    await engine.drain()
    assert credits_by_api(emu) == credits
    assert engine.coalescer.acked_size() <= CACHE
    await assert_crm_matches(emu, legacy)
    rows = await fetch(legacy, "SELECT count(*) FROM connector.outbox")
    assert rows[0][0] == 2_700  # 1,200 inserts + 1,200 snapshot rows + 300 updates, all re-read
