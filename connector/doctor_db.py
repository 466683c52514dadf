"""The database checks of `connector doctor` (:mod:`connector.doctor`), read-only: reachable,
state schema version, the source table, its key and mapped columns and their types, the role's
privileges for the capture mode, ``wal_level``, replica identity and installed capture."""

from __future__ import annotations

from typing import Any

import psycopg

from connector import db
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.doctor_report import Check, Status, _first_line

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
