"""The record routes: insert, update, upsert, delete, get (list and one record) and COQL."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from connector.emulator import coql
from connector.emulator.common import _json_body, json_response, state_of
from connector.emulator.middleware import admit
from connector.emulator.records import (
    ALL_TRIGGERS,
    MESSAGE_KEY,
    MESSAGES,
    FieldError,
    ModuleStore,
    WriteResult,
)
from connector.emulator.state import ApiError, EmulatorState

MAX_RECORDS = 100
MAX_FIELDS = 50
MAX_PER_PAGE = 200


# -- records -----------------------------------------------------------------------------------
def _data_items(body: Any, state: EmulatorState) -> list[Any]:
    if not isinstance(body, dict) or "data" not in body:
        raise ApiError(
            400,
            "MANDATORY_NOT_FOUND",
            "required field not found",
            {"api_name": "data", "json_path": "$.data"},
        )
    data = body["data"]
    if not isinstance(data, list) or not data:
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": "data", "json_path": "$.data", "expected_data_type": "jsonarray"},
        )
    if len(data) > MAX_RECORDS:
        max_len: Any = str(MAX_RECORDS) if state.config.maximum_length_as_string else MAX_RECORDS
        raise ApiError(
            400,
            "LIMIT_EXCEEDED",
            "count of records in your request exceeds the limit",
            {},
            body={
                "data": [
                    {
                        "code": "LIMIT_EXCEEDED",
                        "details": {"maximum_length": max_len, "api_name": "data"},
                        "message": "count of records in your request exceeds the limit",
                        "status": "error",
                    }
                ]
            },
        )
    return data


def _triggers(body: Any) -> list[str]:
    """The automations a write asks for: ``trigger`` omitted runs all of them, ``[]`` none
    (zoho-crm-api.md §2.2; crm-oas v8.0 Body_Wrapper ``trigger``: array of strings with the
    values workflow, approval, blueprint, pathfinder, orchestration). Any other value is refused
    (Zoho's answer to an unknown value is not documented; refusing fails safe)."""
    trigger = body.get("trigger") if isinstance(body, dict) else None
    if trigger is None:
        return list(ALL_TRIGGERS)
    if not isinstance(trigger, list) or any(t not in ALL_TRIGGERS for t in trigger):
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {
                "api_name": "trigger",
                "json_path": "$.trigger",
                "supported_values": list(ALL_TRIGGERS),
            },
        )
    return list(dict.fromkeys(trigger))


def _log_trigger(
    state: EmulatorState, store: ModuleStore, api: str, trigger: list[str], n: int
) -> None:
    state.trigger_log.append(
        {
            "time": state.clock.iso(),
            "module": store.m.spec.api_name,
            "api": api,
            "records": n,
            "trigger": list(trigger),
        }
    )


