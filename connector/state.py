"""All SQL on the connector's own bookkeeping tables.

``key_state``, ``dead_letters``, ``bulk_jobs``, ``snapshots``, ``snapshot_chunks`` and
``credit_ledger`` are read and written only through this module. Every query is a named
constant; the state schema is substituted as a quoted identifier (``psycopg.sql``), never by
string formatting. Functions take an open connection and run in whatever transaction the
caller holds, so that an effect and its bookkeeping can be committed together (a bulk job's
result is applied to ``key_state`` and the job marked ``applied`` in one transaction).

xid8 and pg_snapshot values travel as text (``::text`` out, ``::xid8`` / ``::pg_snapshot`` in).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from connector.events import EventStamp, SnapshotVisibility
from connector.mapping import dumps_json

AnyConn = psycopg.AsyncConnection[Any]


def _q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(schema=sql.Identifier(schema))


def _snap_text(snapshot: SnapshotVisibility | None) -> str | None:
    return None if snapshot is None else str(snapshot)


def _stamp(version: Any, source_xid: Any, snapshot: Any) -> EventStamp | None:
    if version is None:
        return None
    snap = SnapshotVisibility.parse(str(snapshot)) if snapshot is not None else None
    return EventStamp(int(version), int(source_xid) if source_xid is not None else 0, snap)


# --------------------------------------------------------------------------- key_state


@dataclass(frozen=True, slots=True)
class KeyState:
    key: str
    crm_id: str | None
    stamp: EventStamp | None  # last acknowledged or dead-lettered event
    deleted: bool
    status: str
    synced_at: datetime | None
    sent_hash: bytes | None = None  # hash of the mapped record last acknowledged (upsert API)


@dataclass(frozen=True, slots=True)
class Ack:
    """The CRM acknowledged the event with this stamp for ``key``; ``sent_hash``: the hash of
    the record the upsert API wrote (None: unknown, which clears the stored one)."""

    key: str
    stamp: EventStamp
    crm_id: str | None
    deleted: bool = False
    sent_hash: bytes | None = None


Q_KEY_STATES = """
SELECT key, crm_id, version, source_xid::text AS source_xid, snapshot::text AS snapshot,
       deleted, status, synced_at, sent_hash
  FROM {schema}.key_state
 WHERE pipeline = %s AND key = ANY(%s)
"""

# sent_hash is a binary parameter (%b): a bytea[] in text format is escaped element by element
# in Python by psycopg, ~20 µs per acknowledged upsert; binary, ~0.3 µs (issue 19)
Q_ACK = """
INSERT INTO {schema}.key_state AS k
       (pipeline, key, crm_id, version, source_xid, snapshot, deleted, status, last_error,
        synced_at, updated_at, sent_hash)
SELECT %s, a.key, a.crm_id, a.version, a.source_xid::xid8, a.snapshot::pg_snapshot, a.deleted,
       'synced', NULL, now(), now(), a.sent_hash
  FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::boolean[],
              %b::bytea[])
       AS a(key, crm_id, version, source_xid, snapshot, deleted, sent_hash)
ON CONFLICT (pipeline, key) DO UPDATE
   SET crm_id = coalesce(EXCLUDED.crm_id, k.crm_id),
       version = EXCLUDED.version, source_xid = EXCLUDED.source_xid,
       snapshot = EXCLUDED.snapshot, deleted = EXCLUDED.deleted, status = 'synced',
       last_error = NULL, synced_at = now(), updated_at = now(), sent_hash = EXCLUDED.sent_hash
"""

Q_FORGET_SENT = """
UPDATE {schema}.key_state SET sent_hash = NULL
 WHERE pipeline = %s AND key = ANY(%s) AND sent_hash IS NOT NULL
"""

Q_RESOLVE_DEAD_LETTERS = """
UPDATE {schema}.dead_letters
   SET status = 'resolved', updated_at = now()
 WHERE pipeline = %s AND key = ANY(%s) AND status IN ('open', 'retried')
"""

Q_SET_CRM_ID = """
INSERT INTO {schema}.key_state AS k (pipeline, key, crm_id)
VALUES (%s, %s, %s)
ON CONFLICT (pipeline, key) DO UPDATE SET crm_id = EXCLUDED.crm_id, updated_at = now()
"""

Q_KEY_STATUS_COUNTS = """
SELECT CASE WHEN deleted AND status = 'synced' THEN 'deleted' ELSE status END, count(*) AS n
  FROM {schema}.key_state WHERE pipeline = %s GROUP BY 1
