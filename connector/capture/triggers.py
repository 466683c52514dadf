"""Trigger-mode capture: an AFTER ROW trigger on the legacy table appends to the outbox.

The trigger writes, in the legacy transaction itself (transactional outbox), one outbox row per
row change with ``id = version = nextval(outbox sequence)`` drawn inside the AFTER ROW trigger,
i.e. after the row lock: for one key, versions follow commit order (cdc-reference.md §2.3).

The trigger function lives in the state schema, one per pipeline, and is ``SECURITY DEFINER``
with a fixed ``search_path`` and fixed output settings, so that

* the legacy application's roles need no privilege on the state schema, and cannot hijack the
  function through their own ``search_path`` (every name in it is schema-qualified);
* the row image is exactly ``to_jsonb(row)`` with ``TimeZone=UTC`` whatever the session's
  settings (docs/architecture.md, "The outbox row").

See docs/capture.md for the GRANTs and the behaviour (no-op updates, ignored columns, key
changes, NULL keys, TRUNCATE).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import psycopg
from psycopg import sql

from connector.capture import IMAGE_SETTINGS
from connector.config import PipelineConfig
from connector.errors import ConfigError

log = logging.getLogger(__name__)

# Settings that change what to_jsonb() prints; pinned on the function (SET clauses) so that the
# row image does not depend on the legacy session.
_IMAGE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("search_path", "pg_catalog, pg_temp"),
    *IMAGE_SETTINGS,
)


def function_name(pipeline: PipelineConfig) -> str:
    """Name of the pipeline's trigger function (in the state schema)."""
    return f"capture_{pipeline.name}"


def trigger_name(schema: str, pipeline: PipelineConfig) -> str:
    """Name of the trigger on the legacy table; includes a hash of the state schema so that two
    connectors with different state schemas can capture the same table."""
    digest = hashlib.blake2b(schema.encode(), digest_size=4).hexdigest()
    return f"zoho_cdc_{pipeline.name}_{digest}"


def truncate_function_name(pipeline: PipelineConfig) -> str:
    """Name of the pipeline's TRUNCATE trigger function (in the state schema)."""
    return f"capture_{pipeline.name}_truncate"


def truncate_trigger_name(schema: str, pipeline: PipelineConfig) -> str:
    """Name of the statement-level TRUNCATE trigger on the legacy table."""
    digest = hashlib.blake2b(schema.encode(), digest_size=4).hexdigest()
    return f"zoho_cdc_t_{pipeline.name}_{digest}"


def missing_key_message(pipeline: PipelineConfig) -> str:
    """The dead-letter message of a row whose key column is NULL (both capture modes)."""
    return (
        f"key column {pipeline.key_column!r} of {pipeline.source_table!r} is NULL: the row "
        f"cannot be identified in the CRM ({pipeline.key_field!r}); set the key and the row is "
        f"synced as an insert"
    )


def _key(pipeline: PipelineConfig, attr: str) -> str:
    return f"pipelines[{pipeline.name!r}].{attr}"


