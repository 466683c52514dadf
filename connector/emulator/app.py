"""The aiohttp application: accounts server, CRM API, upload host, download links and the
admin API under ``/__emulator__/``, all in one process.

create_app and the route table; the handlers live in routes_oauth.py, routes_metadata.py,
routes_records.py, routes_bulk.py and routes_admin.py, the gate every call passes in
middleware.py, and what they share in common.py."""

from __future__ import annotations

import logging

from aiohttp import web

from connector.emulator.common import STATE_KEY
from connector.emulator.config import EmulatorConfig
from connector.emulator.middleware import ADMIN_PREFIX, emulator_middleware
from connector.emulator.routes_admin import (
    admin_callbacks,
    admin_clock,
    admin_credits,
    admin_faults,
    admin_history,
    admin_jobs,
    admin_locks,
    admin_record,
    admin_records,
    admin_reset,
    admin_triggers,
    admin_usage,
    apply_faults,
)
from connector.emulator.routes_bulk import (
    RUNNER_KEY,
    JobRunner,
    create_bulk_job,
    download_dispatch,
    get_bulk_job,
    upload_file,
)
from connector.emulator.routes_metadata import (
    get_fields,
    get_module,
    get_modules,
    get_org,
    get_users,
)
from connector.emulator.routes_oauth import oauth_revoke, oauth_token
from connector.emulator.routes_records import (
    coql_query,
    delete_records,
    get_record,
    get_records,
    insert_records,
    update_records,
    upsert_records,
)
from connector.emulator.state import ApiError, EmulatorState

# imported from here by server.py, __init__.py and tests/chaos/emulator_main.py
__all__ = ["RUNNER_KEY", "STATE_KEY", "apply_faults", "create_app"]

log = logging.getLogger(__name__)


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(
        404,
        "INVALID_URL_PATTERN",
        "Please check if the URL trying to access is a correct one",
        {"resource_path_index": 0},
    )


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
