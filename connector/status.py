"""The pipeline status document: what `connector status` prints, what `status --json` and the
metrics gauges (runtime) read, one query set for all of them (docs/operations-cli.md explains
every field).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector import db, state, truncate
from connector.config import PipelineConfig, Settings
from connector.outbox import load_checkpoint, not_passed, outbox_lag

Q_PENDING = """
SELECT count(DISTINCT o.key), extract(epoch FROM clock_timestamp() - min(o.captured_at))::float8
  FROM {outbox} o
  LEFT JOIN {key_state} k ON k.pipeline = o.pipeline AND k.key = o.key
 WHERE o.pipeline = %s AND {cond}
   AND (k.version IS NULL OR o.version > k.version)
"""

Q_CHECKPOINT = """
SELECT last_id, greatest(cardinality(pending_txids) - 1, 0), events_passed, updated_at, owner
  FROM {schema}.checkpoints WHERE pipeline = %s
"""

Q_CAPTURE = """
SELECT mode, slot_name, publication_name, last_commit_lsn::text, updated_at
  FROM {schema}.capture_state WHERE pipeline = %s
"""

Q_SLOT_LAG = """
SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
       active
  FROM pg_catalog.pg_replication_slots WHERE slot_name = %s
"""

Q_OWNER = """
SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start
  FROM pg_catalog.pg_locks l
  JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_catalog.pg_database
                      WHERE datname = pg_catalog.current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = %s
"""

Q_BULK_OLDEST = """
SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
  FROM {schema}.bulk_jobs WHERE pipeline = %s AND status = ANY(%s)
"""


async def pipeline_status(
    conn: psycopg.AsyncConnection[Any],
    settings: Settings,
    pipeline: PipelineConfig,
    source: psycopg.AsyncConnection[Any] | None = None,
) -> dict[str, Any]:
    """One pipeline's status as a JSON-ready dict (also used by the demo and the tests)."""

    schema = settings.database.state_schema
    name = pipeline.name
    q = db.render
    position = await load_checkpoint(conn, schema, name)
    lag_events, lag_seconds = await outbox_lag(conn, schema, name, position)
    cond, params = not_passed(position)
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(Q_PENDING).format(
            outbox=sql.Identifier(schema, "outbox"),
            key_state=sql.Identifier(schema, "key_state"),
            cond=cond,
        ),
        [name, *params],
    )
    prow = await cur.fetchone()
    pending_keys, oldest = (int(prow[0]), float(prow[1] or 0.0)) if prow else (0, 0.0)

    cur = await conn.cursor(row_factory=tuple_row).execute(q(Q_CHECKPOINT, schema), (name,))
    cp = await cur.fetchone()
    checkpoint = (
        {
            "offset": int(cp[0]),
            "pending_transactions": int(cp[1] or 0),
            "events_passed": int(cp[2]),
            "updated_at": cp[3],
            "owner": cp[4],
        }
        if cp
        else {"offset": 0, "pending_transactions": 0, "events_passed": 0, "updated_at": None}
    )

    cur = await conn.cursor(row_factory=tuple_row).execute(q(Q_CAPTURE, schema), (name,))
    cap = await cur.fetchone()
    capture: dict[str, Any] = {
        "mode": pipeline.capture,
        "installed": cap is not None,
        "lag_events": lag_events,
        "lag_seconds": round(lag_seconds, 3),
        "slot_lag_bytes": None,
    }
    if cap is not None and cap[1]:
        capture["slot"] = cap[1]
        src = source or conn
        cur = await src.cursor(row_factory=tuple_row).execute(Q_SLOT_LAG, (cap[1],))
        slot = await cur.fetchone()
        if slot is not None:
            capture["slot_lag_bytes"] = int(slot[0] or 0)
            capture["slot_active"] = bool(slot[1])

    window = timedelta(days=1)
    spent_all = await state.credits_spent(conn, schema, window)
    spent_pipeline = await state.credits_spent(conn, schema, window, name)
    remaining = await state.last_remaining(conn, schema)
    budget = pipeline.daily_credit_budget or settings.crm.daily_credit_budget
    credits = {
        "spent_24h": spent_pipeline,
        "spent_24h_all_pipelines": spent_all,
        "budget": budget,
        "left": max(budget - spent_all, 0),
        "reserve": settings.crm.credit_reserve,
        "crm_remaining": remaining,
    }

    cur = await conn.cursor(row_factory=tuple_row).execute(
        q(Q_BULK_OLDEST, schema), (name, list(state.OPEN_BULK_STATUSES))
    )
    b = await cur.fetchone()
    bulk = {
        "in_flight": int(b[0]) if b else 0,
        "oldest_age_seconds": round(float(b[1]), 1) if b and b[1] is not None else None,
        "by_status": await state.bulk_status_counts(conn, schema, name),
    }
    dead = await state.open_dead_letter_count(conn, schema, name)
    keys = await state.key_status_counts(conn, schema, name)
    snap = await state.get_snapshot(conn, schema, name)
    snapshot: dict[str, Any] | None = None
    if snap is not None:
        snapshot = {
            "status": snap.status,
            "rows_read": snap.rows_read,
            "estimated_rows": snap.estimated_rows,
            "chunks_done": snap.chunks_done,
            "started_at": snap.started_at,
            "finished_at": snap.finished_at,
        }
    key = db.advisory_key(schema, "pipeline", name)
    cur = await conn.cursor(row_factory=tuple_row).execute(Q_OWNER, (key,))
    owner = await cur.fetchone()
    cur = await conn.cursor(row_factory=tuple_row).execute(
        db.render(
            "SELECT reason, column_name, message, halted_at FROM {schema}.pipeline_halts"
            " WHERE pipeline = %s",
            schema,
        ),
        (name,),
    )
    halt = await cur.fetchone()
    # after an unclean takeover the owner sends nothing for crm.request_timeout (runtime.py)
    wait_left = await state.writes_wait_left(conn, schema, name) if owner else None
    return {
        "halted": (
            {"reason": halt[0], "column": halt[1], "message": halt[2], "since": halt[3]}
            if halt
            else None
        ),
        "pipeline": name,
        "source_table": pipeline.source_table,
        "module": pipeline.module,
        "running": owner is not None,
        "owner": _owner(owner, cp[4] if cp else None),
        "capture": capture,
        "pending_keys": pending_keys,
        "oldest_pending_change_seconds": round(oldest, 3),
        "takeover_wait_seconds_left": round(wait_left, 1) if wait_left is not None else None,
        "max_staleness_seconds": pipeline.max_staleness.total_seconds(),
        "credits": credits,
        "bulk_jobs": bulk,
        "dead_letters_open": dead,
        "truncates_held": await truncate.held(conn, schema, name),
        "keys": keys,
        "checkpoint": checkpoint,
        "snapshot": snapshot,
    }