async def _write_each(
    request: web.Request,
    store: ModuleStore,
    api: str,
    body: Any,
    data: list[Any],
    *,
    write: Callable[[int, dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """What the insert, update and upsert routes share: the request's automations
    (``trigger``, checked first), admission at the records' credit cost, the trigger log, the
    automations set on the store while it writes, and one answer item per record (``write``;
    a record that is not a JSON object is an INVALID_DATA item)."""
    state = state_of(request)
    trigger = _triggers(body)
    n = len(data)
    await admit(request, api, state.record_cost(n), heavy=n > 10, records=n)
    _log_trigger(state, store, api, trigger, n)
    store.trigger = trigger
    try:
        return [
            write(i, rec) if isinstance(rec, dict) else _not_object(i) for i, rec in enumerate(data)
        ]
    finally:
        store.trigger = None


def _not_object(i: int) -> dict[str, Any]:
    return {
        "code": "INVALID_DATA",
        "details": {"expected_data_type": "jsonobject", "json_path": f"$.data[{i}]"},
        "message": "invalid data",
        "status": "error",
    }


def _item(res: WriteResult, i: int, store: ModuleStore, *, upsert: bool = False) -> dict[str, Any]:
    if res.ok:
        if res.action == "delete":
            return {
                "code": "SUCCESS",
                "details": {"id": res.record_id},
                "message": "record deleted",
                "status": "success",
            }
        by = {"name": store.user["name"], "id": store.user["id"]}
        item: dict[str, Any] = {
            "code": "SUCCESS",
            "details": {
                "Modified_Time": res.modified_time,
                "Modified_By": by,
                "Created_Time": res.created_time,
                "id": res.record_id,
                "Created_By": by,
            },
            "message": "record added" if res.action == "insert" else "record updated",
            "status": "success",
        }
        if upsert:
            item["action"] = res.action
            if res.duplicate_field is not None:
                item["duplicate_field"] = res.duplicate_field
        return item
    if res.code is not None:
        return {
            "code": res.code,
            "details": res.details,
            "message": res.message or MESSAGES.get(res.code, ""),
            "status": "error",
        }
    return _field_error(res.errors[0], i)


def _field_error(err: FieldError, i: int) -> dict[str, Any]:
    code, name, extra = err
    extra = dict(extra)
    message = extra.pop(MESSAGE_KEY, MESSAGES[code])
    return {
        "code": code,
        "details": {"api_name": name, "json_path": f"$.data[{i}].{name}", **extra},
        "message": message,
        "status": "error",
    }


def _overall(items: list[dict[str, Any]], all_ok_status: int) -> int:
    ok = sum(1 for it in items if it["status"] == "success")
    if ok == len(items):
        return all_ok_status
    return 400 if ok == 0 else 207


async def insert_records(request: web.Request) -> web.Response:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    body = await _json_body(request, exact=True)
    data = _data_items(body, state)
    items = await _write_each(
        request,
        store,
        "insert",
        body,
        data,
        write=lambda i, rec: _item(store.insert(rec, "insert"), i, store),
    )
    return json_response({"data": items}, _overall(items, 201))


async def update_records(request: web.Request) -> web.Response:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    path_id = request.match_info.get("id")
    body = await _json_body(request, exact=True)
    data = _data_items(body, state)

    def update(i: int, rec: dict[str, Any]) -> dict[str, Any]:
        rid = path_id if path_id is not None else rec.get("id")
        if rid is None or rid == "":
            return _field_error(("MANDATORY_NOT_FOUND", "id", {}), i)
        return _item(store.update(str(rid), rec, "update"), i, store)

    items = await _write_each(request, store, "update", body, data, write=update)
    return json_response({"data": items}, _overall(items, 200))


async def upsert_records(request: web.Request) -> web.Response:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    body = await _json_body(request, exact=True)
    data = _data_items(body, state)
    dcf = body.get("duplicate_check_fields")
    if dcf is not None and (not isinstance(dcf, list) or not all(isinstance(x, str) for x in dcf)):
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"api_name": "duplicate_check_fields", "json_path": "$.duplicate_check_fields"},
        )
    if dcf:
        for name in dcf:
            if name != "id" and name not in store.m.fields:
                raise ApiError(
                    400,
                    "INVALID_DATA",
                    "invalid data",
                    {"api_name": name, "json_path": "$.duplicate_check_fields"},
                )
    order = store.match_order(dcf)
    items = await _write_each(
        request,
        store,
        "upsert",
        body,
        data,
        write=lambda i, rec: _item(store.upsert(rec, "upsert", order), i, store, upsert=True),
    )
    return json_response({"data": items}, _overall(items, 200))


async def delete_records(request: web.Request) -> web.Response:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    path_id = request.match_info.get("id")
    if path_id is not None:
        ids = [path_id]
    else:
        raw = request.query.get("ids")
        if not raw:
            raise ApiError(
                400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "ids"}
            )
        ids = [x.strip() for x in raw.split(",") if x.strip()]
        if len(ids) > MAX_RECORDS:
            max_len: Any = (
                str(MAX_RECORDS) if state.config.maximum_length_as_string else MAX_RECORDS
            )
            raise ApiError(
                400,
                "LIMIT_EXCEEDED",
                "count of records in your request exceeds the limit",
                {"maximum_length": max_len, "param_name": "ids"},
            )
    await admit(request, "delete", state.cost("delete"), records=len(ids))
    # Delete Records: ``wf_trigger`` (true/false) says whether workflow rules run (zoho-crm-api.md
    # §2.1, SDK DeleteRecordsParam). Its default when omitted is not documented: the emulator
    # treats omitted as true, like an omitted ``trigger`` on the other writes.
    trigger = [] if request.query.get("wf_trigger", "true").lower() == "false" else ["workflow"]
    _log_trigger(state, store, "delete", trigger, len(ids))
    store.trigger = trigger
    items = [_item(store.delete(rid), i, store) for i, rid in enumerate(ids)]
    store.trigger = None
    return json_response({"data": items}, _overall(items, 200))