async def _table_oid(conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig) -> int | None:
    tschema, table = pipeline.table_parts
    cur = await conn.execute(
        "SELECT c.oid::int8, c.relkind::text FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (tschema, table),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    oid, relkind = row[0], row[1]
    if relkind not in ("r", "p"):
        raise ConfigError(
            _key(pipeline, "source_table"),
            f"{pipeline.source_table!r} is not a table (relkind {relkind!r}); "
            "trigger capture needs a table or a partitioned table",
        )
    return int(oid)


async def _check_source(
    conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig
) -> tuple[int, int]:
    """Validate the table, columns and key uniqueness; return (table oid, key attnum)."""
    oid = await _table_oid(conn, pipeline)
    if oid is None:
        raise ConfigError(
            _key(pipeline, "source_table"),
            f"table {pipeline.source_table!r} does not exist in the source database",
        )
    cur = await conn.execute(
        "SELECT attname::text, attnum::int FROM pg_catalog.pg_attribute"
        " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
        (oid,),
    )
    columns = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
    if pipeline.key_column not in columns:
        raise ConfigError(
            _key(pipeline, "key_column"),
            f"column {pipeline.key_column!r} does not exist in {pipeline.source_table!r}",
        )
    for col in pipeline.fields:
        if col not in columns:
            raise ConfigError(
                _key(pipeline, f"fields[{col!r}]"),
                f"column {col!r} does not exist in {pipeline.source_table!r}",
            )
    for col in pipeline.ignore_columns:
        if col not in columns:
            raise ConfigError(
                _key(pipeline, "ignore_columns"),
                f"column {col!r} does not exist in {pipeline.source_table!r}",
            )
    attnum = columns[pipeline.key_column]
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_index"
        " WHERE indrelid = %s AND indisunique AND indisvalid AND indnkeyatts = 1"
        " AND indkey[0] = %s AND indpred IS NULL AND indexprs IS NULL",
        (oid, attnum),
    )
    if await cur.fetchone() is None:
        raise ConfigError(
            _key(pipeline, "key_column"),
            f"column {pipeline.key_column!r} of {pipeline.source_table!r} is not covered by a "
            "primary key or a unique index on that column alone; the key must identify one row",
        )
    return oid, attnum


async def _outbox_sequence(conn: psycopg.AsyncConnection[Any], schema: str) -> str:
    cur = await conn.execute(
        "SELECT pg_catalog.pg_get_serial_sequence(%s, 'id')",
        (sql.Identifier(schema, "outbox").as_string(conn),),
    )
    row = await cur.fetchone()
    if row is None or row[0] is None:
        raise ConfigError(
            "database.state_schema",
            f"state schema {schema!r} has no outbox table; run `connector init` first",
        )
    return str(row[0])


