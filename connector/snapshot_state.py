"""All SQL on ``snapshots`` and ``snapshot_chunks``. Split from ``connector.state`` (issue 20),
which re-exports these names; the same rules hold (named queries, the schema as a quoted
identifier, the caller's transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from connector.events import SnapshotVisibility
from connector.state_common import AnyConn, _as_dict, _first, _q

# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    pipeline: str
    status: str
    cursor: Any  # last key read (JSON value) or None before the first chunk
    chunks_done: int
    rows_read: int
    estimated_rows: int | None
    report: dict[str, Any] | None
    started_at: datetime
    finished_at: datetime | None
    # the largest key when the first chunk was read (JSON, as cursor): chunks read up to it
    # (rows inserted later are captured live); ``upper_known`` False: no bound (not read yet,
    # or a snapshot started before migration 13)
    upper_key: Any = None
    upper_known: bool = False


@dataclass(frozen=True, slots=True)
class ChunkRow:
    id: int
    chunk_no: int
    snapshot: SnapshotVisibility
    rows: int


Q_SNAPSHOT_GET = """
SELECT pipeline, status, cursor, chunks_done, rows_read, estimated_rows, report, started_at,
       finished_at, upper_key, upper_known
  FROM {schema}.snapshots WHERE pipeline = %s
"""

Q_SNAPSHOT_START = """
INSERT INTO {schema}.snapshots (pipeline, status, estimated_rows)
VALUES (%s, 'running', %s)
ON CONFLICT (pipeline) DO UPDATE
   SET status = 'running', cursor = NULL, chunks_done = 0, rows_read = 0,
       estimated_rows = EXCLUDED.estimated_rows, report = NULL, started_at = now(),
       finished_at = NULL, upper_key = NULL, upper_known = false
"""

Q_SNAPSHOT_UPPER = """
UPDATE {schema}.snapshots SET upper_key = %s, upper_known = true
 WHERE pipeline = %s AND status = 'running'
"""

Q_NEXT_CHUNK_NO = """
SELECT coalesce(max(chunk_no), 0) + 1 FROM {schema}.snapshot_chunks WHERE pipeline = %s
"""

Q_SNAPSHOT_PROGRESS = """
UPDATE {schema}.snapshots
   SET cursor = %s, chunks_done = chunks_done + 1, rows_read = rows_read + %s,
       estimated_rows = greatest(coalesce(estimated_rows, 0), %s)
 WHERE pipeline = %s AND status = 'running'
"""

Q_SNAPSHOT_FINISH = """
UPDATE {schema}.snapshots SET status = %s, report = %s, finished_at = now()
 WHERE pipeline = %s
"""

Q_SNAPSHOT_REPORT = """
UPDATE {schema}.snapshots SET report = %s WHERE pipeline = %s
"""

Q_CHUNK_INSERT = """
INSERT INTO {schema}.snapshot_chunks (pipeline, chunk_no, snapshot, first_key, last_key, rows)
VALUES (%s, %s, %s::pg_snapshot, %s, %s, %s)
RETURNING id, snapshot::text
"""

Q_CHUNK_ROWS = """
UPDATE {schema}.snapshot_chunks SET rows = %s, last_key = %s, first_key = %s WHERE id = %s
"""

Q_CHUNKS = """
SELECT id, chunk_no, snapshot::text, rows FROM {schema}.snapshot_chunks
 WHERE pipeline = %s ORDER BY chunk_no
"""

Q_CHUNK_SNAPSHOTS = """
SELECT id, snapshot::text FROM {schema}.snapshot_chunks WHERE id = ANY(%s)
"""


async def get_snapshot(conn: AnyConn, schema: str, pipeline: str) -> SnapshotRow | None:
    cur = await conn.execute(_q(Q_SNAPSHOT_GET, schema), (pipeline,))
    r = await cur.fetchone()
    if r is None:
        return None
    return SnapshotRow(**_as_dict(cur, r))


async def start_snapshot(
    conn: AnyConn, schema: str, pipeline: str, estimated_rows: int | None
) -> None:
    """Begin (or restart from scratch) the pipeline's snapshot. Earlier chunks are kept: outbox
    rows not yet read still need their chunk's snapshot to be ordered."""
    await conn.execute(_q(Q_SNAPSHOT_START, schema), (pipeline, estimated_rows))