def _project(rec: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    out = {"id": rec["id"]}
    for f in fields:
        if f in rec:
            out[f] = rec[f]
        elif f != "id":
            out[f] = None
    return out


async def get_records(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    module = request.match_info["module"]
    store = state.store(module)
    q = request.query
    raw_fields = q.get("fields")
    if not raw_fields:
        raise ApiError(
            400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "fields"}
        )
    fields = [f.strip() for f in raw_fields.split(",") if f.strip()]
    if len(fields) > MAX_FIELDS:
        raise ApiError(
            400,
            "LIMIT_EXCEEDED",
            "the limit for fields exceeded",
            {"limit": MAX_FIELDS, "param_name": "fields"},
        )
    try:
        page = int(q.get("page", "1"))
        per_page = int(q.get("per_page", str(MAX_PER_PAGE)))
    except ValueError:
        raise ApiError(400, "INVALID_DATA", "invalid data", {"param_name": "page"}) from None
    if per_page < 1 or per_page > MAX_PER_PAGE or page < 1:
        raise ApiError(
            400,
            "INVALID_DATA",
            "invalid data",
            {
                "param_name": "per_page" if page >= 1 else "page",
                "maximum_length": str(MAX_PER_PAGE),
            },
        )
    token = q.get("page_token")
    if token and "page" in q:
        raise ApiError(
            400,
            "AMBIGUITY_DURING_PROCESSING",
            "ambiguity while processing the request",
            {"ambiguity_due_to": ["page", "page_token"]},
        )
    if token:
        m = re.fullmatch(r"emu\.(\d+)", token)
        if m is None:
            raise ApiError(400, "INVALID_DATA", "invalid data", {"param_name": "page_token"})
        offset = int(m.group(1))
    else:
        if page > 10:
            raise ApiError(
                400,
                "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
                "you can fetch only 2000 records without page_token",
                {"limit": 2000},
            )
        offset = (page - 1) * per_page
    reach = state.config.pagination_limit
    if offset >= reach:
        raise ApiError(
            400,
            "PAGINATION_LIMIT_EXCEEDED",
            f"you can fetch only {reach} records with page_token",
            {"limit": reach},
        )
    sort_by = q.get("sort_by", "id")
    if sort_by not in ("id", "Created_Time", "Modified_Time"):
        raise ApiError(400, "INVALID_DATA", "invalid data", {"param_name": "sort_by"})
    sort_order = q.get("sort_order", "desc")
    heavy = "sort_by" in q or "cvid" in q
    await admit(request, "get_records", state.cost("get_records"), heavy=heavy)
    if "ids" in q:
        wanted = [x.strip() for x in q["ids"].split(",") if x.strip()]
        recs = [store.records[i] for i in wanted if i in store.records]
    else:
        recs = list(store.records.values())
    key: Callable[[dict[str, Any]], Any] = (
        (lambda r: int(r["id"])) if sort_by == "id" else (lambda r: (r[sort_by], int(r["id"])))
    )
    recs.sort(key=key, reverse=sort_order == "desc")
    chunk = recs[offset : offset + per_page]
    if not chunk:
        return web.Response(status=204)
    more = offset + per_page < len(recs)
    info: dict[str, Any] = {
        "per_page": per_page,
        "count": len(chunk),
        "page": page if not token else offset // per_page + 1,
        "sort_by": sort_by,
        "sort_order": sort_order,
        "more_records": more,
    }
    if more:
        info["next_page_token"] = f"emu.{offset + per_page}"
    return json_response({"data": [_project(r, fields) for r in chunk], "info": info})


async def get_record(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    await admit(request, "get_record", state.cost("get_record"))
    rec = store.records.get(request.match_info["id"])
    if rec is None:
        return web.Response(status=204)
    raw_fields = request.query.get("fields")
    out = _project(rec, [f for f in raw_fields.split(",") if f]) if raw_fields else dict(rec)
    return json_response({"data": [out]})


# -- COQL --------------------------------------------------------------------------------------
async def coql_query(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body = await _json_body(request)
    text = body.get("select_query") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ApiError(
            400, "INVALID_QUERY", "invalid query formed", {"reason": "select_query is missing"}
        )
    try:
        query = coql.parse(text, max_records=state.config.pagination_limit)
    except coql.CoqlError as e:
        raise ApiError(400, e.code, e.message, e.details) from None
    store = state.stores.get(query.module)
    # a subform module's rows are records of their own in COQL (coql.subform_rows)
    sub = coql.subform_rows(state.stores, query.module) if store is None else None
    source: Iterable[dict[str, Any]]
    if store is not None:
        columns = list(store.m.fields)
        known = set(columns) | {"id", "Created_Time", "Modified_Time", "Created_By", "Modified_By"}
        source = store.records.values()
    elif sub is not None:
        columns = [*sub.fields, coql.PARENT_ID]
        known = {*columns, "id"}
        source = sub.rows
    else:
        raise ApiError(
            400,
            "INVALID_QUERY",
            "invalid query formed",
            {"reason": f"module {query.module} is invalid"},
        )
    for f in [*query.fields, *query.where_fields, *([query.order_by] if query.order_by else [])]:
        if f != "*" and f not in known:
            raise ApiError(
                400, "INVALID_QUERY", "column given seems to be invalid", {"column_name": f}
            )
    cost = 1 if query.limit <= 200 else 2 if query.limit <= 1000 else 3
    await admit(request, "coql", cost, heavy=True)
    recs = [r for r in source if query.where is None or query.where(r)]
    if query.order_by:
        ob = query.order_by
        if ob == "id":  # record ids are numeric strings: order them as numbers
            recs.sort(key=lambda r: int(r["id"]), reverse=query.descending)
        else:
            recs.sort(
                key=lambda r: (r.get(ob) is None, r.get(ob) if r.get(ob) is not None else 0),
                reverse=query.descending,
            )
    chunk = recs[query.offset : query.offset + query.limit]
    if not chunk:
        return web.Response(status=204)
    fields = columns if query.fields == ["*"] else query.fields
    return json_response(
        {
            "data": [_project(r, fields) for r in chunk],
            "info": {"count": len(chunk), "more_records": query.offset + query.limit < len(recs)},
        }
    )
