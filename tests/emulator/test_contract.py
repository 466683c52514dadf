"""Contract tests: every behaviour through plain HTTP, each response checked against Zoho's
OpenAPI files (tests/emulator/oas.py explains how they are read)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from connector.emulator import start_emulator
from tests.emulator import oas
from tests.emulator.conftest import Api, make_config, order

REC = ("record.json", "/crm/v8/{module_api_name}")
UPSERT = ("record.json", "/crm/v8/{module_api_name}/upsert")
ONE = ("record.json", "/crm/v8/{module_api_name}/{id}")


def check(spec: tuple[str, str], method: str, status: int, body: Any) -> None:
    try:
        oas.validate(spec[0], method, spec[1], status, body)
    except Exception as e:  # pragma: no cover - the message is the point
        import jsonschema

        if isinstance(e, jsonschema.ValidationError):
            raise AssertionError(f"{spec} {method} {status}: {oas.explain(e)}\n{body}") from e
        raise


async def upsert(
    api: Api, records: list[dict[str, Any]], dcf: list[str] | None = None
) -> tuple[int, Any]:
    payload: dict[str, Any] = {"data": records}
    if dcf is not None:
        payload["duplicate_check_fields"] = dcf
    st, _, body = await api.call("POST", "/crm/v8/Orders/upsert", json=payload)
    check(UPSERT, "post", st, body)
    return st, body


# -- accounts ----------------------------------------------------------------------------------
async def test_token_refresh_form_and_query(emu, api: Api) -> None:
    creds = {
        "grant_type": "refresh_token",
        "client_id": "emulator-client-id",
        "client_secret": "emulator-client-secret",
        "refresh_token": "emulator-refresh-token",
    }
    st, _, body = await api.call("POST", "/oauth/v2/token", auth=False, params=creds)
    assert st == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["api_domain"] == emu.url and body["access_token"]
    st, _, body = await api.call("POST", "/oauth/v2/token", auth=False, data=creds)
    assert st == 200 and "access_token" in body


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"refresh_token": "nope"}, "invalid_code"),
        ({"client_id": "other"}, "invalid_client"),
        ({"client_secret": "wrong"}, "invalid_client_secret"),
    ],
)
async def test_token_errors_are_http_200(api: Api, change: dict[str, str], error: str) -> None:
    creds = {
        "grant_type": "refresh_token",
        "client_id": "emulator-client-id",
        "client_secret": "emulator-client-secret",
        "refresh_token": "emulator-refresh-token",
        **change,
    }
    st, _, body = await api.call("POST", "/oauth/v2/token", auth=False, data=creds)
    assert st == 200
    assert body == {"error": error}


async def test_authorization_code_grant_and_revoke(api: Api) -> None:
    base = {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"}
    st, _, body = await api.call(
        "POST",
        "/oauth/v2/token",
        auth=False,
        data={
            **base,
            "grant_type": "authorization_code",
            "code": "emulator-grant-code",
            "redirect_uri": "x",
        },
    )
    assert st == 200 and body["refresh_token"] and body["access_token"]
    rt = body["refresh_token"]
    # a grant code is single-use
    st, _, again = await api.call(
        "POST",
        "/oauth/v2/token",
        auth=False,
        data={**base, "grant_type": "authorization_code", "code": "emulator-grant-code"},
    )
    assert again == {"error": "invalid_code"}
    st, _, rev = await api.call("POST", "/oauth/v2/token/revoke", auth=False, data={"token": rt})
    assert rev == {"status": "success"}
    st, _, body = await api.call(
        "POST",
        "/oauth/v2/token",
        auth=False,
        data={**base, "grant_type": "refresh_token", "refresh_token": rt},
    )
    assert body == {"error": "invalid_code"}


async def test_token_throttle() -> None:
    async with (
        start_emulator(make_config(auth={"throttle": True, "throttle_max_tokens": 2})) as emu,
        aiohttp.ClientSession() as s,
    ):
        api = Api(emu, s)
        await api.login()
        await api.login()
        st, _, body = await api.call(
            "POST",
            "/oauth/v2/token",
            auth=False,
            data={
                "grant_type": "refresh_token",
                "client_id": "emulator-client-id",
                "client_secret": "emulator-client-secret",
                "refresh_token": "emulator-refresh-token",
            },
        )
        assert st == 400 and body["error"] == "Access Denied"
        emu.advance(601)
        await api.login()


async def test_auth_failures(emu, api: Api) -> None:
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name", auth=False)
    assert st == 401 and body["code"] == "AUTHENTICATION_FAILURE"
    check(REC, "get", st, body)
    st, _, body = await api.call(
        "GET", "/crm/v8/Orders?fields=Name", headers={"Authorization": f"Bearer {api.token}"}
    )
    assert st == 401 and body["code"] == "AUTHENTICATION_FAILURE"
    st, _, body = await api.call(
        "GET", "/crm/v8/Orders?fields=Name", headers={"Authorization": "Zoho-oauthtoken garbage"}
    )
    assert st == 401 and body == {
        "code": "INVALID_TOKEN",
        "details": {},
        "message": "invalid oauth token",
        "status": "error",
    }
    check(REC, "get", st, body)
    # tokens expire on the emulator clock
    emu.advance(3601)
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 401 and body["code"] == "INVALID_TOKEN"
    await api.login()
    st, _, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 204


async def test_token_ttl_knob_and_forced_expiry(emu, api: Api) -> None:
    emu.set_faults(access_token_ttl=5)
    await api.login()
    emu.advance(6)
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 401 and body["code"] == "INVALID_TOKEN"
    emu.set_faults(access_token_ttl=3600)
    await api.login()
    emu.set_faults(expire_tokens_now=True)
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert body["code"] == "INVALID_TOKEN"


async def test_scope_mismatch() -> None:
    cfg = make_config(
        auth={
            "refresh_tokens": [
                {"refresh_token": "emulator-refresh-token", "scopes": ["ZohoCRM.users.READ"]}
            ]
        }
    )
    async with start_emulator(cfg) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        await api.login()
        st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name")
        assert st == 401 and body["code"] == "OAUTH_SCOPE_MISMATCH"
        check(REC, "get", st, body)
        st, _, _ = await api.call("GET", "/crm/v8/users?type=CurrentUser")
        assert st == 200


# -- record writes -----------------------------------------------------------------------------
async def test_insert_all_success_201(emu, api: Api) -> None:
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": [order(1), order(2)]})
    assert st == 201
    check(REC, "post", st, body)
    assert [d["code"] for d in body["data"]] == ["SUCCESS", "SUCCESS"]
    d = body["data"][0]
    assert d["message"] == "record added" and d["status"] == "success"
    assert set(d["details"]) == {"Modified_Time", "Modified_By", "Created_Time", "id", "Created_By"}
    assert [r["parent_id"] for r in sorted(emu.records("Orders"), key=lambda r: r["id"])] == [
        "1",
        "2",
    ]


async def test_insert_mixed_207_in_input_order(api: Api) -> None:
    recs = [order(1), order(2, Quantity="three"), order(3)]
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": recs})
    assert st == 207
    check(REC, "post", st, body)
    assert [d["status"] for d in body["data"]] == ["success", "error", "success"]
    assert body["data"][1] == {
        "code": "INVALID_DATA",
        "details": {
            "api_name": "Quantity",
            "json_path": "$.data[1].Quantity",
            "expected_data_type": "integer",
        },
        "message": "invalid data",
        "status": "error",
    }


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {k: v for k, v in order(1).items() if k != "parent_id"},
            {
                "code": "MANDATORY_NOT_FOUND",
                "details": {"api_name": "parent_id", "json_path": "$.data[0].parent_id"},
                "message": "required field not found",
            },
        ),
        (
            order(1, Name=""),
            {
                "code": "MANDATORY_NOT_FOUND",
                "details": {"api_name": "Name", "json_path": "$.data[0].Name"},
                "message": "required field not found",
            },
        ),
        (
            order(1, parent_id="x" * 256),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "parent_id",
                    "json_path": "$.data[0].parent_id",
                    "maximum_length": "255",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Status="Lost"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Status",
                    "json_path": "$.data[0].Status",
                    "supported_values": [
                        "New",
                        "Paid",
                        "Shipped",
                        "Delivered",
                        "Cancelled",
                        "Refunded",
                    ],
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Customer_Email="not-an-email"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Customer_Email",
                    "json_path": "$.data[0].Customer_Email",
                    "expected_data_type": "email",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Is_Gift="yes"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Is_Gift",
                    "json_path": "$.data[0].Is_Gift",
                    "expected_data_type": "boolean",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Order_Date="03/02/2026"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Order_Date",
                    "json_path": "$.data[0].Order_Date",
                    "expected_data_type": "date",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Placed_At="2026-03-02 09:14:05"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Placed_At",
                    "json_path": "$.data[0].Placed_At",
                    "expected_data_type": "datetime",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Amount="12.50"),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Amount",
                    "json_path": "$.data[0].Amount",
                    "expected_data_type": "currency",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Quantity=1234567890),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Quantity",
                    "json_path": "$.data[0].Quantity",
                    "maximum_length": "9",
                },
                "message": "invalid data",
            },
        ),
        (
            order(1, Notes="x" * 32001),
            {
                "code": "INVALID_DATA",
                "details": {
                    "api_name": "Notes",
                    "json_path": "$.data[0].Notes",
                    "maximum_length": "32000",
                },
                "message": "invalid data",
            },
        ),
    ],
)
async def test_validation_errors_all_failed_400(
    api: Api, record: dict[str, Any], expected: dict[str, Any]
) -> None:
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": [record]})
    assert st == 400
    check(REC, "post", st, body)
    assert body["data"] == [{**expected, "status": "error"}]


async def test_duplicate_data_on_insert_and_update(emu, api: Api) -> None:
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": [order(1), order(2)]})
    first_id = body["data"][0]["details"]["id"]
    second_id = body["data"][1]["details"]["id"]
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": [order(1, Name="Other")]})
    assert st == 400
    check(REC, "post", st, body)
    err = body["data"][0]
    assert err["code"] == "DUPLICATE_DATA" and err["message"] == "duplicate data"
    assert err["details"]["api_name"] == "parent_id"
    assert err["details"]["json_path"] == "$.data[0].parent_id"
    assert err["details"]["duplicate_record"]["id"] == first_id
    assert err["details"]["more_records"] is False
    st, _, body = await api.call(
        "PUT", f"/crm/v8/Orders/{second_id}", json={"data": [{"parent_id": "1"}]}
    )
    assert st == 400 and body["data"][0]["code"] == "DUPLICATE_DATA"
    check(ONE, "put", st, body)


async def test_limit_exceeded_and_bad_bodies(api: Api) -> None:
    st, _, body = await api.call(
        "POST", "/crm/v8/Orders", json={"data": [order(i) for i in range(101)]}
    )
    assert st == 400
    check(REC, "post", st, body)
    assert body["data"][0]["code"] == "LIMIT_EXCEEDED"
    assert body["data"][0]["details"] == {"maximum_length": "100", "api_name": "data"}
    st, _, body = await api.call("POST", "/crm/v8/Orders", json={"nodata": []})
    assert st == 400 and body["code"] == "MANDATORY_NOT_FOUND"
    check(REC, "post", st, body)
    st, _, body = await api.call(
        "POST", "/crm/v8/Orders", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert st == 400 and body["code"] == "INVALID_DATA"
    check(REC, "post", st, body)


async def test_invalid_module_and_url(api: Api) -> None:
    st, _, body = await api.call("POST", "/crm/v8/Nope", json={"data": [order(1)]})
    assert st == 400 and body["code"] == "INVALID_MODULE"
    assert body["details"] == {"resource_path_index": 0}
    check(REC, "post", st, body)
    st, _, body = await api.call("GET", "/crm/v9/whatever")
    assert st == 404 and body["code"] == "INVALID_URL_PATTERN"


async def test_update_many_and_one(emu, api: Api) -> None:
    _, _, body = await api.call("POST", "/crm/v8/Orders", json={"data": [order(1), order(2)]})
    ids = [d["details"]["id"] for d in body["data"]]
    st, _, body = await api.call(
        "PUT",
        "/crm/v8/Orders",
        json={
            "data": [
                {"id": ids[0], "Status": "Paid"},
                {"id": "4876876000009999999", "Status": "Paid"},
                {"Status": "Paid"},
            ]
        },
    )
    assert st == 207
    check(REC, "put", st, body)
    assert body["data"][0]["message"] == "record updated"
    assert body["data"][1] == {
        "code": "INVALID_DATA",
        "details": {"id": "4876876000009999999"},
        "message": "the id given seems to be invalid",
        "status": "error",
    }
    assert body["data"][2]["code"] == "MANDATORY_NOT_FOUND"
    assert body["data"][2]["details"] == {"api_name": "id", "json_path": "$.data[2].id"}
    st, _, body = await api.call(
        "PUT", f"/crm/v8/Orders/{ids[1]}", json={"data": [{"Status": "Shipped"}]}
    )
    assert st == 200
    check(ONE, "put", st, body)
    recs = {r["id"]: r for r in emu.records("Orders")}
    assert recs[ids[0]]["Status"] == "Paid" and recs[ids[1]]["Status"] == "Shipped"


async def test_upsert_duplicate_check_fields(emu, api: Api) -> None:
    st, body = await upsert(api, [order(1), order(2)], ["parent_id"])
    assert st == 200
    assert [d["action"] for d in body["data"]] == ["insert", "insert"]
    st, body = await upsert(api, [order(2, Status="Paid"), order(3)], ["parent_id"])
    assert st == 200
    assert [d["action"] for d in body["data"]] == ["update", "insert"]
    assert body["data"][0]["duplicate_field"] == "parent_id"
    assert body["data"][0]["message"] == "record updated"
    assert len(emu.records("Orders")) == 3
    # without duplicate_check_fields the system field (Name) is tried first, then unique fields
    st, body = await upsert(api, [order(9, Name="Order 1")])
    assert body["data"][0]["action"] == "update" and body["data"][0]["duplicate_field"] == "Name"
    st, body = await upsert(api, [order(1, Status="Nope")], ["parent_id"])
    assert st == 400 and body["data"][0]["code"] == "INVALID_DATA"
    st, _, body = await api.call(
        "POST",
        "/crm/v8/Orders/upsert",
        json={"data": [order(1)], "duplicate_check_fields": ["Unknown"]},
    )
    assert st == 400 and body["code"] == "INVALID_DATA"
    check(UPSERT, "post", st, body)


async def test_delete_by_ids_and_one(emu, api: Api) -> None:
    _, _, body = await api.call(
        "POST", "/crm/v8/Orders", json={"data": [order(1), order(2), order(3)]}
    )
    ids = [d["details"]["id"] for d in body["data"]]
    st, _, body = await api.call("DELETE", f"/crm/v8/Orders?ids={ids[0]},4876876000009999999")
    assert st == 207
    check(REC, "delete", st, body)
    assert body["data"][0] == {
        "code": "SUCCESS",
        "details": {"id": ids[0]},
        "message": "record deleted",
        "status": "success",
    }
    assert (
        body["data"][1]["code"] == "INVALID_DATA"
        and body["data"][1]["message"] == "record not deleted"
    )
    st, _, body = await api.call("DELETE", f"/crm/v8/Orders/{ids[1]}")
    assert st == 200
    check(ONE, "delete", st, body)
    st, _, body = await api.call("DELETE", "/crm/v8/Orders")
    assert st == 400 and body["code"] == "REQUIRED_PARAM_MISSING"
    check(REC, "delete", st, body)
    many = ",".join(str(4876876000001000001 + i) for i in range(101))
    st, _, body = await api.call("DELETE", f"/crm/v8/Orders?ids={many}")
    assert st == 400 and body["code"] == "LIMIT_EXCEEDED"
    check(REC, "delete", st, body)
    assert [r["id"] for r in emu.records("Orders")] == [ids[2]]
    assert [h["api"] for h in emu.history("Orders", ids[0])] == ["insert", "delete"]


# -- reads -------------------------------------------------------------------------------------
async def test_get_records(api: Api) -> None:
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 204 and body is None
    check(REC, "get", st, body)
    _, _, body = await api.call(
        "POST", "/crm/v8/Orders", json={"data": [order(i) for i in range(5)]}
    )
    ids = [d["details"]["id"] for d in body["data"]]
    st, _, body = await api.call("GET", "/crm/v8/Orders")
    assert st == 400 and body == {
        "code": "REQUIRED_PARAM_MISSING",
        "details": {"param_name": "fields"},
        "message": "required param is missing",
        "status": "error",
    }
    check(REC, "get", st, body)
    many = ",".join(f"F{i}" for i in range(51))
    st, _, body = await api.call("GET", f"/crm/v8/Orders?fields={many}")
    assert (
        st == 400
        and body["code"] == "LIMIT_EXCEEDED"
        and body["details"] == {"limit": 50, "param_name": "fields"}
    )
    check(REC, "get", st, body)
    st, _, body = await api.call(
        "GET", f"/crm/v8/Orders?fields=parent_id,Status&ids={ids[1]},{ids[3]}"
    )
    assert st == 200
    check(REC, "get", st, body)
    assert sorted(r["parent_id"] for r in body["data"]) == ["1", "3"]
    assert set(body["data"][0]) == {"id", "parent_id", "Status"}
    st, _, body = await api.call(
        "GET", "/crm/v8/Orders?fields=parent_id&per_page=2&page=2&sort_order=asc"
    )
    assert st == 200
    check(REC, "get", st, body)
    assert [r["parent_id"] for r in body["data"]] == ["2", "3"]
    assert body["info"]["more_records"] is True and body["info"]["page"] == 2
    tok = body["info"]["next_page_token"]
    st, _, body = await api.call(
        "GET", f"/crm/v8/Orders?fields=parent_id&per_page=2&sort_order=asc&page_token={tok}"
    )
    assert [r["parent_id"] for r in body["data"]] == ["4"] and body["info"]["more_records"] is False
    st, _, body = await api.call("GET", "/crm/v8/Orders?fields=parent_id&page=11")
    assert st == 400 and body["code"] == "DISCRETE_PAGINATION_LIMIT_EXCEEDED"
    check(REC, "get", st, body)
    st, _, body = await api.call("GET", f"/crm/v8/Orders/{ids[0]}")
    assert st == 200 and body["data"][0]["parent_id"] == "0"
    check(ONE, "get", st, body)


async def test_coql(api: Api) -> None:
    spec = ("coql.json", "/crm/v8/coql")
    await api.call(
        "POST",
        "/crm/v8/Orders",
        json={"data": [order(i, Status="Paid" if i % 2 else "New") for i in range(6)]},
    )
    q = (
        "select parent_id, Status from Orders where Status = 'Paid' and Quantity >= 1 "
        "order by parent_id asc limit 0, 2"
    )
    st, _, body = await api.call("POST", "/crm/v8/coql", json={"select_query": q})
    assert st == 200
    check(spec, "post", st, body)
    assert [r["parent_id"] for r in body["data"]] == ["1", "3"]
    assert body["info"] == {"count": 2, "more_records": True}
    st, _, body = await api.call(
        "POST",
        "/crm/v8/coql",
        json={
            "select_query": "select Name from Orders "
            "where parent_id in ('4', '5') or parent_id is null"
        },
    )
    assert sorted(r["Name"] for r in body["data"]) == ["Order 4", "Order 5"]
    st, _, body = await api.call(
        "POST",
        "/crm/v8/coql",
        json={"select_query": "select Name from Orders where parent_id = 'none'"},
    )
    assert st == 204
    st, _, body = await api.call(
        "POST", "/crm/v8/coql", json={"select_query": "select Name form Orders"}
    )
    assert st == 400 and body["code"] == "SYNTAX_ERROR"
    check(spec, "post", st, body)
    st, _, body = await api.call(
        "POST", "/crm/v8/coql", json={"select_query": "select Bogus from Orders"}
    )
    assert st == 400 and body["code"] == "INVALID_QUERY"
    check(spec, "post", st, body)
    st, _, body = await api.call(
        "POST", "/crm/v8/coql", json={"select_query": "select Name from Orders limit 2001"}
    )
    assert st == 400 and body["code"] == "LIMIT_EXCEEDED"
    check(spec, "post", st, body)


FULL_SCOPES = {"refresh_tokens": [{"refresh_token": "emulator-refresh-token", "scopes": ["*"]}]}


async def test_metadata_calls() -> None:
    async with (
        start_emulator(make_config(auth=FULL_SCOPES)) as emu,
        aiohttp.ClientSession() as s,
    ):
        api = Api(emu, s)
        await api.login()
        await _metadata_calls(api)


async def _metadata_calls(api: Api) -> None:
    st, _, body = await api.call("GET", "/crm/v8/users?type=CurrentUser")
    assert st == 200 and body["users"][0]["email"]
    check(("users.json", "/crm/v8/users"), "get", st, body)
    st, _, body = await api.call("GET", "/crm/v8/settings/modules")
    assert st == 200 and body["modules"][0]["api_name"] == "Orders"
    check(("modules.json", "/crm/v8/settings/modules"), "get", st, body)
    st, _, body = await api.call("GET", "/crm/v8/settings/fields?module=Orders")
    assert st == 200
    check(("fields.json", "/crm/v8/settings/fields"), "get", st, body)
    fields = {f["api_name"]: f for f in body["fields"]}
    assert (
        fields["parent_id"]["unique"] is not None
        and fields["parent_id"]["system_mandatory"] is True
    )
    assert [p["display_value"] for p in fields["Status"]["pick_list_values"]][:2] == ["New", "Paid"]
    st, _, body = await api.call("GET", "/crm/v8/settings/fields?module=Nope")
    assert st == 400 and body["code"] == "INVALID_MODULE"
    st, _, body = await api.call("GET", "/crm/v8/org")
    assert st == 200 and body["org"][0]["zgid"] == "emulator-org"


# -- credits, concurrency, faults --------------------------------------------------------------
async def test_credits_header_429_and_rolling_window(emu, api: Api) -> None:
    allowance = emu.usage()["credits"]["allowance"]
    assert allowance == 60_000  # enterprise: 50,000 + 10 users x 1,000
    st, headers, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert "X-API-CREDITS-REMAINING" not in headers
    st, _, _ = await api.call("POST", "/__emulator__/credits", json={"used": allowance // 2})
    st, headers, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert headers["X-API-CREDITS-REMAINING"] == str(allowance // 2 - 1)
    await api.call("POST", "/__emulator__/credits", json={"remaining": 5})
    st, headers, body = await api.call(
        "POST", "/crm/v8/Orders/upsert", json={"data": [order(i) for i in range(100)]}
    )
    assert st == 429 and body["code"] == "TOO_MANY_REQUESTS"
    check(UPSERT, "post", st, body)
    assert emu.records("Orders") == []
    st, _, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 204  # 1 credit still fits
    emu.advance(86_401)  # the rolling window gives everything back
    assert emu.usage()["credits"]["used"] == 0
    await api.login()  # the access token expired meanwhile
    st, _, body = await api.call(
        "POST", "/crm/v8/Orders/upsert", json={"data": [order(i) for i in range(100)]}
    )
    assert st == 200 and emu.usage()["credits"]["used"] == 10


async def test_concurrency_limits_answer_429_immediately() -> None:
    cfg = make_config(
        credits={"edition": "free"},
        faults={"latency": "fixed", "latency_ms": 300},
    )
    async with start_emulator(cfg) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        await api.login()
        results = await asyncio.gather(
            *(api.call("GET", "/crm/v8/Orders?fields=Name") for _ in range(8))
        )
        statuses = sorted(r[0] for r in results)
        assert statuses.count(204) == 5 and statuses.count(429) == 3  # free edition: 5
        body = next(r[2] for r in results if r[0] == 429)
        assert (
            body["code"] == "TOO_MANY_REQUESTS" and body["details"]["limit_type"] == "concurrency"
        )
        check(REC, "get", 429, body)
    cfg = make_config(
        credits={"edition": "ultimate"}, faults={"latency": "fixed", "latency_ms": 300}
    )
    async with start_emulator(cfg) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        await api.login()
        calls = [
            api.call(
                "POST",
                "/crm/v8/Orders/upsert",
                json={
                    "data": [order(j * 100 + i) for i in range(11)],
                    "duplicate_check_fields": ["parent_id"],
                },
            )
            for j in range(12)
        ]
        results = await asyncio.gather(*calls)
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) == 10 and statuses.count(429) == 2
        assert {r[2]["details"]["limit_type"] for r in results if r[0] == 429} == {
            "sub_concurrency"
        }
        assert emu.usage()["rejected"]["sub_concurrency"] == 2


async def test_faults_500_429_burst_and_token_expiry(emu, api: Api) -> None:
    emu.set_faults(error_rate=1.0)
    st, _, body = await api.call("POST", "/crm/v8/Orders/upsert", json={"data": [order(1)]})
    assert st == 500 and body == {
        "code": "INTERNAL_ERROR",
        "details": {},
        "message": "Internal server error occurred.",
        "status": "error",
    }
    check(UPSERT, "post", st, body)
    emu.set_faults(error_rate=0.0, burst_429=2)
    got = [(await api.call("GET", "/crm/v8/Orders?fields=Name"))[0] for _ in range(3)]
    assert got == [429, 429, 204]
    emu.set_faults(expire_tokens_after_calls=2)
    got = [(await api.call("GET", "/crm/v8/Orders?fields=Name"))[0] for _ in range(3)]
    assert got == [204, 204, 401]
    await api.login()
    emu.set_faults(latency="uniform", latency_ms=1, latency_max_ms=5, seed=3)
    st, _, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
    assert st == 204
    assert emu.usage()["rejected"] == {"fault_500": 1, "fault_429": 2}


async def test_faults_settable_over_http_and_at_start() -> None:
    async with (
        start_emulator(make_config(faults={"burst_429": 1})) as emu,
        aiohttp.ClientSession() as s,
    ):
        api = Api(emu, s)
        await api.login()
        st, _, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
        assert st == 429
        st, _, body = await api.call("POST", "/__emulator__/faults", json={"error_rate": 1.0})
        assert st == 200 and body["error_rate"] == 1.0
        st, _, _ = await api.call("GET", "/crm/v8/Orders?fields=Name")
        assert st == 500
        st, _, body = await api.call("GET", "/__emulator__/faults")
        assert body["error_rate"] == 1.0
        st, _, body = await api.call("POST", "/__emulator__/faults", json={"error_rate": "lots"})
        assert st == 400


async def test_admin_history_reset_clock_usage(emu, api: Api) -> None:
    _, body = await upsert(api, [order(1, Quantity=1)], ["parent_id"])
    rid = body["data"][0]["details"]["id"]
    await upsert(api, [order(1, Quantity=2)], ["parent_id"])
    await api.call("PUT", "/crm/v8/Orders", json={"data": [{"id": rid, "Quantity": 3}]})
    st, _, hist = await api.call("GET", f"/__emulator__/history/Orders/{rid}")
    assert [h["api"] for h in hist["history"]] == ["upsert", "upsert", "update"]
    assert [h["values"]["Quantity"] for h in hist["history"]] == [1, 2, 3]
    assert hist["history"][0]["values"]["parent_id"] == "1"
    st, _, recs = await api.call("GET", "/__emulator__/records/Orders")
    assert recs["count"] == 1 and recs["records"][0]["Quantity"] == 3
    st, _, usage = await api.call("GET", "/__emulator__/usage")
    assert usage["by_api"]["upsert"] == {"calls": 2, "credits": 2, "records": 2}
    assert usage["by_api"]["update"] == {"calls": 1, "credits": 1, "records": 1}
    st, _, clock = await api.call("POST", "/__emulator__/clock", json={"advance": 100})
    assert clock["offset"] == 100
    st, _, _ = await api.call("POST", "/__emulator__/reset")
    assert emu.records("Orders") == [] and emu.usage()["totals"]["calls"] == 0
    st, _, _ = await api.call("GET", "/__emulator__/records/Nope")
    assert st == 404


async def test_strict_hosts_route_by_data_centre() -> None:
    # accounts on 127.0.0.1, API domain on localhost: a client must switch hosts after the token
    async with start_emulator(make_config(strict_hosts=True)) as probe:
        port = int(probe.url.rsplit(":", 1)[1])
    cfg = make_config(
        strict_hosts=True,
        api_domain=f"http://localhost:{port}",
        accounts_url=f"http://127.0.0.1:{port}",
    )
    async with start_emulator(cfg, port=port) as emu, aiohttp.ClientSession() as s:
        api = Api(emu, s)
        async with s.post(
            f"http://127.0.0.1:{port}/oauth/v2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "emulator-client-id",
                "client_secret": "emulator-client-secret",
                "refresh_token": "emulator-refresh-token",
            },
        ) as r:
            tok = await r.json()
        assert tok["api_domain"] == f"http://localhost:{port}"
        api.token = tok["access_token"]
        st, _, body = await api.call("GET", f"http://127.0.0.1:{port}/crm/v8/Orders?fields=Name")
        assert st == 404 and body["code"] == "INVALID_URL_PATTERN"
        st, _, _ = await api.call("GET", f"{tok['api_domain']}/crm/v8/Orders?fields=Name")
        assert st == 204
