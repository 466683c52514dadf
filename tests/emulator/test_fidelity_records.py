"""Issue 15 items 4, 5, 6, 10: the emulator behaves like Zoho for automations (``trigger``),
record locks, expired bulk jobs and one field validation for the JSON and Bulk Write paths."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.bulk_csv import make_csv_converter
from connector.emulator.records import ALL_TRIGGERS
from connector.emulator.server import EmulatorHandle
from connector.emulator.state import EmulatorState
from connector.emulator.validate import BAD
from connector.errors import BulkJobGone
from connector.zoho.bulk import JobStatus, build_bulk_zip
from connector.zoho.client import ZohoClient
from tests.emulator.conftest import Api, make_config

UPSERT = "/crm/v8/Orders/upsert"


def rec(key: str, **kw: Any) -> dict[str, Any]:
    return {"parent_id": key, "Name": f"Order {key}", **kw}


async def upsert(api: Api, records: list[dict[str, Any]], **body: Any) -> tuple[int, Any]:
    status, _, out = await api.call(
        "POST", UPSERT, json={"data": records, "duplicate_check_fields": ["parent_id"], **body}
    )
    return status, out


# ---- item 4: trigger ---------------------------------------------------------------------------


async def test_omitted_trigger_runs_every_automation(emu: EmulatorHandle, api: Api) -> None:
    status, out = await upsert(api, [rec("K1")])
    assert status == 200
    rid = out["data"][0]["details"]["id"]
    assert emu.history("Orders", rid)[-1]["trigger"] == list(ALL_TRIGGERS)
    assert emu.triggers()[-1] == {
        "time": emu.triggers()[-1]["time"],
        "module": "Orders",
        "api": "upsert",
        "records": 1,
        "trigger": list(ALL_TRIGGERS),
    }


@pytest.mark.parametrize("trigger", [[], ["workflow"], ["approval", "blueprint"]])
async def test_trigger_list_is_recorded(emu: EmulatorHandle, api: Api, trigger: list[str]) -> None:
    status, out = await upsert(api, [rec("K1")], trigger=trigger)
    assert status == 200
    rid = out["data"][0]["details"]["id"]
    assert emu.history("Orders", rid)[-1]["trigger"] == trigger
    status, _, _ = await api.call(
        "PUT", "/crm/v8/Orders", json={"data": [{"id": rid, "Notes": "x"}], "trigger": trigger}
    )
    assert status == 200
    assert emu.history("Orders", rid)[-1]["trigger"] == trigger
    status, _, body = await api.call("GET", "/__emulator__/triggers")
    assert [w["trigger"] for w in body["writes"]] == [trigger, trigger]


async def test_unknown_trigger_value_is_refused(emu: EmulatorHandle, api: Api) -> None:
    status, out = await upsert(api, [rec("K1")], trigger=["workflows"])
    assert status == 400
    assert out["code"] == "INVALID_DATA"
    assert out["details"]["api_name"] == "trigger"
    assert emu.records("Orders") == []


async def test_delete_wf_trigger_is_recorded(emu: EmulatorHandle, api: Api) -> None:
    _, out = await upsert(api, [rec("K1"), rec("K2")], trigger=[])
    a, b = (d["details"]["id"] for d in out["data"])
    status, _, _ = await api.call(
        "DELETE", "/crm/v8/Orders", params={"ids": a, "wf_trigger": "false"}
    )
    assert status == 200
    status, _, _ = await api.call("DELETE", "/crm/v8/Orders", params={"ids": b})
    assert status == 200
    assert emu.history("Orders", a)[-1]["trigger"] == []
    assert emu.history("Orders", b)[-1]["trigger"] == ["workflow"]


# ---- item 6: expired jobs and result links ----------------------------------------------------


async def _bulk_job(
    emu: EmulatorHandle, client: ZohoClient | None = None
) -> tuple[ZohoClient, str]:
    if client is None:
        client = ZohoClient(
            accounts_url=emu.url,
            api_url=emu.url,
            upload_url=emu.url,
            client_id="emulator-client-id",
            client_secret=SecretStr("emulator-client-secret"),
            refresh_token=SecretStr("emulator-refresh-token"),
            org_id="emulator-org",
        )
        await client.open()
    file = build_bulk_zip(["parent_id", "Name"], [["K1", "One"], ["K2", "Two"]])
    file_id = await client.upload_bulk_file(file)
    job_id = await client.create_bulk_job(
        "Orders",
        file_id,
        operation="upsert",
        find_by="parent_id",
        field_mappings=[{"api_name": "parent_id", "index": 0}, {"api_name": "Name", "index": 1}],
    )
    return client, job_id


async def test_finished_job_and_its_link_expire_after_seven_days(emu: EmulatorHandle) -> None:
    client, job_id = await _bulk_job(emu)
    try:
        job = await client.wait_bulk_job(job_id, poll_initial=0.01)
        assert job.status is JobStatus.COMPLETED
        emu.advance(6 * 86_400)  # a week is not over: both still there
        assert (await client.get_bulk_job(job_id)).download_url == job.download_url
        assert len(await client.download_bulk_result(job)) > 0
        emu.advance(2 * 86_400)
        with pytest.raises(BulkJobGone, match="403"):
            await client.download_bulk_result(job)
        with pytest.raises(BulkJobGone, match="404 RESOURCE_NOT_FOUND"):
            await client.get_bulk_job(job_id)
    finally:
        await client.aclose()


async def test_expiry_counts_from_the_end_of_the_job_not_from_the_first_look() -> None:
    async with start_emulator(make_config(bulk={"queue_seconds": 100.0})) as emu:
        client, job_id = await _bulk_job(emu)
        try:
            # the clock jumps 8 days at once: the job is first seen finished now, but it
            # ended (queue 100 s, then at once) more than a week ago
            emu.advance(8 * 86_400)
            with pytest.raises(BulkJobGone, match="404"):
                await client.get_bulk_job(job_id)
        finally:
            await client.aclose()


# ---- item 5: record locks ---------------------------------------------------------------------


async def test_locked_record_refuses_writes_until_unlocked(emu: EmulatorHandle, api: Api) -> None:
    _, out = await upsert(api, [rec("K1"), rec("K2")], trigger=[])
    rid = out["data"][0]["details"]["id"]
    status, _, body = await api.call(
        "POST",
        "/__emulator__/locks",
        json={"module": "Orders", "field": "parent_id", "value": "K1"},
    )
    assert status == 200 and list(body["locks"]["Orders"]) == [rid]
    status, out = await upsert(api, [rec("K1", Notes="new"), rec("K2", Notes="new")], trigger=[])
    assert status == 207
    assert out["data"][0]["code"] == "RECORD_LOCKED"
    assert out["data"][0]["details"] == {"id": rid}
    assert out["data"][1]["code"] == "SUCCESS"
    status, _, body = await api.call("DELETE", "/crm/v8/Orders", params={"ids": rid})
    assert status == 400 and body["data"][0]["code"] == "RECORD_LOCKED"
    await api.call(
        "POST", "/__emulator__/locks", json={"module": "Orders", "id": rid, "unlock": True}
    )
    status, out = await upsert(api, [rec("K1", Notes="new")], trigger=[])
    assert status == 200 and out["data"][0]["code"] == "SUCCESS"


async def test_lock_ends_on_the_emulator_clock(emu: EmulatorHandle, api: Api) -> None:
    _, out = await upsert(api, [rec("K1")], trigger=[])
    rid = out["data"][0]["details"]["id"]
    emu.lock("Orders", rid, seconds=60)
    status, out = await upsert(api, [rec("K1", Notes="x")], trigger=[])
    assert status == 400 and out["data"][0]["code"] == "RECORD_LOCKED"
    emu.advance(61)
    status, out = await upsert(api, [rec("K1", Notes="x")], trigger=[])
    assert status == 200


async def test_bulk_row_of_a_locked_record_is_skipped(emu: EmulatorHandle) -> None:
    client, job_id = await _bulk_job(emu)  # K1, K2 added
    try:
        await client.wait_bulk_job(job_id, poll_initial=0.01)
        k1 = next(r["id"] for r in emu.records("Orders") if r["parent_id"] == "K1")
        emu.lock("Orders", k1)
        _, job_id = await _bulk_job(emu, client)
        job = await client.wait_bulk_job(job_id, poll_initial=0.01)
        results = await client.bulk_results(job, ["K1", "K2"], "parent_id")
        assert results["K1"].code == "RECORD_LOCKED" and not results["K1"].ok
        assert results["K2"].ok
    finally:
        await client.aclose()


# ---- item 10: one validation for the JSON and the Bulk Write path ------------------------------


async def _bulk_value(emu: EmulatorHandle, client: ZohoClient, column: str, cell: str) -> Any:
    """Write one value through Bulk Write; the stored value, or the row's error code."""
    file = build_bulk_zip(["parent_id", "Name", column], [["B1", "Bulk", cell]])
    file_id = await client.upload_bulk_file(file)
    job_id = await client.create_bulk_job(
        "Orders",
        file_id,
        operation="upsert",
        find_by="parent_id",
        field_mappings=[
            {"api_name": "parent_id", "index": 0},
            {"api_name": "Name", "index": 1},
            {"api_name": column, "index": 2},
        ],
    )
    job = await client.wait_bulk_job(job_id, poll_initial=0.01)
    result = (await client.bulk_results(job, ["B1"], "parent_id"))["B1"]
    if not result.ok:
        return result.code
    return next(r for r in emu.records("Orders") if r["parent_id"] == "B1").get(column)