"""


async def key_states(
    conn: AnyConn, schema: str, pipeline: str, keys: Sequence[str]
) -> dict[str, KeyState]:
    """The stored state of the given keys (absent keys are not in the result)."""
    if not keys:
        return {}
    cur = await conn.execute(_q(Q_KEY_STATES, schema), (pipeline, list(keys)))
    out: dict[str, KeyState] = {}
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out[row["key"]] = KeyState(
            key=row["key"],
            crm_id=row["crm_id"],
            stamp=_stamp(row["version"], row["source_xid"], row["snapshot"]),
            deleted=bool(row["deleted"]),
            status=row["status"],
            synced_at=row["synced_at"],
            sent_hash=bytes(row["sent_hash"]) if row["sent_hash"] is not None else None,
        )
    return out


async def forget_sent(conn: AnyConn, schema: str, pipeline: str, keys: Sequence[str]) -> None:
    """Forget what was last sent for ``keys``: their next upsert is sent even when its mapped
    record is identical (a repair, a replay with resend, a retry must reach the CRM)."""
    if keys:
        await conn.execute(_q(Q_FORGET_SENT, schema), (pipeline, list(keys)))


async def record_acks(conn: AnyConn, schema: str, pipeline: str, acks: Sequence[Ack]) -> None:
    """Store acknowledgements and resolve the keys' open dead letters (a newer version arrived)."""
    if not acks:
        return
    keys = [a.key for a in acks]
    await conn.execute(
        _q(Q_ACK, schema),
        (
            pipeline,
            keys,
            [a.crm_id for a in acks],
            [a.stamp.version for a in acks],
            [str(a.stamp.source_xid) for a in acks],
            [_snap_text(a.stamp.snapshot) for a in acks],
            [a.deleted for a in acks],
            [a.sent_hash for a in acks],
        ),
    )
    await conn.execute(_q(Q_RESOLVE_DEAD_LETTERS, schema), (pipeline, keys))


async def key_status_counts(conn: AnyConn, schema: str, pipeline: str) -> dict[str, int]:
    cur = await conn.execute(_q(Q_KEY_STATUS_COUNTS, schema), (pipeline,))
    return _pairs(cur, await cur.fetchall())


# --------------------------------------------------------------------------- dead_letters


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: str
    stamp: EventStamp
    outbox_id: int | None
    payload: dict[str, Any] | None
    code: str
    message: str
    field: str | None = None
    api: str | None = None
    # the CRM's ``details`` of the rejection (maximum_length, supported_values, …)
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    pipeline: str
    key: str
    version: int
    outbox_id: int | None
    payload: Any
    error_code: str
    error_field: str | None
    error_message: str
    api: str | None
    attempts: int
    status: str
    created_at: datetime
    error_details: dict[str, Any] | None = None


# A second dead letter for the same key and version (a replay, a retried bulk row) counts as one
# more attempt of the existing open letter rather than a new row.
# A letter that was `retried` (`connector dead-letters retry` re-captured the key's row) and is
# rejected again is opened again with the new error and version, rather than leaving it
# `retried` beside a new letter (docs/operations-cli.md).
Q_BUMP_DEAD_LETTER = """
UPDATE {schema}.dead_letters
   SET attempts = attempts + 1, error_code = %s, error_field = %s, error_message = %s,
       api = %s, error_details = %s, version = greatest(version, %s),
       outbox_id = coalesce(%s, outbox_id),
       payload = coalesce(%s, payload), status = 'open', updated_at = now()
 WHERE id = (SELECT id FROM {schema}.dead_letters
              WHERE pipeline = %s AND key = %s
                AND ((version = %s AND status = 'open') OR status = 'retried')
              ORDER BY id DESC LIMIT 1)
RETURNING id
"""

Q_INSERT_DEAD_LETTER = """
INSERT INTO {schema}.dead_letters
       (pipeline, key, version, source_xid, outbox_id, payload, error_code, error_field,
        error_message, api, error_details)
VALUES (%s, %s, %s, %s::text::xid8, %s, %s, %s, %s, %s, %s, %s)
"""

