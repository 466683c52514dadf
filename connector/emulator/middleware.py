"""Every call's gate: host checks, authentication and OAuth scopes, concurrency, injected
faults, the credits header, and ``admit`` (sub-concurrency, credits and latency for one call)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from connector.emulator.common import json_response, state_of
from connector.emulator.state import ApiError, EmulatorState, too_many_requests

ADMIN_PREFIX = "/__emulator__/"
DOWNLOAD_RE = re.compile(r"^/v8/crm/(?P<org>[^/]+)/bulk-write/(?P<job>[0-9]+)/(?P<file>[^/]+)$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