async def _key_equality(
    conn: psycopg.AsyncConnection[Any], oid: int, attnum: int
) -> sql.Composable | None:
    """``OPERATOR(schema.=)`` for the key column's type, schema-qualified because the trigger
    function runs with ``search_path = pg_catalog, pg_temp``; None when the type has none."""
    cur = await conn.execute(
        "SELECT n.nspname::text FROM pg_catalog.pg_attribute a"
        " JOIN pg_catalog.pg_operator o ON o.oprname = '=' AND o.oprleft = a.atttypid"
        "  AND o.oprright = a.atttypid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace"
        " WHERE a.attrelid = %s AND a.attnum = %s ORDER BY n.nspname <> 'pg_catalog' LIMIT 1",
        (oid, attnum),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return sql.SQL("OPERATOR({}.=)").format(sql.Identifier(str(row[0])))


def _function_body(
    schema: str,
    pipeline: PipelineConfig,
    sequence: str,
    key_eq: sql.Composable | None = None,
    table_oid: int = 0,
) -> sql.Composed:
    key = sql.Identifier(pipeline.key_column)
    outbox = sql.Identifier(schema, "outbox")
    seq = sql.SQL("{}::pg_catalog.regclass").format(sql.Literal(sequence))
    name = sql.Literal(pipeline.name)
    unchanged: sql.Composable
    if pipeline.ignore_columns:
        ignored = sql.SQL("{}::pg_catalog.text[]").format(
            sql.Literal(list(pipeline.ignore_columns))
        )
        unchanged = sql.SQL(
            "(v_new OPERATOR(pg_catalog.-) {ig}) = (v_old OPERATOR(pg_catalog.-) {ig})"
        ).format(ig=ignored)
    else:
        unchanged = sql.SQL("v_new = v_old")

    def emit(op: str, key_var: str, image: str) -> sql.Composed:
        return sql.SQL(
            "    v_id := pg_catalog.nextval({seq});\n"
            "    INSERT INTO {outbox} (id, pipeline, op, key, version, row)\n"
            "      VALUES (v_id, {name}, {op}, {key_var}, v_id, {image});\n"
        ).format(
            seq=seq,
            outbox=outbox,
            name=name,
            op=sql.Literal(op),
            key_var=sql.SQL(key_var),
            image=sql.SQL(image),
        )

    # A row leaves key K (DELETE, or an UPDATE of its key): K is gone unless another row holds
    # K when the statement ends. Under a DEFERRABLE unique key, another row of the same
    # transaction can take K before this row leaves it (``SET id = id + 1`` in ascending order,
    # a swap of two keys): AFTER ROW triggers run at the end of the statement and see its
    # result, so the survivor's image is captured instead of a delete, with the later version
    # (issue 14 §4: the delete used to win and the CRM lost the record).
    # The look-up runs as the function's owner: without SELECT on the table (revoked after
    # install) it is skipped (the delete is written, as before) rather than failing the
    # legacy application's statement.
    def leave(key_var: str, image: str) -> sql.Composed:
        if key_eq is None or not table_oid:
            return emit("delete", key_var, image)
        return sql.SQL(
            "    v_left := NULL;\n"
            "    IF pg_catalog.has_table_privilege({oid}::pg_catalog.oid, 'SELECT') THEN\n"
            "      SELECT pg_catalog.to_jsonb(t.*) INTO v_left FROM {table} t\n"
            "        WHERE t.{key} {eq} OLD.{key} LIMIT 1;\n"
            "    END IF;\n"
            "    IF v_left IS NULL THEN\n"
            "{gone}"
            "    ELSE\n"
            "{kept}"
            "    END IF;\n"
        ).format(
            oid=sql.Literal(table_oid),
            table=sql.Identifier(*pipeline.table_parts),
            key=key,
            eq=key_eq,
            gone=emit("delete", key_var, image),
            kept=emit("update", key_var, "v_left"),
        )

    # a row without a key cannot be identified in the CRM: it is contained as a dead letter
    # (invariant 8), with the outbox sequence's next value as its version; a later update that
    # sets the key is captured as an insert
    def dead(image: str) -> sql.Composed:
        return sql.SQL(
            "    v_id := pg_catalog.nextval({seq});\n"
            "    INSERT INTO {dead} (pipeline, key, version, source_xid, payload, error_code,\n"
            "        error_field, error_message)\n"
            "      VALUES ({name}, '', v_id, pg_catalog.pg_current_xact_id(), {image},\n"
            "        'MISSING_KEY', {field}, {message});\n"
        ).format(
            seq=seq,
            dead=sql.Identifier(schema, "dead_letters"),
            name=name,
            image=sql.SQL(image),
            field=sql.Literal(pipeline.key_field),
            message=sql.Literal(missing_key_message(pipeline)),
        )

    return sql.SQL(
        "DECLARE\n"
        "  v_new jsonb;\n"
        "  v_old jsonb;\n"
        "  v_left jsonb;\n"
        "  v_new_key text;\n"
        "  v_old_key text;\n"
        "  v_id bigint;\n"
        "BEGIN\n"
        "  IF TG_OP = 'INSERT' THEN\n"
        "    v_new_key := NEW.{key}::text;\n"
        "    IF v_new_key IS NULL THEN\n"
        "{dins}"
        "      RETURN NULL;\n"
        "    END IF;\n"
        "{ins}"
        "  ELSIF TG_OP = 'DELETE' THEN\n"
        "    v_old_key := OLD.{key}::text;\n"
        "    IF v_old_key IS NULL THEN RETURN NULL; END IF;\n"
        "{dele}"
        "  ELSE\n"
        "    IF NEW OPERATOR(pg_catalog.*=) OLD THEN RETURN NULL; END IF;\n"
        "    v_new := pg_catalog.to_jsonb(NEW);\n"
        "    v_old := pg_catalog.to_jsonb(OLD);\n"
        "    IF {unchanged} THEN RETURN NULL; END IF;\n"
        "    v_new_key := NEW.{key}::text;\n"
        "    v_old_key := OLD.{key}::text;\n"
        "    IF v_new_key IS NOT DISTINCT FROM v_old_key THEN\n"
        "      IF v_new_key IS NULL THEN\n"
        "{dupd}"
        "        RETURN NULL;\n"
        "      END IF;\n"
        "{upd}"
        "    ELSE\n"
        "      IF v_old_key IS NOT NULL THEN\n"
        "{kdel}"
        "      END IF;\n"
        "      IF v_new_key IS NOT NULL THEN\n"
        "{kins}"
        "      ELSE\n"
        "{dupd}"
        "      END IF;\n"
        "    END IF;\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END\n"
    ).format(
        key=key,
        ins=emit("insert", "v_new_key", "pg_catalog.to_jsonb(NEW)"),
        dins=dead("pg_catalog.to_jsonb(NEW)"),
        dupd=dead("v_new"),
        dele=leave("v_old_key", "pg_catalog.to_jsonb(OLD)"),
        unchanged=unchanged,
        upd=emit("update", "v_new_key", "v_new"),
        kdel=leave("v_old_key", "v_old"),
        kins=emit("insert", "v_new_key", "v_new"),
    )


async def install(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: PipelineConfig
) -> None:
    """Create (or replace) the pipeline's trigger function and trigger. Idempotent.

    Refuses with ConfigError when the table, the key column or a mapped/ignored column does not
    exist, or when the key column is not unique on its own. Creating the trigger takes a
    SHARE ROW EXCLUSIVE lock on the legacy table (it waits for running writers); a second call
    only replaces the function body, which does not lock the table.
    """
    async with conn.transaction():
        oid, attnum = await _check_source(conn, pipeline)
        sequence = await _outbox_sequence(conn, schema)
        func = sql.Identifier(schema, function_name(pipeline))
        key_eq = await _key_equality(conn, oid, attnum)
        body = _function_body(schema, pipeline, sequence, key_eq, oid).as_string(conn)
        settings = sql.SQL("\n").join(
            sql.SQL("SET {} = {}").format(sql.Identifier(k), sql.Literal(v))
            for k, v in _IMAGE_SETTINGS
        )
        await conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\n"
                "LANGUAGE plpgsql SECURITY DEFINER\n{settings}\nAS {body}"
            ).format(func=func, settings=settings, body=sql.Literal(body))
        )
        await conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(func))
        tname = trigger_name(schema, pipeline)
        cur = await conn.execute(
            "SELECT t.tgfoid = %s::regprocedure, t.tgenabled = 'A' FROM pg_catalog.pg_trigger t"
            " WHERE t.tgrelid = %s AND t.tgname = %s",
            (func.as_string(conn) + "()", oid, tname),
        )
        row = await cur.fetchone()
        table = sql.Identifier(*pipeline.table_parts)
        if row is not None and not row[0]:
            await conn.execute(
                sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(tname), table)
            )
        if row is None or not row[0]:
            await conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {trig} AFTER INSERT OR UPDATE OR DELETE ON {table}"
                    " FOR EACH ROW EXECUTE FUNCTION {func}()"
                ).format(trig=sql.Identifier(tname), table=table, func=func)
            )
        if row is None or not row[0] or not row[1]:
            # fire under every session_replication_role (DESIGN.md invariant 9): logical
            # replication apply workers and bulk-load/sync tools write as 'replica', where an
            # ordinary ('origin') trigger does not fire and the write would be lost
            await _enable_always(conn, pipeline, tname)
        await _install_truncate(conn, schema, pipeline, oid, sequence)
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (pipeline, mode) VALUES (%s, 'triggers')"
                " ON CONFLICT (pipeline) DO UPDATE SET mode = 'triggers', updated_at = now()"
            ).format(sql.Identifier(schema, "capture_state")),
            (pipeline.name,),
        )