# key_state remembers the dead-lettered version so that a replay of older events is filtered;
# crm_id and deleted are kept from the last successful write.
Q_KEY_FAILED = """
INSERT INTO {schema}.key_state AS k
       (pipeline, key, version, source_xid, snapshot, status, last_error, updated_at)
VALUES (%s, %s, %s, %s::text::xid8, %s::pg_snapshot, 'failed', %s, now())
ON CONFLICT (pipeline, key) DO UPDATE
   SET version = EXCLUDED.version, source_xid = EXCLUDED.source_xid,
       snapshot = EXCLUDED.snapshot, status = 'failed', last_error = EXCLUDED.last_error,
       updated_at = now()
"""

Q_LIST_DEAD_LETTERS = """
SELECT id, pipeline, key, version, outbox_id, payload, error_code, error_field, error_message,
       api, attempts, status, created_at, error_details
  FROM {schema}.dead_letters
 WHERE pipeline = %s AND (%s::text IS NULL OR status = %s)
 ORDER BY id
 LIMIT %s
"""

Q_COUNT_OPEN_DEAD_LETTERS = """
SELECT count(*) FROM {schema}.dead_letters WHERE pipeline = %s AND status = 'open'
"""

Q_MARK_DEAD_LETTERS = """
UPDATE {schema}.dead_letters SET status = %s, updated_at = now()
 WHERE pipeline = %s AND id = ANY(%s)
   AND (status = 'open' OR (%s = 'discarded' AND status = 'retried'))
RETURNING id, key, outbox_id
"""


def _details(d: DeadLetter) -> Jsonb | None:
    return Jsonb(d.details, dumps=_dumps) if d.details else None


async def record_dead_letters(
    conn: AnyConn, schema: str, pipeline: str, letters: Sequence[DeadLetter]
) -> None:
    for d in letters:
        cur = await conn.execute(
            _q(Q_BUMP_DEAD_LETTER, schema),
            (
                d.code,
                d.field,
                d.message,
                d.api,
                _details(d),
                d.stamp.version,
                d.outbox_id,
                Jsonb(d.payload, dumps=_dumps) if d.payload is not None else None,
                pipeline,
                d.key,
                d.stamp.version,
            ),
        )
        if await cur.fetchone() is None:
            await conn.execute(
                _q(Q_INSERT_DEAD_LETTER, schema),
                (
                    pipeline,
                    d.key,
                    d.stamp.version,
                    str(d.stamp.source_xid),
                    d.outbox_id,
                    Jsonb(d.payload, dumps=_dumps) if d.payload is not None else None,
                    d.code,
                    d.field,
                    d.message,
                    d.api,
                    _details(d),
                ),
            )
        await conn.execute(
            _q(Q_KEY_FAILED, schema),
            (
                pipeline,
                d.key,
                d.stamp.version,
                str(d.stamp.source_xid),
                _snap_text(d.stamp.snapshot),
                f"{d.code}: {d.message}"[:1000],
            ),
        )


async def list_dead_letters(
    conn: AnyConn, schema: str, pipeline: str, status: str | None = "open", limit: int = 1000
) -> list[DeadLetterRow]:
    cur = await conn.execute(_q(Q_LIST_DEAD_LETTERS, schema), (pipeline, status, status, limit))
    out: list[DeadLetterRow] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out.append(DeadLetterRow(**row))
    return out


async def open_dead_letter_count(conn: AnyConn, schema: str, pipeline: str) -> int:
    cur = await conn.execute(_q(Q_COUNT_OPEN_DEAD_LETTERS, schema), (pipeline,))
    row = await cur.fetchone()
    return int(_first(row)) if row else 0


async def mark_dead_letters(
    conn: AnyConn, schema: str, pipeline: str, ids: Sequence[int], status: str
) -> list[tuple[int, str, int | None]]:
    """Set open letters to ``retried`` or ``discarded`` (a ``retried`` letter may be
    discarded too: its retry is still in flight or failed again); returns (id, key,
    outbox_id)."""
    if status not in ("retried", "discarded"):
        raise ValueError(f"status must be 'retried' or 'discarded', got {status!r}")
    cur = await conn.execute(_q(Q_MARK_DEAD_LETTERS, schema), (status, pipeline, list(ids), status))
    out: list[tuple[int, str, int | None]] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out.append((int(row["id"]), str(row["key"]), row["outbox_id"]))
    return out


