"""All SQL on ``bulk_jobs``. Split from ``connector.state`` (issue 20), which re-exports
these names; the same rules hold (named queries, the schema as a quoted identifier, the
caller's transaction)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from connector.crm_values import dumps_json
from connector.events import EventStamp, SnapshotVisibility
from connector.state_common import AnyConn, _as_dict, _first, _pairs, _q, _snap_text

# --------------------------------------------------------------------------- bulk_jobs


class BulkStatus(enum.StrEnum):
    INTENT = "intent"  # recorded before any CRM call: not paid
    UPLOADED = "uploaded"  # file on the CRM's file server: not paid
    CREATED = "created"  # job created (500 credits paid): poll this job id
    RUNNING = "running"
    COMPLETED = "completed"  # result known, not yet applied to key_state
    FAILED = "failed"  # job failed as a whole, not yet applied
    APPLIED = "applied"  # result applied to key_state / dead_letters
    ABANDONED = "abandoned"  # entries handed back to the pipeline without a result


OPEN_BULK_STATUSES = ("intent", "uploaded", "created", "running", "completed", "failed")


@dataclass(frozen=True, slots=True)
class BulkEntry:
    """One record of a bulk job, as recorded at intent."""

    key: str
    stamp: EventStamp
    op: str
    outbox_id: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "version": self.stamp.version,
            "source_xid": self.stamp.source_xid,
            "snapshot": _snap_text(self.stamp.snapshot),
            "op": self.op,
            "outbox_id": self.outbox_id,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BulkEntry:
        snap = d.get("snapshot")
        return cls(
            key=str(d["key"]),
            stamp=EventStamp(
                int(d["version"]),
                int(d["source_xid"]),
                SnapshotVisibility.parse(snap) if snap else None,
            ),
            op=str(d["op"]),
            outbox_id=int(d["outbox_id"]),
        )


@dataclass(frozen=True, slots=True)
class BulkJobRow:
    id: int
    pipeline: str
    status: BulkStatus
    operation: str
    file_id: str | None
    job_id: str | None
    callback_secret: str | None
    entries: list[BulkEntry]
    record_count: int
    created_at: datetime


Q_BULK_INTENT = """
INSERT INTO {schema}.bulk_jobs (pipeline, status, operation, entries, record_count)
VALUES (%s, 'intent', %s, %s, %s)
RETURNING id
"""

# the callback secret is stored before the create call: an orphan's callback (a job created
# whose id never came back) is then still recognised by the server
Q_BULK_UPLOADED = """
UPDATE {schema}.bulk_jobs
   SET status = 'uploaded', file_id = %s, callback_secret = coalesce(%s, callback_secret),
       updated_at = now()
 WHERE id = %s AND status IN ('intent', 'uploaded')
"""

Q_BULK_CREATED = """
UPDATE {schema}.bulk_jobs
   SET status = 'created', job_id = %s, callback_secret = %s, updated_at = now()
 WHERE id = %s AND status IN ('intent', 'uploaded')
"""

Q_BULK_RUNNING = """
UPDATE {schema}.bulk_jobs SET status = 'running', updated_at = now()
 WHERE id = %s AND status = 'created'
"""

Q_BULK_COMPLETED = """
UPDATE {schema}.bulk_jobs
   SET status = 'completed', added_count = %s, updated_count = %s, skipped_count = %s,
       updated_at = now()
 WHERE id = %s AND status IN ('created', 'running', 'completed')
"""

Q_BULK_FAILED = """
UPDATE {schema}.bulk_jobs SET status = 'failed', error = %s, updated_at = now()
 WHERE id = %s AND status NOT IN ('applied', 'abandoned')
"""

Q_BULK_FINISH = """
UPDATE {schema}.bulk_jobs
   SET status = %s, duration_seconds = coalesce(%s, duration_seconds), updated_at = now()
 WHERE id = %s AND status NOT IN ('applied', 'abandoned')
RETURNING id
"""

Q_BULK_ABANDON_FENCED = """
UPDATE {schema}.bulk_jobs
   SET status = 'abandoned',
       fence_until = coalesce(fence_until, now() + make_interval(secs => %s)),
       updated_at = now()
 WHERE id = %s AND status NOT IN ('applied', 'abandoned')
RETURNING id
"""

Q_BULK_FENCES = """
SELECT id, entries, extract(epoch FROM fence_until - now())::float8 AS seconds_left
  FROM {schema}.bulk_jobs
 WHERE pipeline = %s AND fence_until IS NOT NULL AND fence_until > now()
 ORDER BY id
"""

# a callback for a job whose id we never got: it has finished. fence_until = now() ends a
# fence, and one set later (a restart's recover) keeps it (coalesce above)
Q_BULK_UNFENCE = """
UPDATE {schema}.bulk_jobs SET fence_until = now()
 WHERE id = %s AND job_id IS NULL AND (fence_until IS NULL OR fence_until > now())
"""

Q_BULK_DURATIONS = """
SELECT record_count, duration_seconds, extract(epoch FROM updated_at)::float8 AS measured_at FROM (
    SELECT id, record_count, duration_seconds, updated_at FROM {schema}.bulk_jobs
     WHERE pipeline = %s AND status = 'applied' AND duration_seconds IS NOT NULL
     ORDER BY id DESC LIMIT %s
) recent ORDER BY id
"""

Q_BULK_OPEN = """
SELECT id, pipeline, status, operation, file_id, job_id, callback_secret, entries, record_count,
       created_at
  FROM {schema}.bulk_jobs
 WHERE pipeline = %s AND status = ANY(%s)
 ORDER BY id
