"""Zoho fidelity (issue 15 items 1, 2, 3, 9; issue 17 item 13): hosts per data centre, OAuth
scopes, shared access tokens and Zoho's token throttle, credits of bulk side calls, and an
unreachable accounts server. Every behaviour is cited in docs/zoho-client.md "Fidelity"."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from connector.emulator import start_emulator
from connector.errors import PermanentError, TransientError
from connector.zoho.auth import MemoryTokenStore
from connector.zoho.bulk import build_bulk_zip
from connector.zoho.client import RetryPolicy, ZohoClient
from connector.zoho.scopes import REQUIRED_SCOPES
from connector.zoho_hosts import DATA_CENTRES, UPLOAD_HOSTS
from tests.emulator.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_attempts=2, backoff_base=0.001, backoff_max=0.01, retry_after_max=0.01)

# Zoho's official SDK (zohocrm-python-sdk-8.0, src/com/zoho/crm/api/dc/*_data_center.py; the
# Java/Scala/TypeScript SDKs carry the same hosts): (accounts token URL, API URL, upload host)
SDK_HOSTS = {
    "us": ("https://accounts.zoho.com", "https://www.zohoapis.com", "https://content.zohoapis.com"),
    "eu": ("https://accounts.zoho.eu", "https://www.zohoapis.eu", "https://content.zohoapis.eu"),
    "in": ("https://accounts.zoho.in", "https://www.zohoapis.in", "https://content.zohoapis.in"),
    "au": (
        "https://accounts.zoho.com.au",
        "https://www.zohoapis.com.au",
        "https://content.zohoapis.com.au",
    ),
    "cn": (
        "https://accounts.zoho.com.cn",
        "https://www.zohoapis.com.cn",
        "https://content.zohoapis.com.cn",
    ),
    "jp": ("https://accounts.zoho.jp", "https://www.zohoapis.jp", "https://content.zohoapis.jp"),
    "ca": (
        "https://accounts.zohocloud.ca",
        "https://www.zohoapis.ca",
        "https://upload.zohocloud.ca",
    ),
    "sa": ("https://accounts.zoho.sa", "https://www.zohoapis.sa", "https://files.zoho.sa"),
}


# ---- item 3: hosts per data centre -------------------------------------------------------------


def test_every_data_centre_matches_the_official_sdk() -> None:
    assert set(DATA_CENTRES) == set(UPLOAD_HOSTS) == set(SDK_HOSTS)
    for dc, (accounts, api, upload) in SDK_HOSTS.items():
        assert DATA_CENTRES[dc] == (accounts, api), dc
        assert UPLOAD_HOSTS[dc] == upload, dc


def test_the_table_equals_the_installed_sdk() -> None:
    dc_mod = pytest.importorskip("zohocrmsdk.src.com.zoho.crm.api.dc")
    classes = {
        "us": "USDataCenter",
        "eu": "EUDataCenter",
        "in": "INDataCenter",
        "au": "AUDataCenter",
        "cn": "CNDataCenter",
        "jp": "JPDataCenter",
        "ca": "CADataCenter",
        "sa": "SADataCenter",
    }
    for dc, name in classes.items():
        env = getattr(dc_mod, name).PRODUCTION()
        assert env.accounts_url == DATA_CENTRES[dc][0] + "/oauth/v2/token", dc
        assert env.url == DATA_CENTRES[dc][1], dc
        assert env.file_upload_url == UPLOAD_HOSTS[dc], dc


# ---- item 1: scopes ---------------------------------------------------------------------------


def test_the_documented_scope_lists_are_the_required_ones() -> None:
    for doc in ("README.md", "docs/configuration.md"):
        text = (ROOT / doc).read_text()
        at = text.index("`ZohoCRM.modules.ALL`")
        span = re.split(r"\)|Then:", text[at:], maxsplit=1)[0]
        found = set(re.findall(r"`(Zoho(?:CRM|Files)\.[A-Za-z.]+)`", span))
        assert found == set(REQUIRED_SCOPES), (doc, found ^ set(REQUIRED_SCOPES))


def client_for(emu: Any, **kw: Any) -> ZohoClient:
    return ZohoClient(
        accounts_url=emu.url,
        api_url=emu.url,
        client_id="emulator-client-id",
        client_secret=SecretStr("emulator-client-secret"),
        refresh_token=SecretStr("emulator-refresh-token"),
        retry=FAST,
        **kw,
    )


async def test_emulator_default_token_has_only_the_documented_scopes() -> None:
    async with start_emulator() as emu, client_for(emu) as client:
        # the connector's own calls work with exactly the documented scopes, org lookup too
        assert await client.fields("Orders")
        bf = build_bulk_zip(["parent_id", "Name"], [["1", "Order 1"]])
        assert await client.upload_bulk_file(bf)
        assert "org" in emu.usage()["by_api"]
        # a call outside the list is refused as on a real org (was: scope "*")
        with pytest.raises(PermanentError, match=r"ZohoCRM\.users\.READ"):
            await client.current_user()


async def test_scope_error_names_the_scope_and_the_key_that_avoids_the_call() -> None:
    without_org = [s for s in REQUIRED_SCOPES if s != "ZohoCRM.org.READ"]
    cfg = make_config(
        auth={
            "refresh_tokens": [{"refresh_token": "emulator-refresh-token", "scopes": without_org}]
        }
    )
    async with start_emulator(cfg) as emu:
        async with client_for(emu) as client:
            bf = build_bulk_zip(["parent_id", "Name"], [["1", "Order 1"]])
            with pytest.raises(PermanentError) as err:
                await client.upload_bulk_file(bf)
            msg = str(err.value)
            assert "OAUTH_SCOPE_MISMATCH" in msg and "ZohoCRM.org.READ" in msg
            assert "crm.org_id" in msg
        # with crm.org_id set the call is not needed and the upload works
        async with client_for(emu, org_id="emulator-org") as client:
            assert await client.upload_bulk_file(bf)


# ---- issue 17 item 13: unreachable accounts server ---------------------------------------------


async def test_unreachable_accounts_server_names_the_url_and_errno() -> None:
    client = ZohoClient(
        accounts_url="http://127.0.0.1:9",
        api_url="http://127.0.0.1:9",
        client_id="cid",
        client_secret=SecretStr("very-secret"),
        refresh_token=SecretStr("refresh-secret"),
        retry=FAST,
    )
    async with client:
        with pytest.raises(TransientError) as err:
            await client.fields("Orders")
    msg = str(err.value)
    assert "http://127.0.0.1:9/oauth/v2/token" in msg
    assert f"errno {errno.ECONNREFUSED}" in msg and "ECONNREFUSED" in msg
    assert "secret" not in msg


# ---- item 2: access tokens shared, budgeted, throttle is transient ------------------------------


async def test_emulator_throttles_token_creation_like_zoho_by_default() -> None:
    async with start_emulator() as emu:
        for i in range(10):  # ten processes that do not share a store
            async with client_for(emu, token_store=MemoryTokenStore()) as client:
                await client.tokens.get()
            assert emu.usage()["tokens_issued"] == i + 1
        async with client_for(emu, token_store=MemoryTokenStore()) as client:
            with pytest.raises(TransientError, match="throttl"):
                await client.tokens.get()
        assert emu.usage()["tokens_issued"] == 10
        emu.advance(601)  # the window passes on the emulator's clock
        async with client_for(emu, token_store=MemoryTokenStore()) as client:
            await client.tokens.get()


async def test_clients_of_one_process_share_a_token() -> None:
    async with start_emulator() as emu:
        for _ in range(12):  # more than Zoho's 10: one verb opening many clients
            async with client_for(emu) as client:
                assert await client.fields("Orders")
        assert emu.usage()["tokens_issued"] == 1


async def test_throttled_refresh_is_transient_and_honest() -> None:
    cfg = make_config(auth={"throttle_max_tokens": 1})
    async with start_emulator(cfg) as emu:
        async with client_for(emu, token_store=MemoryTokenStore()) as first:
            await first.fields("Orders")
        async with client_for(emu, token_store=MemoryTokenStore()) as second:
            with pytest.raises(TransientError) as err:
                await second.fields("Orders")
            msg = str(err.value)
            assert "throttl" in msg and "credentials are fine" in msg
            assert "check client_id" not in msg and "secret" not in msg
            assert err.value.retry_after is not None and err.value.retry_after > 0
            # the block is remembered: no more calls to the accounts server in the window
            with pytest.raises(TransientError):
                await second.tokens.get()
        assert emu.usage()["tokens_issued"] == 1


async def test_client_side_budget_defers_token_creation() -> None:
    async with start_emulator() as emu, client_for(emu, token_budget=2) as client:
        for _ in range(2):
            token = await client.tokens.get()
            client.tokens.invalidate(token.value)
        with pytest.raises(TransientError, match=r"budget spent.*crm\.token_budget = 2") as err:
            await client.tokens.get()
        assert err.value.retry_after is not None and 0 < err.value.retry_after <= 600
        assert emu.usage()["tokens_issued"] == 2  # the accounts server was not asked


async def test_processes_and_verbs_share_one_access_token(database: str) -> None:
    from connector.zoho import PgTokenStore

    async with start_emulator() as emu:
        for _ in range(5):  # five "processes" (replicas, CLI verbs), one after the other
            store = PgTokenStore(database, "connector")
            async with client_for(emu, token_store=store) as client:
                assert await client.fields("Orders")
        assert emu.usage()["tokens_issued"] == 1
        # a token the CRM rejects is replaced once, and the replacement is shared again
        emu.set_faults(expire_tokens_now=True)
        async with client_for(emu, token_store=PgTokenStore(database, "connector")) as client:
            assert await client.fields("Orders")
        async with client_for(emu, token_store=PgTokenStore(database, "connector")) as client:
            assert await client.fields("Orders")
        assert emu.usage()["tokens_issued"] == 2


async def test_the_token_is_never_logged_and_the_refresh_token_never_stored(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg

    from connector.zoho import PgTokenStore

    caplog.set_level("DEBUG")
    async with start_emulator() as emu:
        async with client_for(emu, token_store=PgTokenStore(database, "connector")) as client:
            token = await client.tokens.token()
    assert token not in caplog.text
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute("SELECT key, access_token FROM connector.oauth_tokens")
        rows = await cur.fetchall()
    assert len(rows) == 1 and rows[0][1] == token
    assert "emulator-refresh-token" not in rows[0][0]


# ---- item 8: bulk CSV date/time formats ---------------------------------------------------------


def _bulk_pipeline() -> Any:
    from connector.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "name": "orders",
            "source_table": "public.orders",
            "key_column": "id",
            "module": "Orders",
            "fields": {
                "name": "Name",
                "order_date": {"field": "Order_Date", "type": "date"},
                "placed_at": {"field": "Placed_At", "type": "datetime"},
            },
        }
    )


def test_client_declares_only_formats_on_zohos_list() -> None:
    from connector.emulator.bulk_csv import ALLOWED_DATE_FORMATS, ALLOWED_DATETIME_FORMATS
    from connector.mapping import RecordMapper

    mappings = {m["api_name"]: m for m in RecordMapper(_bulk_pipeline()).field_mappings()}
    assert mappings["Order_Date"]["format"] in ALLOWED_DATE_FORMATS
    placed = mappings["Placed_At"].get("format")
    assert placed is None or placed in ALLOWED_DATETIME_FORMATS


@pytest.mark.parametrize(
    ("field", "fmt"),
    [("Placed_At", "yyyy-MM-dd'T'HH:mm:ssXXX"), ("Order_Date", "yyyy/dd/MM")],
)
async def test_emulator_refuses_a_format_not_on_zohos_list(field: str, fmt: str) -> None:
    from connector.mapping import RecordMapper

    mapper = RecordMapper(_bulk_pipeline())
    mappings = mapper.field_mappings()
    for m in mappings:
        if m["api_name"] == field:
            m["format"] = fmt
    async with start_emulator() as emu, client_for(emu) as client:
        bf = build_bulk_zip(
            mapper.csv_header(),
            [
                mapper.to_csv_values(
                    {"id": 1, "name": "A", "order_date": "2026-03-02", "placed_at": None}
                )
            ],
        )
        file_id = await client.upload_bulk_file(bf)
        with pytest.raises(PermanentError, match="INVALID_FORMAT"):
            await client.create_bulk_job(
                "Orders", file_id, operation="upsert", find_by="parent_id", field_mappings=mappings
            )


async def test_datetime_with_offset_lands_as_the_same_instant() -> None:
    from connector.mapping import RecordMapper

    mapper = RecordMapper(_bulk_pipeline())
    row = {
        "id": 7,
        "name": "A",
        "order_date": "2026-03-02",
        "placed_at": "2026-03-02T23:30:05+05:30",
    }
    async with start_emulator() as emu, client_for(emu) as client:
        bf = build_bulk_zip(mapper.csv_header(), [mapper.to_csv_values(row)])
        file_id = await client.upload_bulk_file(bf)
        job_id = await client.create_bulk_job(
            "Orders",
            file_id,
            operation="upsert",
            find_by="parent_id",
            field_mappings=mapper.field_mappings(),
        )
        job = await client.wait_bulk_job(job_id, poll_initial=0.01)
        results = await client.bulk_results(job, bf.keys, "parent_id")
        assert results["7"].record_id
        rec = next(r for r in emu.records("Orders") if r["parent_id"] == "7")
    assert rec["Order_Date"] == "2026-03-02"
    from datetime import datetime

    assert datetime.fromisoformat(rec["Placed_At"]) == datetime.fromisoformat(row["placed_at"])


async def test_zoho_default_datetime_format_is_configurable_and_keeps_the_instant() -> None:
    """pipelines[].bulk_datetime_format = "MM/dd/yyyy HH:mm:ss" declares Zoho's default pattern
    and writes each instant offset-less in pipelines[].bulk_timezone, the zone the CRM reads it
    in (the emulator's timezone_offset plays the CRM user's zone)."""
    from datetime import datetime

    from connector.config import PipelineConfig
    from connector.mapping import RecordMapper

    data = _bulk_pipeline().model_dump()
    data.update(bulk_datetime_format="MM/dd/yyyy HH:mm:ss", bulk_timezone="Asia/Kolkata")
    mapper = RecordMapper(PipelineConfig.model_validate(data))
    by_name = {m["api_name"]: m for m in mapper.field_mappings()}
    assert by_name["Placed_At"]["format"] == "MM/dd/yyyy HH:mm:ss"
    row = {"id": 9, "name": "A", "order_date": "2026-03-02", "placed_at": "2026-03-02T20:00:00Z"}
    assert mapper.to_csv_values(row)[-1] == "03/03/2026 01:30:00"
    async with start_emulator(make_config(timezone_offset="+05:30")) as emu:
        async with client_for(emu) as client:
            bf = build_bulk_zip(mapper.csv_header(), [mapper.to_csv_values(row)])
            file_id = await client.upload_bulk_file(bf)
            job_id = await client.create_bulk_job(
                "Orders",
                file_id,
                operation="upsert",
                find_by="parent_id",
                field_mappings=mapper.field_mappings(),
            )
            await client.wait_bulk_job(job_id, poll_initial=0.01)
        rec = next(r for r in emu.records("Orders") if r["parent_id"] == "9")
    assert datetime.fromisoformat(rec["Placed_At"]) == datetime.fromisoformat(row["placed_at"])


def test_bulk_timezone_is_checked() -> None:
    from pydantic import ValidationError

    from connector.config import PipelineConfig

    data = _bulk_pipeline().model_dump()
    data["bulk_timezone"] = "Mars/Olympus"
    with pytest.raises(ValidationError, match=r"(?s)bulk_timezone.*IANA time zone"):
        PipelineConfig.model_validate(data)