# Capture-time MISSING_KEY letters (written by the trigger in the legacy transaction, or by the
# logical decoder) never pass through the emitter, so the runtime counts them into
# connector_dead_letters_total from here. They are told apart from the emitter's letters by
# ``api IS NULL`` (the emitter always records the API; its own MISSING_KEY letters, for an empty
# key string, are counted by the emitter itself).
_MK_LETTERS = "pipeline = %(p)s AND error_code = 'MISSING_KEY' AND api IS NULL"  # capture-time only

# start-up: everything after the pipeline's last saved checkpoint (all when none was saved)
Q_MISSING_KEY_START = (
    """
WITH cp AS (
    SELECT updated_at - make_interval(secs => %(margin)s) AS updated_at
      FROM {schema}.checkpoints
     WHERE pipeline = %(p)s AND (last_id > 0 OR cardinality(pending_txids) > 0)
)
SELECT pg_current_snapshot()::text AS snap,
       pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       (SELECT updated_at FROM cp) AS cutoff,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE """
    + _MK_LETTERS
    + """
                AND created_at > coalesce((SELECT updated_at FROM cp), '-infinity')
              ORDER BY id) AS ids
"""
)

Q_MISSING_KEY_NEW = (
    """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE id > %(floor)s AND """
    + _MK_LETTERS
    + """
              ORDER BY id) AS ids
"""
)

# while the start-up window is open: also the letters at or below the floor that were created
# after the checkpoint, or (trigger capture, where source_xid is the writing transaction) that
# the start-up snapshot did not see
Q_MISSING_KEY_NEW_LATE = (
    """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
       (SELECT max(id) FROM {schema}.dead_letters) AS top,
       ARRAY(SELECT id FROM {schema}.dead_letters
              WHERE """
    + _MK_LETTERS
    + """
                AND (id > %(floor)s
                     OR created_at > coalesce(%(cutoff)s::timestamptz, '-infinity')
                     OR (%(snap)s::pg_snapshot IS NOT NULL AND source_xid IS NOT NULL
                         AND NOT pg_visible_in_snapshot(source_xid, %(snap)s::pg_snapshot)))
              ORDER BY id) AS ids
"""
)

Q_BURN_XID = "SELECT pg_current_xact_id()::text::bigint"


@dataclass(slots=True)
class MissingKeyTally:
    """Which capture-time MISSING_KEY letters of one pipeline this process has counted.

    Gap-free without assuming that ids commit in order: ``seen`` holds the counted ids above
    ``floor``, and the floor only moves to ``candidate[0]`` (the highest dead letter id visible
    in some snapshot *S*) once every transaction that was running at *S* has ended, which is
    when the snapshot's xmin reaches ``candidate[1]``, an xid assigned just after *S*. A
    letter id at or below ``candidate[0]`` was drawn before *S*, by a writer that already had
    its xid (trigger capture: the row change came first; logical capture: the pipeline's one
    decoder, serially), so that writer's letter is visible by then and is in ``seen``.

    Start-up (``started`` False): the letters created after the pipeline's last saved
    checkpoint (less ``margin``) are counted (all of them when none was saved); until the first
    candidate is confirmed, letters at or below the floor that commit late are still picked up
    (``cutoff``, and ``snapshot`` in trigger capture).
    """

    started: bool = False
    floor: int = 0
    seen: set[int] = field(default_factory=set)
    candidate: tuple[int, int] | None = None  # (floor to move to, xid the xmin must reach)
    late: bool = False  # the start-up window is open
    cutoff: datetime | None = None
    snapshot: str | None = None


