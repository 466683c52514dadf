"""The seed's credit table, read back from the usage endpoint: upsert in 100-record calls
costs ceil(n/100) calls and 10 credits per call; bulk write costs one job and 500 credits (plus
1 for each upload, job-details and download call)."""

from __future__ import annotations

import csv
import io
import zipfile

import aiohttp
import pytest

from connector.emulator import start_emulator
from tests.emulator.conftest import Api, make_config

TABLE = [(100, 1, 10), (2_000, 20, 200), (5_000, 50, 500), (25_000, 250, 2_500)]


def rec(i: int) -> dict[str, object]:
    return {"Name": f"Order {i}", "parent_id": str(i), "Status": "New", "Quantity": 1}


@pytest.fixture
async def api_session():
    async with start_emulator(make_config()) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        await api.login()
        yield emu, api


async def test_upsert_column_of_the_table(api_session) -> None:
    emu, api = api_session
    for n, calls, credits in TABLE:
        emu.reset()
        for start in range(0, n, 100):
            st, _, _ = await api.call(
                "POST",
                "/crm/v8/Orders/upsert",
                json={
                    "data": [rec(i) for i in range(start, start + 100)],
                    "duplicate_check_fields": ["parent_id"],
                },
            )
            assert st == 200
        st, _, usage = await api.call("GET", "/__emulator__/usage")
        assert usage["by_api"] == {"upsert": {"calls": calls, "credits": credits, "records": n}}
        assert usage["totals"]["credits"] == credits and usage["credits"]["used"] == credits
        assert len(emu.records("Orders")) == n


async def test_bulk_column_of_the_table(api_session) -> None:
    emu, api = api_session
    for n, _, _ in TABLE:
        emu.reset()
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["parent_id", "Name", "Status"])
        w.writerows([str(i), f"Order {i}", "New"] for i in range(n))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("orders.csv", out.getvalue())
        form = aiohttp.FormData()
        form.add_field("file", buf.getvalue(), filename="orders.zip")
        st, _, up = await api.call(
            "POST",
            "/crm/v8/upload",
            data=form,
            headers={"feature": "bulk-write", "X-CRM-ORG": "emulator-org"},
        )
        assert st == 200
        st, _, job = await api.call(
            "POST",
            "/crm/bulk/v8/write",
            json={
                "operation": "upsert",
                "resource": [
                    {
                        "type": "data",
                        "module": {"api_name": "Orders"},
                        "file_id": str(up["details"]["file_id"]),
                        "find_by": "parent_id",
                    }
                ],
            },
        )
        assert st == 201
        st, _, details = await api.call("GET", f"/crm/bulk/v8/write/{job['details']['id']}")
        assert details["status"] == "COMPLETED"
        assert details["resource"][0]["file"]["added_count"] == n
        st, _, _ = await api.call("GET", details["result"]["download_url"])
        assert st == 200
        st, _, usage = await api.call("GET", "/__emulator__/usage")
        assert usage["bulk_jobs"] == 1
        assert usage["by_api"]["bulk_write_job"]["calls"] == 1
        # the table's 500 per job (DESIGN.md §1) is the job; upload, one job-details call and
        # the download cost 1 each on top ("All other APIs: 1", Zoho's API limits page)
        assert usage["by_api"]["bulk_write_job"]["credits"] == 500
        assert usage["totals"]["credits"] == 503 and usage["credits"]["used"] == 503
