"""COQL on a subform module (issue 21; ``connector/emulator/coql.py`` ``subform_rows``).

Zoho's COQL Overview: "FROM - … To retrieve records from a Subform, specify the Subform
module's API name" (zoho.com/crm/developer/docs/api/COQL-Overview.html); Kaizen #124 "Accessing
Subform using Zoho CRM APIs" reads them with ``select … from <Subform module> where Parent_Id =
'…'``. Each row is a record: its row ``id``, its row fields and ``Parent_Id`` (a lookup to the
record holding it). What `connector verify` reads for a subform pipeline: every row, by keyset
paging on the row id (``ZohoClient.coql_pages``), at the credits of any COQL call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient
from tests.emulator.conftest import Api
from tests.emulator.test_bulk import check
from tests.emulator.test_relations import relations_config

COQL = ("coql.json", "/crm/v8/coql")


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


async def coql(api: Api, query: str) -> tuple[int, Any]:
    st, _, body = await api.call("POST", "/crm/v8/coql", json={"select_query": query})
    check(COQL, "post", st, body)  # Zoho's OAS
    return st, body


async def order(api: Api, key: str, lines: list[tuple[str, int]]) -> str:
    """An Orders record with subform rows ``lines`` (Product, Qty); returns its id."""
    rows = [{"Product": p, "Qty": q} for p, q in lines]
    st, _, body = await api.call(
        "POST", "/crm/v8/Orders", json={"data": [{"Name": key, "Legacy_Id": key, "Lines": rows}]}
    )
    assert st == 201, body
    return str(body["data"][0]["details"]["id"])


def stored_rows(emu: EmulatorHandle, order_id: str) -> list[dict[str, Any]]:
    rec = next(r for r in emu.records("Orders") if r["id"] == order_id)
    return list(rec["Lines"])


async def test_rows_are_records_with_their_id_fields_and_parent(
    remu: EmulatorHandle, rapi: Api
) -> None:
    o1 = await order(rapi, "o1", [("a", 1), ("b", 2)])
    o2 = await order(rapi, "o2", [("c", 3)])
    await order(rapi, "o3", [])
    st, body = await coql(
        rapi, "select Parent_Id, Product, Qty from Order_Lines where id is not null"
    )
    assert st == 200
    got = sorted((r["Parent_Id"]["id"], r["Product"], r["Qty"]) for r in body["data"])
    assert got == [(o1, "a", 1), (o1, "b", 2), (o2, "c", 3)]
    # each row's id is the subform row id the record holds
    ids = {r["id"] for r in body["data"]}
    assert ids == {row["id"] for o in (o1, o2) for row in stored_rows(remu, o)}
    # Parent_Id is rendered as the emulator renders every lookup (the record's id and name)
    by_product = {r["Product"]: r for r in body["data"]}
    assert by_product["c"]["Parent_Id"] == {"name": "o2", "id": o2}
    assert body["info"] == {"count": 3, "more_records": False}

    # `*`: the row fields and Parent_Id
    st, body = await coql(rapi, "select * from Order_Lines where Product = 'a'")
    assert st == 200 and set(body["data"][0]) == {"id", "Product", "Qty", "Parent_Id"}


async def test_criteria_by_the_parent_record(rapi: Api) -> None:
    o1 = await order(rapi, "o1", [("a", 1), ("b", 2)])
    o2 = await order(rapi, "o2", [("c", 3)])
    o3 = await order(rapi, "o3", [("d", 4)])
    st, body = await coql(rapi, f"select Product from Order_Lines where Parent_Id = '{o1}'")
    assert st == 200 and sorted(r["Product"] for r in body["data"]) == ["a", "b"]
    st, body = await coql(
        rapi, f"select Product from Order_Lines where Parent_Id in ('{o2}', '{o3}')"
    )
    assert st == 200 and sorted(r["Product"] for r in body["data"]) == ["c", "d"]
    st, body = await coql(
        rapi, f"select Product from Order_Lines where Parent_Id = '{o1}' and Qty > 1"
    )
    assert [r["Product"] for r in body["data"]] == ["b"]
    st, _ = await coql(rapi, "select Product from Order_Lines where Parent_Id = '1'")
    assert st == 204  # no record holds rows under that id


async def test_keyset_paging_by_row_id(remu: EmulatorHandle, rapi: Api) -> None:
    """``where id > {last} order by id asc limit L``: what ``ZohoClient.coql_pages`` sends;
    every row once, in row id order, each call charged as any COQL call."""
    orders = [await order(rapi, f"o{i}", [(f"p{i}.{j}", j) for j in range(3)]) for i in range(4)]
    every = sorted(
        (row["id"] for o in orders for row in stored_rows(remu, o)), key=lambda i: int(i)
    )
    got: list[str] = []
    where = "id is not null"
    while True:
        st, body = await coql(
            rapi, f"select Product from Order_Lines where {where} order by id asc limit 5"
        )
        if st == 204:
            break
        got += [r["id"] for r in body["data"]]
        if not body["info"]["more_records"]:
            break
        where = f"id > {got[-1]}"
    assert got == every and len(got) == 12

    used = remu.usage()["by_api"]["coql"]
    async with ZohoClient(
        accounts_url=remu.url,
        api_url=remu.url,
        upload_url=remu.url,
        client_id="emulator-client-id",
        client_secret=SecretStr("emulator-client-secret"),
        refresh_token=SecretStr("emulator-refresh-token"),
        org_id="emulator-org",
    ) as client:
        pages = [
            page
            async for page in client.coql_pages(
                "Order_Lines", ["Parent_Id", "Product", "Qty"], page_size=5
            )
        ]
        assert [len(p) for p in pages] == [5, 5, 2]
        assert [r["id"] for p in pages for r in p] == every
        assert {r["Parent_Id"]["id"] for p in pages for r in p} == set(orders)
        # limit 5 (<= 200) costs 1 credit a call, as any COQL call (the client counts the same)
        after = remu.usage()["by_api"]["coql"]
        assert after["calls"] - used["calls"] == 3
        assert after["credits"] - used["credits"] == 3
        assert (client.calls, client.credits_spent) == (3, 3)
        st, body = await coql(rapi, "select Product from Order_Lines order by id asc limit 2000")
        assert st == 200 and len(body["data"]) == 12
        assert remu.usage()["by_api"]["coql"]["credits"] - after["credits"] == 3  # limit 2000


async def test_rows_follow_the_record_replaced_and_deleted(remu: EmulatorHandle, rapi: Api) -> None:
    """An update naming the subform replaces its rows (new ids: the old rows are gone from
    COQL too); the rows of a deleted record are gone with it (Update Subform Data: "Whenever a
    record is deleted, all the subform details within the parent record will also get
    deleted")."""
    o1 = await order(rapi, "o1", [("a", 1), ("b", 2)])
    o2 = await order(rapi, "o2", [("c", 3)])
    old = {row["id"] for row in stored_rows(remu, o1)}
    st, _, body = await rapi.call(
        "PUT", "/crm/v8/Orders", json={"data": [{"id": o1, "Lines": [{"Product": "z", "Qty": 9}]}]}
    )
    assert st == 200, body
    st, body = await coql(rapi, "select Parent_Id, Product, Qty from Order_Lines limit 200")
    rows = {r["id"]: (r["Parent_Id"]["id"], r["Product"], r["Qty"]) for r in body["data"]}
    assert sorted(rows.values()) == [(o1, "z", 9), (o2, "c", 3)]
    assert not old & set(rows)

    st, _, _ = await rapi.call("DELETE", "/crm/v8/Orders", params={"ids": o1})
    assert st == 200
    st, body = await coql(rapi, "select Parent_Id, Product from Order_Lines limit 200")
    assert [(r["Parent_Id"]["id"], r["Product"]) for r in body["data"]] == [(o2, "c")]
    st, _ = await coql(rapi, f"select Product from Order_Lines where Parent_Id = '{o1}'")
    assert st == 204


async def test_unknown_columns_and_modules_are_refused(rapi: Api) -> None:
    await order(rapi, "o1", [("a", 1)])
    # a field of the parent module is not a column of its subform module
    for column in ("Legacy_Id", "Created_Time", "Bogus"):
        st, body = await coql(rapi, f"select {column} from Order_Lines limit 10")
        assert st == 400 and body["code"] == "INVALID_QUERY", column
        assert body["details"] == {"column_name": column}
    st, body = await coql(rapi, "select Product from Order_Lines where Legacy_Id = 'o1'")
    assert st == 400 and body["details"] == {"column_name": "Legacy_Id"}
    # neither a module nor a subform module
    st, body = await coql(rapi, "select Product from Lines limit 10")
    assert st == 400 and body["code"] == "INVALID_QUERY"
    # Parent_Id is a column of a subform module only
    st, body = await coql(rapi, "select Parent_Id from Orders limit 10")
    assert st == 400 and body["details"] == {"column_name": "Parent_Id"}
