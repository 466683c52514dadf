"""What every route module shares: the application's state key, JSON in (``_json_body``) and
out (``json_response``, ``dumps``), and the base URL the emulator answers on."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from connector.emulator.state import ApiError, EmulatorState

STATE_KEY = web.AppKey("emulator_state", EmulatorState)


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
