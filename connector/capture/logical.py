"""Logical-replication capture: a publication, a ``pgoutput`` slot, and a streaming consumer.

``install`` / ``uninstall`` / ``slot_lag_bytes`` / ``slot_status`` manage the server objects;
``LogicalCapture.run`` streams the slot through a psycopg 3.3 ``replication="database"``
connection (``START_REPLICATION`` returns a CopyBoth cursor; its ``pgconn`` reads CopyData and
sends standby status updates), decodes pgoutput (``pgoutput.py``), converts values
(``values.py``) and appends outbox rows with COPY, many source transactions per outbox
transaction. The position is confirmed to the server only after the outbox transaction holding
those rows (and ``capture_state.last_commit_lsn``) has committed, and only at commit boundaries;
source commits whose end LSN is ``<= last_commit_lsn`` are replays and are dropped. See
docs/capture-logical.md for the design and its trade-offs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from connector.capture import OWN_WRITE_PREFIX
from connector.capture import pgoutput as po
from connector.capture import values as vals
from connector.capture.triggers import missing_key_message
from connector.config import PipelineConfig
from connector.errors import ConfigError, PermanentError

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "connector-heartbeat"
ORIGIN_PREFIX = "zoho-cdc-connector:"  # replication origins of the connector: prefix + slot name
ORIGIN_MIN_SERVER = 160000  # pgoutput's `origin` option is PostgreSQL 16+
TOAST_CANDIDATE = 1000  # characters of a JSON fragment worth keeping for unchanged-TOAST fills

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


async def _one(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    if row is None:
        return None
    return row[0] if not isinstance(row, dict) else next(iter(row.values()))


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
        cur = await conn.execute(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
        )
        row = await cur.fetchone()
        if row is None:
            break
        active, pid = tuple(row.values()) if isinstance(row, dict) else tuple(row)
        if active and pid is not None:
            await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
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


# ---------------------------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------------------------

_TOAST = 1
_SERVER = 2
_RECHECK = 3  # the key's row at the end of the transaction is read from the table
_MISSING_KEY = "missing_key"  # _Event.op of a row whose key is NULL: a dead letter, not a row


@dataclass
class CaptureStats:
    events: int = 0  # outbox rows committed
    transactions: int = 0  # source transactions whose rows are committed
    outbox_commits: int = 0
    skipped_replays: int = 0  # source transactions dropped as already stored
    toast_cache_hits: int = 0
    toast_fetches: int = 0
    toast_missing: int = 0  # unchanged TOAST value whose row had gone (written as null)
    truncates: int = 0
    heartbeats: int = 0  # heartbeat messages sent
    heartbeats_received: int = 0  # ... and seen coming back through the slot
    reconnects: int = 0
    last_commit_lsn: int = 0
    confirmed_lsn: int = 0


@dataclass
class _Codec:
    """Per-Relation: converters and JSON key prefixes chosen once."""

    relation: po.Relation
    convs: list[vals.Converter]
    prefixes: list[str]
    names: list[str]
    key_idx: int
    key_cols: list[int]
    ignored: frozenset[int] = frozenset()
    varlen: tuple[int, ...] = ()  # columns of types that can be TOASTed
    encode: vals.RowEncoder | None = None  # fused decode + convert of a whole tuple
    heads: dict[str, bytes] = field(default_factory=dict)  # op -> b"\t<pipeline>\t<op>\t"
    head_insert: bytes = b""
    head_update: bytes = b""
    deferrable: bool = False  # the key's unique constraint is DEFERRABLE


@dataclass
class _Event:
    op: str
    key: str
    frags: list[str | None]  # None: column left out (key-only delete image)
    xid: int
    commit_lsn: int
    codec: _Codec
    deferred: list[tuple[int, int, str]] | None = None  # (column, kind, text for _SERVER)
    image: str | None = None  # the whole JSON image, read from the table (_RECHECK)


_Row = tuple[bytes, bytes, int, int, bytes]
"""A row ready for COPY (the fast path): ``(head, body, xid, commit_lsn, raw key)``; ``head``
is ``\\t<pipeline>\\t<op>\\t<key>\\t`` and ``body`` the JSON image, both COPY-escaped."""


@dataclass
class _Pending:
    events: list[_Event | _Row] = field(default_factory=list)
    committed: int = 0  # events[:committed] belong to committed source transactions
    last_end_lsn: int = 0
    last_xid: int = 0
    transactions: int = 0
    first_commit_at: float | None = None


@dataclass
class _Batch:
    """One unit of work for the writer task: rows to COPY, and, when ``end_lsn`` is set, the
    commit of the outbox transaction (with capture_state) after them."""

    events: list[_Event | _Row]
    end_lsn: int = 0
    xid: int = 0
    transactions: int = 0


class _Closed(Exception):
    """The server ended the replication stream."""


class LogicalCapture:
    """Stream the pipeline's slot into the outbox. One instance per pipeline and process."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        pipeline: PipelineConfig,
        *,
        state_dsn: str | None = None,
        batch_rows: int = 10_000,
        flush_interval: float = 0.1,
        heartbeat_interval: float = 10.0,
        status_interval: float = 10.0,
        max_backoff: float = 30.0,
        toast_cache_bytes: int = 64 << 20,
        after_outbox_commit: Callable[[int], Awaitable[None]] | None = None,
        origin_check_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.state_dsn = state_dsn or dsn
        self.schema = schema
        self.pipeline = pipeline
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.status_interval = status_interval
        self.max_backoff = max_backoff
        self.toast_cache_bytes = toast_cache_bytes
        self.after_outbox_commit = after_outbox_commit
        self.stats = CaptureStats()
        self.slot_name = object_name(schema, pipeline.name)
        self._schema_ident = sql.Identifier(schema)
        self._types = vals.TypeRegistry()
        self._toast: OrderedDict[str, dict[int, str]] = OrderedDict()
        self._toast_bytes = 0
        # deferrable keys: keys the current source transaction inserted or updated, and those
        # a row left after that (DELETE, key change): re-read at its commit (see _note_leave)
        self._txn_up: set[str] = set()
        self._txn_recheck: dict[str, _Event] = {}
        self._codecs: dict[int, _Codec] = {}
        # START_REPLICATION at the stored commit, so the server itself skips what is stored;
        # the client-side skip rule covers a slot that went back (tests turn this off to
        # exercise that rule)
        self.request_stored_lsn = True
        # ``filter_own_writes`` (the pipeline option, off by default): tag the state
        # connection's writes with the pipeline's replication origin and stream with origin
        # 'none', so that the walsender skips them before decoding; ``origin_filter``: in use
        # in the current (or last) session
        self.filter_own_writes = pipeline.filter_own_writes
        self.origin_filter = False
        self.origin_fallback_reason: str | None = None
        self.origin_check_interval = origin_check_interval

    # -- supervision -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set; reconnect with capped exponential backoff (jittered)
        when a connection is lost. Configuration problems raise ``ConfigError``."""
        backoff = 0.2
        while not stop.is_set():
            try:
                started = await self._session(stop)
                if started:
                    backoff = 0.2
            except (psycopg.OperationalError, OSError, _Closed) as exc:
                self.stats.reconnects += 1
                delay = min(self.max_backoff, backoff) * (0.5 + random.random() / 2)
                log.warning(
                    "logical capture connection lost; reconnecting",
                    extra={
                        "pipeline": self.pipeline.name,
                        "error": type(exc).__name__,
                        "delay": round(delay, 2),
                    },
                )
                backoff = min(self.max_backoff, backoff * 2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, stop: asyncio.Event) -> bool:
        self._codecs = {}
        self._toast.clear()
        self._toast_bytes = 0
        self.origin_filter = False
        opts = vals.SESSION_OPTIONS
        state = await psycopg.AsyncConnection.connect(self.state_dsn, autocommit=False)
        try:
            src = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, options=opts)
            try:
                repl = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, replication="database", options=opts
                )
                try:
                    return await self._stream(stop, state, src, repl)
                finally:
                    await repl.close()
            finally:
                await src.close()
        finally:
            if self.origin_filter:
                with contextlib.suppress(psycopg.Error):
                    await state.rollback()
                    await state.execute("SELECT pg_replication_origin_session_reset()")
            await state.close()  # (closing releases the origin in any case)

    async def _setup_origin(
        self,
        state: psycopg.AsyncConnection[Any],
        src: psycopg.AsyncConnection[Any],
        slot: str,
    ) -> bool:
        """Tag the state connection's writes with the pipeline's replication origin, when the
        source server has pgoutput's ``origin`` option (16+), no other replication origin exists
        on it, and the role may call ``pg_replication_origin_session_setup``. Otherwise keep
        decoding our own writes (correct, slower) and say why once."""
        self.origin_filter = False
        if not self.filter_own_writes:
            return False
        origin = origin_name(slot)
        reason: str | None = None
        version = src.info.server_version
        if version < ORIGIN_MIN_SERVER:
            reason = f"the source server is PostgreSQL {version // 10000} (origin filtering: 16+)"
        else:
            other = await foreign_origin(src)
            if other is not None:
                reason = (
                    f"replication origin {other!r} is not the connector's: changes written under "
                    f"it (e.g. by a subscription) would be filtered out too"
                )
        if reason is None:
            try:
                await state.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
                await state.commit()
            except psycopg.errors.InsufficientPrivilege:
                await state.rollback()
                reason = "the role may not execute pg_replication_origin_session_setup(text)"
            except psycopg.errors.UndefinedObject:
                await state.rollback()
                reason = (
                    f"replication origin {origin!r} does not exist (`connector init` creates it "
                    f"when the role may execute pg_replication_origin_create(text))"
                )
            except psycopg.errors.ObjectInUse:
                # another session holds it (e.g. the backend of a connector cut off by a
                # network partition, until TCP keepalive ends it): never wait for it
                await state.rollback()
                reason = f"replication origin {origin!r} is in use by another session"
        if reason is not None:
            if reason != self.origin_fallback_reason:
                log.info(
                    "logical capture does not filter its own writes by replication origin; the "
                    "walsender also decodes the outbox writes (slower, correct)",
                    extra={"pipeline": self.pipeline.name, "reason": reason},
                )
            self.origin_fallback_reason = reason
            return False
        self.origin_fallback_reason = None
        self.origin_filter = True
        return True

    async def _stream(
        self,
        stop: asyncio.Event,
        state: psycopg.AsyncConnection[Any],
        src: psycopg.AsyncConnection[Any],
        repl: psycopg.AsyncConnection[Any],
    ) -> bool:
        ident = self._schema_ident
        cur = await state.execute(
            sql.SQL(
                "SELECT slot_name, publication_name, last_commit_lsn::text"
                " FROM {}.capture_state WHERE pipeline = %s AND mode = 'logical'"
            ).format(ident),
            (self.pipeline.name,),
        )
        row = await cur.fetchone()
        await state.commit()
        if row is None:
            raise ConfigError(
                _key(self.pipeline, "capture"),
                f"logical capture is not installed for pipeline {self.pipeline.name!r}; "
                f"run `connector init`",
            )
        slot, publication, last_lsn = row
        self._stored_lsn = po.str_to_lsn(last_lsn) if last_lsn else 0
        self._confirmed = self._stored_lsn
        self._received = self._stored_lsn
        self._seq = await _one(
            state,
            "SELECT pg_get_serial_sequence(%s, 'id')",
            (f"{_quote(self.schema)}.outbox",),
        )
        await state.commit()
        self._state, self._src, self._repl = state, src, repl
        self._xid_ref = 0
        self._xid_ref_at = 0.0
        self._copy_sql = sql.SQL(
            "COPY {}.outbox (id, pipeline, op, key, version, source_xid, source_lsn, row,"
            " captured_at) FROM STDIN"
        ).format(ident)
        # commit LSN -> the source transaction's commit time (pgoutput Begin), COPY-ready: the
        # outbox row's captured_at, from which every deadline and staleness figure runs
        # (DESIGN.md invariant 10), not the time the connector stored it
        self._commit_times: dict[int, bytes] = {}
        self._fetch_sql = sql.SQL(
            "SELECT j.key, j.value::text FROM {} t, jsonb_each(to_jsonb(t)) j"
            " WHERE t.{} = %s AND j.key = ANY(%s)"
        ).format(_table_ident(self.pipeline), sql.Identifier(self.pipeline.key_column))
        self._image_sql = sql.SQL("SELECT to_jsonb(t)::text FROM {} t WHERE t.{} = %s").format(
            _table_ident(self.pipeline), sql.Identifier(self.pipeline.key_column)
        )
        self._dead_sql = sql.SQL(
            "INSERT INTO {}.dead_letters (pipeline, key, version, source_xid, payload,"
            " error_code, error_field, error_message)"
            " VALUES (%s, '', nextval(%s::regclass), %s::xid8, %s::jsonb, 'MISSING_KEY', %s, %s)"
        ).format(ident)
        self._spilled_open = False
        by_origin = await self._setup_origin(state, src, slot)
        await repl.execute(
            sql.SQL(
                "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1',"
                " publication_names {}, messages 'true'{})"
            ).format(
                sql.Identifier(slot),
                sql.SQL(po.lsn_to_str(self._stored_lsn if self.request_stored_lsn else 0)),
                sql.Literal(publication),
                sql.SQL(", origin 'none'" if by_origin else ""),
            )
        )
        log.info(
            "logical capture streaming",
            extra={
                "pipeline": self.pipeline.name,
                "slot": slot,
                "from_lsn": po.lsn_to_str(self._stored_lsn),
                "origin_filter": by_origin,
            },
        )
        self._skip_below = self._stored_lsn
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=2)
        self._inflight = 0
        self._written = 0
        writer = asyncio.create_task(self._writer(), name=f"outbox-writer-{self.pipeline.name}")
        self._writer_task = writer
        try:
            await self._consume(stop, repl.pgconn)
        finally:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return True

    async def _writer(self) -> None:
        """Write batches in order (overlapping the next batch's decoding), commit, confirm."""
        while True:
            batch = await self._queue.get()
            self._written += await self._write(batch.events)
            if batch.end_lsn:
                await self._commit(batch)
            self._inflight -= 1
            self._queue.task_done()

    async def _enqueue(self, batch: _Batch) -> None:
        self._check_writer()
        self._inflight += 1
        await self._queue.put(batch)

    def _check_writer(self) -> None:
        w = self._writer_task
        if w.done():
            exc = w.exception()
            if exc is not None:
                raise exc
            raise _Closed("outbox writer stopped")

    async def _drain(self) -> None:
        """Wait until every queued batch is written and committed."""
        while self._inflight:
            self._check_writer()
            await asyncio.sleep(0.005)
        self._check_writer()

    # -- the stream loop ----------------------------------------------------------------------
    async def _consume(self, stop: asyncio.Event, pgconn: Any) -> None:
        loop = asyncio.get_running_loop()
        pending = _Pending()
        self._pending = pending
        in_txn = False
        skip = False
        own = False  # the connector's own sync-flag transaction (OWN_WRITE_PREFIX)
        xid = 0
        commit_lsn = 0
        last_status = time.monotonic()
        last_activity = time.monotonic()
        last_origin_check = last_activity
        get = pgconn.get_copy_data
        decode_tuple = po.decode_tuple
        unpack_xlog = po._XLOG.unpack_from
        unpack_rel = po._U32.unpack_from
        unpack_begin = po._BEGIN.unpack_from
        unpack_commit = po._COMMIT.unpack_from
        needs_server = vals.NeedsServer
        codecs = self._codecs
        monotonic = time.monotonic
        while True:
            nbytes, view = get(1)
            if nbytes > 0:
                data = bytes(view)
                kind = data[0]
                if kind == 0x77:  # 'w' XLogData
                    m = data[25]
                    if m in {73, 85, 68}:  # I / U / D
                        if skip or own:
                            continue
                        (relid,) = unpack_rel(data, 26)
                        codec = codecs.get(relid)
                        if codec is None:
                            continue
                        # fast path: an insert, or an update without an old tuple, whose
                        # values are all sent as text and convertible from it
                        row = None
                        if data[30] == 0x4E and codec.encode is not None:  # 'N' new tuple
                            try:
                                row = codec.encode(
                                    data,
                                    31,
                                    codec.head_insert if m == 0x49 else codec.head_update,
                                    xid,
                                    commit_lsn,
                                )
                            except needs_server:
                                row = None
                        if row is not None:
                            if self._toast:
                                self._forget(row[4].decode())
                            pending.events.append(row)
                        elif m == 0x49:
                            new, _ = decode_tuple(data, 31)
                            self._on_row("insert", codec, new, None, None, xid, commit_lsn)
                        else:
                            msg = po.decode(data[25:])
                            if isinstance(msg, po.Update):
                                self._on_row(
                                    "update",
                                    codec,
                                    msg.new,
                                    msg.old,
                                    msg.old_kind,
                                    xid,
                                    commit_lsn,
                                )
                            elif isinstance(msg, po.Delete):
                                self._on_row(
                                    "delete", codec, None, msg.old, msg.old_kind, xid, commit_lsn
                                )
                        if len(pending.events) - pending.committed >= self.batch_rows:
                            # a large source transaction: spill its rows into the open outbox
                            # transaction, which is committed only after the source commit
                            await self._enqueue(_Batch(pending.events))
                            pending.events = []
                            pending.committed = 0
                            self._spilled_open = True
                        continue
                    if m == 0x42:  # 'B' Begin
                        commit_lsn, commit_ts, xid = unpack_begin(data, 26)
                        in_txn = True
                        own = False
                        if self._txn_up:
                            self._txn_up.clear()
                            self._txn_recheck.clear()
                        # a commit record before the stored one ends at or before it: a replay
                        skip = commit_lsn < self._skip_below
                        if not skip:
                            self._commit_times[commit_lsn] = _copy_time(commit_ts)
                        continue
                    start, _end, _ts = unpack_xlog(data, 1)
                    self._received = max(self._received, start)
                    if m == 0x43:  # 'C' Commit
                        _flags, _lsn, end_lsn, _ts = unpack_commit(data, 26)
                        in_txn = False
                        now = monotonic()
                        last_activity = now
                        if skip:
                            skip = False
                            self.stats.skipped_replays += 1
                            continue
                        if self._txn_recheck:
                            pending.events.extend(self._txn_recheck.values())
                            self._txn_recheck.clear()
                            self._txn_up.clear()
                        spilled = self._spilled_open
                        if len(pending.events) > pending.committed or spilled:
                            self._spilled_open = False
                            pending.committed = len(pending.events)
                            pending.last_end_lsn = end_lsn
                            pending.last_xid = xid
                            pending.transactions += 1
                            if pending.first_commit_at is None:
                                pending.first_commit_at = now
                        elif not pending.transactions and not self._inflight:
                            # nothing of ours in it and nothing unstored before it
                            self._confirmed = max(self._confirmed, end_lsn)
                        if pending.transactions and (
                            pending.committed >= self.batch_rows
                            or spilled
                            or stop.is_set()
                            or now - (pending.first_commit_at or now) >= self.flush_interval
                        ):
                            await self._flush()
                            last_status = monotonic()
                        if stop.is_set():
                            await self._drain()
                            self._send_status()
                            return
                        continue
                    msg = po.decode(data[25:])
                    if isinstance(msg, po.Relation):
                        await self._on_relation(msg)
                    elif isinstance(msg, po.Truncate):
                        if not skip:
                            self._on_truncate(msg, xid, commit_lsn)
                    elif isinstance(msg, po.Message) and msg.prefix == OWN_WRITE_PREFIX:
                        own = msg.transactional and in_txn
                    elif isinstance(msg, po.Message) and msg.prefix == HEARTBEAT_PREFIX:
                        self.stats.heartbeats_received += 1
                        if (
                            not in_txn
                            and not pending.events
                            and not self._inflight
                            and msg.lsn > self._confirmed
                        ):
                            # every commit before the heartbeat is stored: confirm past it
                            self._confirmed = msg.lsn
                            self._send_status()
                            last_status = monotonic()
                    # Type / Origin: nothing to do (types are looked up by OID)
                elif kind == 0x6B:  # 'k' keepalive
                    ka = po.parse_copy_data(data)
                    assert isinstance(ka, po.Keepalive)
                    self._received = max(self._received, ka.wal_end)
                    if not in_txn and not pending.events and not self._inflight:
                        # nothing of ours is in flight: everything before wal_end is handled
                        self._confirmed = max(self._confirmed, ka.wal_end)
                    if ka.reply_requested:
                        self._send_status()
                        last_status = monotonic()
                continue
            if nbytes == -1:
                raise _Closed("replication stream ended by the server")
            if nbytes < -1:
                raise psycopg.OperationalError("replication stream error")
            # nothing buffered: time-based flush, housekeeping, then wait for the socket
            now = monotonic()
            self._check_writer()
            can_flush = pending.transactions and not (in_txn and self._spilled_open)
            if can_flush and (
                stop.is_set() or now - (pending.first_commit_at or now) >= self.flush_interval
            ):
                await self._flush()
                last_status = monotonic()
                continue
            if stop.is_set() and not pending.transactions:
                await self._drain()
                self._send_status()
                return
            if now - last_status >= self.status_interval:
                self._send_status()
                last_status = now
            if self.origin_filter and now - last_origin_check >= self.origin_check_interval:
                last_origin_check = now
                await self._check_origins()
            if now - last_activity >= self.heartbeat_interval and not in_txn and not pending.events:
                # the captured table is idle: a non-transactional message lets the slot's
                # confirmed position follow the WAL even when other tables are busy
                await self._src.execute(
                    "SELECT pg_logical_emit_message(false, %s, now()::text)", (HEARTBEAT_PREFIX,)
                )
                self.stats.heartbeats += 1
                last_activity = now
            timeout = 0.1
            if pending.first_commit_at is not None:
                timeout = max(
                    0.0, min(timeout, pending.first_commit_at + self.flush_interval - now)
                )
            await _wait_readable(loop, pgconn.socket, timeout)
            pgconn.consume_input()

    async def _check_origins(self) -> None:
        """While filtering by origin: a replication origin that is not the connector's has
        appeared (a subscription created meanwhile): restart the stream without the filter."""
        other = await foreign_origin(self._src)
        if other is None:
            return
        log.warning(
            "a replication origin that is not the connector's appeared while the capture was "
            "filtering by origin: restarting without the filter; source changes written under "
            "it before this check (at most origin_check_interval ago) were skipped by the "
            "server: run `connector verify`",
            extra={"pipeline": self.pipeline.name, "origin": other},
        )
        raise _Closed("foreign replication origin")

    # -- decoding helpers ---------------------------------------------------------------------
    async def _on_relation(self, rel: po.Relation) -> None:
        schema, table = self.pipeline.table_parts
        if (rel.namespace or "pg_catalog") != schema or rel.name != table:
            return
        oids = [c.type_oid for c in rel.columns]
        missing = self._types.missing(oids)
        while missing:
            await self._lookup_types(missing)
            missing = self._types.missing(oids)
        names = [c.name for c in rel.columns]
        if self.pipeline.key_column not in names:
            raise PermanentError(
                f"{_key(self.pipeline, 'key_column')}: column {self.pipeline.key_column!r} "
                f"is no longer in {self.pipeline.source_table!r}"
            )
        convs = [self._types.converter(o) for o in oids]
        key_idx = names.index(self.pipeline.key_column)
        varlen = tuple(i for i, o in enumerate(oids) if o not in vals.FIXED_LENGTH)
        pipe = vals.copy_escape(self.pipeline.name.encode())
        codec = _Codec(
            relation=rel,
            convs=convs,
            prefixes=[vals.dumps_str(n) + ":" for n in names],
            names=names,
            key_idx=key_idx,
            key_cols=[i for i, c in enumerate(rel.columns) if c.is_key],
            varlen=varlen,
            ignored=frozenset(i for i, n in enumerate(names) if n in self.pipeline.ignore_columns),
            encode=vals.row_encoder(
                names, oids, convs, key_idx=key_idx, varlen=frozenset(varlen), big=TOAST_CANDIDATE
            ),
            heads={
                op: b"\t" + pipe + b"\t" + op.encode() + b"\t"
                for op in ("insert", "update", "delete")
            },
        )
        codec.head_insert = codec.heads["insert"]
        codec.head_update = codec.heads["update"]
        cur = await self._src.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c"
            " JOIN pg_catalog.pg_attribute a"
            "  ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)"
            " WHERE c.conrelid = %s AND c.contype IN ('p', 'u') AND c.condeferrable"
            " AND a.attname = %s)",
            (rel.oid, self.pipeline.key_column),
        )
        found = await cur.fetchone()
        if found is not None and found[0]:
            # another row of a transaction can hold a key before this row leaves it: events
            # go through _on_row, which tracks that (the fast path does not)
            codec.deferrable = True
            codec.encode = None
        self._codecs[rel.oid] = codec
        # a new Relation may change column positions or types: cached images are stale
        self._toast.clear()
        self._toast_bytes = 0

    async def _lookup_types(self, oids: list[int]) -> None:
        cur = await self._src.execute(
            "SELECT t.oid, t.typtype, t.typbasetype, t.typelem,"
            " (t.typelem <> 0 AND t.typsubscript = 'array_subscript_handler'::regproc),"
            " coalesce(e.typdelim, ','), format_type(t.oid, NULL), t.typrelid,"
            " (t.oid >= 16384 AND EXISTS (SELECT 1 FROM pg_cast c WHERE c.castsource = t.oid"
            "  AND c.casttarget = 'json'::regtype AND c.castmethod = 'f'))"
            " FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = ANY(%s)",
            (oids,),
        )
        found = set()
        for (
            oid,
            typtype,
            base,
            elem,
            is_array,
            delim,
            name,
            _relid,
            castjson,
        ) in await cur.fetchall():
            found.add(oid)
            if typtype == "d":
                info = vals.TypeInfo(oid, base, sql_name=name)
            elif is_array:
                info = vals.TypeInfo(oid, oid, elem=elem, delim=delim, sql_name=name)
            elif typtype == "c" or oid == vals.RECORD:
                info = vals.TypeInfo(oid, oid, category="composite", sql_name=name)
            elif castjson:
                info = vals.TypeInfo(oid, oid, category="castjson", sql_name=name)
            else:
                info = vals.TypeInfo(oid, oid, category="other", sql_name=name)
            self._types.add(info)
        for oid in oids:
            if oid not in found:
                raise PermanentError(f"type OID {oid} of {self.pipeline.source_table!r} is unknown")

    def _convert(
        self, codec: _Codec, tup: list[po.Value], key: str, old: list[po.Value] | None
    ) -> tuple[list[str | None], list[tuple[int, int, str]] | None]:
        if po.UNCHANGED not in tup:
            try:  # fast path: every value sent, every type convertible from its text
                return [
                    "null" if raw is None else conv(raw.decode())  # type: ignore[union-attr]
                    for conv, raw in zip(codec.convs, tup, strict=True)
                ], None
            except vals.NeedsServer:
                pass
        frags: list[str | None] = []
        deferred: list[tuple[int, int, str]] | None = None
        convs = codec.convs
        cached: dict[int, str] | None = None
        for i, raw in enumerate(tup):
            if raw is None:
                frags.append("null")
            elif raw is po.UNCHANGED:
                val: str | None = None
                raw_old = old[i] if old is not None else None
                if isinstance(raw_old, bytes):
                    more: list[tuple[int, int, str]] = []
                    val = self._conv1(convs[i], raw_old, i, more)
                    if more:
                        deferred = (deferred or []) + more
                if val is None:
                    if cached is None:
                        cached = self._toast.get(key, {})
                    val = cached.get(i)
                    if val is not None:
                        self.stats.toast_cache_hits += 1
                if val is None:
                    deferred = deferred or []
                    deferred.append((i, _TOAST, ""))
                    frags.append("null")
                else:
                    frags.append(val)
            else:
                assert isinstance(raw, bytes)
                try:
                    frags.append(convs[i](raw.decode()))
                except vals.NeedsServer:
                    deferred = deferred or []
                    deferred.append((i, _SERVER, raw.decode()))
                    frags.append("null")
        return frags, deferred

    @staticmethod
    def _conv1(
        conv: vals.Converter, raw: bytes, i: int, deferred: list[tuple[int, int, str]]
    ) -> str | None:
        try:
            return conv(raw.decode())
        except vals.NeedsServer:
            deferred.append((i, _SERVER, raw.decode()))
            return "null"

    def _remember(self, codec: _Codec, key: str, frags: list[str | None]) -> None:
        """Keep the large values of the latest image of ``key`` (bounded LRU by bytes) so that
        a later update that leaves them TOASTed and unchanged can be completed exactly.

        Only variable-length columns whose value is over ``TOAST_CANDIDATE`` characters: a
        value is moved out of line only when the row exceeds ~2 kB; a smaller out-of-line value
        (possible in very wide rows) is completed from the source row instead."""
        if self._toast:
            old = self._toast.pop(key, None)
            if old is not None:
                self._toast_bytes -= sum(len(v) for v in old.values())
        entry = None
        for i in codec.varlen:
            f = frags[i]
            if f is not None and len(f) > TOAST_CANDIDATE:
                if entry is None:
                    entry = {}
                entry[i] = f
        if entry is None:
            return
        size = sum(len(v) for v in entry.values())
        if size > self.toast_cache_bytes:
            return
        self._toast[key] = entry
        self._toast_bytes += size
        while self._toast_bytes > self.toast_cache_bytes and self._toast:
            _, ev = self._toast.popitem(last=False)
            self._toast_bytes -= sum(len(v) for v in ev.values())

    def _forget(self, key: str) -> None:
        old = self._toast.pop(key, None)
        if old is not None:
            self._toast_bytes -= sum(len(v) for v in old.values())

    def _on_row(  # noqa: PLR0917
        self,
        op: str,
        codec: _Codec,
        new: list[po.Value] | None,
        old: list[po.Value] | None,
        old_kind: str | None,
        xid: int,
        commit_lsn: int,
    ) -> None:
        ki = codec.key_idx
        events = self._pending.events
        if new is None:  # delete
            assert old is not None
            raw_key = old[ki]
            if not isinstance(raw_key, bytes):
                log.warning("delete without a key value", extra={"pipeline": self.pipeline.name})
                return
            key = raw_key.decode()
            if old_kind == "K":
                only = set(codec.key_cols)
                img: list[po.Value] = [v if i in only else None for i, v in enumerate(old)]
                frags, deferred = self._convert(codec, img, key, None)
                frags = [f if i in only else None for i, f in enumerate(frags)]
            else:
                frags, deferred = self._convert(codec, old, key, None)
            self._forget(key)
            gone = _Event("delete", key, frags, xid, commit_lsn, codec, deferred)
            events.append(gone)
            if codec.deferrable:
                self._note_leave(gone)
            return
        raw_key = new[ki]
        if not isinstance(raw_key, bytes):
            self._on_missing_key(codec, new, old, old_kind, xid, commit_lsn)
            return
        key = raw_key.decode()
        if old is not None and isinstance(old[ki], bytes) and old[ki] != raw_key:
            # the key itself changed: the old key is gone
            old_key = old[ki]
            assert isinstance(old_key, bytes)
            ok = old_key.decode()
            only = set(codec.key_cols) if old_kind == "K" else set(range(len(old)))
            ofr, odef = self._convert(
                codec, [v if i in only else None for i, v in enumerate(old)], ok, None
            )
            ofr = [f if i in only else None for i, f in enumerate(ofr)]
            cached = self._toast.get(ok)
            if cached is not None:
                self._toast[key] = cached
                self._toast.pop(ok, None)
            left = _Event("delete", ok, ofr, xid, commit_lsn, codec, odef)
            events.append(left)
            if codec.deferrable:
                self._note_leave(left)
            op = "insert"  # as trigger mode: a key change is a delete plus an insert
        elif old is not None and old[ki] is None:
            op = "insert"  # the key was NULL (a dead letter so far): the row appears, as in
            # trigger mode
        frags, deferred = self._convert(codec, new, key, old if old_kind == "O" else None)
        if op == "update" and old_kind == "O" and old is not None and not deferred:
            # REPLICA IDENTITY FULL gives the old image: skip no-op updates (as trigger mode)
            ofr2, odef2 = self._convert(codec, old, key, None)
            ignored = codec.ignored
            if not odef2 and all(
                a == b or i in ignored for i, (a, b) in enumerate(zip(frags, ofr2, strict=True))
            ):
                return
        self._remember(codec, key, frags)
        events.append(_Event(op, key, frags, xid, commit_lsn, codec, deferred))
        if codec.deferrable:
            self._txn_up.add(key)

    def _note_leave(self, ev: _Event) -> None:
        """A row left key ``ev.key`` (DELETE or key change). Under a DEFERRABLE key, another row
        of the same transaction may already hold that key (``SET id = id + 1`` in ascending
        order, a swap): when this transaction inserted or updated the key before, the key's
        row is re-read at commit and its image (or a delete when there is none) is the
        transaction's last event for the key (issue 14 §4: the delete used to win). The read
        is at capture time, so it may carry a later transaction's image: later events of the
        key follow it, as for unchanged TOAST values."""
        if ev.key in self._txn_up:
            self._txn_recheck[ev.key] = _Event(
                "delete",
                ev.key,
                list(ev.frags),
                ev.xid,
                ev.commit_lsn,
                ev.codec,
                [*(ev.deferred or []), (ev.codec.key_idx, _RECHECK, "")],
            )

    def _on_missing_key(  # noqa: PLR0917
        self,
        codec: _Codec,
        new: list[po.Value],
        old: list[po.Value] | None,
        old_kind: str | None,
        xid: int,
        commit_lsn: int,
    ) -> None:
        """A row whose key column is NULL: contained as a ``MISSING_KEY`` dead letter, written
        in the outbox transaction of its batch (invariant 8). When the key was set before
        (an update to NULL), the old key is gone from the source: a delete, as for a key
        change. Unchanged TOAST values of the image are not fetched (there is no key to fetch
        them by) and stay null in the payload."""
        ki = codec.key_idx
        events = self._pending.events
        raw_old = old[ki] if old is not None else None
        if isinstance(raw_old, bytes):
            assert old is not None
            ok = raw_old.decode()
            only = set(codec.key_cols) if old_kind == "K" else set(range(len(old)))
            ofr, odef = self._convert(
                codec, [v if i in only else None for i, v in enumerate(old)], ok, None
            )
            ofr = [f if i in only else None for i, f in enumerate(ofr)]
            self._forget(ok)
            events.append(_Event("delete", ok, ofr, xid, commit_lsn, codec, odef))
        image = [None if v is po.UNCHANGED else v for v in new]
        frags, deferred = self._convert(codec, image, "", None)
        events.append(_Event(_MISSING_KEY, "", frags, xid, commit_lsn, codec, deferred))

    def _on_truncate(self, msg: po.Truncate, xid: int, commit_lsn: int) -> None:
        """A TRUNCATE of the source table becomes one ``truncate`` outbox event (key '', no
        image) in its place in the stream; the pipeline decides what it means for the CRM
        (``on_truncate``, connector/truncate.py, which also logs it)."""
        if any(r in self._codecs for r in msg.relations):
            self.stats.truncates += 1
            self._toast.clear()
            self._toast_bytes = 0
            head = b"\t" + vals.copy_escape(self.pipeline.name.encode()) + b"\ttruncate\t\t"
            self._pending.events.append((head, b"\\N", xid, commit_lsn, b""))

    # -- writing ------------------------------------------------------------------------------
    async def _xid_reference(self) -> int:
        now = time.monotonic()
        if now - self._xid_ref_at > 1.0:
            text = await _one(self._src, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
            self._xid_ref = int(text)
            self._xid_ref_at = now
        return self._xid_ref

    async def _resolve(self, events: list[_Event]) -> None:
        for ev in events:
            if not ev.deferred:
                continue
            toast_cols = [i for i, kind, _ in ev.deferred if kind == _TOAST]
            if toast_cols:
                self.stats.toast_fetches += 1
                names = [ev.codec.names[i] for i in toast_cols]
                cur = await self._src.execute(self._fetch_sql, (ev.key, names))
                got = {k: v for k, v in await cur.fetchall()}
                for i in toast_cols:
                    v = got.get(ev.codec.names[i])
                    if v is None:
                        self.stats.toast_missing += 1
                        log.warning(
                            "unchanged TOAST value of a row that is gone; a later delete of the "
                            "key supersedes this event",
                            extra={"pipeline": self.pipeline.name},
                        )
                        v = "null"
                    ev.frags[i] = v
            for i, kind, text in ev.deferred:
                if kind == _RECHECK:
                    image = await _one(self._src, self._image_sql, (ev.key,))
                    if image is not None:
                        ev.op = "update"
                        ev.image = image
                elif kind == _SERVER:
                    conv_sql = sql.SQL("SELECT to_jsonb(CAST(%s::text AS {}))::text").format(
                        sql.SQL(self._types_sql_name(ev.codec, i))
                    )
                    ev.frags[i] = await _one(self._src, conv_sql, (text,))
            ev.deferred = None

    def _types_sql_name(self, codec: _Codec, i: int) -> str:
        oid = codec.relation.columns[i].type_oid
        info = self._types._infos.get(oid)
        if info is None:
            raise PermanentError(f"type OID {oid} cannot be converted")
        return info.sql_name

    def _render(self, ev: _Event) -> _Row:
        """An event of the general path (deferred values resolved) as a COPY-ready row."""
        prefixes = ev.codec.prefixes
        body = ",".join(prefixes[i] + f for i, f in enumerate(ev.frags) if f is not None)
        image = ev.image if ev.image is not None else "{" + body + "}"
        return (
            ev.codec.heads[ev.op] + vals.copy_escape(ev.key.encode()) + b"\t",
            vals.copy_escape(image.encode()),
            ev.xid,
            ev.commit_lsn,
            b"",
        )

    async def _write(self, events: list[_Event | _Row]) -> int:
        """COPY the events into the open outbox transaction (opened here if needed), as one
        text-format buffer. Returns the number of outbox rows written."""
        if not events:
            return 0
        slow = [ev for ev in events if isinstance(ev, _Event)]
        if slow:
            await self._resolve(slow)
            if any(ev.op == _MISSING_KEY for ev in slow):
                return await self._write_with_dead_letters(events)
        ref = await self._xid_reference()
        cur = await self._state.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (self._seq, len(events))
        )
        ids = sorted(r[0] for r in await cur.fetchall())
        widen = po.widen_xid
        render = self._render
        times = self._commit_times
        last_xid = last_lsn = -1
        sx = sl = st = b""
        lines: list[bytes] = []
        append = lines.append
        for ident, ev in zip(ids, events, strict=True):
            head, body, xid, lsn, _ = render(ev) if isinstance(ev, _Event) else ev
            if xid != last_xid:
                sx = b"%d" % widen(xid, ref)
                last_xid = xid
            if lsn != last_lsn:
                sl = b"%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF)
                st = times.get(lsn, b"now")  # (every streamed transaction has its Begin)
                last_lsn = lsn
            append(b"%d%s%d\t%s\t%s\t%s\t%s\n" % (ident, head, ident, sx, sl, body, st))
        async with self._state.cursor() as c, c.copy(self._copy_sql) as copy:
            await copy.write(b"".join(lines))
        return len(events)

    async def _write_with_dead_letters(self, events: list[_Event | _Row]) -> int:
        """``_write`` for a batch holding rows without a key: those become ``MISSING_KEY`` dead
        letters in the same (open) outbox transaction, with a version drawn from the outbox
        sequence in their place in the stream; the others are written as usual."""
        rows: list[_Event | _Row] = []
        written = 0
        for ev in events:
            if not (isinstance(ev, _Event) and ev.op == _MISSING_KEY):
                rows.append(ev)
                continue
            written += await self._write(rows)
            rows = []
            ref = await self._xid_reference()
            prefixes = ev.codec.prefixes
            body = ",".join(prefixes[i] + f for i, f in enumerate(ev.frags) if f is not None)
            await self._state.execute(
                self._dead_sql,
                (
                    self.pipeline.name,
                    self._seq,
                    str(po.widen_xid(ev.xid, ref)),
                    "{" + body + "}",
                    self.pipeline.key_field,
                    missing_key_message(self.pipeline),
                ),
            )
        return written + await self._write(rows)

    async def _flush(self) -> None:
        """Hand the committed events to the writer (which commits them together with
        capture_state, then confirms the last stored commit to the server)."""
        pending = self._pending
        batch = _Batch(
            pending.events[: pending.committed],
            pending.last_end_lsn,
            pending.last_xid,
            pending.transactions,
        )
        pending.events = pending.events[pending.committed :]
        pending.committed = 0
        pending.transactions = 0
        pending.first_commit_at = None
        await self._enqueue(batch)

    async def _commit(self, batch: _Batch) -> None:
        end_lsn = batch.end_lsn
        ref = await self._xid_reference()
        res = await self._state.execute(
            sql.SQL(
                "UPDATE {}.capture_state SET last_commit_lsn = %s::pg_lsn,"
                " last_source_xid = %s::xid8, updated_at = now()"
                " WHERE pipeline = %s AND mode = 'logical'"
            ).format(self._schema_ident),
            (po.lsn_to_str(end_lsn), str(po.widen_xid(batch.xid, ref)), self.pipeline.name),
        )
        if res.rowcount != 1:
            await self._state.rollback()
            raise PermanentError(
                f"capture_state row of pipeline {self.pipeline.name!r} disappeared "
                f"(uninstalled while running?)"
            )
        await self._state.commit()
        times = self._commit_times
        while times:  # transactions stream in commit order: drop the stored ones
            first = next(iter(times))
            if first > end_lsn:
                break
            del times[first]
        self.stats.events += self._written
        self._written = 0
        self.stats.transactions += batch.transactions
        self.stats.outbox_commits += 1
        self.stats.last_commit_lsn = end_lsn
        self._stored_lsn = end_lsn
        if self.after_outbox_commit is not None:
            await self.after_outbox_commit(end_lsn)
        self._confirmed = max(self._confirmed, end_lsn)
        self._send_status()

    def _send_status(self, *, reply: bool = False) -> None:
        pg = self._repl.pgconn
        msg = po.standby_status(
            max(self._received, self._confirmed), self._confirmed, self._confirmed, reply=reply
        )
        if pg.put_copy_data(msg) != 1:
            raise psycopg.OperationalError("cannot send the standby status update")
        pg.flush()
        self.stats.confirmed_lsn = self._confirmed


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _copy_time(pg_us: int) -> bytes:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as COPY text for timestamptz."""
    return (_PG_EPOCH + timedelta(microseconds=pg_us)).isoformat().encode()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)
