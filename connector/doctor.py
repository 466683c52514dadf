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

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import psycopg

from connector import db
from connector.config import PipelineConfig, Secrets, Settings
from connector.errors import ConfigError, ConnectorError, DataError, TransientError
from connector.mapping import RecordMapper, check_mapping
from connector.zoho import coql
from connector.zoho.auth import PgTokenStore
from connector.zoho.bulk import build_bulk_zip, parse_result_zip
from connector.zoho.client import FieldMeta, ZohoClient

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "skip"]
DEFAULT_PROBE_KEY = "__connector_probe__"

#: PostgreSQL type categories (pg_type.typcategory) a column may have for each CRM type.
#: Text-like CRM fields take any value's text; the others need a column that holds that kind.
_CATEGORIES: dict[str, frozenset[str]] = {
    "multiselectpicklist": frozenset({"A", "S"}),
    "integer": frozenset({"N"}),
    "bigint": frozenset({"N"}),
    "decimal": frozenset({"N"}),
    "double": frozenset({"N"}),
    "currency": frozenset({"N"}),
    "percent": frozenset({"N"}),
    "boolean": frozenset({"B"}),
    "date": frozenset({"D"}),
    "datetime": frozenset({"D"}),
}


@dataclasses.dataclass
class Check:
    area: str  # "database" | "crm" | "roundtrip"
    name: str
    status: Status
    detail: str
    fix: str = ""
    pipeline: str | None = None

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[self.status]
        where = f"[{self.pipeline}] " if self.pipeline else ""
        text = f"{mark} {self.area}.{self.name}: {where}{self.detail}"
        if self.fix and self.status in ("fail", "warn"):
            text += f"\n       fix: {self.fix}"
        return text


@dataclasses.dataclass
class DoctorReport:
    checks: list[Check] = dataclasses.field(default_factory=list)
    credits_spent: int = 0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "failed": len(self.failed),
            "credits_spent": self.credits_spent,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }

    def text(self) -> str:
        lines = [c.line() for c in self.checks]
        n_fail = len(self.failed)
        n_warn = sum(1 for c in self.checks if c.status == "warn")
        lines.append(
            f"{len(self.checks)} checks: {len(self.checks) - n_fail - n_warn} ok, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''}, {n_fail} failed; "
            f"{self.credits_spent} CRM credit{'s' if self.credits_spent != 1 else ''} spent"
        )
        return "\n".join(lines)


# ---- database ---------------------------------------------------------------------------------


