"""Issue 15 items 4, 5, 6, 10: the emulator behaves like Zoho for automations (``trigger``),
record locks, expired bulk jobs and one field validation for the JSON and Bulk Write paths."""

from __future__ import annotations

from typing import Any

import pytest

from connector.emulator.records import ALL_TRIGGERS
from connector.emulator.server import EmulatorHandle
from tests.emulator.conftest import Api

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
