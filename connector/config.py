"""Typed configuration from a TOML file plus the environment, validated with clear errors.

Secrets (client secret, refresh token, database password) are never written in the file: the
file names an environment variable (``*_env``) or a file (``*_file``) that holds them. Every
mistake is reported as ``ConfigError(key, message)`` naming the dotted key, the bad value and
what was expected; ``connector config check FILE`` prints it and exits 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from connector.config_relations import (
    check_lookups,
    check_subforms,
    fill_subform_modules,
)
from connector.config_secrets import Secrets, check_dsn, redact, resolve_secret
from connector.errors import ConfigError
from connector.zoho_hosts import DATA_CENTRES, EDITION_CONCURRENCY, UPLOAD_HOSTS

CrmType = Literal[
    "text",
    "textarea",
    "email",
    "phone",
    "url",
    "picklist",
    "multiselectpicklist",
    "integer",
    "bigint",
    "decimal",
    "currency",
    "double",
    "percent",
    "boolean",
    "date",
    "datetime",
    "lookup",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_IDENT = re.compile(r"^[^\x00]{1,63}$")


def parse_duration(value: Any) -> timedelta:
    """'10m', '30s', '1.5h', '500ms', or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '10m', '30s' or '1h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a non-negative duration")
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"expected a duration such as '10m', '30s' or '1h', got {value!r}")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CrmConfig(_Strict):
    data_centre: Literal["us", "eu", "in", "au", "cn", "jp", "ca", "sa", "custom"] = "us"
    accounts_url: str | None = None
    api_url: str | None = None
    upload_url: str | None = None
    client_id: str = Field(min_length=1)
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    refresh_token_env: str | None = None
    refresh_token_file: str | None = None
    org_id: str | None = None
    edition: Literal[
        "free",
        "standard",
        "starter",
        "professional",
        "enterprise",
        "zoho_one",
        "ultimate",
        "crm_plus",
    ] = "enterprise"
    max_concurrency: int | None = Field(default=None, ge=1, le=25)
    daily_credit_budget: int = Field(default=50_000, ge=500)
    credit_reserve: int = Field(default=1_000, ge=0)
    request_timeout: Duration = timedelta(seconds=60)
    # access tokens this connector may create per 10 minutes (Zoho allows 10 per refresh token
    # and then blocks creation for the rest of the window; docs/zoho-client.md)
    token_budget: int = Field(default=5, ge=1, le=10)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for bad in ("client_secret", "refresh_token", "access_token"):
                if bad in data:
                    raise ValueError(
                        f"{bad} must not be written in the file; use {bad}_env or {bad}_file"
                        if bad != "access_token"
                        else "access_token must not be configured; it is obtained by refresh"
                    )
        return data

    @model_validator(mode="after")
    def _check(self) -> CrmConfig:
        if self.data_centre == "custom" and not (self.accounts_url and self.api_url):
            raise ValueError("data_centre 'custom' needs accounts_url and api_url")
        if self.credit_reserve >= self.daily_credit_budget:
            raise ValueError("credit_reserve must be below daily_credit_budget")
        for name in ("accounts_url", "api_url", "upload_url"):
            url = getattr(self, name)
            if url is not None and not re.match(r"^https?://[^\s/]+", url):
                raise ValueError(f"{name} must be an http(s) URL, got {url!r}")
        if not (self.client_secret_env or self.client_secret_file):
            raise ValueError("set client_secret_env or client_secret_file")
        if not (self.refresh_token_env or self.refresh_token_file):
            raise ValueError("set refresh_token_env or refresh_token_file")
        return self

    @property
    def resolved_accounts_url(self) -> str:
        return (self.accounts_url or DATA_CENTRES[self.data_centre][0]).rstrip("/")

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or DATA_CENTRES[self.data_centre][1]).rstrip("/")

    @property
    def resolved_upload_url(self) -> str:
        if self.upload_url:
            return self.upload_url.rstrip("/")
        if self.data_centre == "custom":
            return self.resolved_api_url
        return UPLOAD_HOSTS[self.data_centre]

    @property
    def concurrency(self) -> int:
        return self.max_concurrency or EDITION_CONCURRENCY[self.edition]