async def count_missing_key_letters(
    conn: AnyConn,
    schema: str,
    pipeline: str,
    tally: MissingKeyTally,
    *,
    trigger: bool,
    margin: float = 0.0,
) -> int:
    """How many capture-time ``MISSING_KEY`` letters of ``pipeline`` became visible since the
    previous call with the same ``tally`` (which it updates). ``conn`` must be in autocommit
    (each statement its own snapshot); ``trigger``: the pipeline captures with triggers;
    ``margin``: seconds before the checkpoint's time that the first call counts from."""
    # all I/O first, then the tally is changed: a failed call (retried on the next refresh)
    # neither counts nor forgets anything
    if not tally.started:
        cur = await conn.execute(_q(Q_MISSING_KEY_START, schema), {"p": pipeline, "margin": margin})
        row = _as_dict(cur, await cur.fetchone())
        ids = {int(i) for i in row["ids"]}
        top = int(row["top"] or 0)
        burnt = await _burn_xid(conn) if top > 0 else None
        tally.started, tally.seen, tally.floor = True, ids, top
        if burnt is not None:
            tally.late, tally.cutoff = True, row["cutoff"]
            tally.snapshot = str(row["snap"]) if trigger else None
            tally.candidate = (top, burnt)
        return len(ids)
    params: dict[str, Any] = {"p": pipeline, "floor": tally.floor}
    if tally.late:
        params |= {"cutoff": tally.cutoff, "snap": tally.snapshot}
        cur = await conn.execute(_q(Q_MISSING_KEY_NEW_LATE, schema), params)
    else:
        cur = await conn.execute(_q(Q_MISSING_KEY_NEW, schema), params)
    row = _as_dict(cur, await cur.fetchone())
    new = {int(i) for i in row["ids"]} - tally.seen
    xmin, top = int(row["xmin"]), int(row["top"] or 0)
    candidate, floor = tally.candidate, tally.floor
    confirmed = False
    if candidate is not None and xmin >= candidate[1]:
        confirmed, floor = True, max(floor, candidate[0])
        candidate = None
    if candidate is None and top > floor:
        candidate = (top, await _burn_xid(conn))
    seen = tally.seen | new
    if confirmed:  # every letter at or below the new floor is in ``seen`` and counted
        seen = {i for i in seen if i > floor}
        tally.late, tally.cutoff, tally.snapshot = False, None, None
    tally.seen, tally.floor, tally.candidate = seen, floor, candidate
    return len(new)


async def _burn_xid(conn: AnyConn) -> int:
    """An xid assigned now (its own, committed, transaction): every xid below it was
    assigned earlier."""
    cur = await conn.execute(Q_BURN_XID)
    return int(_first(await cur.fetchone()))


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
SELECT record_count, duration_seconds FROM (
    SELECT id, record_count, duration_seconds FROM {schema}.bulk_jobs
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
) -> list[tuple[int, float]]:
    """(records, seconds) of the pipeline's latest measured jobs, oldest first."""
    cur = await conn.execute(_q(Q_BULK_DURATIONS, schema), (pipeline, limit))
    out: list[tuple[int, float]] = []
    for r in await cur.fetchall():
        row = _as_dict(cur, r)
        out.append((int(row["record_count"]), float(row["duration_seconds"])))
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


# --------------------------------------------------------------------------- credit_ledger

Q_CREDIT = """
INSERT INTO {schema}.credit_ledger (pipeline, api, credits, records, remaining)
VALUES (%s, %s, %s, %s, %s)
"""

Q_CREDITS_SINCE = """
SELECT coalesce(sum(credits), 0) FROM {schema}.credit_ledger
 WHERE spent_at > now() - %s AND (%s::text IS NULL OR pipeline = %s)
"""

Q_LAST_REMAINING = """
SELECT remaining FROM {schema}.credit_ledger
 WHERE remaining IS NOT NULL AND spent_at > now() - interval '1 day'
 ORDER BY id DESC LIMIT 1
"""


async def record_credits(
    conn: AnyConn,
    schema: str,
    pipeline: str | None,
    *,
    api: str,
    credits: int,
    records: int = 0,
    remaining: int | None = None,
) -> None:
    await conn.execute(_q(Q_CREDIT, schema), (pipeline, api, credits, records, remaining))


async def credits_spent(
    conn: AnyConn,
    schema: str,
    window: timedelta = timedelta(days=1),
    pipeline: str | None = None,
) -> int:
    """Credits spent in the rolling window (all pipelines share the org's allowance)."""
    cur = await conn.execute(_q(Q_CREDITS_SINCE, schema), (window, pipeline, pipeline))
    row = await cur.fetchone()
    return int(_first(row)) if row else 0


Q_CREDITS_AFTER = """
SELECT coalesce(sum(credits), 0) FROM {schema}.credit_ledger
 WHERE spent_at >= %s AND (%s::text IS NULL OR pipeline = %s)
"""


async def credits_since(
    conn: AnyConn, schema: str, since: datetime, pipeline: str | None = None
) -> int:
    cur = await conn.execute(_q(Q_CREDITS_AFTER, schema), (since, pipeline, pipeline))
    row = await cur.fetchone()
    return int(_first(row)) if row else 0


async def last_remaining(conn: AnyConn, schema: str) -> int | None:
    """The CRM's last reported X-API-CREDITS-REMAINING in the last day, if any."""
    cur = await conn.execute(_q(Q_LAST_REMAINING, schema))
    row = await cur.fetchone()
    return None if row is None else int(_first(row))


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


