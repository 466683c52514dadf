"""Bad input is contained (invariant 8): rejected records are dead-lettered with the CRM's code
and field, the rest proceeds, and a later fix arrives without manual action."""

from __future__ import annotations

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import EngineFactory, assert_crm_matches, crm_by_key, execute, fetch, insert_sql

BAD = {
    # id: (column, value, expected code, expected field)
    11: ("name", "", "MANDATORY_NOT_FOUND", "Name"),
    22: ("name", "x" * 300, "INVALID_DATA", "Name"),
    33: ("status", "Lost", "INVALID_DATA", "Status"),
    44: ("customer_email", "not-an-email", "INVALID_DATA", "Customer_Email"),
    55: ("name", "y" * 256, "INVALID_DATA", "Name"),
    66: ("status", "Pending", "INVALID_DATA", "Status"),
    77: ("customer_email", "a@@b", "INVALID_DATA", "Customer_Email"),
}


async def _insert_with_bad_rows(dsn: str, n: int) -> None:
    await execute(dsn, *insert_sql(n))
    for key, (column, value, _, _) in BAD.items():
        await execute(dsn, f"UPDATE public.orders SET {column} = %s WHERE id = %s", (value, key))


async def test_seven_invalid_of_a_thousand(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    await _insert_with_bad_rows(legacy, 1_000)
    await (await make_engine(client)).drain()

    crm = crm_by_key(emu)
    assert len(crm) == 993
    assert not set(crm) & {str(k) for k in BAD}
    letters = await fetch(
        legacy,
        "SELECT key::int, error_code, error_field, status, api FROM connector.dead_letters"
        " ORDER BY key::int",
    )
    assert [(k, code, field) for k, code, field, _, _ in letters] == [
        (k, BAD[k][2], BAD[k][3]) for k in sorted(BAD)
    ]
    assert {status for *_, status, _ in letters} == {"open"}
    states = dict(
        await fetch(legacy, "SELECT status, count(*) FROM connector.key_state GROUP BY status")
    )
    assert states == {"synced": 993, "failed": 7}
    # the checkpoint passed the dead-lettered events too (invariant 5)
    rows = await fetch(
        legacy,
        "SELECT c.last_id = (SELECT max(id) FROM connector.outbox) FROM connector.checkpoints c",
    )
    assert rows == [(True,)]


async def test_bulk_rejections_then_fixed_in_source(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    n = 6_000  # above break-even: one bulk job
    bad = list(range(100, 2_100, 100))  # 20 keys
    await execute(legacy, *insert_sql(n))
    await execute(legacy, "UPDATE public.orders SET status = 'Lost' WHERE id = ANY(%s)", (bad,))
    await (await make_engine(client)).drain()

    assert emu.usage()["bulk_jobs"] == 1
    letters = await fetch(
        legacy,
        "SELECT key::int, error_code, error_field, api FROM connector.dead_letters"
        " WHERE status = 'open' ORDER BY key::int",
    )
    assert [r[0] for r in letters] == bad
    assert {(r[1], r[2], r[3]) for r in letters} == {("INVALID_DATA", "Status", "bulk")}
    assert len(crm_by_key(emu)) == n - 20

    # fixed in the source: the new versions are sent, the letters resolve themselves
    await execute(legacy, "UPDATE public.orders SET status = 'Paid' WHERE id = ANY(%s)", (bad,))
    await (await make_engine(client)).drain()
    rows = await fetch(
        legacy, "SELECT status, count(*) FROM connector.dead_letters GROUP BY status"
    )
    assert dict(rows) == {"resolved": 20}
    await assert_crm_matches(emu, legacy)
    assert emu.usage()["bulk_jobs"] == 1  # the 20 fixes went by upsert (2 credits)


async def test_sync_flag_written_back_without_a_capture_event(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    from .conftest import pipeline_config

    pipeline = pipeline_config(sync_flag_column="synced")
    await execute(legacy, *insert_sql(50))
    await (await make_engine(client, pipeline)).drain()
    assert await fetch(legacy, "SELECT count(*) FROM public.orders WHERE synced") == [(50,)]
    # writing the flag produced no outbox event (the trigger ignores that column)
    assert await fetch(legacy, "SELECT count(*) FROM connector.outbox") == [(50,)]
    # a row changed after its acknowledged version is not flagged by a late ack
    await execute(legacy, "UPDATE public.orders SET synced = false, name = 'changed' WHERE id = 1")
    await (await make_engine(client, pipeline)).drain()
    assert await fetch(legacy, "SELECT synced FROM public.orders WHERE id = 1") == [(True,)]
    assert crm_by_key(emu)["1"]["Name"] == "changed"


async def test_sync_flag_not_set_on_a_row_that_moved_on(legacy: str, client: ZohoClient) -> None:
    import json
    from datetime import UTC, datetime

    from connector.emitter import Emitter
    from connector.events import ChangeEvent, Op

    from .conftest import pipeline_config

    pipeline = pipeline_config(sync_flag_column="synced")
    await execute(legacy, *insert_sql(2))
    images = await fetch(legacy, "SELECT key, row::text FROM connector.outbox ORDER BY key")
    old = {k: json.loads(r) for k, r in images}
    await execute(legacy, "UPDATE public.orders SET name = 'moved on' WHERE id = 2")
    emitter = Emitter(pipeline, client=client, pool=None, source_dsn=legacy)  # type: ignore[arg-type]
    events = [
        ChangeEvent(i, "orders", Op.INSERT, k, i, 1, old[k], datetime.now(UTC))
        for i, k in enumerate(sorted(old), start=1)
    ]
    assert await emitter.write_sync_flags(events) == 1
    rows = await fetch(legacy, "SELECT id, synced FROM public.orders ORDER BY id")
    assert rows == [(1, True), (2, False)]
