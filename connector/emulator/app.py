"""The aiohttp application: accounts server, CRM API, upload host, download links and the
admin API under ``/__emulator__/``, all in one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from connector.emulator import bulk, coql, metadata
from connector.emulator.config import EmulatorConfig
from connector.emulator.records import (
    ALL_TRIGGERS,
    MESSAGE_KEY,
    MESSAGES,
    FieldError,
    ModuleStore,
    WriteResult,
)
from connector.emulator.state import ApiError, BulkJob, EmulatorState, too_many_requests

log = logging.getLogger(__name__)

STATE_KEY = web.AppKey("emulator_state", EmulatorState)

MAX_RECORDS = 100
MAX_FIELDS = 50
MAX_PER_PAGE = 200
ADMIN_PREFIX = "/__emulator__/"
DOWNLOAD_RE = re.compile(r"^/v8/crm/(?P<org>[^/]+)/bulk-write/(?P<job>[0-9]+)/(?P<file>[^/]+)$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):  # numbers stored exactly (validate.py) go out as written
        return orjson.Fragment(str(value))
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_exact)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=dumps(obj), status=status, content_type="application/json", charset="UTF-8"
    )


def state_of(request: web.Request) -> EmulatorState:
    return request.app[STATE_KEY]


def base_url(request: web.Request, state: EmulatorState) -> str:
    return state.base_url or f"{request.scheme}://{request.host}"


# -- request classification --------------------------------------------------------------------
def classify(path: str) -> str:
    if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
        return "admin"
    if path.startswith("/oauth/"):
        return "accounts"
    if path == "/crm/v8/upload":
        return "upload"
    if DOWNLOAD_RE.match(path):
        return "download"
    return "api"


_OPERATIONS = {"GET": "READ", "POST": "CREATE", "PUT": "UPDATE", "PATCH": "UPDATE"}


def required_scope(method: str, path: str) -> tuple[str, str]:
    """(scope family, operation) a call needs, as each v8 page documents it: ``ZohoCRM.users``,
    ``ZohoCRM.org`` (Organization API: org.READ), ``ZohoCRM.settings.{fields,modules,…}``
    (Field/Module metadata: settings.fields.READ …), ``ZohoCRM.coql`` (COQL: coql.READ),
    ``ZohoFiles.files`` (Upload file: files.ALL), ``ZohoCRM.bulk`` (Bulk Write: bulk.CREATE /
    bulk.READ or bulk.ALL), ``ZohoCRM.modules.{module}`` (record APIs: modules.ALL or
    modules.{module}.{operation}). Upsert is documented with CREATE+UPDATE; ALL covers it."""
    op = _OPERATIONS.get(method, "DELETE" if method == "DELETE" else "READ")
    parts = [p for p in path.split("/") if p]
    if path.startswith("/crm/v8/users"):
        return "ZohoCRM.users", "READ"
    if path.startswith("/crm/v8/org"):
        return "ZohoCRM.org", op
    if path.startswith("/crm/v8/settings"):
        sub = parts[3] if len(parts) > 3 else ""
        return f"ZohoCRM.settings.{sub}".rstrip("."), op
    if path.startswith("/crm/v8/coql"):
        return "ZohoCRM.coql", "READ"
    if path == "/crm/v8/upload":
        return "ZohoFiles.files", "CREATE"
    if path.startswith("/crm/bulk/") or DOWNLOAD_RE.match(path):
        return "ZohoCRM.bulk", op
    module = parts[2].lower() if len(parts) > 2 else ""
    return f"ZohoCRM.modules.{module}".rstrip("."), op


def scope_grants(granted: str, family: str, op: str) -> bool:
    """Does one granted scope (``Service.scope[.sub].OPERATION``) allow (family, op)? ``ALL``
    covers every operation; a parent scope covers its sub-scopes (settings.ALL covers
    settings.fields.READ; modules.ALL covers modules.orders.CREATE)."""
    if granted == "*":
        return True
    head, _, last = granted.rpartition(".")
    if last.upper() in ("ALL", "READ", "CREATE", "UPDATE", "DELETE", "WRITE"):
        g_family, g_op = head, last.upper()
    else:
        g_family, g_op = granted, "ALL"
    if not (family == g_family or family.startswith(g_family + ".")):
        return False
    if g_op == "WRITE":
        return op in ("CREATE", "UPDATE", "DELETE")
    return g_op in ("ALL", op)


@dataclass
class CallCtx:
    key: tuple[str, str]
    heavy: bool = False


CTX_KEY = web.RequestKey("emulator_call", CallCtx)


def _host_of(url: str) -> str:
    return urlsplit(url).netloc


# -- middleware --------------------------------------------------------------------------------
@web.middleware
async def emulator_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = state_of(request)
    kind = classify(request.path)
    try:
        if kind == "admin":
            return await handler(request)
        if state.config.strict_hosts:
            expected = {
                "accounts": state.accounts_url,
                "upload": state.upload_url,
                "download": state.download_url,
                "api": state.api_domain,
            }[kind]
            if expected and _host_of(expected) != request.host:
                raise ApiError(
                    404,
                    "INVALID_URL_PATTERN",
                    "Please check if the URL trying to access is a correct one",
                    {"resource_path_index": 0},
                )
        if kind == "accounts":
            return await handler(request)
        return await _api_call(request, handler, state)
    except ApiError as e:
        resp = json_response(e.payload(), e.http_status)
        if kind not in ("admin", "accounts"):
            _credit_header(resp, state)
        return resp


async def _api_call(
    request: web.Request, handler: Handler, state: EmulatorState
) -> web.StreamResponse:
    auth = request.headers.get("Authorization")
    if not auth:
        raise ApiError(401, "AUTHENTICATION_FAILURE", "Authentication failed", {})
    scheme, _, token = auth.partition(" ")
    if scheme != "Zoho-oauthtoken" and not (scheme == "Bearer" and state.config.auth.accept_bearer):
        raise ApiError(401, "AUTHENTICATION_FAILURE", "Authentication failed", {})
    at = state.tokens.lookup(token.strip())
    if at is None:
        raise ApiError(401, "INVALID_TOKEN", "invalid oauth token", {})
    family, op = required_scope(request.method, request.path)
    if not any(scope_grants(g, family, op) for g in at.scopes):
        # Zoho's body does not name the scope (zoho-crm-api.md §1.4)
        raise ApiError(401, "OAUTH_SCOPE_MISMATCH", "Unauthorized", {})
    faults = state.faults
    if faults.calls_until_expiry > 0:
        faults.calls_until_expiry -= 1
        if faults.calls_until_expiry == 0:
            state.tokens.expire_all()
    key = (state.config.org_id, at.client_id)
    in_flight = state.in_flight.get(key, 0)
    if in_flight >= state.concurrency_limit:
        state.count_rejection("concurrency")
        raise too_many_requests("concurrency")
    if faults.burst_429 > 0:
        faults.burst_429 -= 1
        state.count_rejection("fault_429")
        raise too_many_requests("fault")
    fc = faults.config
    if fc.rate_429 > 0 and faults.rng.random() < fc.rate_429:
        state.count_rejection("fault_429")
        raise too_many_requests("fault")
    if fc.error_rate > 0 and faults.rng.random() < fc.error_rate:
        state.count_rejection("fault_500")
        raise ApiError(500, "INTERNAL_ERROR", "Internal server error occurred.", {})
    ctx = CallCtx(key)
    request[CTX_KEY] = ctx
    state.in_flight[key] = in_flight + 1
    try:
        resp = await handler(request)
    finally:
        state.in_flight[key] -= 1
        if ctx.heavy:
            state.heavy_in_flight[key] -= 1
    _credit_header(resp, state)
    return resp


def _credit_header(resp: web.StreamResponse, state: EmulatorState) -> None:
    ledger = state.ledger
    used = ledger.used()
    if used * 2 >= ledger.allowance:
        resp.headers["X-API-CREDITS-REMAINING"] = str(max(0, ledger.allowance - used))


async def admit(
    request: web.Request, api: str, credits: int, *, heavy: bool = False, records: int = 0
) -> None:
    """Sub-concurrency and credit checks for one call, then its injected latency."""
    state = state_of(request)
    ctx = request[CTX_KEY]
    if heavy:
        n = state.heavy_in_flight.get(ctx.key, 0)
        if n >= state.config.credits.sub_concurrency:
            state.count_rejection("sub_concurrency")
            raise too_many_requests("sub_concurrency")
        state.heavy_in_flight[ctx.key] = n + 1
        ctx.heavy = True
    if credits > 0 and state.ledger.remaining() < credits:
        state.count_rejection("credits")
        raise too_many_requests("credits")
    state.ledger.charge(credits)
    state.count_call(api, credits, records)
    delay = state.faults.latency_seconds()
    if delay > 0:
        await asyncio.sleep(delay)


# -- accounts ----------------------------------------------------------------------------------
async def _params(request: web.Request) -> dict[str, str]:
    params = {k: v for k, v in request.query.items()}
    if request.can_read_body:
        if (
            request.content_type == "application/x-www-form-urlencoded"
            or request.content_type.startswith("multipart/")
        ):
            form = await request.post()
            params.update({k: str(v) for k, v in form.items()})
        elif request.content_type == "application/json":
            with contextlib.suppress(ValueError):
                body = orjson.loads(await request.read())
                if isinstance(body, dict):
                    params.update({k: str(v) for k, v in body.items()})
    return params


async def oauth_token(request: web.Request) -> web.Response:
    state = state_of(request)
    p = await _params(request)
    auth = state.config.auth
    grant = p.get("grant_type")
    if p.get("client_id") != auth.client_id:
        return json_response({"error": "invalid_client"})
    if p.get("client_secret") != auth.client_secret:
        return json_response({"error": "invalid_client_secret"})
    if grant == "refresh_token":
        rt = p.get("refresh_token", "")
        if rt not in state.tokens.refresh:
            return json_response({"error": "invalid_code"})
        if state.tokens.throttled(rt):
            return json_response(
                {
                    "error": "Access Denied",
                    "error_description": "You have made too many requests continuously. "
                    "Please try again after some time.",
                    "status": "failure",
                },
                400,
            )
        at = state.tokens.issue(rt, p["client_id"])
        return json_response(_token_body(request, state, at.token))
    if grant == "authorization_code":
        code = p.get("code", "")
        if code not in state.tokens.grant_codes:
            return json_response({"error": "invalid_code"})
        state.tokens.grant_codes.discard(code)
        rt = f"1000.{len(state.tokens.refresh) + 1:04d}.{abs(hash((code, state.clock.now()))):x}"
        state.tokens.refresh[rt] = ["*"]
        at = state.tokens.issue(rt, p["client_id"])
        return json_response({**_token_body(request, state, at.token), "refresh_token": rt})
    return json_response({"error": "unsupported_grant_type"})


def _token_body(request: web.Request, state: EmulatorState, token: str) -> dict[str, Any]:
    return {
        "access_token": token,
        "api_domain": state.config.api_domain or base_url(request, state),
        "token_type": "Bearer",
        "expires_in": int(state.tokens.ttl),
    }


async def oauth_revoke(request: web.Request) -> web.Response:
    state = state_of(request)
    p = await _params(request)
    if state.tokens.revoke(p.get("token", "")):
        return json_response({"status": "success"})
    return json_response({"status": "failure", "error": "invalid_token"})


# -- metadata ----------------------------------------------------------------------------------
async def get_users(request: web.Request) -> web.Response:
    state = state_of(request)
    await admit(request, "users", state.cost("users"))
    return json_response(metadata.users_response(state.config, state.clock.iso(0)))


async def get_org(request: web.Request) -> web.Response:
    state = state_of(request)
    await admit(request, "org", state.cost("org"))
    return json_response(metadata.org_response(state.config))


async def get_modules(request: web.Request) -> web.Response:
    state = state_of(request)
    await admit(request, "modules", state.cost("modules"))
    return json_response(metadata.modules_response(state.config, state.clock.iso(0)))


async def get_module(request: web.Request) -> web.Response:
    state = state_of(request)
    spec = state.config.module(request.match_info["api_name"])
    if spec is None:
        raise ApiError(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            {"resource_path_index": 0},
        )
    await admit(request, "modules", state.cost("modules"))
    i = state.config.modules.index(spec)
    return json_response(
        {"modules": [metadata.module_meta(state.config, spec, i, state.clock.iso(0))]}
    )


async def get_fields(request: web.Request) -> web.Response:
    state = state_of(request)
    name = request.query.get("module")
    if not name:
        raise ApiError(
            400,
            "REQUIRED_PARAM_MISSING",
            "One of the expected parameter is missing",
            {"param_name": "module"},
        )
    spec = state.config.module(name) or state.config.subform_module(name)
    if spec is None:
        raise ApiError(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            {"param_name": "module"},
        )
    await admit(request, "fields", state.cost("fields"))
    return json_response(metadata.fields_response(state.config, spec, state.clock.iso(0)))


# -- records -----------------------------------------------------------------------------------
async def _json_body(request: web.Request, *, exact: bool = False) -> Any:
    """The JSON body; ``exact`` (record writes) reads fractional numbers as ``Decimal`` so a
    value's digits are validated and stored as sent (validate.py), not as a float."""
    raw = await request.read()
    if not raw:
        return None
    try:
        if exact:
            return json.loads(raw, parse_float=Decimal)
        return orjson.loads(raw)
    except (orjson.JSONDecodeError, ValueError):
        raise ApiError(
            400, "INVALID_DATA", "invalid data", {"reason": "body is not valid JSON"}
        ) from None


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
    trigger = _triggers(body)
    n = len(data)
    await admit(request, "insert", state.record_cost(n), heavy=n > 10, records=n)
    _log_trigger(state, store, "insert", trigger, n)
    store.trigger = trigger
    items = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            items.append(_not_object(i))
            continue
        items.append(_item(store.insert(rec, "insert"), i, store))
    store.trigger = None
    return json_response({"data": items}, _overall(items, 201))