@dataclass(frozen=True, slots=True)
class ChunkRow:
    id: int
    chunk_no: int
    snapshot: SnapshotVisibility
    rows: int


Q_SNAPSHOT_GET = """
SELECT pipeline, status, cursor, chunks_done, rows_read, estimated_rows, report, started_at,
       finished_at
  FROM {schema}.snapshots WHERE pipeline = %s
"""

Q_SNAPSHOT_START = """
INSERT INTO {schema}.snapshots (pipeline, status, estimated_rows)
VALUES (%s, 'running', %s)
ON CONFLICT (pipeline) DO UPDATE
   SET status = 'running', cursor = NULL, chunks_done = 0, rows_read = 0,
       estimated_rows = EXCLUDED.estimated_rows, report = NULL, started_at = now(),
       finished_at = NULL
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


# --------------------------------------------------------------------------- helpers


# --- the takeover wait (checkpoints.crm_quiet_until, migrations 0009 and 0011) ----------------
#
# After an unclean stop a new owner may not write to the CRM before ``crm_quiet_until``:
# requests the previous owner had in flight may still be applied until then. Written when an
# owner takes the pipeline (``take_ownership``), cleared just before its first CRM write
# (``start_writing``), read by ``connector status`` (``writes_wait_left``). These three are
# the column's only reader and writers.

Q_TAKE_OWNERSHIP = """
INSERT INTO {schema}.checkpoints AS c (pipeline, owner) VALUES (%s, %s)
ON CONFLICT (pipeline) DO UPDATE SET owner = EXCLUDED.owner,
  crm_quiet_until = CASE WHEN c.owner IS NOT NULL AND c.crm_quiet_until IS NULL
                         THEN now() + make_interval(secs => %s) ELSE c.crm_quiet_until END
RETURNING greatest(extract(epoch FROM c.crm_quiet_until - now()), 0)::float8 AS wait
"""

Q_START_WRITING = """
UPDATE {schema}.checkpoints SET crm_quiet_until = NULL
 WHERE pipeline = %s AND crm_quiet_until IS NOT NULL
"""

Q_WRITES_WAIT_LEFT = """
SELECT extract(epoch FROM crm_quiet_until - clock_timestamp())::float8
  FROM {schema}.checkpoints WHERE pipeline = %s
"""


async def take_ownership(
    conn: AnyConn, schema: str, pipeline: str, owner: str, request_timeout: float
) -> float:
    """Record ``owner`` as the pipeline's owner; returns the seconds to wait before the first
    CRM write. When a previous owner is still recorded (it did not stop cleanly) and had
    started writing, the wait ends ``request_timeout`` from now; when it never wrote (it was
    killed during its own wait) the earlier end is kept; with no previous owner and no wait
    recorded: 0."""
    cur = await conn.execute(_q(Q_TAKE_OWNERSHIP, schema), (pipeline, owner, request_timeout))
    row = await cur.fetchone()
    if row is None:
        return 0.0
    wait = _as_dict(cur, row)["wait"]
    return 0.0 if wait is None else float(wait)


async def start_writing(conn: AnyConn, schema: str, pipeline: str) -> None:
    """The owner is about to send its first CRM write: a successor must wait in full."""
    await conn.execute(_q(Q_START_WRITING, schema), (pipeline,))


async def writes_wait_left(conn: AnyConn, schema: str, pipeline: str) -> float | None:
    """Seconds until the pipeline's owner may write to the CRM; None when it may now."""
    cur = await conn.execute(_q(Q_WRITES_WAIT_LEFT, schema), (pipeline,))
    row = await cur.fetchone()
    value = None if row is None else _first(row)
    return float(value) if value is not None and value > 0 else None


def _as_dict(cur: Any, row: Any) -> dict[str, Any]:
    """Rows as dicts whatever the connection's row factory (tuple or dict_row)."""
    if isinstance(row, dict):
        return row
    names = [d.name for d in cur.description]
    return dict(zip(names, row, strict=True))


def _first(row: Any) -> Any:
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]


def _pairs(cur: Any, rows: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        vals = list(_as_dict(cur, r).values())
        out[str(vals[0])] = int(vals[1])
    return out


def _dumps(obj: Any) -> str:
    """JSON for payloads holding Decimal / date values (never through binary floats)."""
    return dumps_json(obj).decode()
