"""Never stale across a restart when the previous owner's acknowledgement was lost (issue 14 §1).

The trigger-mode soak (seed 9051, 25 min) saw 9,698 bulk writes move records back a version.
The sequence: an owner sends version N+1 of a key (an upsert, or a bulk job that then runs as
an orphan) and dies — or loses its lease on a PostgreSQL restart — before the acknowledgement
is stored. ``key_state`` still says N-1 and the checkpoint is behind version N's event. The
next engine re-reads from the checkpoint; version N comes first, in its own reader batch, and
with a backlog older than ``max_staleness`` it was dispatched at once — over the N+1 the CRM
already had — before the reader reached N+1. Now, while the engine catches up with what was
committed at its start, each batch also carries each of its keys' newest committed outbox row
(read ahead), so the key goes out at that version.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from connector.costs import CostModel
from connector.emulator.server import EmulatorHandle
from connector.mapping import RecordMapper
from connector.zoho.client import ZohoClient

from .conftest import (
    FAST,
    EngineFactory,
    crm_by_key,
    execute,
    fetch,
    insert_sql,
    pipeline_config,
)

CHEAP_BULK = CostModel(bulk_job_credits=10)  # 300 keys go as one bulk job


async def _previous_owner_sent_newest(legacy: str, client: ZohoClient) -> None:
    """What the killed owner did: it upserted each key's newest image (read from the outbox
    as it would have) and died before storing the acknowledgement."""
    rows = await fetch(
        legacy,
        "SELECT DISTINCT ON (key) row FROM connector.outbox WHERE pipeline = 'orders'"
        " ORDER BY key, id DESC",
    )
    mapper = RecordMapper(pipeline_config())
    records = [mapper.to_json(r[0]) for r in rows]
    for i in range(0, len(records), 100):
        results = await client.upsert("Orders", records[i : i + 100], ["parent_id"])
        assert all(r.ok for r in results)


def _names_written(emu: EmulatorHandle) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, rec in crm_by_key(emu).items():
        out[key] = [str(h["values"]["Name"]) for h in emu.history("Orders", rec["id"])]
    return out


@pytest.mark.parametrize(("keys", "api"), [(1, "upsert"), (300, "bulk")])
async def test_reread_after_lost_ack_never_writes_an_older_version(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    keys: int,
    api: str,
) -> None:
    await execute(legacy, *insert_sql(keys, tag="v1"))
    await (await make_engine(client, cost=CHEAP_BULK)).drain()
    # two more versions of every key, one transaction each
    await execute(legacy, "UPDATE public.orders SET name = replace(name, 'v1', 'v2')")
    await execute(legacy, "UPDATE public.orders SET name = replace(name, 'v2', 'v3')")
    await _previous_owner_sent_newest(legacy, client)
    assert all(n[-1].endswith("v3") for n in _names_written(emu).values())

    # the next engine reads one transaction per batch: v2 comes alone, v3 in the next read
    options = dataclasses.replace(FAST, read_limit=keys)
    engine = await make_engine(client, cost=CHEAP_BULK, options=options)
    await engine.drain()

    history = _names_written(emu)
    assert len(history) == keys
    for key, names in history.items():
        after = names[names.index(next(n for n in names if n.endswith("v3"))) :]
        assert all(n.endswith("v3") for n in after), (key, names)
    usage: dict[str, Any] = emu.usage()["by_api"]
    if api == "bulk":
        assert usage.get("bulk_write_job", {}).get("calls", 0) >= 1
    rows = await fetch(legacy, "SELECT count(*) FROM connector.key_state WHERE version IS NULL")
    assert rows[0][0] == 0


async def test_delete_after_a_lost_reinsert_ack_deletes_the_new_record(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    """Found by the 10-minute trigger-mode soak of seed 9051 after the fix above: 3 deleted
    rows left in the CRM. Key 5 was deleted (key_state: deleted, the old record's id), then
    re-inserted; an owner upserted it — a new CRM record — and was killed before storing the
    ack; the next owner's delete used the id in key_state, the CRM answered that it was already
    gone, and the new record stayed. An id recorded with a delete is that deleted record's: a
    later delete now looks the key up instead."""
    await execute(legacy, *insert_sql(1, tag="v1"))
    await (await make_engine(client)).drain()
    await execute(legacy, "DELETE FROM public.orders WHERE id = 1")
    await (await make_engine(client)).drain()
    assert crm_by_key(emu) == {}
    await execute(legacy, *insert_sql(1, tag="again"))
    await _previous_owner_sent_newest(legacy, client)  # a new record; its ack is lost
    assert set(crm_by_key(emu)) == {"1"}
    await execute(legacy, "DELETE FROM public.orders WHERE id = 1")

    await (await make_engine(client)).drain()
    assert crm_by_key(emu) == {}
    rows = await fetch(legacy, "SELECT deleted FROM connector.key_state WHERE key = '1'")
    assert rows == [(True,)]