async def update_records(request: web.Request) -> web.Response:
    state = state_of(request)
    store = state.store(request.match_info["module"])
    path_id = request.match_info.get("id")
    body = await _json_body(request, exact=True)
    data = _data_items(body, state)
    trigger = _triggers(body)
    n = len(data)
    await admit(request, "update", state.record_cost(n), heavy=n > 10, records=n)
    _log_trigger(state, store, "update", trigger, n)
    store.trigger = trigger
    items = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            items.append(_not_object(i))
            continue
        rid = path_id if path_id is not None else rec.get("id")
        if rid is None or rid == "":
            items.append(_field_error(("MANDATORY_NOT_FOUND", "id", {}), i))
            continue
        items.append(_item(store.update(str(rid), rec, "update"), i, store))
    store.trigger = None
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
    trigger = _triggers(body)
    n = len(data)
    await admit(request, "upsert", state.record_cost(n), heavy=n > 10, records=n)
    _log_trigger(state, store, "upsert", trigger, n)
    store.trigger = trigger
    items = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            items.append(_not_object(i))
            continue
        items.append(_item(store.upsert(rec, "upsert", order), i, store, upsert=True))
    store.trigger = None
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
    if store is None:
        raise ApiError(
            400,
            "INVALID_QUERY",
            "invalid query formed",
            {"reason": f"module {query.module} is invalid"},
        )
    known = set(store.m.fields) | {
        "id",
        "Created_Time",
        "Modified_Time",
        "Created_By",
        "Modified_By",
    }
    for f in [*query.fields, *query.where_fields, *([query.order_by] if query.order_by else [])]:
        if f != "*" and f not in known:
            raise ApiError(
                400, "INVALID_QUERY", "column given seems to be invalid", {"column_name": f}
            )
    cost = 1 if query.limit <= 200 else 2 if query.limit <= 1000 else 3
    await admit(request, "coql", cost, heavy=True)
    recs = [r for r in store.records.values() if query.where is None or query.where(r)]
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
    fields = list(store.m.fields) if query.fields == ["*"] else query.fields
    return json_response(
        {
            "data": [_project(r, fields) for r in chunk],
            "info": {"count": len(chunk), "more_records": query.offset + query.limit < len(recs)},
        }
    )


