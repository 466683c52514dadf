"""The admin API under ``/__emulator__/`` (emulator-only, no credits): usage, records,
history, reset, clock, faults, credits, callbacks, jobs, triggers and locks."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from connector.emulator import bulk
from connector.emulator.common import _json_body, json_response, state_of
from connector.emulator.records import MESSAGE_KEY
from connector.emulator.routes_bulk import RUNNER_KEY, JobRunner
from connector.emulator.state import ApiError, EmulatorState


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