"""

Q_BULK_BY_SECRET = """
SELECT id, pipeline, job_id FROM {schema}.bulk_jobs
 WHERE job_id = %s AND callback_secret = %s
"""

Q_BULK_COUNTS = """
SELECT status, count(*) FROM {schema}.bulk_jobs WHERE pipeline = %s GROUP BY status
"""


async def bulk_intent(
    conn: AnyConn, schema: str, pipeline: str, operation: str, entries: Sequence[BulkEntry]
) -> int:
    cur = await conn.execute(
        _q(Q_BULK_INTENT, schema),
        # orjson (dumps_json), not psycopg's default json.dumps: ~1.6 -> ~0.2 µs per entry
        # (issue 19); the entries hold strings, integers and NULLs, stored as the same jsonb
        (
            pipeline,
            operation,
            Jsonb([e.to_json() for e in entries], dumps=dumps_json),
            len(entries),
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(_first(row))


async def bulk_uploaded(
    conn: AnyConn, schema: str, job: int, file_id: str, callback_secret: str | None = None
) -> None:
    """The file is on the CRM's file server; the create call comes next. ``callback_secret``
    is stored now, so that the callback of a job whose create answer was lost is recognised."""
    await conn.execute(_q(Q_BULK_UPLOADED, schema), (file_id, callback_secret, job))


async def bulk_created(
    conn: AnyConn, schema: str, job: int, job_id: str, callback_secret: str | None
) -> None:
    await conn.execute(_q(Q_BULK_CREATED, schema), (job_id, callback_secret, job))


async def bulk_completed(
    conn: AnyConn, schema: str, job: int, *, added: int, updated: int, skipped: int
) -> None:
    await conn.execute(_q(Q_BULK_COMPLETED, schema), (added, updated, skipped, job))


async def bulk_failed(conn: AnyConn, schema: str, job: int, error: str) -> None:
    await conn.execute(_q(Q_BULK_FAILED, schema), (error[:1000], job))


async def bulk_finish(
    conn: AnyConn,
    schema: str,
    job: int,
    status: BulkStatus,
    *,
    duration: float | None = None,
) -> bool:
    """Mark a job ``applied`` or ``abandoned``; False if it already was (fenced).
    ``duration``: intent to result in seconds, when this process ran the whole job."""
    if status not in (BulkStatus.APPLIED, BulkStatus.ABANDONED):
        raise ValueError("a job finishes as applied or abandoned")
    cur = await conn.execute(_q(Q_BULK_FINISH, schema), (str(status), duration, job))
    return await cur.fetchone() is not None


async def bulk_abandon_fenced(conn: AnyConn, schema: str, job: int, seconds: float) -> bool:
    """Abandon a job whose create call may have reached the CRM: its keys stay fenced for
    ``seconds`` from now (database clock) or until its callback. False if already finished."""
    cur = await conn.execute(_q(Q_BULK_ABANDON_FENCED, schema), (float(seconds), job))
    return await cur.fetchone() is not None


@dataclass(frozen=True, slots=True)
class BulkFence:
    """An abandoned job that may still write on the CRM: its keys wait ``seconds_left``."""

    job: int
    keys: list[str]
    seconds_left: float


async def bulk_fences(conn: AnyConn, schema: str, pipeline: str) -> list[BulkFence]:
    cur = await conn.execute(_q(Q_BULK_FENCES, schema), (pipeline,))
    out: list[BulkFence] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        raw = row["entries"]
        if isinstance(raw, str | bytes):
            raw = orjson.loads(raw)
        keys = [str(e["key"]) for e in raw]
        out.append(BulkFence(int(row["id"]), keys, float(row["seconds_left"])))
    return out


async def bulk_unfence(conn: AnyConn, schema: str, job: int) -> None:
    """The job (one whose id never came back) can no longer write: its callback came. Ends
    its fence, now or when a later ``bulk_abandon_fenced`` would set one."""
    await conn.execute(_q(Q_BULK_UNFENCE, schema), (job,))


async def bulk_durations(
    conn: AnyConn, schema: str, pipeline: str, limit: int = 10
) -> list[tuple[int, float, float]]:
    """(records, seconds, measured at: epoch seconds of the row's last update, when its result
    was applied) of the pipeline's latest measured jobs, oldest first."""
    cur = await conn.execute(_q(Q_BULK_DURATIONS, schema), (pipeline, limit))
    out: list[tuple[int, float, float]] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out.append(
            (int(row["record_count"]), float(row["duration_seconds"]), float(row["measured_at"]))
        )
    return out


async def open_bulk_jobs(
    conn: AnyConn, schema: str, pipeline: str, statuses: Iterable[str] = OPEN_BULK_STATUSES
) -> list[BulkJobRow]:
    cur = await conn.execute(_q(Q_BULK_OPEN, schema), (pipeline, list(statuses)))
    out: list[BulkJobRow] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        raw = row["entries"]
        if isinstance(raw, str | bytes):
            raw = orjson.loads(raw)
        out.append(
            BulkJobRow(
                id=int(row["id"]),
                pipeline=row["pipeline"],
                status=BulkStatus(row["status"]),
                operation=row["operation"],
                file_id=row["file_id"],
                job_id=row["job_id"],
                callback_secret=row["callback_secret"],
                entries=[BulkEntry.from_json(e) for e in raw],
                record_count=int(row["record_count"]),
                created_at=row["created_at"],
            )
        )
    return out


async def bulk_status_counts(conn: AnyConn, schema: str, pipeline: str) -> dict[str, int]:
    cur = await conn.execute(_q(Q_BULK_COUNTS, schema), (pipeline,))
    return _pairs(cur, await cur.fetchall())