async def _install_truncate(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    oid: int,
    sequence: str,
) -> None:
    """The statement-level ``AFTER TRUNCATE`` trigger: one ``truncate`` outbox event (key '',
    no image, ``id = version`` from the outbox sequence, so it sits in the stream between the
    changes before and after it). Row triggers do not fire on TRUNCATE (PostgreSQL docs, CREATE
    TRIGGER: "TRUNCATE ... FOR EACH STATEMENT" only). ENABLE ALWAYS like the row trigger."""
    func = sql.Identifier(schema, truncate_function_name(pipeline))
    body = sql.SQL(
        "DECLARE\n  v_id bigint;\nBEGIN\n"
        "  v_id := pg_catalog.nextval({seq}::pg_catalog.regclass);\n"
        "  INSERT INTO {outbox} (id, pipeline, op, key, version, row)\n"
        "    VALUES (v_id, {name}, 'truncate', '', v_id, NULL);\n"
        "  RETURN NULL;\nEND\n"
    ).format(
        seq=sql.Literal(sequence),
        outbox=sql.Identifier(schema, "outbox"),
        name=sql.Literal(pipeline.name),
    )
    await conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\n"
            "LANGUAGE plpgsql SECURITY DEFINER\nSET search_path = 'pg_catalog, pg_temp'\nAS {body}"
        ).format(func=func, body=sql.Literal(body.as_string(conn)))
    )
    await conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(func))
    tname = truncate_trigger_name(schema, pipeline)
    cur = await conn.execute(
        "SELECT t.tgenabled = 'A' FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = %s AND t.tgname = %s",
        (oid, tname),
    )
    row = await cur.fetchone()
    table = sql.Identifier(*pipeline.table_parts)
    if row is None:
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {trig} AFTER TRUNCATE ON {table}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {func}()"
            ).format(trig=sql.Identifier(tname), table=table, func=func)
        )
    if row is None or not row[0]:
        await _enable_always(conn, pipeline, tname)