async def _json_value(emu: EmulatorHandle, api: Api, column: str, raw: str) -> Any:
    """Write one value through the JSON upsert (``raw`` is the JSON text of the value)."""
    record = '{"parent_id":"J1","Name":"Json","' + column + '":' + raw + "}"
    body = '{"data":[' + record + '],"duplicate_check_fields":["parent_id"],"trigger":[]}'
    _, _, out = await api.call(
        "POST", UPSERT, data=body, headers={"Content-Type": "application/json"}
    )
    item = out["data"][0]
    if item["status"] != "success":
        return item["code"]
    return next(r for r in emu.records("Orders") if r["parent_id"] == "J1").get(column)


# (column, JSON text, CSV cell): the same value on both paths
SAME_VALUE = [
    ("Amount", "9999999999999999.99", "9999999999999999.99"),  # 16 digits + 2: valid, exact
    ("Amount", "99999999999999999.5", "99999999999999999.5"),  # 17 digits before the point
    ("Amount", "1.1234567891", "1.1234567891"),  # 10 decimals: more than Zoho's 9
    ("Amount", "0.1", "0.1"),
    ("Quantity", "1234567890", "1234567890"),  # integer: 9 digits
    ("Quantity", "42", "42"),
    ("Customer_Email", '"not-an-email"', "not-an-email"),
    ("Customer_Email", '"a@example.org"', "a@example.org"),
    ("Status", '"Lost"', "Lost"),  # not in the picklist
    ("Status", '"Paid"', "Paid"),
    ("Name", '"' + "x" * 256 + '"', "x" * 256),  # single line: 255
    ("Order_Date", '"2024-02-30"', "02/30/2024"),  # no such day (CSV default MM/dd/yyyy)
    ("Order_Date", '"2024-02-29"', "02/29/2024"),
]


