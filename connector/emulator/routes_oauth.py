"""The accounts server: ``/oauth/v2/token`` (refresh and authorization-code grants) and
``/oauth/v2/token/revoke``."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from aiohttp import web

from connector.emulator.common import base_url, json_response, state_of
from connector.emulator.state import EmulatorState


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