# -- bulk write --------------------------------------------------------------------------------
def _upload_header_error() -> ApiError:
    return ApiError(
        400,
        "BAD_REQUEST",
        "Bad Request",
        {},
        body={
            "ERROR_CODE": 400,
            "ERROR_MESSAGE": "Bad Request",
            "x-error": "check if headers [feature, X-CRM-ORG] are present and valid",
        },
    )


async def upload_file(request: web.Request) -> web.Response:
    state = state_of(request)
    if (
        request.headers.get("feature") != "bulk-write"
        or request.headers.get("X-CRM-ORG") != state.config.org_id
    ):
        raise _upload_header_error()
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            400, "INVALID_FILE_FORMAT", "invalid file format. only zip format is supported", {}
        )
    limit = state.config.bulk.max_zip_bytes
    reader = await request.multipart()
    payload: bytes | None = None
    name = "upload.zip"
    while True:
        part = await reader.next()
        if part is None:
            break
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
            name = part.filename or name
            chunks = bytearray()
            while True:
                chunk = await part.read_chunk(1 << 16)
                if not chunk:
                    break
                chunks.extend(chunk)
                if len(chunks) > limit:
                    raise ApiError(413, "FILE_TOO_LARGE", "File size too large to process", {})
            payload = bytes(chunks)
    if payload is None:
        raise ApiError(
            400, "INVALID_FILE_FORMAT", "invalid file format. only zip format is supported", {}
        )
    upload = bulk.parse_upload(state, name, payload)
    await admit(request, "bulk_upload", state.cost("bulk_upload"), records=len(upload.rows))
    state.uploads[upload.file_id] = upload
    return json_response(
        {
            "status": "success",
            "code": "FILE_UPLOAD_SUCCESS",
            "message": "file uploaded.",
            "details": {
                "file_id": int(upload.file_id),
                "created_time": upload.created_time,
                "id": upload.file_id,
                "created_by": {"id": state.config.user.id, "name": state.config.user.name},
            },
        }
    )


