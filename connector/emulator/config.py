"""Configuration of the Zoho CRM emulator: modules and fields, credentials, editions, bulk
timing and faults. Loadable from TOML (`EmulatorConfig.from_toml`); the packaged default is
``default.toml`` next to this file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connector.zoho.scopes import REQUIRED_SCOPES

DataType = Literal[
    "text",
    "textarea",
    "email",
    "phone",
    "website",
    "picklist",
    "multiselectpicklist",
    "integer",
    "bigint",
    "double",
    "currency",
    "percent",
    "decimal",
    "boolean",
    "date",
    "datetime",
    "lookup",
    "subform",
]

# Zoho: "Each record's subform can have a maximum of 100 subform records" (Subform API v8,
# https://www.zoho.com/crm/developer/docs/api/v8/subforms.html).
SUBFORM_MAX_ROWS = 100

# Default maximum lengths per data type (reference §2.5); a field's `length` overrides.
DEFAULT_LENGTH: dict[str, int] = {
    "text": 255,
    "textarea": 2000,
    "email": 100,
    "phone": 30,
    "website": 255,
    "picklist": 120,
    "multiselectpicklist": 2000,
    "integer": 9,
    "bigint": 18,
    "double": 16,
    "currency": 16,
    "decimal": 16,
    "percent": 5,
    "boolean": 5,
    "date": 10,
    "datetime": 30,
    "lookup": 19,  # a record id (zoho-crm-api.md §2.5: ids are 1..19 digits)
    "subform": SUBFORM_MAX_ROWS,
}

EDITIONS: dict[str, dict[str, int | None]] = {
    # per-user credits, cap (None = unlimited), concurrency (reference §4.1, §4.3)
    "free": {"per_user": 0, "cap": 5_000, "concurrency": 5, "base": 5_000},
    "standard": {"per_user": 250, "cap": 100_000, "concurrency": 10, "base": 50_000},
    "professional": {"per_user": 500, "cap": 3_000_000, "concurrency": 15, "base": 50_000},
    "enterprise": {"per_user": 1_000, "cap": 5_000_000, "concurrency": 20, "base": 50_000},
    "ultimate": {"per_user": 2_000, "cap": None, "concurrency": 25, "base": 50_000},
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldSpec(_Model):
    api_name: str
    data_type: DataType = "text"
    label: str | None = None
    length: int | None = None
    mandatory: bool = False
    unique: bool = False
    picklist: list[str] = Field(default_factory=list)
    decimal_places: int = 2
    # data_type "lookup": the api_name of the module the field points to (field metadata
    # ``lookup.module``; zoho-crm-api.md §2.5: written as ``{"id": "<record id>"}``)
    lookup_module: str | None = None
    # data_type "subform": the subform module's api_name (field metadata ``subform.module``)
    # and the fields of its rows. Rows hold plain fields only: a lookup or subform inside a
    # subform is not modelled and refused (fail safe).
    subform_module: str | None = None
    subform_fields: list[FieldSpec] = Field(default_factory=list)

    @property
    def max_length(self) -> int:
        return self.length if self.length is not None else DEFAULT_LENGTH[self.data_type]

    @model_validator(mode="after")
    def _picklist_values(self) -> FieldSpec:
        if self.data_type in ("picklist", "multiselectpicklist") and not self.picklist:
            raise ValueError(f"field {self.api_name}: a picklist needs `picklist` values")
        if (self.data_type == "lookup") != (self.lookup_module is not None):
            raise ValueError(
                f"field {self.api_name}: `lookup_module` is set exactly for data_type 'lookup'"
            )
        if (self.data_type == "subform") != bool(self.subform_fields):
            raise ValueError(
                f"field {self.api_name}: `subform_fields` is set exactly for data_type 'subform'"
            )
        for sub in self.subform_fields:
            if sub.data_type in ("lookup", "subform") or sub.mandatory or sub.unique:
                raise ValueError(
                    f"field {self.api_name}: subform field {sub.api_name} is a lookup, subform,"
                    " mandatory or unique field; the emulator models plain optional fields in"
                    " subform rows only"
                )
        return self


class ModuleSpec(_Model):
    api_name: str
    singular_label: str | None = None
    plural_label: str | None = None
    id: str | None = None
    # System-defined duplicate-check fields: used by upsert matching, not enforced on insert.
    system_duplicate_check_fields: list[str] = Field(default_factory=lambda: ["Name"])
    fields: list[FieldSpec]

    @model_validator(mode="after")
    def _names(self) -> ModuleSpec:
        names = [f.api_name for f in self.fields]
        if len(names) != len(set(names)):
            raise ValueError(f"module {self.api_name}: duplicate field api_name")
        return self


class TokenSpec(_Model):
    refresh_token: str
    # Scopes granted (e.g. "ZohoCRM.modules.ALL", "ZohoCRM.settings.fields.READ"); "*" grants
    # everything. Default: exactly the scopes the connector documents (README "Zoho scopes"),
    # so a call needing another scope fails here as it would on a real org.
    scopes: list[str] = Field(default_factory=lambda: list(REQUIRED_SCOPES))


class AuthConfig(_Model):
    client_id: str = "emulator-client-id"
    client_secret: str = "emulator-client-secret"
    refresh_tokens: list[TokenSpec] = Field(
        default_factory=lambda: [TokenSpec(refresh_token="emulator-refresh-token")]
    )
    grant_codes: list[str] = Field(default_factory=lambda: ["emulator-grant-code"])
    access_token_ttl: float = 3600.0
    # Accounts throttle: more than `throttle_max_tokens` access tokens from one refresh token
    # within `throttle_window` seconds is refused (reference §1.2; Zoho Accounts "Refresh access
    # token": up to ten access tokens in ten minutes, then creation is blocked for the rest of
    # the ten minutes). On by default, as on Zoho; tests that mint many tokens turn it off.
    throttle: bool = True
    throttle_max_tokens: int = 10
    throttle_window: float = 600.0
    accept_bearer: bool = False


class CreditsConfig(_Model):
    edition: Literal["free", "standard", "professional", "enterprise", "ultimate"] = "enterprise"
    users: int = 10
    addon_credits: int = 0
    window_seconds: float = 86_400.0
    concurrency: int | None = None  # None = the edition's limit
    sub_concurrency: int = 10
    # Credits per call by API name; "records" APIs cost ceil(n / records_per_credit).
    records_per_credit: int = 10
    costs: dict[str, int] = Field(
        default_factory=lambda: {
            "default": 1,
            "bulk_write_job": 500,
            # "All other APIs: 1" (Zoho API limits page): upload, job details and result
            # download are not listed, so they cost 1 each like any other call
            "bulk_upload": 1,
            "bulk_job_details": 1,
            "bulk_download": 1,
        }
    )


class BulkConfig(_Model):
    # Simulated-clock rows per second; 0 means a job completes as soon as it is looked at.
    rows_per_second: float = 0.0
    # Seconds a job stays ADDED before processing starts (simulated clock).
    queue_seconds: float = 0.0
    in_progress_status: str = "INPROGRESS"
    max_zip_bytes: int = 25 * 1024 * 1024
    max_rows: int = 25_000
    max_columns: int = 200
    # How long a result link works after the job ends: "up to 7 days" (crm-oas v8.0
    # bulk_write.yaml, zoho-crm-api.md §3.4; not in the human docs). Then 403 "Link not valid".
    result_link_ttl: float = 7 * 86_400.0
    # How long a finished job's details stay readable; then 404 RESOURCE_NOT_FOUND. Zoho does
    # not document job retention (UNCONFIRMED): the emulator forgets a job when its result link
    # expires, so a client must survive both.
    job_ttl: float = 7 * 86_400.0
    # Literals written to the result file's STATUS column. Zoho documents the meanings (added,
    # updated, skipped, left unprocessed; bulk-write download-result page) but not the
    # spellings (zoho-crm-api.md §3.4, UNCONFIRMED): tests change them to check the client.
    result_statuses: dict[str, str] = Field(
        default_factory=lambda: {
            "ADDED": "ADDED",
            "UPDATED": "UPDATED",
            "SKIPPED": "SKIPPED",
            "UNPROCESSED": "UNPROCESSED",
        }
    )
    callback_timeout: float = 5.0
    # Real seconds between two steps of the background job runner.
    tick_seconds: float = 0.05


class FaultConfig(_Model):
    error_rate: float = 0.0  # share of API calls answered 500 INTERNAL_ERROR
    latency: Literal["none", "fixed", "uniform", "exponential"] = "none"
    latency_ms: float = 0.0  # fixed value, uniform minimum, or exponential mean
    latency_max_ms: float = 0.0  # uniform maximum / exponential cap
    burst_429: int = 0  # the next N API calls are answered 429
    rate_429: float = 0.0  # share of API calls answered 429
    expire_tokens_after_calls: int = 0  # after N more API calls, all access tokens expire
    bulk_fail_next: int = 0  # the next N bulk jobs end FAILED
    bulk_fail_rate: float = 0.0
    skip_rows_field: str | None = None  # bulk rows whose field matches the pattern are skipped
    skip_rows_pattern: str | None = None
    # the next N bulk rows are left unprocessed (STATUS UNPROCESSED, nothing written), as
    # Zoho's result file can report (bulk-write download-result page: "unprocessed")
    unprocessed_rows_next: int = 0
    drop_callbacks: bool = False
    seed: int | None = None

    @model_validator(mode="after")
    def _latency_needs_a_model(self) -> FaultConfig:
        # a figure nobody reads is a silent no-op: say so instead
        if self.latency == "none" and (self.latency_ms or self.latency_max_ms):
            raise ValueError(
                "faults.latency_ms / latency_max_ms are set but faults.latency is 'none', so no "
                "latency would be added: set latency = 'fixed', 'uniform' or 'exponential'"
            )
        return self


class UserSpec(_Model):
    id: str = "4876876000000331001"
    name: str = "Emulator Bot"
    email: str = "emulatorbot@local.com"
    zuid: str = "700000001"


class EmulatorConfig(_Model):
    org_id: str = "emulator-org"
    # Base URLs the emulator advertises; None means the URL it is served on.
    api_domain: str | None = None
    accounts_url: str | None = None
    upload_url: str | None = None
    download_url: str | None = None
    # When true, a request must arrive on the host of its base URL (data-centre routing tests).
    strict_hosts: bool = False
    timezone_offset: str = "+00:00"
    strict_picklists: bool = True
    # Emit details.maximum_length as a string (Zoho's OAS types it string); false = integer.
    maximum_length_as_string: bool = True
    # How far paging reaches (reference §2.6): Get Records with page_token refuses a page that
    # starts at or beyond this many records (400 PAGINATION_LIMIT_EXCEEDED); COQL refuses
    # ``limit offset, n`` with offset + n above it (400 LIMIT_EXCEEDED). Zoho's value is 100,000;
    # tests lower it instead of creating 100,001 records.
    pagination_limit: int = Field(default=100_000, ge=1)
    user: UserSpec = Field(default_factory=UserSpec)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    credits: CreditsConfig = Field(default_factory=CreditsConfig)
    bulk: BulkConfig = Field(default_factory=BulkConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    modules: list[ModuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lookup_targets(self) -> EmulatorConfig:
        names = {m.api_name for m in self.modules}
        for m in self.modules:
            for f in m.fields:
                if f.lookup_module is not None and f.lookup_module not in names:
                    raise ValueError(
                        f"module {m.api_name}: lookup field {f.api_name} points to module"
                        f" {f.lookup_module!r}, which is not configured"
                    )
                if f.data_type == "subform" and (f.subform_module or f.api_name) in names:
                    raise ValueError(
                        f"module {m.api_name}: subform field {f.api_name}'s subform module has"
                        " the name of a configured module"
                    )
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> EmulatorConfig:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulatorConfig:
        return cls.model_validate(data)

    @classmethod
    def default(cls) -> EmulatorConfig:
        return cls.from_toml(Path(__file__).with_name("default.toml"))

    def module(self, api_name: str) -> ModuleSpec | None:
        for m in self.modules:
            if m.api_name == api_name:
                return m
        return None

    def subform_module(self, api_name: str) -> ModuleSpec | None:
        """The subform module ``api_name`` (a subform field's ``subform.module``) as a module of
        its row fields: Zoho serves its field metadata at ``settings/fields?module=<subform
        module>`` ("The Field API names of the individual fields in a subform can be acquired
        using Fields Metadata API, with the request URL as fields?module={Sub_form_api_name}",
        Subform API, zoho.com/crm/developer/docs/api/v2/subforms.html)."""
        for m in self.modules:
            for f in m.fields:
                if f.data_type == "subform" and (f.subform_module or f.api_name) == api_name:
                    return ModuleSpec(
                        api_name=api_name,
                        system_duplicate_check_fields=[],
                        fields=f.subform_fields,
                    )
        return None