@pytest.mark.parametrize(("column", "json_text", "cell"), SAME_VALUE)
async def test_one_value_one_verdict_on_both_paths(
    emu: EmulatorHandle, api: Api, column: str, json_text: str, cell: str
) -> None:
    client, _ = await _bulk_job(emu)
    try:
        via_bulk = await _bulk_value(emu, client, column, cell)
    finally:
        await client.aclose()
    via_json = await _json_value(emu, api, column, json_text)
    if column == "Name":  # the name is also what the row is called: compare the codes only
        assert via_json == via_bulk == "INVALID_DATA"
        return
    assert via_json == via_bulk, (via_json, via_bulk)
    assert type(via_json) is type(via_bulk)


async def test_currency_keeps_every_digit_in_answers(emu: EmulatorHandle, api: Api) -> None:
    assert await _json_value(emu, api, "Amount", "9999999999999999.99") == Decimal(
        "9999999999999999.99"
    )
    async with api.session.get(
        emu.url + "/crm/v8/Orders",
        params={"fields": "Amount,parent_id"},
        headers={"Authorization": f"Zoho-oauthtoken {api.token}"},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert b'"Amount":9999999999999999.99' in raw  # not 1e16


@given(
    whole=st.integers(min_value=0, max_value=10**18),
    frac=st.text(alphabet="0123456789", max_size=11),
    negative=st.booleans(),
)
def test_number_verdicts_agree_for_any_decimal(whole: int, frac: str, negative: bool) -> None:
    """For every decimal text, the JSON checker and the CSV converter of the same currency
    field agree, and an accepted value is stored with exactly the digits sent."""
    text = ("-" if negative else "") + str(whole) + ("." + frac if frac else "")
    state = EmulatorState(EmulatorConfig.default())
    store = state.stores["Orders"]
    check = store.m.checkers["Amount"]
    convert = make_csv_converter(store.m.fields["Amount"], None, state, check)
    via_json = json.loads(text, parse_float=Decimal)
    json_ok = check(via_json) is None
    via_csv = convert(text)
    assert json_ok == (via_csv is not BAD)
    if json_ok:
        assert via_csv == via_json == Decimal(text)
