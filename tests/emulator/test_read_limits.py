"""Contract tests for how far reads reach (reference §2.6): Get Records with page_token is
refused past ``pagination_limit`` records (400 PAGINATION_LIMIT_EXCEEDED), COQL ``LIMIT offset,
n`` past it (400 LIMIT_EXCEEDED), and COQL keyset paging ``where id > {last} order by id asc``
(ids compared as numbers) reads past both. Responses are validated against Zoho's OpenAPI
files like the other contract tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from connector.emulator import start_emulator
from connector.emulator.config import EmulatorConfig
from connector.emulator.server import EmulatorHandle
from connector.zoho import coql as client_coql
from tests.emulator import oas
from tests.emulator.conftest import Api, make_config, order

REC = ("record.json", "/crm/v8/{module_api_name}")
COQL = ("coql.json", "/crm/v8/coql")
CAP = 1_000
N = 1_150


def check(spec: tuple[str, str], method: str, status: int, body: Any) -> None:
    oas.validate(spec[0], method, spec[1], status, body)


def seed(emu: EmulatorHandle, n: int) -> list[str]:
    """``n`` valid Orders records written straight into the emulator's store (fast)."""
    store = emu.state.store("Orders")
    ids: list[str] = []
    for i in range(n):
        res = store.insert(order(i), "insert")
        assert res.ok and res.record_id is not None
        ids.append(res.record_id)
    return ids


@pytest.fixture
async def capped() -> AsyncIterator[tuple[Api, list[str]]]:
    async with start_emulator(make_config(pagination_limit=CAP)) as emu:
        ids = seed(emu, N)
        async with aiohttp.ClientSession() as s:
            a = Api(emu, s)
            await a.login()
            yield a, ids


async def coql(api: Api, query: str) -> tuple[int, Any]:
    st, _, body = await api.call("POST", "/crm/v8/coql", json={"select_query": query})
    check(COQL, "post", st, body)
    return st, body


def test_default_reach_is_zohos() -> None:
    assert EmulatorConfig.default().pagination_limit == 100_000
    assert EmulatorConfig().pagination_limit == 100_000


async def test_get_records_page_token_stops_at_the_limit(capped: tuple[Api, list[str]]) -> None:
    api, ids = capped
    seen: list[str] = []
    path = "/crm/v8/Orders?fields=parent_id&per_page=200&sort_order=asc&page=1"
    while True:
        st, _, body = await api.call("GET", path)
        if st != 200:
            break
        check(REC, "get", st, body)
        seen += [r["id"] for r in body["data"]]
        assert body["info"]["more_records"] is True  # N > CAP: Zoho still offers a next page
        tok = body["info"]["next_page_token"]
        path = f"/crm/v8/Orders?fields=parent_id&per_page=200&sort_order=asc&page_token={tok}"
    assert seen == ids[:CAP]  # every record up to the limit, then the refusal
    assert st == 400
    assert body["code"] == "PAGINATION_LIMIT_EXCEEDED" and body["status"] == "error"
    assert body["details"] == {"limit": CAP}
    # record.json's 400 enum does not list the code (like DISCRETE_PAGINATION_LIMIT_EXCEEDED):
    # the body must fit common.json's API_Exception envelope
    oas._envelope().validate(body)


async def test_coql_offset_reach(capped: tuple[Api, list[str]]) -> None:
    api, ids = capped
    st, body = await coql(api, "select parent_id from Orders where id is not null limit 800, 200")
    assert st == 200 and [r["id"] for r in body["data"]] == ids[800:CAP]
    for q in (
        "select parent_id from Orders where id is not null limit 801, 200",
        "select parent_id from Orders where id is not null limit 200 offset 900",
        "select parent_id from Orders where id is not null limit 1000, 1",
    ):
        st, body = await coql(api, q)
        assert st == 400, q
        assert body["code"] == "LIMIT_EXCEEDED"
        assert body["details"] == {"by": "offset", "limit": CAP}


async def test_coql_offset_reach_default(api: Api) -> None:
    """Zoho's own numbers, no records needed: offset + limit may reach 100,000, not more."""
    st, _ = await coql(api, "select Name from Orders where id is not null limit 98000, 2000")
    assert st == 204
    st, body = await coql(api, "select Name from Orders where id is not null limit 98001, 2000")
    assert st == 400 and body["code"] == "LIMIT_EXCEEDED"
    assert body["details"] == {"by": "offset", "limit": 100_000}


async def test_coql_keyset_paging_by_id_reads_past_the_limit(
    capped: tuple[Api, list[str]],
) -> None:
    api, ids = capped
    got: list[str] = []
    where = "id is not null"
    while True:
        st, body = await coql(
            api, f"select id, parent_id from Orders where {where} order by id asc limit 500"
        )
        if st == 204:
            break
        got += [r["id"] for r in body["data"]]
        assert body["info"]["more_records"] is (len(got) < N)
        if not body["info"]["more_records"]:
            break
        where = f"id > {got[-1]}"
    assert got == ids  # all N > CAP records, each once, in id order
    # id compares as a number whether the literal is a number or a quoted string
    st, body = await coql(
        api, f"select parent_id from Orders where id > '{ids[-3]}' order by id desc limit 10"
    )
    assert st == 200 and [r["id"] for r in body["data"]] == [ids[-1], ids[-2]]
    st, body = await coql(
        api, f"select parent_id from Orders where id >= {ids[5]} and id < {ids[8]} limit 10"
    )
    assert [r["parent_id"] for r in body["data"]] == ["5", "6", "7"]


async def test_coql_in_takes_at_most_50_values(capped: tuple[Api, list[str]]) -> None:
    """COQL-Limitations: "in (up to 50 values)", "not in (up to 50 values)"; more is a
    LIMIT_EXCEEDED like COQL's other limits. The client's ``coql.one_of`` keeps to it."""
    api, _ = capped
    fifty = ", ".join(f"'{i}'" for i in range(50))
    st, body = await coql(api, f"select parent_id from Orders where parent_id in ({fifty})")
    assert st == 200 and {r["parent_id"] for r in body["data"]} == {str(i) for i in range(50)}
    for op in ("in", "not in"):
        q = f"select parent_id from Orders where parent_id {op} ({fifty}, '50')"
        st, body = await coql(api, q)
        assert st == 400 and body["code"] == "LIMIT_EXCEEDED", (op, body)
        assert body["details"] == {"by": "in", "limit": 50}
    assert client_coql.one_of("parent_id", ["1", "o'k"]) == "parent_id in ('1', 'o''k')"
    with pytest.raises(ValueError):
        client_coql.one_of("parent_id", [str(i) for i in range(51)])
