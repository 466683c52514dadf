"""Logical capture's server objects: the publication, the pgoutput slot, the ``capture_state``
row and the replication origin (``install``, ``create_slot``, ``uninstall``), the checks of the
source table (``check_source``) and the slot's status (``slot_status``, ``slot_lag_bytes``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from connector.capture.logical.gap import end_slot_holder, pass_gap
from connector.config import PipelineConfig
from connector.db import fetch_value as _one
from connector.errors import ConfigError, PermanentError

# one logger for the package: log lines keep the name they had before the split
log = logging.getLogger("connector.capture.logical")

ORIGIN_PREFIX = "zoho-cdc-connector:"  # replication origins of the connector: prefix + slot name
ORIGIN_MIN_SERVER = 160000  # pgoutput's `origin` option is PostgreSQL 16+

# ---------------------------------------------------------------------------------------------
# names and installation
# ---------------------------------------------------------------------------------------------


def object_name(schema: str, pipeline: str) -> str:
    """The slot and publication name of a pipeline: ``<schema>_<pipeline>``, sanitised.

    Slot names allow only lower-case letters, digits and underscores (at most 63 bytes).
    """
    raw = re.sub(r"[^a-z0-9_]", "_", f"{schema}_{pipeline}".lower())
    return raw[:63]


def _key(pipeline: PipelineConfig, attr: str) -> str:
    return f"pipelines[{pipeline.name!r}].{attr}"


def _table_ident(pipeline: PipelineConfig) -> sql.Identifier:
    schema, table = pipeline.table_parts
    return sql.Identifier(schema, table)


async def check_source(conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig) -> None:
    """Refuse clearly: wal_level, missing table or key column, non-unique key, replica identity
    that would not carry the key of a deleted row."""
    level = await _one(conn, "SELECT current_setting('wal_level')")
    if level != "logical":
        raise ConfigError(
            _key(pipeline, "capture"),
            f"capture = 'logical' needs wal_level = logical on the source server (it is "
            f"{level!r}); set wal_level = logical and restart PostgreSQL, or use "
            f"capture = 'triggers'",
        )
    schema, table = pipeline.table_parts
    cur = await conn.execute(
        "SELECT c.oid, c.relreplident, c.relpersistence FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    )
    row = await cur.fetchone()
    if row is None:
        raise ConfigError(
            _key(pipeline, "source_table"), f"table {pipeline.source_table!r} does not exist"
        )
    relid, replident, persistence = (
        (row["oid"], row["relreplident"], row["relpersistence"]) if isinstance(row, dict) else row
    )
    if persistence == "u":
        # an UNLOGGED table writes no WAL, so logical decoding never sees its changes and
        # CREATE PUBLICATION refuses it (PostgreSQL docs, CREATE PUBLICATION: "unlogged
        # tables ... cannot be part of a publication")
        raise ConfigError(
            _key(pipeline, "source_table"),
            f"table {pipeline.source_table!r} is UNLOGGED: its changes are not in the WAL, so "
            f"logical capture cannot see them. Nothing was installed. Fix: ALTER TABLE "
            f"{pipeline.source_table} SET LOGGED, or use capture = 'triggers'",
        )
    attnum = await _one(
        conn,
        "SELECT attnum FROM pg_attribute WHERE attrelid = %s AND attname = %s"
        " AND attnum > 0 AND NOT attisdropped",
        (relid, pipeline.key_column),
    )
    if attnum is None:
        raise ConfigError(
            _key(pipeline, "key_column"),
            f"column {pipeline.key_column!r} does not exist in {pipeline.source_table!r}",
        )
    for col, attr in [(c, f"fields[{c!r}]") for c in pipeline.fields] + [
        (c, "ignore_columns") for c in pipeline.ignore_columns
    ]:
        found = await _one(
            conn,
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s AND attname = %s"
            " AND attnum > 0 AND NOT attisdropped",
            (relid, col),
        )
        if found is None:
            raise ConfigError(
                _key(pipeline, attr),
                f"column {col!r} does not exist in {pipeline.source_table!r}",
            )
    cur = await conn.execute(
        "SELECT indisprimary, indisreplident, indimmediate FROM pg_index WHERE indrelid = %s"
        " AND indisunique AND indnkeyatts = 1 AND indkey[0] = %s AND indpred IS NULL"
        " AND indexprs IS NULL",
        (relid, attnum),
    )
    idx = [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in await cur.fetchall()]
    if not idx:
        raise ConfigError(
            _key(pipeline, "key_column"),
            f"column {pipeline.key_column!r} of {pipeline.source_table!r} is not unique "
            f"(needs a primary key or a unique index on that column alone)",
        )
    if replident == "d" and await _one(
        conn, "SELECT NOT indimmediate FROM pg_index WHERE indrelid = %s AND indisprimary", (relid,)
    ):
        # PostgreSQL uses a primary key as the default replica identity only when it is
        # immediate (relcache: RelationGetIndexList); with a DEFERRABLE one the table has no
        # replica identity, and once it is in a publication (which publishes updates and
        # deletes) every UPDATE and DELETE of the legacy application fails. Never break the app.
        raise ConfigError(
            _key(pipeline, "capture"),
            f"the primary key of {pipeline.source_table!r} is DEFERRABLE, and PostgreSQL "
            f"does not use a deferrable key as replica identity: with the publication in "
            f"place every UPDATE and DELETE on the table would fail. Nothing was installed. "
            f"Fix: create an immediate unique index on {pipeline.key_column!r} and run "
            f"ALTER TABLE {pipeline.source_table} REPLICA IDENTITY USING INDEX <that "
            f"index>, or ALTER TABLE {pipeline.source_table} REPLICA IDENTITY FULL (larger "
            f"WAL), or use capture = 'triggers'",
        )
    carried = replident == "f" or any(
        (replident == "d" and prim and immediate) or (replident == "i" and rid)
        for prim, rid, immediate in idx
    )
    if not carried:
        raise ConfigError(
            _key(pipeline, "key_column"),
            f"the replica identity of {pipeline.source_table!r} does not include "
            f"{pipeline.key_column!r}, so deletes would not carry the key; make it the primary "
            f"key, or run ALTER TABLE ... REPLICA IDENTITY USING INDEX <its unique index> "
            f"(or REPLICA IDENTITY FULL)",
        )


def origin_name(slot: str) -> str:
    """The replication origin that tags the capture's own writes (outbox, dead letters,
    capture_state) so that its walsender skips them before decoding (``origin 'none'``)."""
    return ORIGIN_PREFIX + slot


async def _may_execute(conn: psycopg.AsyncConnection[Any], signature: str) -> bool:
    """Whether the current role may execute the function ``signature`` (False when the server
    has no such function). ``conn`` must be in autocommit mode."""
    try:
        return bool(await _one(conn, "SELECT has_function_privilege(%s, 'EXECUTE')", (signature,)))
    except psycopg.errors.UndefinedFunction:
        return False


async def _create_origin(
    state: psycopg.AsyncConnection[Any], source: psycopg.AsyncConnection[Any], slot: str
) -> None:
    """Create the pipeline's replication origin (idempotent) when the source server supports
    ``origin 'none'`` and the role may; otherwise log why not (capture works without it)."""
    if source.info.server_version < ORIGIN_MIN_SERVER:
        return
    origin = origin_name(slot)
    if await _one(state, "SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)):
        return
    if not await _may_execute(state, "pg_replication_origin_create(text)"):
        log.info(
            "replication origin not created: the role may not execute "
            "pg_replication_origin_create(text); logical capture works without it, but the "
            "walsender then also decodes the capture's own outbox writes (docs/security.md, "
            "optional grants)",
            extra={"origin": origin},
        )
        return
    with contextlib.suppress(psycopg.errors.UniqueViolation):  # created concurrently
        await state.execute("SELECT pg_replication_origin_create(%s)", (origin,))


async def _drop_origin(conn: psycopg.AsyncConnection[Any], slot: str) -> None:
    origin = origin_name(slot)
    if await _one(conn, "SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)) is None:
        return
    if not await _may_execute(conn, "pg_replication_origin_drop(text)"):
        log.info(
            "replication origin left in place: the role may not execute "
            "pg_replication_origin_drop(text); it retains no WAL; an administrator can drop it "
            "with SELECT pg_replication_origin_drop('<origin>')",
            extra={"origin": origin},
        )
        return
    for _ in range(50):
        try:
            await conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))
        except psycopg.errors.ObjectInUse:  # a capture's state connection still holds it
            await asyncio.sleep(0.1)
            continue
        except psycopg.errors.UndefinedObject:
            pass
        return
    log.warning(
        "replication origin left in place: still in use by another session (a connector still "
        "running?); it retains no WAL",
        extra={"origin": origin},
    )


async def foreign_origin(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """The name of a replication origin on ``conn``'s server that is not the connector's (a
    subscription's, or another tool's), or None. Changes written under such an origin would be
    dropped by ``origin 'none'``, so the capture does not filter by origin while one exists."""
    return await _one(  # type: ignore[no-any-return]
        conn,
        "SELECT roname FROM pg_replication_origin WHERE left(roname, %s) <> %s"
        " ORDER BY roident LIMIT 1",
        (len(ORIGIN_PREFIX), ORIGIN_PREFIX),
    )


async def install(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    *,
    state_conn: psycopg.AsyncConnection[Any] | None = None,
    wait_timeout: float | None = None,
    report_every: float = 5.0,
) -> None:
    """Create the publication (FOR TABLE the source table), the pgoutput slot, the
    ``capture_state`` row and, when permitted on PostgreSQL 16+, the replication origin that
    tags the capture's own writes (``origin_name``). Idempotent. ``conn``: autocommit
    connection to the source database; ``state_conn``: to the state database when it is another
    one. Creating the slot waits for the transactions that hold an xid anywhere in the cluster;
    see ``create_slot`` for ``wait_timeout`` and ``report_every``."""
    state = state_conn or conn
    await check_source(conn, pipeline)
    mode = await _one(
        state,
        sql.SQL("SELECT mode FROM {}.capture_state WHERE pipeline = %s").format(
            sql.Identifier(schema)
        ),
        (pipeline.name,),
    )
    if mode is not None and mode != "logical":
        raise ConfigError(
            _key(pipeline, "capture"),
            f"pipeline {pipeline.name!r} is installed with capture = {mode!r}; "
            f"run `connector uninstall` for it first",
        )
    name = object_name(schema, pipeline.name)
    table = _table_ident(pipeline)
    sch, tbl = pipeline.table_parts
    exists = await _one(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
    if exists is None:
        # publish_via_partition_root: a partitioned table's changes are published under its
        # own name, not its partitions' (which the stream would not recognise: nothing was
        # captured, silently); no effect on a plain table (PostgreSQL docs, CREATE PUBLICATION)
        await conn.execute(
            sql.SQL(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
            ).format(sql.Identifier(name), table)
        )
    else:
        has = await _one(
            conn,
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s"
            " AND tablename = %s",
            (name, sch, tbl),
        )
        if has is None:
            await conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(name), table)
            )
        # a publication made by an earlier version lacks the option (install is an upgrade)
        await conn.execute(
            sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(
                sql.Identifier(name)
            )
        )
    plugin = await _one(
        conn, "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (name,)
    )
    created_lsn: str | None = None
    if plugin is None:
        created_lsn = await create_slot(
            conn, name, pipeline, wait_timeout=wait_timeout, report_every=report_every
        )
    elif plugin != "pgoutput":
        raise ConfigError(
            _key(pipeline, "capture"),
            f"replication slot {name!r} exists with plugin {plugin!r}, not pgoutput",
        )
    elif exists is None:
        # the slot outlived its publication: a change made meanwhile stops pgoutput (< 18) on
        # every reconnect until the slot is past it (gap.py)
        skipped = await pass_gap(
            conn, name, name, timeout=wait_timeout if wait_timeout is not None else 60.0
        )
        if skipped is not None:
            log.warning(
                "connector init: the publication was missing while changes were made, and "
                "PostgreSQL could not decode them; replication slot %s advanced from %s to %s "
                "past them. Those changes were NOT captured: run `connector verify --pipeline "
                "%s --repair` once the connector runs, to re-capture every row that differs",
                skipped.slot,
                skipped.from_lsn or "its start",
                skipped.to_lsn,
                pipeline.name,
                extra={"pipeline": pipeline.name, "slot": skipped.slot},
            )
    ident = sql.Identifier(schema)
    await state.execute(
        sql.SQL(
            "INSERT INTO {}.capture_state (pipeline, mode, slot_name, publication_name,"
            " last_commit_lsn) VALUES (%s, 'logical', %s, %s, %s::pg_lsn)"
            " ON CONFLICT (pipeline) DO UPDATE SET slot_name = EXCLUDED.slot_name,"
            " publication_name = EXCLUDED.publication_name,"
            " last_commit_lsn = CASE WHEN %s THEN EXCLUDED.last_commit_lsn"
            " ELSE {}.capture_state.last_commit_lsn END, updated_at = now()"
        ).format(ident, ident),
        (pipeline.name, name, name, created_lsn, created_lsn is not None),
    )
    if pipeline.filter_own_writes:
        await _create_origin(state, conn, name)


async def _slot_blockers(monitor: psycopg.AsyncConnection[Any], pid: int) -> list[str]:
    """What the session ``pid`` (creating a slot) waits for: the sessions blocking it (pid,
    database, user, application, state, age of the transaction) and prepared transactions
    (``pg_blocking_pids`` shows those as 0). Never the query text (it may hold data)."""
    cur = await monitor.execute(
        "SELECT a.pid, a.datname, a.usename, a.application_name, a.state,"
        " extract(epoch FROM clock_timestamp() - a.xact_start)::float8"
        " FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(%s)) ORDER BY a.xact_start",
        (pid,),
    )
    out = []
    for bpid, db, user, app, state, age in await cur.fetchall():
        age_text = f"{age:.0f} s" if age is not None else "age unknown"
        out.append(
            f"pid {bpid} (database {db!r}, user {user!r}, application {app!r}, {state}, "
            f"transaction open {age_text})"
        )
    prepared = await _one(monitor, "SELECT 0 = ANY(pg_blocking_pids(%s))", (pid,))
    if prepared:
        cur = await monitor.execute(
            "SELECT gid, database, extract(epoch FROM clock_timestamp() - prepared)::float8"
            " FROM pg_prepared_xacts ORDER BY prepared"
        )
        for gid, db, age in await cur.fetchall():
            out.append(f"prepared transaction {gid!r} (database {db!r}, prepared {age:.0f} s ago)")
    return out


async def create_slot(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    pipeline: PipelineConfig,
    *,
    wait_timeout: float | None = None,
    report_every: float = 5.0,
) -> str:
    """Create the pgoutput slot ``name``; return its consistent point (LSN text).

    PostgreSQL makes the creation wait until every transaction that holds an xid, in any
    database of the cluster (prepared ones too), has ended. Every ``report_every`` seconds of
    waiting a warning names them (pid, database, user, application, state, age; from a second
    connection). After ``wait_timeout`` seconds (None: no limit) the creation is cancelled and
    ``PermanentError`` says what it waited for; nothing is lost (run `connector init` again)."""
    creator = conn.info.backend_pid
    task = asyncio.create_task(
        _one(
            conn,
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            (name,),
        )
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    monitor: psycopg.AsyncConnection[Any] | None = None
    try:
        while True:
            waited = loop.time() - started
            step = report_every
            if wait_timeout is not None:
                step = max(0.0, min(step, wait_timeout - waited))
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return str(task.result())
            waited = loop.time() - started
            if monitor is None:
                info = psycopg.conninfo.conninfo_to_dict(conn.info.dsn)
                if conn.info.password:
                    info["password"] = conn.info.password
                monitor = await psycopg.AsyncConnection.connect(
                    psycopg.conninfo.make_conninfo(**info),  # type: ignore[arg-type]
                    autocommit=True,
                )
            blockers = await _slot_blockers(monitor, creator)
            what = "; ".join(blockers) or "transactions of other roles (not visible to this role)"
            if wait_timeout is not None and waited >= wait_timeout:
                await conn.cancel_safe()
                try:
                    return str(await task)  # it may have finished meanwhile
                except psycopg.errors.QueryCanceled:
                    pass
                raise PermanentError(
                    f"pipelines[{pipeline.name!r}]: replication slot {name!r} not created: waited "
                    f"{waited:.0f} s (--wait-timeout) for transactions open in the cluster to "
                    f"end: {what}. Commit or end them (a writing transaction in any database, or "
                    f"a prepared one, blocks the slot creation) and run `connector init` again"
                )
            log.warning(
                "connector init waits for open transactions before the replication slot can "
                "be created (PostgreSQL waits for every transaction holding an xid in the "
                "cluster); commit or end them",
                extra={
                    "pipeline": pipeline.name,
                    "slot": name,
                    "waited_s": round(waited),
                    "waiting_for": what,
                },
            )
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                await task
        if monitor is not None:
            await monitor.close()


async def uninstall(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    *,
    state_conn: psycopg.AsyncConnection[Any] | None = None,
) -> None:
    """Drop the slot (terminating a walsender still using it) and the publication, delete the
    ``capture_state`` row, then drop the replication origin (when permitted). Idempotent. A
    forgotten slot retains WAL until the disk fills."""
    state = state_conn or conn
    name = object_name(schema, pipeline.name)
    for _ in range(50):
        if (
            await _one(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,))
            is None
        ):
            break
        if await end_slot_holder(conn, name) is not None:
            await asyncio.sleep(0.1)
            continue
        try:
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        except psycopg.errors.ObjectInUse:
            await asyncio.sleep(0.1)
            continue
        except psycopg.errors.UndefinedObject:
            pass
        break
    else:
        raise PermanentError(f"replication slot {name!r} stays in use; cannot drop it")
    await conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
    await state.execute(
        sql.SQL("DELETE FROM {}.capture_state WHERE pipeline = %s AND mode = 'logical'").format(
            sql.Identifier(schema)
        ),
        (pipeline.name,),
    )
    # last: a capture reconnecting meanwhile now refuses (not installed) before taking it
    await _drop_origin(state, name)


@dataclass(frozen=True)
class SlotStatus:
    """What ``connector status`` and the metrics show about a pipeline's slot."""

    slot_name: str
    active: bool
    lag_bytes: int | None  # current WAL position - confirmed_flush_lsn
    retained_bytes: int | None  # current WAL position - restart_lsn (WAL kept for the slot)
    wal_status: str | None  # reserved / extended / unreserved / lost
    safe_wal_size: int | None
    confirmed_flush_lsn: str | None


async def slot_status(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> SlotStatus | None:
    name = object_name(schema, pipeline if isinstance(pipeline, str) else pipeline.name)
    cur = await conn.execute(
        "SELECT active,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " wal_status, safe_wal_size, confirmed_flush_lsn::text"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    active, lag, retained, wal_status, safe, confirmed = (
        tuple(row.values()) if isinstance(row, dict) else tuple(row)
    )
    return SlotStatus(name, bool(active), lag, retained, wal_status, safe, confirmed)


async def slot_lag_bytes(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> int | None:
    """Bytes of WAL between the server's current position and the slot's confirmed position;
    None when the slot does not exist."""
    st = await slot_status(conn, schema, pipeline)
    return None if st is None else st.lag_bytes
