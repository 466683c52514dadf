"""The CRM checks of `connector doctor` (:mod:`connector.doctor`): token, hosts, organisation,
scopes, module and field mapping, credits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from connector.config import PipelineConfig, Settings
from connector.doctor_report import Check
from connector.errors import ConfigError, ConnectorError, TransientError
from connector.mapping_check import check_mapping
from connector.zoho import coql
from connector.zoho.client import FieldMeta, ZohoClient

# ---- CRM --------------------------------------------------------------------------------------


#: (scope, what needs it, probe) — the cheapest call that needs each scope. Only scopes the
#: connector uses (connector/zoho/scopes.py REQUIRED_SCOPES); the org scope has its own check.
def _scope_probes(
    client: ZohoClient, module: str
) -> list[tuple[str, str, Callable[[], Awaitable[Any]]]]:
    return [
        ("ZohoCRM.settings.fields.READ", "the mapping check", lambda: client.fields(module)),
        ("ZohoCRM.coql.READ", "`connector verify`", lambda: client.coql(_probe_coql(module))),
    ]


def _probe_coql(module: str) -> str:
    return coql.select(module, ["id"], where=coql.not_null("id"), limit=1)


async def crm_checks(
    settings: Settings,
    client: ZohoClient,
    pipelines: list[PipelineConfig],
) -> tuple[list[Check], dict[str, list[FieldMeta]]]:
    out: list[Check] = []
    metas: dict[str, list[FieldMeta]] = {}
    crm = settings.crm
    minted_before = client.tokens.refreshes
    try:
        await client.tokens.get()
    except TransientError as exc:
        out.append(
            Check(
                "crm",
                "token",
                "fail",
                f"no access token from {crm.resolved_accounts_url} now: {exc}",
                "if Zoho is throttling token creation (10 per refresh token per 10 minutes), "
                "wait and run doctor again; else check crm.data_centre / crm.accounts_url and "
                "the network path to the accounts server",
            )
        )
        return out, metas
    except ConnectorError as exc:
        out.append(
            Check(
                "crm",
                "token",
                "fail",
                f"no access token from {crm.resolved_accounts_url}: {exc}",
                "check crm.data_centre (or crm.accounts_url), crm.client_id and the client "
                "secret / refresh token (a self-client grant for this data centre)",
            )
        )
        return out, metas
    how = (
        "a new access token minted"
        if client.tokens.refreshes > minted_before
        else "the shared access token reused (none minted)"
    )
    out.append(Check("crm", "token", "ok", f"{how} from {crm.resolved_accounts_url}"))

    domain = client.tokens.api_domain
    configured = crm.api_url.rstrip("/") if crm.api_url else crm.resolved_api_url
    if domain and domain.rstrip("/") != configured:
        out.append(
            Check(
                "crm",
                "hosts",
                "fail",
                f"the org's API domain is {domain}, the configuration points at {configured}",
                "set crm.data_centre to the org's data centre (or crm.api_url to its API "
                "domain); the upload host follows the data centre (docs/configuration.md)",
            )
        )
    else:
        out.append(
            Check(
                "crm",
                "hosts",
                "ok",
                f"accounts {crm.resolved_accounts_url}, API {configured}, upload "
                f"{crm.resolved_upload_url}",
            )
        )

    module = pipelines[0].module if pipelines else "Leads"
    for scope, used_by, probe in _scope_probes(client, module):
        out.append(await _scope_check(scope, used_by, probe))

    out.append(await _org_check(settings, client))

    for p in pipelines:
        try:
            fields = await client.fields(p.module)
        except ConnectorError as exc:
            out.append(
                Check(
                    "crm",
                    "module",
                    "fail",
                    f"cannot read module {p.module!r}: {exc}",
                    f"fix pipelines[{p.name!r}].module (the module's API name)",
                    p.name,
                )
            )
            continue
        metas[p.name] = fields
        out.append(
            Check("crm", "module", "ok", f"module {p.module!r}: {len(fields)} fields", "", p.name)
        )
        try:
            await check_mapping(_Fields(fields), p, {q.name: q for q in pipelines})
        except ConfigError as exc:
            out.append(Check("crm", "mapping", "fail", str(exc), f"fix {exc.key}", p.name))
        else:
            out.append(
                Check(
                    "crm",
                    "mapping",
                    "ok",
                    f"key field {p.key_field!r} is unique; {len(p.fields)} mapped field"
                    f"{'s' if len(p.fields) != 1 else ''} exist with matching types",
                    "",
                    p.name,
                )
            )

    remaining = client.credits_remaining
    out.append(
        Check(
            "crm",
            "credits",
            "ok" if remaining is None or remaining > crm.credit_reserve else "warn",
            f"{remaining} credits left today (X-API-CREDITS-REMAINING)"
            if remaining is not None
            else "the CRM did not report credits remaining (no X-API-CREDITS-REMAINING header)",
            "the connector stops spending at crm.credit_reserve; wait for the daily reset or "
            "raise the org's credits",
        )
    )
    return out, metas


class _Fields:
    def __init__(self, fields: list[FieldMeta]) -> None:
        self._fields = fields

    async def fields(self, module: str) -> list[FieldMeta]:
        return self._fields


async def _scope_check(scope: str, used_by: str, probe: Callable[[], Awaitable[Any]]) -> Check:
    try:
        await probe()
    except ConnectorError as exc:
        text = str(exc)
        if "OAUTH_SCOPE_MISMATCH" in text or "scope" in text.lower():
            return Check(
                "crm",
                "scope",
                "fail",
                f"{scope} not granted (needed by {used_by})",
                f"generate a new refresh token whose grant includes {scope} (docs/configuration.md"
                " lists every scope)",
            )
        return Check("crm", "scope", "warn", f"{scope}: probe failed: {text}")
    return Check("crm", "scope", "ok", f"{scope} granted")


async def _org_check(settings: Settings, client: ZohoClient) -> Check:
    try:
        org = await client.org()
    except ConnectorError as exc:
        if "OAUTH_SCOPE_MISMATCH" in str(exc):
            fix = "grant ZohoCRM.org.READ, or set crm.org_id (the org's zgid)"
            if settings.crm.org_id:
                return Check(
                    "crm",
                    "org",
                    "warn",
                    f"ZohoCRM.org.READ not granted; using crm.org_id {settings.crm.org_id!r}",
                    fix,
                )
            return Check("crm", "org", "fail", "ZohoCRM.org.READ not granted", fix)
        return Check("crm", "org", "fail", f"cannot read the organisation: {exc}")
    zgid = str(org.get("zgid") or org.get("id") or "")
    tz = org.get("time_zone") or "?"
    edition = (org.get("license_details") or {}).get("paid_type") or "?"
    detail = f"org {zgid}, time zone {tz}, edition {edition}"
    configured = settings.crm.org_id
    if configured and configured != zgid:
        return Check(
            "crm",
            "org",
            "fail",
            f"{detail}; crm.org_id is {configured!r}",
            f"set crm.org_id = {zgid!r} (or remove it)",
        )
    if isinstance(edition, str) and edition.lower() != settings.crm.edition:
        return Check(
            "crm",
            "org",
            "warn",
            f"{detail}; crm.edition is {settings.crm.edition!r} (sets the concurrency limit "
            f"{settings.crm.concurrency})",
            f"set crm.edition = {edition.lower()!r} so the connector uses the edition's "
            "concurrency limit",
        )
    return Check("crm", "org", "ok", f"{detail}; concurrency limit {settings.crm.concurrency}")