def _owner(lock: Any, recorded: str | None) -> dict[str, Any] | None:
    """Who owns the pipeline: ``id``/``host``/``pid`` of the connector process (the
    ``host:pid`` it recorded in the checkpoint row), and ``backend_pid`` of its PostgreSQL
    session that holds the lease (what ``pg_terminate_backend`` would take)."""
    if lock is None:
        return None
    host, _, pid = (recorded or "").rpartition(":")
    return {
        "id": recorded,
        "host": host or None,
        "pid": int(pid) if pid.isdigit() else None,
        "backend_pid": lock[0],
        "application_name": lock[1],
        "client_addr": lock[2],
    }


def _plural(n: int, word: str) -> str:
    """``1 chunk``, ``2 chunks``, ``0 chunks``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _fmt_time(t: datetime | None) -> str:
    if t is None:
        return "never"
    age = (datetime.now(UTC) - t).total_seconds()
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({_fmt_age(max(age, 0.0))} ago)"


def format_status(doc: dict[str, Any]) -> str:
    c = doc["capture"]
    cr = doc["credits"]
    b = doc["bulk_jobs"]
    cp = doc["checkpoint"]
    snap = doc["snapshot"]
    state_word = "RUNNING" if doc["running"] else "NOT RUNNING"
    late = doc["oldest_pending_change_seconds"] > doc["max_staleness_seconds"]
    if doc.get("halted"):
        state_word = "STOPPED (schema change)"
    lines = [
        f"pipeline {doc['pipeline']}  ({doc['source_table']} -> {doc['module']})  {state_word}",
        f"  capture      {c['mode']}{'' if c['installed'] else ' (NOT INSTALLED: run init)'}"
        f"  lag {c['lag_events']} events / {_fmt_age(c['lag_seconds'])}"
        + (f" / slot {c['slot_lag_bytes']} bytes" if c.get("slot_lag_bytes") is not None else ""),
        f"  pending      {doc['pending_keys']} keys, oldest change "
        f"{_fmt_age(doc['oldest_pending_change_seconds'])} "
        f"(max_staleness {_fmt_age(doc['max_staleness_seconds'])})"
        + ("  <-- OVER max_staleness" if late else "")
        + (
            f"\n               waiting {doc['takeover_wait_seconds_left']:.0f}s more before"
            " writing to the CRM: the previous owner did not stop cleanly and requests it had in"
            " flight may still land (crm.request_timeout)"
            if doc.get("takeover_wait_seconds_left")
            else ""
        ),
        f"  credits      {cr['spent_24h']} spent in 24 h by this pipeline "
        f"({cr['spent_24h_all_pipelines']} all), {cr['left']} left of {cr['budget']}"
        + (
            f", CRM says {cr['crm_remaining']} remaining" if cr["crm_remaining"] is not None else ""
        ),
        f"  bulk jobs    {b['in_flight']} in flight"
        + (f", oldest {_fmt_age(b['oldest_age_seconds'])}" if b["in_flight"] else ""),
        *(
            [f"  stopped      {_fmt_time(doc['halted']['since'])}: {doc['halted']['message']}"]
            if doc.get("halted")
            else []
        ),
        f"  dead letters {doc['dead_letters_open']} open"
        + ("  (see: connector dead-letters list)" if doc["dead_letters_open"] else ""),
        *(
            f"  TRUNCATE     held, {t['crm_keys']} CRM record(s) kept (source "
            f"{_fmt_time(t['source_time'])}); run `connector verify --pipeline "
            f'{doc["pipeline"]} --repair`, or set on_truncate = "propagate"'
            for t in doc.get("truncates_held", [])
        ),
        "  keys         "
        + (", ".join(f"{k} {v}" for k, v in sorted(doc["keys"].items())) or "none yet"),
        f"  checkpoint   offset {cp['offset']},"
        f" {_plural(cp['pending_transactions'], 'open transaction')}"
        f" tracked, updated {_fmt_time(cp['updated_at'])}",
    ]
    if snap is not None:
        total = snap["estimated_rows"]
        lines.append(
            f"  initial sync {snap['status']}, {snap['rows_read']} rows"
            + (f" of ~{total}" if total else "")
            + f", {_plural(snap['chunks_done'], 'chunk')}"
        )
    else:
        lines.append("  initial sync not started")
    return "\n".join(lines)
