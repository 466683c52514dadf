"""`connector verify` reads every CRM record, past the 100,000-record reach of Get Records
paging: against an emulator whose reach is lowered to 2,000 records (Zoho: 100,000), a
4,500-row table verifies with 0 mismatches, mismatches past the reach are found, the calls and
credits are reported, and paged Get Records would have been refused."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from connector import verify as verify_mod
from connector import verify_common
from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.server import EmulatorHandle
from connector.errors import PermanentError
from connector.mapping import RecordMapper
from connector.verify import source_rows, verify
from connector.zoho.client import ZohoClient
from tests.pipeline.conftest import SCHEMA, execute, insert_sql, make_client, pipeline_config

REACH = 2_000
ROWS = 4_500


@pytest.fixture
async def capped() -> AsyncIterator[EmulatorHandle]:
    cfg = EmulatorConfig.default().model_copy(update={"pagination_limit": REACH})
    async with start_emulator(cfg) as handle:
        yield handle


async def seed_crm(emu: EmulatorHandle, dsn: str) -> dict[str, str]:
    """The CRM records the connector would have written for every row (straight into the
    emulator's store: fast); returns CRM id by key."""
    pipeline = pipeline_config()
    mapper = RecordMapper(pipeline)
    store = emu.state.store("Orders")
    ids: dict[str, str] = {}
    rows = await source_rows(dsn, pipeline)
    for key in sorted(rows, key=int):
        rec = mapper.to_json(rows[key])
        rec = {k: float(v) if k == "Amount" and v is not None else v for k, v in rec.items()}
        res = store.insert(rec, "insert")
        assert res.ok, res.errors
        assert res.record_id is not None
        ids[key] = res.record_id
    return ids


async def run_verify(client: ZohoClient, dsn: str) -> verify_mod.VerifyReport:
    return await verify(
        pipeline=pipeline_config(), client=client, source_dsn=dsn, state_dsn=dsn, schema=SCHEMA
    )


async def test_verify_reads_past_the_paging_reach(
    legacy: str, capped: EmulatorHandle, caplog: Any, monkeypatch: Any
) -> None:
    await execute(legacy, *insert_sql(ROWS))
    ids = await seed_crm(capped, legacy)
    monkeypatch.setattr(verify_common, "PROGRESS_EVERY", 2_000)  # read there by the paging
    async with make_client(capped) as client:
        with caplog.at_level(logging.INFO, logger="connector.verify"):
            report = await run_verify(client, legacy)
        assert report.rows_in_source == report.records_in_crm == ROWS
        assert report.mismatches == 0 and not report.dead_lettered, report.to_json(5)
        # 3 COQL calls of limit 2000 (2,000 + 2,000 + 500 records), 3 credits each
        assert (report.crm_calls, report.crm_credits) == (3, 9)
        doc = report.to_json()
        assert (doc["crm_calls"], doc["crm_credits"]) == (3, 9)
        progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify:")]
        assert progress == [
            "verify: 2000 CRM records read, 3 credits",
            "verify: 4000 CRM records read, 6 credits",
        ]

        # records past the reach are really compared: change one, drop one
        store = capped.state.store("Orders")
        store.records[ids[str(ROWS)]]["Name"] = "changed in the CRM"
        del store.records[ids[str(ROWS - 1)]]
        report = await run_verify(client, legacy)
        assert [m.key for m in report.different] == [str(ROWS)]
        assert report.different[0].fields["Name"][1] == "changed in the CRM"
        assert [m.key for m in report.missing] == [str(ROWS - 1)]
        assert not report.extra

        # the old way, paged Get Records, is refused at the reach
        seen = 0
        with pytest.raises(PermanentError, match="PAGINATION_LIMIT_EXCEEDED"):
            async for page in client.get_records("Orders", ["parent_id"], per_page=200):
                seen += len(page)
        assert seen == REACH


async def test_coql_pages_where_and_field_checks(legacy: str, capped: EmulatorHandle) -> None:
    await execute(legacy, *insert_sql(30))
    ids = await seed_crm(capped, legacy)
    async with make_client(capped) as client:
        pages = [
            p
            async for p in client.coql_pages(
                "Orders", ["parent_id", "Status"], where="Status = 'Paid'", page_size=4
            )
        ]
        got = [r["parent_id"] for p in pages for r in p]
        assert got == [str(k) for k in range(1, 31) if k % 6 == 1]  # insert_sql's Paid rows
        assert [len(p) for p in pages] == [4, 1]
        assert all(set(r) == {"id", "parent_id", "Status"} for p in pages for r in p)
        assert [r["id"] for p in pages for r in p] == [ids[k] for k in got]
        with pytest.raises(ValueError, match=r"1\.\.50"):
            async for _ in client.coql_pages("Orders", [f"F{i}" for i in range(51)]):
                pass
        with pytest.raises(ValueError, match="id too"):
            async for _ in client.coql_pages("Orders", [f"F{i}" for i in range(50)]):
                pass