async def create_bulk_job(request: web.Request) -> web.Response:
    state = state_of(request)
    job = bulk.create_job(state, await _json_body(request))
    await admit(request, "bulk_write_job", state.cost("bulk_write_job"), records=len(job.rows))
    state.jobs[job.id] = job
    request.app[RUNNER_KEY].wake()
    return json_response(
        {
            "status": "success",
            "code": "SUCCESS",
            "message": "success",
            "details": {
                "id": job.id,
                "created_by": {"id": state.config.user.id, "name": state.config.user.name},
            },
        },
        201,
    )


def _job_not_found() -> ApiError:
    return ApiError(404, "RESOURCE_NOT_FOUND", "The requested resource doesn't exist.", {})


async def get_bulk_job(request: web.Request) -> web.Response:
    state = state_of(request)
    job = state.jobs.get(request.match_info["job_id"])
    if job is None:
        raise _job_not_found()
    request.app[RUNNER_KEY].step(job)
    if job.completed_at is not None and state.clock.now() > (
        job.completed_at + state.config.bulk.job_ttl
    ):
        raise _job_not_found()  # expired (bulk.job_ttl)
    await admit(request, "bulk_job_details", state.cost("bulk_job_details"))
    return json_response(bulk.job_details(state, job))


async def download_result(request: web.Request) -> web.Response:
    state = state_of(request)
    m = DOWNLOAD_RE.match(request.path)
    assert m is not None
    job = state.jobs.get(m.group("job"))
    forbidden = ApiError(
        403, "FORBIDDEN", "Forbidden", {}, body={"info": "Forbidden", "x-info": "Link not valid"}
    )
    if job is None or m.group("org") != state.config.org_id or m.group("file") != f"{job.id}.zip":
        raise forbidden
    request.app[RUNNER_KEY].step(job)
    if job.result_zip is None or job.completed_at is None:
        raise forbidden
    if state.clock.now() > job.completed_at + state.config.bulk.result_link_ttl:
        raise forbidden
    await admit(request, "bulk_download", state.cost("bulk_download"))
    return web.Response(
        body=job.result_zip,
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.zip"'},
    )