async def _fetchone(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def database_checks(
    settings: Settings, secrets: Secrets, pipelines: list[PipelineConfig]
) -> list[Check]:
    out: list[Check] = []
    schema = settings.database.state_schema
    try:
        conn = await psycopg.AsyncConnection.connect(
            secrets.dsn, autocommit=True, connect_timeout=10
        )
    except psycopg.Error as exc:
        out.append(
            Check(
                "database",
                "reachable",
                "fail",
                f"cannot connect: {_first_line(exc)}",
                "check database.dsn / database.dsn_env (host, port, user, password, dbname) "
                "and that the server accepts connections from this host (pg_hba.conf)",
            )
        )
        return out
    async with conn:
        await conn.execute("SET default_transaction_read_only = on")
        row = await _fetchone(conn, "SELECT current_user, current_setting('server_version')")
        out.append(
            Check("database", "reachable", "ok", f"connected as {row[0]} (PostgreSQL {row[1]})")
        )
        out.append(await _state_schema(conn, schema))
        wal = (await _fetchone(conn, "SELECT current_setting('wal_level')"))[0]
        for p in pipelines:
            out.extend(await _pipeline_db_checks(conn, schema, p, wal))
    return out


async def _state_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> Check:
    latest = max((m.version for m in db.migrations()), default=0)
    exists = await _fetchone(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    if exists is None:
        return Check(
            "database",
            "state_schema",
            "fail",
            f"state schema {schema!r} does not exist",
            "run `connector init --config FILE` (creates the schema and installs capture)",
        )
    try:
        version = await db.schema_version(conn, schema)
    except psycopg.Error as exc:
        return Check(
            "database",
            "state_schema",
            "fail",
            f"cannot read the state schema's version: {_first_line(exc)}",
            "run `connector init`; check the role's USAGE on the state schema",
        )
    if version < latest:
        return Check(
            "database",
            "state_schema",
            "fail",
            f"state schema {schema!r} is at version {version}, this connector needs {latest}",
            "run `connector init` to migrate it",
        )
    return Check("database", "state_schema", "ok", f"state schema {schema!r} at version {version}")


async def _pipeline_db_checks(
    conn: psycopg.AsyncConnection[Any], schema: str, p: PipelineConfig, wal: str
) -> list[Check]:
    out: list[Check] = []

    def add(name: str, status: Status, detail: str, fix: str = "") -> None:
        out.append(Check("database", name, status, detail, fix, p.name))

    tschema, tname = p.table_parts
    row = await _fetchone(
        conn,
        "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (tschema, tname),
    )
    if row is None:
        add(
            "table",
            "fail",
            f"table {p.source_table!r} does not exist (or this role cannot see it)",
            f"fix pipelines[{p.name!r}].source_table (schema.table)",
        )
        return out
    relid, replident = row
    cur = await conn.execute(
        "SELECT a.attname, t.typname, t.typcategory FROM pg_attribute a"
        " JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (relid,),
    )
    columns = {name: (typname, cat) for name, typname, cat in await cur.fetchall()}
    problems: list[tuple[str, str]] = []
    if p.key_column not in columns:
        problems.append(
            (f"pipelines[{p.name!r}].key_column", f"column {p.key_column!r} does not exist")
        )
    for column, m in p.fields.items():
        key = f"pipelines[{p.name!r}].fields.{column}"
        if column not in columns:
            problems.append((key, f"column {column!r} does not exist"))
            continue
        typname, cat = columns[column]
        allowed = _CATEGORIES.get(m.type)
        if allowed is not None and cat not in allowed:
            problems.append(
                (key, f"column {column!r} is {typname}, which cannot become a {m.type} field")
            )
    if problems:
        for key, what in problems:
            add("columns", "fail", f"{p.source_table}: {what}", f"fix {key} in the configuration")
    else:
        add(
            "columns",
            "ok",
            f"{p.source_table}: key {p.key_column!r} and {len(p.fields)} mapped column"
            f"{'s' if len(p.fields) != 1 else ''} present with compatible types",
        )

    select = (await _fetchone(conn, "SELECT has_table_privilege(%s, 'SELECT')", (relid,)))[0]
    if not select:
        add(
            "privileges",
            "fail",
            f"this role lacks SELECT on {p.source_table}",
            f"GRANT SELECT ON {p.source_table} TO <connector role> (docs/security.md)",
        )
    if p.capture == "triggers":
        trig = (await _fetchone(conn, "SELECT has_table_privilege(%s, 'TRIGGER')", (relid,)))[0]
        if not trig:
            add(
                "privileges",
                "fail",
                f"this role lacks TRIGGER on {p.source_table} (needed by `connector init`)",
                f"GRANT TRIGGER ON {p.source_table} TO <connector role>, or run `init` as the "
                "table's owner (docs/security.md)",
            )
        elif select:
            add("privileges", "ok", "SELECT and TRIGGER on the source table")
        from connector.capture import triggers

        installed = await triggers.is_installed(conn, schema, p)
        add(
            "capture",
            "ok" if installed else "fail",
            "capture trigger installed and enabled"
            if installed
            else "capture trigger is not installed (or disabled)",
            "run `connector init` (it installs the trigger)",
        )
        if installed:
            names = [triggers.trigger_name(schema, p), triggers.truncate_trigger_name(schema, p)]
            cur = await conn.execute(
                "SELECT tgname FROM pg_catalog.pg_trigger WHERE tgrelid = %s"
                " AND tgname = ANY(%s) AND tgenabled <> 'A'",
                (relid, names),
            )
            ordinary = [str(r[0]) for r in await cur.fetchall()]
            if ordinary:
                add(
                    "trigger_firing",
                    "warn",
                    f"trigger(s) {', '.join(ordinary)} do not fire for writes under "
                    "session_replication_role = replica (replication apply workers, restores)",
                    "as the table's owner: "
                    + "; ".join(
                        f"ALTER TABLE {p.source_table} ENABLE ALWAYS TRIGGER {t}" for t in ordinary
                    ),
                )
            else:
                add("trigger_firing", "ok", "capture fires under every session_replication_role")
    else:
        repl = (
            await _fetchone(
                conn,
                "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            )
        )[0]
        if not repl:
            add(
                "privileges",
                "fail",
                "this role has no REPLICATION attribute (needed for capture = 'logical')",
                "ALTER ROLE <connector role> REPLICATION, or use capture = 'triggers'",
            )
        elif select:
            add("privileges", "ok", "SELECT on the source table and REPLICATION")
        if wal != "logical":
            add(
                "wal_level",
                "fail",
                f"wal_level is {wal!r}; capture = 'logical' needs 'logical'",
                "set wal_level = logical in postgresql.conf and restart PostgreSQL, or use "
                "capture = 'triggers'",
            )
        else:
            add("wal_level", "ok", "wal_level = logical")
        deferrable_pk = replident == "d" and await _fetchone(
            conn,
            "SELECT 1 FROM pg_index WHERE indrelid = %s AND indisprimary AND NOT indimmediate",
            (relid,),
        )
        if deferrable_pk:
            # PostgreSQL does not use a DEFERRABLE primary key as replica identity: with the
            # publication, every UPDATE/DELETE of the application fails (capture-logical.md)
            add(
                "replica_identity",
                "fail",
                f"{p.source_table} has a DEFERRABLE primary key, which PostgreSQL does not use "
                "as replica identity: with the publication every UPDATE and DELETE would fail",
                f"create an immediate unique index on {p.key_column!r} and ALTER TABLE "
                f"{p.source_table} REPLICA IDENTITY USING INDEX <it>, or REPLICA IDENTITY FULL, "
                "or use capture = 'triggers'",
            )
        elif replident == "n":
            add(
                "replica_identity",
                "fail",
                f"{p.source_table} has REPLICA IDENTITY NOTHING: deletes would carry no key",
                f"ALTER TABLE {p.source_table} REPLICA IDENTITY DEFAULT (with a primary key) "
                "or USING INDEX <unique index>",
            )
        else:
            add(
                "replica_identity", "ok", f"replica identity {_REPLIDENT.get(replident, replident)}"
            )
        from connector.capture import logical

        slot = await logical.slot_status(conn, schema, p)
        pub = await _fetchone(
            conn,
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s"
            " AND tablename = %s",
            (logical.object_name(schema, p.name), tschema, tname),
        )
        if slot is None or pub is None:
            missing = " and ".join(
                w for w, gone in (("slot", slot is None), ("publication", pub is None)) if gone
            )
            add(
                "capture",
                "fail",
                f"replication {missing} missing",
                "run `connector init` (it creates the publication and the slot)",
            )
        else:
            add(
                "capture",
                "ok",
                f"slot {slot.slot_name} ({'active' if slot.active else 'inactive'}) and "
                "publication present",
            )
    return out


_REPLIDENT = {"d": "DEFAULT (primary key)", "i": "USING INDEX", "f": "FULL", "n": "NOTHING"}


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
            await check_mapping(_Fields(fields), p)
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


# ---- round trip -------------------------------------------------------------------------------


def probe_row(p: PipelineConfig, metas: list[FieldMeta], probe_key: str) -> dict[str, Any]:
    """A source row image with a value for every mapped field type (as ``to_jsonb`` gives)."""
    by_name = {m.api_name: m for m in metas}
    row: dict[str, Any] = {p.key_column: probe_key}
    for column, m in p.fields.items():
        meta = by_name.get(m.field)
        row[column] = _probe_value(m.type, meta)
    return row


def _probe_value(crm_type: str, meta: FieldMeta | None) -> Any:
    limit = meta.length if meta and meta.length else 255
    if crm_type == "picklist":
        values = [v for v in (meta.picklist_values if meta else ()) if v != "-None-"]
        return values[0] if values else "connector probe"
    if crm_type == "multiselectpicklist":
        values = [v for v in (meta.picklist_values if meta else ()) if v != "-None-"]
        return values[:2]
    samples: dict[str, Any] = {
        "text": "connector probe — ünïcødé ✓",
        "textarea": "connector probe\nsecond line — ünïcødé ✓",
        "email": "connector.probe@example.com",
        "phone": "+1 555 0100",
        "url": "https://example.com/connector-probe",
        "integer": 42,
        "bigint": "9007199254740993",
        "decimal": Decimal("1234.5"),
        "double": Decimal("1234.5"),
        "currency": Decimal("1234.56"),
        "percent": Decimal("12.5"),
        "boolean": True,
        "date": "2024-02-29",
        "datetime": "2024-02-29T13:45:30+05:30",
    }
    value = samples.get(crm_type, "connector probe")
    if isinstance(value, str) and crm_type in ("text", "textarea"):
        value = value[:limit]
    return value


def compare(crm_type: str, sent: Any, got: Any) -> str | None:
    """None when the CRM holds the value sent, else what differs (values are the probe's own)."""
    if sent is None:
        return None if got in (None, "") else f"expected empty, got {got!r}"
    try:
        if crm_type in ("integer", "bigint", "decimal", "double", "currency", "percent"):
            if got is None or Decimal(str(got)) != Decimal(str(sent)):
                return f"sent {sent}, read back {got!r}"
            return None
        if crm_type == "boolean":
            return None if got is sent or got == sent else f"sent {sent}, read back {got!r}"
        if crm_type == "datetime":
            a = datetime.fromisoformat(str(sent))
            b = datetime.fromisoformat(str(got))
            if a != b:
                return f"sent {sent}, read back {got!r} (a different instant)"
            return None
        if crm_type == "date":
            return None if str(got) == str(sent) else f"sent {sent}, read back {got!r}"
        if crm_type == "multiselectpicklist":
            return None if sorted(got or []) == sorted(sent) else f"sent {sent}, got {got!r}"
    except (InvalidOperation, ValueError, TypeError):
        return f"sent {sent!r}, read back {got!r} (not comparable)"
    return None if got == sent else f"sent {sent!r}, read back {got!r}"


async def roundtrip_checks(
    client: ZohoClient,
    p: PipelineConfig,
    metas: list[FieldMeta],
    *,
    probe_key: str,
    bulk: bool,
    naive_timezone: tzinfo = UTC,
) -> list[Check]:
    out: list[Check] = []
    mapper = RecordMapper(p, naive_timezone=naive_timezone)
    row = probe_row(p, metas, probe_key)
    try:
        record = mapper.to_json(row)
    except DataError as exc:
        return [
            Check("roundtrip", "upsert", "fail", f"probe row not convertible: {exc}", "", p.name)
        ]
    out.append(await _upsert_roundtrip(client, p, mapper, record, probe_key))
    if bulk:
        out.append(await _bulk_roundtrip(client, p, mapper, row, record, probe_key))
    else:
        out.append(
            Check(
                "roundtrip",
                "bulk",
                "skip",
                "Bulk Write round trip not run (costs one bulk job, 500 credits): add --bulk",
                "",
                p.name,
            )
        )
    return out


async def _find(client: ZohoClient, p: PipelineConfig, probe_key: str) -> dict[str, Any] | None:
    fields = ["id", p.key_field, *[m.field for m in p.fields.values()]]
    rows = await client.coql(
        coql.select(p.module, fields, where=coql.equals(p.key_field, probe_key), limit=1)
    )
    return rows[0] if rows else None


def _differences(p: PipelineConfig, record: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    out = []
    for m in p.fields.values():
        diff = compare(m.type, record.get(m.field), got.get(m.field))
        if diff:
            out.append(f"{m.field} ({m.type}): {diff}")
    return out


async def _upsert_roundtrip(
    client: ZohoClient,
    p: PipelineConfig,
    mapper: RecordMapper,
    record: dict[str, Any],
    probe_key: str,
) -> Check:
    def check(status: Status, detail: str, fix: str = "") -> Check:
        return Check("roundtrip", "upsert", status, detail, fix, p.name)

    try:
        results = await client.upsert(p.module, [record], duplicate_check_fields=[p.key_field])
    except ConnectorError as exc:
        return check("fail", f"probe upsert failed: {exc}", "see the message; check the scopes")
    res = results[0]
    if not res.ok:
        return check(
            "fail",
            f"the CRM rejected the probe record: {res.code} on {res.field or '?'}: {res.message}",
            f"fix the mapping of {res.field or 'the field'} (pipelines[{p.name!r}].fields)",
        )
    try:
        got = await _find(client, p, probe_key)
        if got is None:
            return check("fail", "the probe record was written but cannot be read back by key")
        diffs = _differences(p, record, got)
    except coql.CoqlValueError as exc:
        return check("fail", f"the probe key cannot be read back: {exc}", "choose --probe-key")
    finally:
        if res.id:
            with contextlib.suppress(ConnectorError):
                await client.delete(p.module, [res.id])
    if diffs:
        return check(
            "fail",
            "the CRM holds different values: " + "; ".join(diffs),
            "check the field types in the mapping and the org's time zone/currency settings",
        )
    types = ", ".join(sorted({m.type for m in p.fields.values()}))
    return check(
        "ok",
        f"probe record written by Upsert, read back equal on {len(p.fields)} field"
        f"{'s' if len(p.fields) != 1 else ''} ({types}), "
        "deleted",
    )


async def _bulk_roundtrip(  # noqa: PLR0917
    client: ZohoClient,
    p: PipelineConfig,
    mapper: RecordMapper,
    row: dict[str, Any],
    record: dict[str, Any],
    probe_key: str,
) -> Check:
    def check(status: Status, detail: str, fix: str = "") -> Check:
        return Check("roundtrip", "bulk", status, detail, fix, p.name)

    try:
        zipped = build_bulk_zip(mapper.csv_header(), [mapper.to_csv_values(row)])
        file_id = await client.upload_bulk_file(zipped)
        job_id = await client.create_bulk_job(
            p.module,
            file_id,
            operation="upsert",
            find_by=p.key_field,
            field_mappings=mapper.field_mappings(),
        )
        job = await client.wait_bulk_job(job_id, poll_initial=1.0, poll_max=10.0, timeout=900)
    except (ConnectorError, DataError) as exc:
        return check(
            "fail",
            f"bulk write of the probe failed: {exc}",
            "check ZohoCRM.bulk.ALL "
            "and ZohoFiles.files.ALL scopes and the upload host (crm.data_centre)",
        )
    if str(job.status) != "COMPLETED":
        return check("fail", f"bulk job {job_id} ended {job.status}")
    try:
        results = parse_result_zip(await client.download_bulk_result(job), p.key_field)
    except ConnectorError as exc:
        return check("fail", f"cannot download the bulk result: {exc}")
    errors = [r for r in results if not r.ok]
    record_id: str | None = None
    with contextlib.suppress(ConnectorError):
        got = await _find(client, p, probe_key)
        record_id = str(got["id"]) if got else None
    try:
        if errors:
            r = errors[0]
            return check(
                "fail",
                f"the CRM rejected the probe row in the bulk file: {r.code} on "
                f"{r.field or '?'}: {r.message}",
                "a date/time format this org refuses: see docs/zoho-client.md (bulk formats)",
            )
        if got is None:
            return check("fail", "the bulk job completed but the probe cannot be read back")
        diffs = _differences(p, record, got)
        if diffs:
            return check(
                "fail",
                "the CRM holds different values after Bulk Write: " + "; ".join(diffs),
                "the bulk CSV date/time format or time zone differs from the org's: see "
                "docs/zoho-client.md",
            )
        return check("ok", f"probe written by Bulk Write (job {job_id}), read back equal, deleted")
    finally:
        if record_id:
            with contextlib.suppress(ConnectorError):
                await client.delete(p.module, [record_id])


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


__all__ = [
    "DEFAULT_PROBE_KEY",
    "Check",
    "DoctorReport",
    "compare",
    "doctor",
    "probe_row",
]