async def _enable_always(
    conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig, tname: str
) -> bool:
    """``ALTER TABLE … ENABLE ALWAYS TRIGGER``: PostgreSQL allows it to the table's owner only.
    A least-privilege role (SELECT, TRIGGER) gets an ordinary trigger and a WARNING with the
    statement for the owner to run; until then writes under session_replication_role = replica
    are not captured (docs/security.md; `connector doctor` reports it)."""
    stmt = sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(
        sql.Identifier(*pipeline.table_parts), sql.Identifier(tname)
    )
    try:
        async with conn.transaction():
            await conn.execute(stmt)
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "pipeline %s: trigger %s fires for ordinary writes only: only the owner of %s may "
            "make it fire under session_replication_role = replica; as the owner run: %s",
            pipeline.name,
            tname,
            pipeline.source_table,
            stmt.as_string(conn),
        )
        return False
    return True


async def uninstall(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: PipelineConfig
) -> None:
    """Drop the triggers and their functions. Idempotent; the outbox is left as it is."""
    async with conn.transaction():
        oid = await _table_oid(conn, pipeline)
        if oid is not None:
            for tname in (trigger_name(schema, pipeline), truncate_trigger_name(schema, pipeline)):
                await conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(tname), sql.Identifier(*pipeline.table_parts)
                    )
                )
        for fname in (function_name(pipeline), truncate_function_name(pipeline)):
            await conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(schema, fname))
            )
        cur = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (sql.Identifier(schema, "capture_state").as_string(conn),),
        )
        row = await cur.fetchone()
        if row is not None and row[0]:
            await conn.execute(
                sql.SQL("DELETE FROM {} WHERE pipeline = %s AND mode = 'triggers'").format(
                    sql.Identifier(schema, "capture_state")
                ),
                (pipeline.name,),
            )


async def is_installed(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: PipelineConfig
) -> bool:
    """True when the trigger exists on the table, is enabled and calls this pipeline's function."""
    oid = await _table_oid(conn, pipeline)
    if oid is None:
        return False
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_trigger t"
        " JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " WHERE t.tgrelid = %s AND t.tgname = %s AND t.tgenabled <> 'D'"
        " AND n.nspname = %s AND p.proname = %s",
        (oid, trigger_name(schema, pipeline), schema, function_name(pipeline)),
    )
    return await cur.fetchone() is not None