class DatabaseConfig(_Strict):
    dsn: str | None = None
    dsn_env: str | None = None
    state_dsn: str | None = None
    state_dsn_env: str | None = None
    state_schema: str = "connector"
    pool_size: int = Field(default=8, ge=2, le=100)

    @field_validator("dsn", "state_dsn")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v is not None and re.search(r"(:[^:@/]+@)|password=", v):
            raise ValueError(
                "the DSN holds a password; put it in dsn_env, PGPASSWORD or ~/.pgpass instead"
            )
        if v is not None:
            check_dsn(v)
        return v

    @field_validator("state_schema")
    @classmethod
    def _schema_name(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError("expected a schema name of 1 to 63 characters")
        return v

    @model_validator(mode="after")
    def _check(self) -> DatabaseConfig:
        if not (self.dsn or self.dsn_env):
            raise ValueError("set dsn or dsn_env")
        return self


class FieldMapping(_Strict):
    field: str = Field(min_length=1)
    type: CrmType = "text"
    # type "lookup": the pipeline whose records the column's value (the parent's legacy key)
    # points to (docs/related-tables.md)
    pipeline: str | None = None

    @model_validator(mode="after")
    def _lookup(self) -> FieldMapping:
        if self.type == "lookup" and not self.pipeline:
            raise ValueError(
                "type 'lookup' needs pipeline = the name of the parent pipeline whose legacy"
                " key this column holds"
            )
        if self.pipeline is not None and self.type != "lookup":
            raise ValueError(f"pipeline is only for type 'lookup' (this field is {self.type!r})")
        return self


class SubformOf(_Strict):
    """``subform_of = { pipeline = "orders", field = "Lines", parent_column = "order_id" }``:
    this pipeline's rows are the rows of subform field ``field`` of the records that pipeline
    ``pipeline`` writes; ``parent_column`` holds the parent's legacy key (the link, not a row
    field). docs/related-tables.md, "Subforms"."""

    pipeline: str = Field(min_length=1)
    field: str = Field(min_length=1)
    parent_column: str = Field(min_length=1)


def _mapping(v: Any) -> Any:
    if isinstance(v, str):
        return {"field": v}
    return v


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    source_table: str = Field(min_length=1)
    key_column: str = Field(min_length=1)
    module: str = Field(min_length=1)
    key_field: str = "parent_id"
    capture: Literal["triggers", "logical"] = "triggers"
    max_staleness: Duration = timedelta(minutes=10)
    # the planner's dial (docs/planner.md): economy = fewest credits, every change leaves at its
    # latest moment; balanced = beats "100 or 10 min" on credits and latency (80 pending leave
    # together, none older than max_staleness/5); fast = changes leave once 2 s old
    freshness: Literal["economy", "balanced", "fast"] = "economy"
    # the time each CRM call may spend in 429/5xx retries, kept inside max_staleness: the
    # planner sends that much earlier (docs/planner.md, "margin"); 0 = no retry budget
    retry_allowance: Duration = timedelta(0)
    daily_credit_budget: int | None = Field(default=None, ge=500)
    delete_mode: Literal["delete", "mark", "ignore"] = "delete"
    delete_mark_field: str | None = None
    # TRUNCATE of the source table: "hold" keeps the CRM records and raises it (status, metric,
    # alert, log) until `verify --repair`; "propagate" applies delete_mode to every known key
    on_truncate: Literal["hold", "propagate"] = "hold"
    ignore_columns: tuple[str, ...] = ()
    sync_flag_column: str | None = None
    snapshot_chunk_size: int = Field(default=25_000, ge=1, le=25_000)
    snapshot: Literal["auto", "never"] = "auto"
    retention: Duration = timedelta(days=7)
    # logical capture only: tag the connector's own outbox writes with a replication origin so
    # that the walsender skips them before decoding (PostgreSQL 16+, optional GRANTs). Off by
    # default: pgoutput's ``origin 'none'`` drops *every* change that carries an origin, so it
    # is only safe when nothing else writes the source database under a replication origin
    # (no logical-replication subscription into it); see docs/capture-logical.md
    filter_own_writes: bool = False
    # Zoho automations the connector's record writes run (Upsert's ``trigger``; Delete's
    # ``wf_trigger`` is true when "workflow" is listed). Zoho runs every workflow, approval and
    # blueprint when ``trigger`` is omitted and none for ``[]``; the default [] keeps replayed
    # legacy changes from firing automations (mails, approval locks) on every synced write.
    triggers: tuple[
        Literal["workflow", "approval", "blueprint", "pathfinder", "orchestration"], ...
    ] = ()
    # bulk CSV date/time cells (docs/zoho-client.md "Fidelity"): "iso8601" = ISO 8601 with the
    # offset, no format declared (Zoho's Kaizen #13); "MM/dd/yyyy HH:mm:ss" = Zoho's default
    # pattern, offset-less, written in bulk_timezone (set it to the CRM user's time zone)
    bulk_datetime_format: Literal["iso8601", "MM/dd/yyyy HH:mm:ss"] = "iso8601"
    bulk_timezone: str = "UTC"
    fields: dict[str, Annotated[FieldMapping, BeforeValidator(_mapping)]]
    # this pipeline's rows are rows of a subform of another pipeline's records (issue 21)
    subform_of: SubformOf | None = None

    @field_validator("source_table")
    @classmethod
    def _table(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) > 2 or not all(parts) or not all(_IDENT.match(p) for p in parts):
            raise ValueError(f"expected 'table' or 'schema.table', got {v!r}")
        return v

    @field_validator("bulk_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"expected an IANA time zone such as 'Europe/Berlin' or 'UTC', got {v!r}"
            ) from None
        return v

    @field_validator("max_staleness")
    @classmethod
    def _staleness(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1) or v > timedelta(days=1):
            raise ValueError("expected a duration between 1s and 24h")
        return v

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.fields:
            raise ValueError("fields must map at least one column to a CRM field")
        crm_fields = [m.field for m in self.fields.values()]
        dup = {f for f in crm_fields if crm_fields.count(f) > 1}
        if dup:
            raise ValueError(f"CRM field(s) mapped twice: {', '.join(sorted(dup))}")
        if self.key_field in crm_fields:
            raise ValueError(
                f"key_field {self.key_field!r} is filled from key_column; do not map it in fields"
            )
        if self.retry_allowance < timedelta(0) or self.retry_allowance * 2 > self.max_staleness:
            raise ValueError(
                f"retry_allowance {self.retry_allowance} must be between 0 and half of "
                f"max_staleness ({self.max_staleness}): lower retry_allowance or raise "
                "max_staleness"
            )
        if self.delete_mode == "mark" and not self.delete_mark_field:
            raise ValueError("delete_mode 'mark' needs delete_mark_field")
        if self.sync_flag_column and self.sync_flag_column in self.fields:
            raise ValueError("sync_flag_column must not be a mapped column")
        if self.sync_flag_column and self.sync_flag_column not in self.ignore_columns:
            object.__setattr__(
                self, "ignore_columns", (*self.ignore_columns, self.sync_flag_column)
            )
        return self

    @property
    def table_parts(self) -> tuple[str, str]:
        if "." in self.source_table:
            schema, table = self.source_table.split(".", 1)
            return schema, table
        return "public", self.source_table


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)
    public_url: str | None = None  # base URL the CRM can reach for bulk callbacks
    drain_timeout: Duration = timedelta(seconds=30)


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(_Strict):
    crm: CrmConfig
    database: DatabaseConfig
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    pipelines: list[PipelineConfig] = Field(min_length=1)

    @field_validator("pipelines")
    @classmethod
    def _unique(cls, pipelines: list[PipelineConfig]) -> list[PipelineConfig]:
        names = [p.name for p in pipelines]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"duplicate pipeline name {n!r}")
        return pipelines

    @model_validator(mode="before")
    @classmethod
    def _subform_module(cls, data: Any) -> Any:
        return fill_subform_modules(data)

    @model_validator(mode="after")
    def _lookups(self) -> Settings:
        check_subforms(self.pipelines)
        check_lookups(self.pipelines)
        return self

    def pipeline(self, name: str) -> PipelineConfig:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise ConfigError(
            "--pipeline", f"no pipeline named {name!r}; have {[p.name for p in self.pipelines]}"
        )


