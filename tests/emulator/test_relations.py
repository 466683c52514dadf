"""Lookup and subform fields in the emulator (issue 21 part 1), through plain HTTP.

Zoho's documentation for each behaviour is cited in connector/emulator/records.py
(``ModuleStore.relations``) and bulk.py (``_check_relation_mapping``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.server import EmulatorHandle
from tests.emulator.conftest import Api
from tests.emulator.test_bulk import check, create, details, make_zip, read_result, upload


def relations_config() -> EmulatorConfig:
    return EmulatorConfig.from_dict(
        {
            "modules": [
                {
                    "api_name": "Accounts",
                    "id": "4876876000000600001",
                    "fields": [
                        {"api_name": "Name", "mandatory": True},
                        {"api_name": "Legacy_Id", "unique": True},
                        {"api_name": "City"},
                    ],
                },
                {
                    "api_name": "Orders",
                    "id": "4876876000000500001",
                    "fields": [
                        {"api_name": "Name", "mandatory": True},
                        {"api_name": "Legacy_Id", "unique": True},
                        {"api_name": "Account", "data_type": "lookup", "lookup_module": "Accounts"},
                        {
                            "api_name": "Lines",
                            "data_type": "subform",
                            "subform_module": "Order_Lines",
                            "subform_fields": [
                                {"api_name": "Product"},
                                {"api_name": "Qty", "data_type": "integer"},
                            ],
                        },
                    ],
                },
            ]
        }
    )


@pytest.fixture
async def remu() -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(relations_config()) as e:
        yield e


@pytest.fixture
async def rapi(remu: EmulatorHandle) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as s:
        a = Api(remu, s)
        await a.login()
        yield a


async def _account(api: Api, key: str) -> str:
    st_, _, body = await api.call(
        "POST", "/crm/v8/Accounts", json={"data": [{"Name": f"Acme {key}", "Legacy_Id": key}]}
    )
    assert st_ == 201, body
    return str(body["data"][0]["details"]["id"])


async def _upsert(api: Api, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    st_, _, body = await api.call(
        "POST",
        "/crm/v8/Orders/upsert",
        json={"data": [rec], "duplicate_check_fields": ["Legacy_Id"]},
    )
    return st_, body["data"][0]


def _order(remu: EmulatorHandle, key: str) -> dict[str, Any]:
    return next(r for r in remu.records("Orders") if r["Legacy_Id"] == key)


async def test_field_metadata_names_the_target_and_the_subform(rapi: Api) -> None:
    st_, _, body = await rapi.call("GET", "/crm/v8/settings/fields", params={"module": "Orders"})
    assert st_ == 200
    check(("fields.json", "/crm/v8/settings/fields"), "get", st_, body)  # Zoho's OAS
    by = {f["api_name"]: f for f in body["fields"]}
    assert by["Account"]["data_type"] == "lookup"
    assert by["Account"]["json_type"] == "jsonobject"
    assert by["Account"]["lookup"]["module"]["api_name"] == "Accounts"
    assert by["Lines"]["data_type"] == "subform"
    assert by["Lines"]["subform"]["module"] == "Order_Lines"
    assert by["Name"]["lookup"] is None


async def test_field_metadata_of_the_subform_module(rapi: Api) -> None:
    st_, _, body = await rapi.call(
        "GET", "/crm/v8/settings/fields", params={"module": "Order_Lines"}
    )
    assert st_ == 200
    check(("fields.json", "/crm/v8/settings/fields"), "get", st_, body)
    assert {f["api_name"]: f["data_type"] for f in body["fields"]} == {
        "Product": "text",
        "Qty": "integer",
    }


async def test_lookup_id_must_exist_in_the_target_module(remu, rapi: Api) -> None:
    acc = await _account(rapi, "c1")
    st_, item = await _upsert(rapi, {"Name": "O1", "Legacy_Id": "o1", "Account": {"id": acc}})
    assert st_ == 200 and item["status"] == "success", item
    assert _order(remu, "o1")["Account"] == {"name": "Acme c1", "id": acc}

    # an id of no Accounts record (an Orders id, here): refused, nothing stored
    other = _order(remu, "o1")["id"]
    st_, item = await _upsert(rapi, {"Name": "O2", "Legacy_Id": "o2", "Account": {"id": other}})
    assert st_ == 400
    assert item["code"] == "INVALID_DATA"
    assert item["message"] == "the id given seems to be invalid"
    assert item["details"]["api_name"] == "Account" and item["details"]["id"] == other
    assert "__message__" not in item["details"]
    assert all(r["Legacy_Id"] != "o2" for r in remu.records("Orders"))

    # the update path too: the stored lookup is left as it was
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1", "Account": {"id": "1"}})
    assert st_ == 400 and item["code"] == "INVALID_DATA"
    assert _order(remu, "o1")["Account"]["id"] == acc

    # not the documented {"id": ...} shape: INVALID_DATA with the expected type
    st_, item = await _upsert(rapi, {"Name": "O3", "Legacy_Id": "o3", "Account": acc})
    assert st_ == 400 and item["details"]["expected_data_type"] == "lookup"

    # null clears the lookup
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1", "Account": None})
    assert st_ == 200 and _order(remu, "o1")["Account"] is None


async def test_coql_compares_a_lookup_by_the_parent_id(rapi: Api) -> None:
    acc = await _account(rapi, "c1")
    other = await _account(rapi, "c2")
    for key, parent in (("o1", acc), ("o2", other), ("o3", acc)):
        await _upsert(rapi, {"Name": key, "Legacy_Id": key, "Account": {"id": parent}})
    st_, _, body = await rapi.call(
        "POST",
        "/crm/v8/coql",
        json={"select_query": f"select Legacy_Id, Account from Orders where Account = '{acc}'"},
    )
    assert st_ == 200, body
    assert sorted(r["Legacy_Id"] for r in body["data"]) == ["o1", "o3"]
    assert body["data"][0]["Account"]["id"] == acc


async def test_lookup_to_a_deleted_parent_is_refused(remu, rapi: Api) -> None:
    acc = await _account(rapi, "c9")
    st_, _, _ = await rapi.call("DELETE", "/crm/v8/Accounts", params={"ids": acc})
    assert st_ == 200
    st_, item = await _upsert(rapi, {"Name": "O9", "Legacy_Id": "o9", "Account": {"id": acc}})
    assert st_ == 400 and item["message"] == "the id given seems to be invalid"


async def test_subform_rows_kept_replaced_and_removed_as_documented(remu, rapi: Api) -> None:
    rows = [{"Product": f"p{i}", "Qty": i} for i in (1, 2, 3)]
    st_, item = await _upsert(rapi, {"Name": "O1", "Legacy_Id": "o1", "Lines": rows})
    assert st_ == 200 and item["action"] == "insert", item
    stored = _order(remu, "o1")["Lines"]
    assert [(r["Product"], r["Qty"]) for r in stored] == [("p1", 1), ("p2", 2), ("p3", 3)]
    ids = [r["id"] for r in stored]
    assert len(set(ids)) == 3

    # Zoho's example: rows 1 and 3 named with a new row -> row 2 deleted, a new row 4
    st_, item = await _upsert(
        rapi,
        {
            "Legacy_Id": "o1",
            "Name": "O1",
            "Lines": [{"id": ids[0]}, {"id": ids[2], "Qty": 30}, {"Product": "p4", "Qty": 4}],
        },
    )
    assert st_ == 200 and item["action"] == "update", item
    stored = _order(remu, "o1")["Lines"]
    assert [r["id"] for r in stored][:2] == [ids[0], ids[2]]
    assert [(r["Product"], r["Qty"]) for r in stored] == [("p1", 1), ("p3", 30), ("p4", 4)]
    assert stored[2]["id"] not in ids

    # a write that does not name the subform leaves it as it is
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1 renamed"})
    assert st_ == 200 and len(_order(remu, "o1")["Lines"]) == 3

    # a row id of another record: not documented, refused (nothing changes)
    st_, item = await _upsert(rapi, {"Name": "O2", "Legacy_Id": "o2", "Lines": [{"Qty": 1}]})
    foreign = _order(remu, "o2")["Lines"][0]["id"]
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1", "Lines": [{"id": foreign}]})
    assert st_ == 400 and item["code"] == "INVALID_DATA"
    assert item["details"]["parent_api_name"] == "Lines"
    assert len(_order(remu, "o1")["Lines"]) == 3

    # a bad value in a row names the row's field
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1", "Lines": [{"Qty": "x"}]})
    assert st_ == 400 and item["details"]["api_name"] == "Qty"
    assert item["details"]["parent_api_name"] == "Lines"

    # [] deletes every row
    st_, item = await _upsert(rapi, {"Legacy_Id": "o1", "Name": "O1", "Lines": []})
    assert st_ == 200 and _order(remu, "o1")["Lines"] == []


async def test_subform_rows_replaced_by_an_update_naming_only_the_id_and_the_subform(
    remu, rapi: Api
) -> None:
    """What the subform engine sends (connector/emitter_subform.py): Update Records (PUT) with
    the record's id and the complete row set, no other field. Zoho's "Update Subform Data"
    page documents this call: rows without an id are created, rows not named are deleted, the
    record's other fields stay; an unknown or deleted record id is INVALID_DATA with
    ``{"id": …}`` (zoho-crm-api.md §3)."""
    st_, item = await _upsert(
        rapi, {"Name": "O1", "Legacy_Id": "o1", "Lines": [{"Product": "a", "Qty": 1}]}
    )
    rid = item["details"]["id"]
    st_, _, body = await rapi.call(
        "PUT",
        "/crm/v8/Orders",
        json={"data": [{"id": rid, "Lines": [{"Product": "b", "Qty": 2}, {"Product": "c"}]}]},
    )
    assert st_ == 200 and body["data"][0]["status"] == "success", body
    order = _order(remu, "o1")
    assert [(r["Product"], r.get("Qty")) for r in order["Lines"]] == [("b", 2), ("c", None)]
    assert order["Name"] == "O1"  # not named: kept
    st_, _, body = await rapi.call("DELETE", "/crm/v8/Orders", params={"ids": rid})
    assert st_ == 200
    st_, _, body = await rapi.call(
        "PUT", "/crm/v8/Orders", json={"data": [{"id": rid, "Lines": []}]}
    )
    item = body["data"][0]
    assert item["code"] == "INVALID_DATA" and item["details"] == {"id": rid}, body
    assert item["message"] == "the id given seems to be invalid"


async def test_subform_row_id_on_insert_is_refused(remu, rapi: Api) -> None:
    st_, item = await _upsert(
        rapi, {"Name": "O1", "Legacy_Id": "o1", "Lines": [{"id": "4876876000001000001"}]}
    )
    assert st_ == 400 and item["details"]["parent_api_name"] == "Lines"
    assert remu.records("Orders") == []


async def test_bulk_lookup_default_value_is_refused(rapi: Api) -> None:
    header = ["Legacy_Id", "Name", "Account"]
    _, up = await upload(rapi, make_zip([["o1", "O1", "c1"]], header=header))
    body = _job(up["details"]["file_id"], header, "Legacy_Id")
    body["resource"][0]["field_mappings"][2]["default_value"] = {"value": "c1"}
    st_, out = await create(rapi, body)
    assert st_ == 400 and out["details"]["json_path"].endswith("[2].default_value")


async def test_subform_row_limit(rapi: Api) -> None:
    rows = [{"Qty": i} for i in range(101)]
    st_, item = await _upsert(rapi, {"Name": "O1", "Legacy_Id": "o1", "Lines": rows})
    assert st_ == 400 and item["details"]["limit"] == 100


def _job(file_id: str, header: list[str], find_by: str | None) -> dict[str, Any]:
    maps: list[dict[str, Any]] = [{"api_name": h, "index": i} for i, h in enumerate(header)]
    if find_by is not None:
        maps[header.index("Account")]["find_by"] = find_by
    return {
        "operation": "upsert",
        "resource": [
            {
                "type": "data",
                "module": {"api_name": "Orders"},
                "file_id": file_id,
                "find_by": "Legacy_Id",
                "field_mappings": maps,
            }
        ],
    }


async def test_bulk_lookup_resolved_by_find_by_on_the_parent_unique_field(remu, rapi: Api) -> None:
    acc = await _account(rapi, "c1")
    header = ["Legacy_Id", "Name", "Account"]
    rows = [["o1", "O1", "c1"], ["o2", "O2", "c-missing"], ["o3", "O3", ""]]
    _, up = await upload(rapi, make_zip(rows, header=header))
    st_, out = await create(rapi, _job(up["details"]["file_id"], header, "Legacy_Id"))
    assert st_ == 201, out
    job = await details(rapi, out["details"]["id"])
    assert job["status"] == "COMPLETED"
    _, _, payload = await rapi.call("GET", job["result"]["download_url"])
    _, result = read_result(payload)
    assert [r["STATUS"] for r in result] == ["ADDED", "SKIPPED", "ADDED"]
    assert result[1]["ERRORS"] == "INVALID_DATA-Account"
    assert _order(remu, "o1")["Account"] == {"name": "Acme c1", "id": acc}
    assert _order(remu, "o3")["Account"] is None
    assert all(r["Legacy_Id"] != "o2" for r in remu.records("Orders"))


@pytest.mark.parametrize("find_by", [None, "City", "Nope"])
async def test_bulk_lookup_without_a_usable_find_by_is_refused(rapi: Api, find_by: Any) -> None:
    header = ["Legacy_Id", "Name", "Account"]
    _, up = await upload(rapi, make_zip([["o1", "O1", "c1"]], header=header))
    st_, out = await create(rapi, _job(up["details"]["file_id"], header, find_by))
    assert st_ == 400 and out["code"] == "INVALID_DATA"
    assert out["details"]["json_path"] == "$.resource[0].field_mappings[2].find_by"


async def test_bulk_subform_column_is_refused(rapi: Api) -> None:
    header = ["Legacy_Id", "Name", "Lines"]
    _, up = await upload(rapi, make_zip([["o1", "O1", "x"]], header=header))
    body = _job(up["details"]["file_id"], header, None)
    st_, out = await create(rapi, body)
    assert st_ == 400 and out["details"]["api_name"] == "Lines"


def test_config_refuses_a_lookup_to_an_unknown_module() -> None:
    data = relations_config().model_dump()
    data["modules"][1]["fields"][2]["lookup_module"] = "Contacts"
    with pytest.raises(ValueError, match="Contacts"):
        EmulatorConfig.from_dict(data)


# property: whatever sequence of subform writes, the stored rows are exactly the rows of the
# last write, in its order; a named row keeps its id; ids are never reused
_write = st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=6)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=st.lists(_write, min_size=1, max_size=5))
def test_subform_rows_follow_the_last_write(writes: list[list[tuple[bool, int]]]) -> None:
    from connector.emulator.state import EmulatorState

    state = EmulatorState(relations_config())
    store = state.stores["Orders"]
    res = store.insert({"Name": "O", "Legacy_Id": "o"}, "insert")
    rid = res.record_id
    assert rid is not None
    seen_ids: set[str] = set()
    for write in writes:
        current = store.records[rid].get("Lines") or []
        rows: list[dict[str, Any]] = []
        expect_kept: list[str | None] = []
        used: set[int] = set()
        for keep, qty in write:
            if keep and current and (qty % len(current)) not in used:
                used.add(qty % len(current))
                old = current[qty % len(current)]
                rows.append({"id": old["id"], "Qty": qty})
                expect_kept.append(old["id"])
            else:
                rows.append({"Qty": qty})
                expect_kept.append(None)
        out = store.update(rid, {"Lines": rows}, "update")
        assert out.ok, out
        stored = store.records[rid]["Lines"]
        assert [r["Qty"] for r in stored] == [q for _, q in write]
        for kept, r in zip(expect_kept, stored, strict=True):
            if kept is None:
                assert r["id"] not in seen_ids
            else:
                assert r["id"] == kept
        seen_ids |= {r["id"] for r in stored}