class JobRunner:
    """Moves bulk jobs along the emulator clock and delivers callbacks; one task per app."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.deliveries: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self.event.set()

    def step(self, job: BulkJob) -> None:
        if bulk.step_job(self.state, job):
            self._finished(job)

    def step_all(self) -> None:
        for job in list(self.state.jobs.values()):
            if not job.done:
                self.step(job)

    def _finished(self, job: BulkJob) -> None:
        if job.callback is None or job.callback_sent:
            return
        job.callback_sent = True
        body = bulk.job_details(self.state, job)
        body["job_id"] = job.id
        body["state"] = job.status
        entry: dict[str, Any] = {
            "job_id": job.id,
            "url": job.callback["url"],
            "time": self.state.clock.iso(),
            "state": job.status,
            "status": "pending",
            "body": body,
        }
        self.state.callbacks.append(entry)
        if self.state.faults.config.drop_callbacks:
            entry["status"] = "dropped"
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(entry), name=f"emulator-callback-{job.id}"
        )
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, entry: dict[str, Any]) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        try:
            async with self.session.post(
                entry["url"],
                data=dumps(entry["body"]),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.state.config.bulk.callback_timeout),
            ) as resp:
                entry["http_status"] = resp.status
                entry["status"] = "delivered" if resp.status < 400 else "failed"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            entry["status"] = "failed"
            entry["error"] = type(e).__name__

    async def run(self) -> None:
        tick = self.state.config.bulk.tick_seconds
        while True:
            self.step_all()
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), timeout=tick)

    async def start(self, app: web.Application) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="emulator-job-runner")

    async def stop(self, app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for t in list(self.deliveries):
            t.cancel()
        if self.deliveries:
            await asyncio.gather(*self.deliveries, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


RUNNER_KEY = web.AppKey("emulator_runner", JobRunner)


# -- admin -------------------------------------------------------------------------------------
async def admin_usage(request: web.Request) -> web.Response:
    return json_response(state_of(request).usage_snapshot())


async def admin_records(request: web.Request) -> web.Response:
    state = state_of(request)
    module = request.match_info["module"]
    try:
        recs = state.records_of(module)
    except ApiError as e:
        return json_response(e.payload(), 404)
    out: dict[str, Any] = {"module": module, "count": len(recs), "records": recs}
    if request.query.get("include_deleted") in ("1", "true"):
        out["deleted"] = [dict(r) for r in state.stores[module].deleted.values()]
    return json_response(out)


async def admin_record(request: web.Request) -> web.Response:
    """``PATCH`` (body: the fields to change) or ``DELETE`` one record, as a person editing in
    the CRM would: no credits, recorded in the history as an update / delete. For rehearsing
    ``connector verify --repair``. Emulator-only (not a Zoho path)."""
    state = state_of(request)
    module, rid = request.match_info["module"], request.match_info["id"]
    try:
        store = state.store(module)
    except ApiError as e:
        return json_response(e.payload(), 404)
    if request.method == "DELETE":
        res = store.delete(rid)
    else:
        body = await request.json()
        if not isinstance(body, dict):
            return json_response({"code": "INVALID_DATA", "message": "expected an object"}, 400)
        res = store.update(rid, body, "update")
    if not res.ok:
        errors = [
            {"code": c, "api_name": a, **{k: v for k, v in d.items() if k != MESSAGE_KEY}}
            for c, a, d in res.errors
        ]
        return json_response(
            {"code": res.code or "INVALID_DATA", "message": res.message, "errors": errors}, 400
        )
    return json_response({"id": rid, "action": res.action or "delete"})


async def admin_history(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        hist = state.history_of(request.match_info["module"], request.match_info["id"])
    except ApiError as e:
        return json_response(e.payload(), 404)
    return json_response({"id": request.match_info["id"], "history": hist})


async def admin_reset(request: web.Request) -> web.Response:
    state_of(request).reset()
    return json_response({"status": "reset"})


async def admin_clock(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "POST":
        body = await _json_body(request) or {}
        try:
            state.clock.advance(float(body.get("advance", 0)))
        except (TypeError, ValueError) as e:
            return json_response({"error": str(e)}, 400)
        runner: JobRunner = request.app[RUNNER_KEY]
        runner.step_all()
        runner.wake()
    return json_response(
        {"now": state.clock.now(), "iso": state.clock.iso(), "offset": state.clock.offset}
    )


def apply_faults(state: EmulatorState, changes: dict[str, Any]) -> dict[str, Any]:
    changes = dict(changes)
    if changes.pop("expire_tokens_now", False):
        state.tokens.expire_all()
    ttl = changes.pop("access_token_ttl", None)
    if ttl is not None:
        state.tokens.ttl = float(ttl)
    if changes:
        state.faults.update(changes)
    return state.faults.snapshot()


async def admin_faults(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "POST":
        body = await _json_body(request) or {}
        if not isinstance(body, dict):
            return json_response({"error": "expected a JSON object"}, 400)
        try:
            return json_response(apply_faults(state, body))
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
    return json_response(state.faults.snapshot())


async def admin_credits(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "POST":
        body = await _json_body(request) or {}
        if body.get("reset"):
            state.ledger.reset()
        if "allowance" in body:
            state.ledger.allowance = int(body["allowance"])
        if "used" in body:
            state.ledger.set_used(int(body["used"]))
        if "remaining" in body:
            state.ledger.set_used(max(0, state.ledger.allowance - int(body["remaining"])))
    return json_response(state.ledger.snapshot())


async def admin_callbacks(request: web.Request) -> web.Response:
    return json_response({"callbacks": state_of(request).callbacks})


async def admin_locks(request: web.Request) -> web.Response:
    """Lock records as an approval process does (writes answer ``RECORD_LOCKED``).
    POST ``{"module", "id" | "field"+"value", "seconds"?: lock length on the emulator clock,
    "unlock"?: true}``; GET lists the locks of every module."""
    state = state_of(request)
    if request.method == "POST":
        body = await _json_body(request) or {}
        try:
            store = state.store(str(body.get("module")))
        except ApiError as e:
            return json_response(e.payload(), 404)
        rid = body.get("id")
        if rid is None and "field" in body:
            rid = store.find(str(body["field"]), body.get("value"))
        if rid is None or str(rid) not in store.records:
            return json_response({"error": "no such record"}, 404)
        if body.get("unlock"):
            store.locks.pop(str(rid), None)
        else:
            seconds = body.get("seconds")
            until = None if seconds is None else state.clock.now() + float(seconds)
            store.locks[str(rid)] = until
    out = {
        name: {rid: until for rid, until in st.locks.items() if st.locked(rid)}
        for name, st in state.stores.items()
    }
    return json_response({"locks": {k: v for k, v in out.items() if v}})


async def admin_triggers(request: web.Request) -> web.Response:
    """Every record write with the automations it asked Zoho to run."""
    return json_response({"writes": state_of(request).trigger_log})


async def admin_jobs(request: web.Request) -> web.Response:
    state = state_of(request)
    return json_response({"jobs": [bulk.job_details(state, j) for j in state.jobs.values()]})


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(
        404,
        "INVALID_URL_PATTERN",
        "Please check if the URL trying to access is a correct one",
        {"resource_path_index": 0},
    )


async def download_dispatch(request: web.Request) -> web.Response:
    return await download_result(request)


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """The emulator as an aiohttp application (state in ``app[STATE_KEY]``)."""
    config = config or EmulatorConfig.default()
    state = EmulatorState(config)
    app = web.Application(
        middlewares=[emulator_middleware], client_max_size=config.bulk.max_zip_bytes + (1 << 20)
    )
    app[STATE_KEY] = state
    runner = JobRunner(state)
    app[RUNNER_KEY] = runner
    app.on_startup.append(runner.start)
    app.on_cleanup.append(runner.stop)
    r = app.router
    r.add_post("/oauth/v2/token", oauth_token)
    r.add_post("/oauth/v2/token/revoke", oauth_revoke)
    a = ADMIN_PREFIX
    r.add_get(a + "usage", admin_usage)
    r.add_get(a + "records/{module}", admin_records)
    r.add_route("PATCH", a + "records/{module}/{id}", admin_record)
    r.add_route("DELETE", a + "records/{module}/{id}", admin_record)
    r.add_get(a + "history/{module}/{id}", admin_history)
    r.add_post(a + "reset", admin_reset)
    r.add_route("*", a + "clock", admin_clock)
    r.add_route("*", a + "faults", admin_faults)
    r.add_route("*", a + "credits", admin_credits)
    r.add_get(a + "callbacks", admin_callbacks)
    r.add_get(a + "jobs", admin_jobs)
    r.add_get(a + "triggers", admin_triggers)
    r.add_route("*", a + "locks", admin_locks)
    r.add_get("/crm/v8/users", get_users)
    r.add_get("/crm/v8/org", get_org)
    r.add_get("/crm/v8/settings/modules", get_modules)
    r.add_get("/crm/v8/settings/modules/{api_name}", get_module)
    r.add_get("/crm/v8/settings/fields", get_fields)
    r.add_post("/crm/v8/coql", coql_query)
    r.add_post("/crm/v8/upload", upload_file)
    r.add_post("/crm/bulk/v8/write", create_bulk_job)
    r.add_get("/crm/bulk/v8/write/{job_id}", get_bulk_job)
    r.add_get("/v8/crm/{org}/bulk-write/{job}/{file}", download_dispatch)
    r.add_get("/crm/v8/{module}", get_records)
    r.add_post("/crm/v8/{module}", insert_records)
    r.add_put("/crm/v8/{module}", update_records)
    r.add_delete("/crm/v8/{module}", delete_records)
    r.add_post("/crm/v8/{module}/upsert", upsert_records)
    r.add_get("/crm/v8/{module}/{id}", get_record)
    r.add_put("/crm/v8/{module}/{id}", update_records)
    r.add_delete("/crm/v8/{module}/{id}", delete_records)
    r.add_route("*", "/{tail:.*}", not_found)
    return app
