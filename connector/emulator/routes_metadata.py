"""The metadata routes: users, organization, modules and fields (the bodies are built in
metadata.py)."""

from __future__ import annotations

from aiohttp import web

from connector.emulator import metadata
from connector.emulator.common import json_response, state_of
from connector.emulator.middleware import admit
from connector.emulator.state import ApiError


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
