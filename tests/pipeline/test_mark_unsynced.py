"""delete_mode = "mark" never marks a key that never reached the CRM (issue 14 §4): the mark is
an upsert of {key, Deleted: true}, which the CRM would take as an insert (a ghost record, or
MANDATORY_NOT_FOUND). As with "delete", such a delete is acknowledged without a write; a
`dead-letters retry` of such a letter (re-capture) resolves it the same way."""

from __future__ import annotations

from connector.emulator.server import EmulatorHandle
from connector.verify import recapture
from connector.zoho import ZohoClient
from tests.pipeline.conftest import (
    SCHEMA,
    EngineFactory,
    crm_by_key,
    execute,
    fetch,
    insert_sql,
    pipeline_config,
)

MARK = pipeline_config(delete_mode="mark", delete_mark_field="Deleted")


def upserted_records(emu: EmulatorHandle) -> int:
    return int(emu.usage()["by_api"].get("upsert", {}).get("records", 0))


async def test_mark_mode_skips_keys_never_synced(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    await execute(legacy, *insert_sql(5))
    await (await make_engine(client, MARK)).drain()
    assert len(crm_by_key(emu)) == 5

    # row 6 is inserted and deleted before the connector sends it; row 5 was synced
    await execute(legacy, *insert_sql(1, start=6))
    await execute(legacy, "DELETE FROM public.orders WHERE id IN (5, 6)")
    await (await make_engine(client, MARK)).drain()
    crm = crm_by_key(emu)
    assert "6" not in crm  # no ghost record
    assert crm["5"]["Deleted"] is True  # a synced key is still marked
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
    assert await fetch(legacy, "SELECT deleted FROM connector.key_state WHERE key = '6'") == [
        (True,)
    ]


async def test_retry_of_a_mark_letter_for_an_unsynced_key_resolves_it(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    # a letter the old code opened: the mark of key 7 (never in the CRM) was refused
    await execute(
        legacy,
        "INSERT INTO connector.dead_letters (pipeline, key, version, error_code, error_message,"
        " api) VALUES ('orders', '7', 1, 'MANDATORY_NOT_FOUND', 'required field not found',"
        " 'mark')",
    )
    done = await recapture(
        pipeline=MARK, keys=["7"], source_dsn=legacy, state_dsn=legacy, schema=SCHEMA
    )
    assert done.deleted == ["7"]
    before = upserted_records(emu)
    await (await make_engine(client, MARK)).drain()
    assert "7" not in crm_by_key(emu)
    assert upserted_records(emu) == before  # nothing written for it
    assert await fetch(legacy, "SELECT status FROM connector.dead_letters") == [("resolved",)]