async def set_snapshot_upper(conn: AnyConn, schema: str, pipeline: str, upper: Any) -> None:
    """Record the largest key of the first chunk's snapshot (None: the table had no keyed row)."""
    await conn.execute(
        _q(Q_SNAPSHOT_UPPER, schema), (Jsonb(upper) if upper is not None else None, pipeline)
    )


async def insert_chunk(
    conn: AnyConn,
    schema: str,
    pipeline: str,
    *,
    chunk_no: int,
    first_key: Any,
    last_key: Any,
    rows: int,
    snapshot: str,
) -> ChunkRow:
    """Record a chunk read in ``snapshot`` (the text of the source transaction's
    ``pg_current_snapshot()``)."""
    cur = await conn.execute(
        _q(Q_CHUNK_INSERT, schema),
        (pipeline, chunk_no, snapshot, Jsonb(first_key), Jsonb(last_key), rows),
    )
    r = await cur.fetchone()
    assert r is not None
    vals = list(r.values()) if isinstance(r, dict) else list(r)
    return ChunkRow(int(vals[0]), chunk_no, SnapshotVisibility.parse(str(vals[1])), rows)


async def next_chunk_no(conn: AnyConn, schema: str, pipeline: str) -> int:
    cur = await conn.execute(_q(Q_NEXT_CHUNK_NO, schema), (pipeline,))
    row = await cur.fetchone()
    return int(_first(row)) if row else 1


async def chunks(conn: AnyConn, schema: str, pipeline: str) -> list[ChunkRow]:
    cur = await conn.execute(_q(Q_CHUNKS, schema), (pipeline,))
    out: list[ChunkRow] = []
    for r in await cur.fetchall():
        vals = list(r.values()) if isinstance(r, dict) else list(r)
        out.append(
            ChunkRow(
                int(vals[0]), int(vals[1]), SnapshotVisibility.parse(str(vals[2])), int(vals[3])
            )
        )
    return out


async def snapshot_progress(
    conn: AnyConn, schema: str, pipeline: str, *, cursor: Any, rows: int, estimated: int
) -> None:
    await conn.execute(_q(Q_SNAPSHOT_PROGRESS, schema), (Jsonb(cursor), rows, estimated, pipeline))


async def finish_snapshot(
    conn: AnyConn, schema: str, pipeline: str, status: str, report: dict[str, Any] | None
) -> None:
    await conn.execute(
        _q(Q_SNAPSHOT_FINISH, schema),
        (status, Jsonb(report) if report is not None else None, pipeline),
    )


Q_SNAPSHOT_COUNTS = """
UPDATE {schema}.snapshots
   SET report = coalesce(report, '{{}}'::jsonb) || jsonb_build_object(
       'sent', coalesce((report->>'sent')::bigint, 0) + %s,
       'added', coalesce((report->>'added')::bigint, 0) + %s,
       'updated', coalesce((report->>'updated')::bigint, 0) + %s,
       'skipped', coalesce((report->>'skipped')::bigint, 0) + %s)
 WHERE pipeline = %s AND status = 'running'
"""


async def add_snapshot_counts(
    conn: AnyConn,
    schema: str,
    pipeline: str,
    *,
    sent: int = 0,
    added: int = 0,
    updated: int = 0,
    skipped: int = 0,
) -> None:
    """Count snapshot rows acknowledged (added / updated) or dead-lettered (skipped)."""
    if sent or added or updated or skipped:
        await conn.execute(_q(Q_SNAPSHOT_COUNTS, schema), (sent, added, updated, skipped, pipeline))
