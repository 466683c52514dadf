"""`connector doctor`: everything a first installation can get wrong, one line per check.

Three groups of checks, each a :class:`Check` with a status and, when it fails, the fix:

* **database** (read-only: the session runs with ``default_transaction_read_only``): reachable,
  state schema version, the source table, its key and mapped columns and their types, the role's
  privileges for the capture mode, ``wal_level``, replica identity, and whether capture is
  installed (trigger, or slot + publication);
* **crm**: an access token, the data centre's hosts (the token's ``api_domain`` against the
  configured API URL), the organisation (id, time zone, edition), the granted scopes (each
  scope the connector needs, probed by the cheapest call that needs it), the module and the
  field mapping (the same check ``connector run`` makes), the credits the CRM reports;
* **round trip**: one probe record (key ``--probe-key``, default ``__connector_probe__``) with
  a value for every mapped field type, written by Upsert (and with ``--bulk`` by Bulk Write,
  500 credits), read back, compared value by value, and deleted.

Exit codes: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 for a
configuration error (the file itself). ``--json`` prints the report as one JSON document.
"""

from __future__ import annotations

import logging

from connector.config import Settings
from connector.config_secrets import Secrets
from connector.doctor_crm import crm_checks
from connector.doctor_db import database_checks
from connector.doctor_report import Check, DoctorReport, Status
from connector.doctor_roundtrip import compare, probe_row, roundtrip_checks
from connector.errors import ConfigError
from connector.zoho.auth import PgTokenStore
from connector.zoho.client import ZohoClient

log = logging.getLogger(__name__)

DEFAULT_PROBE_KEY = "__connector_probe__"


# ---- the verb ---------------------------------------------------------------------------------


async def doctor(
    settings: Settings,
    secrets: Secrets,
    *,
    pipelines: list[str] | None = None,
    bulk: bool = False,
    probe_key: str = DEFAULT_PROBE_KEY,
    roundtrip: bool = True,
    client: ZohoClient | None = None,
) -> DoctorReport:
    chosen = [p for p in settings.pipelines if not pipelines or p.name in pipelines]
    unknown = sorted(set(pipelines or ()) - {p.name for p in settings.pipelines})
    if unknown:
        raise ConfigError(
            "--pipeline",
            f"no pipeline named {', '.join(map(repr, unknown))} (configured: "
            f"{', '.join(p.name for p in settings.pipelines)})",
        )
    report = DoctorReport()
    report.add(*await database_checks(settings, secrets, chosen))
    own = client is None
    if client is None:
        # the access token shared by every process and verb (state schema, docs/security.md),
        # when the state schema is there; a new installation gets a process-local one
        store = None
        if any(c.name == "state_schema" and c.status == "ok" for c in report.checks):
            store = PgTokenStore(secrets.state_dsn, settings.database.state_schema)
        client = ZohoClient.from_config(
            settings.crm,
            client_secret=secrets.client_secret,
            refresh_token=secrets.refresh_token,
            token_store=store,
        )
        await client.open()
    try:
        before = client.credits_spent
        checks, metas = await crm_checks(settings, client, chosen)
        report.add(*checks)
        if roundtrip:
            for p in chosen:
                if p.name not in metas:
                    report.add(
                        Check("roundtrip", "upsert", "skip", "module not readable", "", p.name)
                    )
                    continue
                report.add(
                    *await roundtrip_checks(
                        client, p, metas[p.name], probe_key=probe_key, bulk=bulk
                    )
                )
        report.credits_spent = client.credits_spent - before
    finally:
        if own:
            await client.aclose()
    return report


__all__ = [
    "DEFAULT_PROBE_KEY",
    "Check",
    "DoctorReport",
    "Status",
    "compare",
    "crm_checks",
    "database_checks",
    "doctor",
    "probe_row",
    "roundtrip_checks",
]
