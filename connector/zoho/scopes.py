"""The OAuth scopes the connector's refresh token needs (README "Zoho scopes",
docs/configuration.md), and which scope each client call needs, for error messages.

Sources (Zoho CRM v8 docs): Scopes page (``ZohoCRM.{users,org,settings,modules,...}``); the
Organization API (``ZohoCRM.org.READ``); Field metadata (``ZohoCRM.settings.fields.READ``);
COQL (``ZohoCRM.coql.READ``); Bulk Write create job (``ZohoCRM.bulk.CREATE`` or ``.ALL`` plus
``ZohoCRM.modules.ALL``) and upload file (``ZohoFiles.files.ALL``); record APIs
(``ZohoCRM.modules.ALL``). The emulator's default refresh token carries exactly this list.
"""

from __future__ import annotations

#: What the connector calls: records, field metadata, COQL (verify, snapshot), bulk write and
#: its file upload, and ``GET /crm/v8/org`` (the bulk upload's ``X-CRM-ORG`` header and the
#: org's time zone for bulk CSV date/times) unless ``crm.org_id`` and ``crm.bulk_timezone`` are
#: both configured.
REQUIRED_SCOPES: tuple[str, ...] = (
    "ZohoCRM.modules.ALL",
    "ZohoCRM.bulk.ALL",
    "ZohoCRM.settings.fields.READ",
    "ZohoCRM.coql.READ",
    "ZohoFiles.files.ALL",
    "ZohoCRM.org.READ",
)

#: client API name -> (scope it needs, configuration key that avoids the call or None)
API_SCOPES: dict[str, tuple[str, str | None]] = {
    "org": ("ZohoCRM.org.READ", "crm.org_id"),
    "users": ("ZohoCRM.users.READ", None),
    "fields": ("ZohoCRM.settings.fields.READ", None),
    "coql": ("ZohoCRM.coql.READ", None),
    "bulk_upload": ("ZohoFiles.files.ALL", None),
    "bulk_create": ("ZohoCRM.bulk.ALL", None),
    "bulk_job": ("ZohoCRM.bulk.ALL", None),
    "bulk_download": ("ZohoCRM.bulk.ALL", None),
}


def scope_hint(api: str) -> str:
    """``the refresh token lacks ZohoCRM.org.READ …; or set crm.org_id`` for an API name."""
    scope, avoid = API_SCOPES.get(api, ("ZohoCRM.modules.ALL", None))
    text = (
        f"the refresh token lacks the scope {scope}: create a refresh token with the scopes "
        f"{','.join(REQUIRED_SCOPES)} (README, 'Zoho scopes')"
    )
    if avoid:
        text += f", or set {avoid} so that this call is not needed"
    return text