def _loc(loc: tuple[int | str, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1] = (
                f"{parts[-1]}[{name!r}]"
                if name and parts
                else f"{parts[-1] if parts else ''}[{item}]"
            )
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(p for p in parts if p) or "<root>"


def _describe(err: Any, data: Any) -> ConfigError:
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    key = _loc(loc, data)
    etype = err["type"]
    msg = err["msg"]
    if etype == "extra_forbidden":
        return ConfigError(key, "unknown key (check the spelling; see docs/configuration.md)")
    if etype == "missing":
        return ConfigError(key, "required key is missing")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    shown = (
        ""
        if isinstance(given, dict | list) or given is None or "dsn" in key or "got " in msg
        else f" (got {redact(repr(given))})"
    )
    return ConfigError(key, f"{redact(msg)}{shown}")


def parse_settings(data: dict[str, Any]) -> Settings:
    """Validated settings, or one ``ConfigError`` listing every mistake (one per line)."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e, data) for e in exc.errors()]
        _hint_misspellings(errors)
        first, rest = errors[0], errors[1:]
        if not rest:
            raise first from None
        more = "".join(f"\n  {e}" for e in rest)
        raise ConfigError(first.key, f"{str(first).removeprefix(first.key + ': ')}{more}") from None


def _hint_misspellings(errors: list[ConfigError]) -> None:
    """A missing key next to an unknown one spelled alike (``[databse]``): say so on both."""
    import difflib

    missing = [e.key for e in errors if str(e).endswith("required key is missing")]
    for i, e in enumerate(errors):
        if "unknown key" not in str(e):
            continue
        parent, _, leaf = e.key.rpartition(".")
        alike = [m for m in missing if m.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, [m.rpartition(".")[2] for m in alike], n=1)
        if close:
            errors[i] = ConfigError(
                e.key, f"unknown key; did you mean {close[0]!r}? (see docs/configuration.md)"
            )
            for j, m in enumerate(errors):
                if m.key == (f"{parent}.{close[0]}" if parent else close[0]) and j != i:
                    errors[j] = ConfigError(
                        m.key, f"required key is missing (is {leaf!r} a misspelling of it?)"
                    )


def load_settings(path: str | Path) -> Settings:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse_settings(data)


def resolve_secrets(
    settings: Settings, environ: dict[str, str] | None = None, *, crm_secrets: bool = True
) -> Secrets:
    """The secrets the configuration names. ``crm_secrets=False`` (verbs that only touch the
    database: ``init``, ``uninstall``, ``status``, ``dead-letters``) leaves the Zoho client
    secret and refresh token unresolved (empty), so a DBA needs only the database's."""
    env = dict(os.environ if environ is None else environ)
    crm = settings.crm
    if crm_secrets:
        client_secret = resolve_secret(
            crm.client_secret_env, crm.client_secret_file, "crm.client_secret", env
        )
        refresh = resolve_secret(
            crm.refresh_token_env, crm.refresh_token_file, "crm.refresh_token", env
        )
    else:
        client_secret = refresh = SecretStr("")
    db = settings.database
    if db.dsn_env:
        dsn = env.get(db.dsn_env)
        if not dsn:
            raise ConfigError(
                "database.dsn_env", f"environment variable {db.dsn_env} is not set or empty"
            )
    else:
        assert db.dsn is not None
        dsn = db.dsn
    if db.state_dsn_env:
        state = env.get(db.state_dsn_env)
        if not state:
            raise ConfigError(
                "database.state_dsn_env",
                f"environment variable {db.state_dsn_env} is not set or empty",
            )
    else:
        state = db.state_dsn or dsn
    for key, value in (("database.dsn_env", dsn), ("database.state_dsn_env", state)):
        if (key == "database.dsn_env" and db.dsn_env) or (
            key == "database.state_dsn_env" and db.state_dsn_env
        ):
            try:
                check_dsn(value)
            except ValueError as exc:
                raise ConfigError(key, f"the DSN in that variable is {exc}") from None
    return Secrets(client_secret, refresh, dsn, state)
