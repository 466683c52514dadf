"""The client's contract with the CRM — what the connector relies on Zoho doing — run against
the emulator in `make test` and against a real org when ZOHO_LIVE_* is set (conftest.py).

Each test states one behaviour of Zoho's documented API (docs/zoho-client.md has the sources)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import SecretStr

from connector.errors import PermanentError, TransientError
from connector.zoho.bulk import JobStatus, RowOutcome, build_bulk_zip
from tests.contract.conftest import Crm


async def test_upsert_inserts_then_updates_the_same_record(crm: Crm) -> None:
    async with crm.client() as client:
        first = await client.upsert(crm.module, [crm.record(i) for i in range(3)], [crm.key_field])
        assert [r.ok for r in first] == [True, True, True]
        assert [r.action for r in first] == ["insert"] * 3
        crm.written.update(r.id for r in first if r.id)
        again = await client.upsert(
            crm.module,
            [crm.record(i, **{crm.name_field: f"renamed {i}"}) for i in range(3)],
            [crm.key_field],
        )
        assert [r.action for r in again] == ["update"] * 3
        assert [r.id for r in again] == [r.id for r in first]


async def test_read_back_by_ids_and_coql_pages(crm: Crm) -> None:
    async with crm.client() as client:
        res = await client.upsert(crm.module, [crm.record(i) for i in range(5)], [crm.key_field])
        ids = [r.id for r in res if r.id]
        crm.written.update(ids)
        pages = [
            p
            async for p in client.get_records(crm.module, [crm.key_field, crm.name_field], ids=ids)
        ]
        got = {rec[crm.key_field]: rec for page in pages for rec in page}
        assert set(got) == {crm.key(i) for i in range(5)}
        assert got[crm.key(2)][crm.name_field] == "contract probe 2"
        # COQL paging (offset pages of 2): every probe once, none twice
        rows = await client.coql(
            f"select {crm.key_field} from {crm.module} where {crm.key_field} like '{crm.prefix}%'",
            page_size=2,
        )
        assert sorted(r[crm.key_field] for r in rows) == sorted(crm.key(i) for i in range(5))


async def test_delete_known_and_unknown_ids(crm: Crm) -> None:
    async with crm.client() as client:
        res = await client.upsert(crm.module, [crm.record(0)], [crm.key_field])
        rid = res[0].id
        assert rid
        out = await client.delete(crm.module, [rid, "4876876000009999999"])
        assert out[0].ok and out[0].id == rid
        assert not out[1].ok and out[1].code == "INVALID_DATA"


async def test_request_level_error_shape(crm: Crm) -> None:
    async with crm.client() as client:
        with pytest.raises(PermanentError, match="INVALID_MODULE"):
            await client.upsert("No_Such_Module_X", [crm.record(0)], [crm.key_field])


async def test_per_record_error_names_the_field(crm: Crm) -> None:
    async with crm.client() as client:
        # a key longer than any text field allows (255): the record is refused, the call is not
        res = await client.upsert(
            crm.module,
            [crm.record(0), {crm.key_field: "x" * 300, crm.name_field: "too long key"}],
            [crm.key_field],
        )
        crm.written.update(r.id for r in res if r.id)
        assert res[0].ok
        assert not res[1].ok
        assert res[1].code in ("INVALID_DATA", "DUPLICATE_DATA")
        assert res[1].field == crm.key_field


async def test_refused_refresh_token_is_permanent_and_secret_free(crm: Crm) -> None:
    secret = "contract-wrong-refresh-token-zz9"
    async with crm.client(refresh_token=SecretStr(secret)) as client:
        with pytest.raises(PermanentError) as info:
            await client.fields(crm.module)
        assert secret not in str(info.value)


async def test_token_refresh_after_invalidation(crm: Crm) -> None:
    async with crm.client() as client:
        await client.fields(crm.module)
        before = client.tokens.refreshes
        client.tokens.invalidate()
        await client.fields(crm.module)
        assert client.tokens.refreshes == before + 1


async def test_bulk_upsert_job_and_result_file(crm: Crm) -> None:
    if not crm.bulk_allowed:
        pytest.skip("set ZOHO_LIVE_BULK=1 to spend 500 credits on the Bulk Write contract")
    header = [crm.key_field, crm.name_field]
    rows = [[crm.key(i), f"bulk probe {i}"] for i in range(3)]
    async with crm.client() as client:
        bf = build_bulk_zip(header, rows)
        file_id = await client.upload_bulk_file(bf)
        job_id = await client.create_bulk_job(
            crm.module,
            file_id,
            operation="upsert",
            find_by=crm.key_field,
            field_mappings=[{"api_name": h, "index": i} for i, h in enumerate(header)],
        )
        job = await client.wait_bulk_job(job_id, poll_initial=0.2, poll_max=10, timeout=900)
        assert job.status is JobStatus.COMPLETED
        results = await client.bulk_results(job, bf.keys, crm.key_field)
        assert {k: r.outcome for k, r in results.items()} == {
            crm.key(i): RowOutcome.ADDED for i in range(3)
        }
        crm.written.update(r.record_id for r in results.values() if r.record_id)


async def test_429_is_transient_and_retried(crm: Crm) -> None:
    emu = crm.emulator_only()
    emu.set_faults(burst_429=3)
    async with crm.client() as client:
        res = await client.upsert(crm.module, [crm.record(0)], [crm.key_field])
        assert res[0].ok
        assert client.retries >= 3


async def test_5xx_beyond_the_retry_budget_is_transient(crm: Crm) -> None:
    from connector.zoho.client import RetryPolicy

    emu = crm.emulator_only()
    emu.set_faults(error_rate=1.0)
    fast = RetryPolicy(max_attempts=2, backoff_base=0.001, backoff_max=0.01, retry_after_max=0.01)
    async with crm.client(retry=fast) as client:
        with pytest.raises(TransientError):
            await client.upsert(crm.module, [crm.record(0)], [crm.key_field])
    emu.set_faults(error_rate=0.0)


async def test_numbers_come_back_exact(crm: Crm) -> None:
    emu = crm.emulator_only()  # the live module's numeric fields are not known
    async with crm.client() as client:
        rec = crm.record(0, Amount=Decimal("12.34"), Quantity=7)
        res = await client.upsert(crm.module, [rec], [crm.key_field])
        assert res[0].ok
        rows = await client.coql(
            f"select Amount, Quantity from {crm.module} where {crm.key_field} = '{crm.key(0)}'"
        )
        assert Decimal(str(rows[0]["Amount"])) == Decimal("12.34")
        assert rows[0]["Quantity"] == 7
        assert len(emu.records(crm.module)) == 1
