"""ZohoClient against the CRM emulator: records, errors, token expiry, faults, bulk, credits,
secrets. No timing assertions: waits are bounded only to fail instead of hanging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from connector.config import CrmConfig, PipelineConfig
from connector.emulator import EmulatorConfig, start_emulator
from connector.errors import ConfigError, PermanentError, TransientError
from connector.mapping import RecordMapper
from connector.mapping_check import check_mapping
from connector.zoho.bulk import JobStatus, RowOutcome, build_bulk_zip
from connector.zoho.client import RetryPolicy, ZohoClient

CLIENT_ID = "emulator-client-id"
CLIENT_SECRET = "emulator-client-secret"
REFRESH_TOKEN = "emulator-refresh-token"
FAST = RetryPolicy(max_attempts=12, backoff_base=0.001, backoff_max=0.02, retry_after_max=0.05)

PIPELINE = PipelineConfig.model_validate(
    {
        "name": "orders",
        "source_table": "public.orders",
        "key_column": "id",
        "module": "Orders",
        "fields": {
            "name": "Name",
            "email": {"field": "Customer_Email", "type": "email"},
            "status": {"field": "Status", "type": "picklist"},
            "amount": {"field": "Amount", "type": "currency"},
            "quantity": {"field": "Quantity", "type": "integer"},
            "order_date": {"field": "Order_Date", "type": "date"},
            "placed_at": {"field": "Placed_At", "type": "datetime"},
            "notes": {"field": "Notes", "type": "textarea"},
            "is_gift": {"field": "Is_Gift", "type": "boolean"},
        },
    }
)
MAPPER = RecordMapper(PIPELINE)
READ_FIELDS = [
    "parent_id",
    "Name",
    "Status",
    "Amount",
    "Quantity",
    "Order_Date",
    "Placed_At",
    "Is_Gift",
    "Notes",
    "Customer_Email",
]


def row(i: int, **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "id": i,
        "name": f"Order {i}",
        "email": f"buyer{i}@example.org",
        "status": ["New", "Paid", "Shipped"][i % 3],
        "amount": Decimal(f"{i}.25"),
        "quantity": i % 7 + 1,
        "order_date": "2024-03-01",
        "placed_at": f"2024-03-01T10:{i % 60:02d}:07.654321+00:00",
        "notes": f'note, "{i}"\nsecond line',
        "is_gift": i % 2 == 0,
    }
    r.update(over)
    return r


@pytest.fixture
async def emu() -> AsyncIterator[Any]:
    async with start_emulator() as handle:
        yield handle


def make_client(emu: Any, **kw: Any) -> ZohoClient:
    params: dict[str, Any] = {
        "accounts_url": emu.url,
        "client_id": CLIENT_ID,
        "client_secret": SecretStr(CLIENT_SECRET),
        "refresh_token": SecretStr(REFRESH_TOKEN),
        "concurrency": 20,
        "request_timeout": 30.0,
        "retry": FAST,
    }
    params.update(kw)
    return ZohoClient(**params)


async def upsert_all(client: ZohoClient, records: list[dict[str, Any]]) -> list[Any]:
    out = []
    for i in range(0, len(records), 100):
        out.extend(await client.upsert("Orders", records[i : i + 100], ["parent_id"]))
    return out


async def test_upsert_250_and_read_back(emu: Any) -> None:
    async with make_client(emu) as client:
        await check_mapping(client, PIPELINE)
        rows = [row(i) for i in range(250)]
        results = await upsert_all(client, [MAPPER.to_json(r) for r in rows])
        assert len(results) == 250
        assert all(r.ok and r.action == "insert" and r.id for r in results)
        ids = [r.id for r in results]
        assert len(set(ids)) == 250

        pages = [p async for p in client.get_records("Orders", READ_FIELDS, ids=ids)]
        by_key = {rec["parent_id"]: rec for page in pages for rec in page}
        assert len(by_key) == 250
        got = by_key["7"]
        assert got["Name"] == "Order 7"
        assert got["Status"] == "Paid"
        assert Decimal(str(got["Amount"])) == Decimal("7.25")
        assert got["Quantity"] == 1
        assert got["Order_Date"] == "2024-03-01"
        assert got["Placed_At"].startswith("2024-03-01T10:07:07")
        assert got["Is_Gift"] is False
        assert got["Notes"] == 'note, "7"\nsecond line'

        # paging without ids: 250 records, 100 per page
        pages = [p async for p in client.get_records("Orders", ["parent_id"], per_page=100)]
        assert [len(p) for p in pages] == [100, 100, 50]

        coql = await client.coql(
            "select parent_id, Amount from Orders where Quantity >= 1", page_size=120
        )
        assert sorted(int(r["parent_id"]) for r in coql) == list(range(250))

        # the same keys again: updates, same ids
        again = await upsert_all(
            client, [MAPPER.to_json(row(i, status="Delivered")) for i in range(250)]
        )
        assert all(r.ok and r.action == "update" for r in again)
        assert [r.id for r in again] == ids
        assert {rec["Status"] for rec in emu.records("Orders")} == {"Delivered"}


async def test_per_record_errors_carry_code_and_field(emu: Any) -> None:
    async with make_client(emu) as client:
        records = [
            MAPPER.to_json(row(1)),
            MAPPER.to_json(row(2, status="Lost")),  # not in the picklist
            MAPPER.to_json(row(3, quantity=12345678901)),  # more than 9 digits
            MAPPER.to_json(row(4, name=None)),  # mandatory Name missing
            MAPPER.to_json(row(5)),
        ]
        results = await client.upsert("Orders", records, ["parent_id"])
        assert [r.index for r in results] == [0, 1, 2, 3, 4]
        assert [r.status for r in results] == ["success", "error", "error", "error", "success"]
        assert (results[1].code, results[1].field) == ("INVALID_DATA", "Status")
        assert (results[2].code, results[2].field) == ("INVALID_DATA", "Quantity")
        assert (results[3].code, results[3].field) == ("MANDATORY_NOT_FOUND", "Name")
        assert results[1].message

        # all failing: HTTP 400 with a data array is still per-record results
        bad = await client.insert("Orders", [MAPPER.to_json(row(9, status="Lost"))])
        assert bad[0].code == "INVALID_DATA" and bad[0].field == "Status"

        # a duplicate key on insert
        dup = await client.insert("Orders", [MAPPER.to_json(row(1))])
        assert dup[0].code == "DUPLICATE_DATA" and dup[0].field == "parent_id"

        # delete: one known id, one unknown
        deleted = await client.delete("Orders", [results[0].id or "", "4876876000009999999"])
        assert deleted[0].ok and deleted[0].id == results[0].id
        assert not deleted[1].ok and deleted[1].code == "INVALID_DATA"

        # a request-level error is permanent
        with pytest.raises(PermanentError, match="INVALID_MODULE"):
            await client.upsert("Nope", [MAPPER.to_json(row(1))], ["parent_id"])


async def test_token_expiry_mid_run_refreshes_once_and_carries_on(emu: Any) -> None:
    async with make_client(emu) as client:
        await client.upsert("Orders", [MAPPER.to_json(row(0))], ["parent_id"])
        assert client.tokens.refreshes == 1
        emu.set_faults(expire_tokens_after_calls=2)
        for i in range(1, 6):
            res = await client.upsert("Orders", [MAPPER.to_json(row(i))], ["parent_id"])
            assert res[0].ok
        assert client.tokens.refreshes == 2
        emu.set_faults(expire_tokens_now=True)
        # many concurrent calls with the same stale token share a single refresh
        chunks = [[MAPPER.to_json(row(100 + 10 * k + j)) for j in range(10)] for k in range(8)]
        out = await asyncio.gather(*(client.upsert("Orders", c, ["parent_id"]) for c in chunks))
        assert all(r.ok for res in out for r in res)
        assert client.tokens.refreshes == 3
        assert len(emu.records("Orders")) == 86


async def test_5xx_and_429_burst_everything_arrives_limiter_drops_and_recovers(emu: Any) -> None:
    async with make_client(emu) as client:
        await client.fields("Orders")
        emu.set_faults(error_rate=0.05, seed=7, burst_429=6)
        records = [MAPPER.to_json(row(i)) for i in range(2000)]
        batches = [records[i : i + 100] for i in range(0, 2000, 100)]
        results = await asyncio.gather(
            *(client.upsert("Orders", b, ["parent_id"]) for b in batches)
        )
        assert all(r.ok for res in results for r in res)
        assert len(emu.records("Orders")) == 2000
        rejected = emu.usage()["rejected"]
        assert rejected.get("fault_429", 0) == 6 and rejected.get("fault_500", 0) > 0
        assert client.retries >= 6
        assert client.limiter.decreases >= 1
        assert client.limiter.limit < client.limiter.max_limit

        emu.set_faults(error_rate=0.0)
        for _ in range(400):
            if client.limiter.limit == client.limiter.max_limit:
                break
            await asyncio.gather(*(client.fields("Orders") for _ in range(5)))
        assert client.limiter.limit == client.limiter.max_limit
        assert client.limiter.in_flight == 0


class CallbackServer:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.bodies: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.query.get("token") == "cb-secret"
        self.bodies.append(await request.json())
        self.event.set()
        return web.json_response({"ok": True})

    async def __aenter__(self) -> CallbackServer:
        app = web.Application()
        app.router.add_post("/zoho/bulk-callback", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/zoho/bulk-callback?token=cb-secret"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_full_bulk_job_with_callback_and_skipped_rows() -> None:
    config = EmulatorConfig.default()
    config.bulk.queue_seconds = 60.0
    config.faults.skip_rows_field = "Name"
    config.faults.skip_rows_pattern = "SKIP"
    calls: list[str] = []
    first_poll = asyncio.Event()

    def hook(
        api: str, records: int, credits: int, latency: float, status: int, remaining: int | None
    ) -> None:
        calls.append(api)
        if api == "bulk_job":
            first_poll.set()

    async with start_emulator(config) as emu, CallbackServer() as cb:
        async with make_client(emu, on_call=hook) as client:
            # one existing record so the upsert updates it
            pre = await client.upsert("Orders", [MAPPER.to_json(row(0))], ["parent_id"])
            rows = [row(i) for i in range(300)]
            rows[10] = row(10, name="SKIP me")
            rows[20] = row(20, status="Lost")
            bf = build_bulk_zip(MAPPER.csv_header(), (MAPPER.to_csv_values(r) for r in rows))
            file_id = await client.upload_bulk_file(bf)
            job_id = await client.create_bulk_job(
                "Orders",
                file_id,
                operation="upsert",
                find_by="parent_id",
                field_mappings=MAPPER.field_mappings(),
                callback_url=cb.url,
            )
            waiter = asyncio.create_task(
                client.wait_bulk_job(job_id, wake=cb.event, poll_initial=600.0)
            )
            await asyncio.wait_for(first_poll.wait(), 30)
            assert not waiter.done()
            emu.advance(61)
            # poll_initial is 600 s: only the callback can end the wait within the bound
            job = await asyncio.wait_for(waiter, 60)
            assert cb.bodies, "the callback never arrived"
            assert job.status is JobStatus.COMPLETED
            assert (job.added, job.updated, job.skipped, job.total) == (297, 1, 2, 300)

            results = await client.bulk_results(job, bf.keys, "parent_id")
            assert len(results) == 300
            assert results["0"].outcome is RowOutcome.UPDATED
            assert results["0"].record_id == pre[0].id
            assert results["1"].outcome is RowOutcome.ADDED and results["1"].ok
            assert results["10"].outcome is RowOutcome.SKIPPED and results["10"].code
            assert results["20"].outcome is RowOutcome.SKIPPED
            assert (results["20"].code, results["20"].field) == ("INVALID_DATA", "Status")
            stored = {r["parent_id"]: r for r in emu.records("Orders")}
            assert len(stored) == 298
            assert stored["5"]["Placed_At"].startswith("2024-03-01T10:05:07")
            assert stored["5"]["Order_Date"] == "2024-03-01"
            assert stored["5"]["Notes"] == 'note, "5"\nsecond line'
            assert str(stored["5"]["Amount"]) in ("5.25", "5.250")
            assert stored["5"]["Is_Gift"] is False
            assert calls.count("bulk_create") == 1


async def test_bulk_job_failed_and_polling_without_callback(emu: Any) -> None:
    emu.set_faults(bulk_fail_next=1)
    async with make_client(emu) as client:
        bf = build_bulk_zip(MAPPER.csv_header(), [MAPPER.to_csv_values(row(1))])
        file_id = await client.upload_bulk_file(bf)
        job_id = await client.create_bulk_job(
            "Orders",
            file_id,
            operation="upsert",
            find_by="parent_id",
            field_mappings=MAPPER.field_mappings(),
        )
        job = await client.wait_bulk_job(job_id, poll_initial=0.01)
        assert job.status is JobStatus.FAILED
        with pytest.raises(PermanentError, match="no download_url"):
            await client.download_bulk_result(job)


async def test_credits_counted_equal_emulator_usage(emu: Any) -> None:
    seen: list[tuple[str, int, int]] = []

    def hook(
        api: str, records: int, credits: int, latency: float, status: int, remaining: int | None
    ) -> None:
        seen.append((api, credits, status))

    async with make_client(emu, on_call=hook) as client:
        await check_mapping(client, PIPELINE)
        await upsert_all(client, [MAPPER.to_json(row(i)) for i in range(235)])
        await client.insert("Orders", [MAPPER.to_json(row(1000 + i)) for i in range(5)])
        ids = [r["id"] for r in emu.records("Orders")][:3]
        await client.update("Orders", [{"id": i, "Status": "Paid"} for i in ids])
        await client.delete("Orders", ids[:2])
        _ = [p async for p in client.get_records("Orders", ["parent_id"], per_page=200)]
        await client.coql("select parent_id from Orders where Quantity > 0")
        bf = build_bulk_zip(MAPPER.csv_header(), [MAPPER.to_csv_values(row(5000))])
        file_id = await client.upload_bulk_file(bf)
        job_id = await client.create_bulk_job(
            "Orders",
            file_id,
            operation="upsert",
            find_by="parent_id",
            field_mappings=MAPPER.field_mappings(),
        )
        job = await client.wait_bulk_job(job_id, poll_initial=0.01)
        await client.bulk_results(job, bf.keys, "parent_id")
        usage = emu.usage()
        assert client.credits_spent == usage["totals"]["credits"] == usage["credits"]["used"]
        # fields 1, upserts 10+10+4, insert 1, update 1, delete 1, 2 pages of reads,
        # COQL with LIMIT 2000: 3, org 1, bulk job 500, and 1 for every upload, job poll and
        # result download ("All other APIs: 1")
        polls = usage["by_api"]["bulk_job_details"]["calls"]
        assert polls >= 1
        assert client.credits_spent == 1 + 24 + 1 + 1 + 1 + 2 + 3 + 1 + 500 + 1 + polls + 1
        assert sum(c for _, c, _ in seen) == client.credits_spent
        assert client.calls == usage["totals"]["calls"]


async def test_credits_remaining_follows_the_header() -> None:
    config = EmulatorConfig.default()
    config.credits.edition = "free"  # 5,000 credits a day: the header appears at 2,500 used
    async with start_emulator(config) as emu:
        remaining: list[int | None] = []
        async with make_client(
            emu, on_call=lambda a, r, c, lat, s, rem: remaining.append(rem)
        ) as client:
            await client.fields("Orders")
            assert client.credits_remaining is None
            bf = build_bulk_zip(MAPPER.csv_header(), [MAPPER.to_csv_values(row(1))])
            fid = await client.upload_bulk_file(bf)
            for _ in range(5):
                await client.create_bulk_job(
                    "Orders",
                    fid,
                    operation="upsert",
                    find_by="parent_id",
                    field_mappings=MAPPER.field_mappings(),
                )
            used = emu.usage()["credits"]["used"]
            assert used == 1 + 1 + 1 + 5 * 500  # fields, org (X-CRM-ORG), upload, five jobs
            assert client.credits_spent == used
            assert client.credits_remaining == 5000 - used
            assert remaining[-1] == 5000 - used


async def test_check_mapping_against_the_emulator(emu: Any) -> None:
    async with make_client(emu) as client:
        await check_mapping(client, PIPELINE)
        wrong = PIPELINE.model_copy(
            update={
                "fields": {
                    **PIPELINE.fields,
                    "quantity": PIPELINE.fields["amount"].model_copy(update={"field": "Quantity"}),
                }
            }
        )
        with pytest.raises(ConfigError) as err:
            await check_mapping(client, wrong)
        assert err.value.key == "pipelines['orders'].fields.quantity"
        assert "'integer'" in str(err.value)
        not_unique = PIPELINE.model_copy(
            update={
                "key_field": "Name",
                "fields": {k: v for k, v in PIPELINE.fields.items() if k != "name"},
            }
        )
        with pytest.raises(ConfigError) as err:
            await check_mapping(client, not_unique)
        assert err.value.key == "pipelines['orders'].key_field"


async def test_secrets_never_in_errors_or_logs(emu: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    access_tokens: list[str] = []
    async with make_client(emu) as client:
        emu.set_faults(error_rate=0.2, seed=3, burst_429=2, expire_tokens_after_calls=3)
        for i in range(6):
            await client.upsert("Orders", [MAPPER.to_json(row(i))], ["parent_id"])
            token = client.tokens._token
            if token is not None:
                access_tokens.append(token.value)
                texts.append(repr(token))
        texts.append(repr(client))
        emu.set_faults(error_rate=0.0)
    for kw in (
        {"refresh_token": SecretStr(REFRESH_TOKEN + "-revoked")},
        {"client_secret": SecretStr(CLIENT_SECRET + "-wrong")},
        {"client_id": "someone-else"},
    ):
        async with make_client(emu, **kw) as bad:
            with pytest.raises(PermanentError) as err:
                await bad.upsert("Orders", [MAPPER.to_json(row(1))], ["parent_id"])
            texts.append(str(err.value))
            texts.append(repr(err.value))
    assert "invalid_code" in texts[-6] and "refresh token" in texts[-6]
    texts.extend(r.getMessage() for r in caplog.records)
    texts.extend(str(r.args) for r in caplog.records)
    assert any("retrying" in t for t in texts)
    secrets = [CLIENT_SECRET, REFRESH_TOKEN, *set(access_tokens)]
    assert len(secrets) >= 3
    for text in texts:
        for secret in secrets:
            assert secret not in text


async def test_timeouts_are_transient_and_reported_with_status_0(emu: Any) -> None:
    statuses: list[int] = []
    async with make_client(
        emu,
        request_timeout=0.2,
        retry=RetryPolicy(max_attempts=2, backoff_base=0.001, backoff_max=0.01),
        on_call=lambda a, r, c, lat, s, rem: statuses.append(s),
    ) as client:
        await client.fields("Orders")
        emu.set_faults(latency="fixed", latency_ms=2000)
        with pytest.raises(TransientError, match="timed out"):
            await client.upsert("Orders", [MAPPER.to_json(row(1))], ["parent_id"])
        assert statuses[-2:] == [0, 0]
        emu.set_faults(latency="none")
        res = await client.upsert("Orders", [MAPPER.to_json(row(1))], ["parent_id"])
        assert res[0].ok


async def test_from_config_with_custom_data_centre(emu: Any) -> None:
    crm = CrmConfig.model_validate(
        {
            "data_centre": "custom",
            "accounts_url": emu.url,
            "api_url": emu.url,
            "client_id": CLIENT_ID,
            "client_secret_env": "X",
            "refresh_token_env": "Y",
            "org_id": "emulator-org",
            "edition": "professional",
            "request_timeout": "20s",
        }
    )
    client = ZohoClient.from_config(
        crm, client_secret=SecretStr(CLIENT_SECRET), refresh_token=SecretStr(REFRESH_TOKEN)
    )
    assert client.limiter.max_limit == 15
    async with client:
        assert await client.fields("Orders")
        bf = build_bulk_zip(MAPPER.csv_header(), [MAPPER.to_csv_values(row(1))])
        assert await client.upload_bulk_file(bf)
        # org id came from the configuration: no GET /crm/v8/org
        assert "org" not in emu.usage()["by_api"]
