"""The seed's table end to end: N pending records → the planner's choice and the credits the
emulator charged (DESIGN.md §1): 100 → 10, 2,000 → 200, 5,000 → 500 (tie → upsert),
25,000 → 500 (one bulk job, plus 1 credit for each of its upload, status polls and result
download, which the table leaves out)."""

from __future__ import annotations

import pytest

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import (
    EngineFactory,
    assert_crm_matches,
    credits_by_api,
    execute,
    fetch,
    insert_sql,
)


@pytest.mark.parametrize(
    ("n", "api", "credits"),
    [(100, "upsert", 10), (2_000, "upsert", 200), (5_000, "upsert", 500), (25_000, "bulk", 500)],
)
async def test_pending_records_cost_what_the_price_list_says(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    n: int,
    api: str,
    credits: int,
) -> None:
    await execute(legacy, *insert_sql(n))
    engine = await make_engine(client)
    await engine.drain()

    spent = credits_by_api(emu)
    if api == "bulk":
        # the price table's 500 is the job; its upload, status polls and result download cost
        # 1 each on top ("All other APIs: 1", Zoho's API limits page; docs/zoho-client.md)
        polls = emu.usage()["by_api"]["bulk_job_details"]["calls"]
        assert spent == {
            "bulk_write_job": 500,
            "bulk_upload": 1,
            "bulk_job_details": polls,
            "bulk_download": 1,
        }, spent
        credits = 500 + 1 + polls + 1
        assert emu.usage()["bulk_jobs"] == 1
    else:
        assert spent == {"upsert": credits}, spent
        assert emu.usage()["bulk_jobs"] == 0
    await assert_crm_matches(emu, legacy)
    # the credit ledger agrees with the CRM, and every key is synced
    rows = await fetch(legacy, "SELECT coalesce(sum(credits), 0) FROM connector.credit_ledger")
    assert rows[0][0] == credits
    rows = await fetch(legacy, "SELECT status, count(*) FROM connector.key_state GROUP BY status")
    assert dict(rows) == {"synced": n}
    # the checkpoint passed every event
    rows = await fetch(
        legacy,
        "SELECT c.last_id = (SELECT max(id) FROM connector.outbox) FROM connector.checkpoints c",
    )
    assert rows == [(True,)]
