"""The delete path's lookup by key goes through the one COQL builder (connector/zoho/coql.py):
a key with a quote or non-ASCII is found; a key with a backslash, which Zoho documents no
escape for, is refused loudly instead of being "not in the CRM" (which would acknowledge a
delete without deleting: a stale record)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from psycopg_pool import AsyncConnectionPool

from connector.coalesce import PendingEntry
from connector.emitter import Emitter, _Results
from connector.emulator.server import EmulatorHandle
from connector.events import ChangeEvent, Op
from connector.zoho import coql
from connector.zoho.client import ZohoClient

from .conftest import crm_by_key, pipeline_config


def _emitter(client: ZohoClient, dsn: str) -> Emitter:
    pool: AsyncConnectionPool = AsyncConnectionPool(dsn, open=False)  # unused by the lookup
    return Emitter(pipeline_config(), client=client, pool=pool)


@pytest.mark.parametrize("key", ["O'Brien", "it''s", "Zoë ✓ 東京", "percent%_like", "  spaced  "])
async def test_a_key_with_quotes_or_non_ascii_is_found(
    database: str, emu: EmulatorHandle, client: ZohoClient, key: str
) -> None:
    other = await client.upsert("Orders", [{"parent_id": "x", "Name": "other"}], ["parent_id"])
    results = await client.upsert("Orders", [{"parent_id": key, "Name": "n"}], ["parent_id"])
    assert results[0].ok and other[0].ok
    assert await _emitter(client, database)._lookup_id(key) == results[0].id


async def test_a_key_with_a_backslash_is_refused_not_reported_missing(
    database: str, emu: EmulatorHandle, client: ZohoClient
) -> None:
    key = "a\\b"
    results = await client.upsert("Orders", [{"parent_id": key, "Name": "n"}], ["parent_id"])
    assert results[0].ok
    with pytest.raises(coql.CoqlValueError, match="backslash"):
        await _emitter(client, database)._lookup_id(key)


async def test_the_delete_of_such_a_key_is_dead_lettered_not_acknowledged(
    database: str, emu: EmulatorHandle, client: ZohoClient
) -> None:
    key = "a\\b"
    await client.upsert("Orders", [{"parent_id": key, "Name": "n"}], ["parent_id"])
    now = datetime.now(UTC)
    event = ChangeEvent(1, "orders", Op.DELETE, key, 1, 1, {"id": key}, now)
    async with AsyncConnectionPool(database, kwargs={"autocommit": True}, open=False) as pool:
        emitter = Emitter(pipeline_config(), client=client, pool=pool)
        res = _Results()
        targets, out = await emitter._in_crm([PendingEntry(key, event, now)], res, "delete")
    assert targets == []
    assert [e.key for e in out.done] == [key] and not out.retry
    assert res.acks == []  # not "never reached the CRM"
    assert [(d.key, d.code) for d in res.dead] == [(key, "coql_backslash")]
    assert len(crm_by_key(emu)) == 1  # still there, for the operator to see
