"""All SQL on the connector's own bookkeeping tables.

``key_state``, ``dead_letters``, ``bulk_jobs``, ``snapshots``, ``snapshot_chunks`` and
``credit_ledger`` are read and written only through this module (``bulk_jobs`` in
``connector.bulk_state``, ``snapshots`` and ``snapshot_chunks`` in ``connector.snapshot_state``,
the capture-time MISSING_KEY count in ``connector.missing_key``: issue 20; their names are
re-exported here). Every query is a named
constant; the state schema is substituted as a quoted identifier (``psycopg.sql``), never by
string formatting. Functions take an open connection and run in whatever transaction the
caller holds, so that an effect and its bookkeeping can be committed together (a bulk job's
result is applied to ``key_state`` and the job marked ``applied`` in one transaction).

xid8 and pg_snapshot values travel as text (``::text`` out, ``::xid8`` / ``::pg_snapshot`` in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from connector.bulk_state import (
    OPEN_BULK_STATUSES,
    BulkEntry,
    BulkFence,
    BulkJobRow,
    BulkStatus,
    bulk_abandon_fenced,
    bulk_completed,
    bulk_created,
    bulk_durations,
    bulk_failed,
    bulk_fences,
    bulk_finish,
    bulk_intent,
    bulk_status_counts,
    bulk_unfence,
    bulk_uploaded,
    open_bulk_jobs,
)
from connector.events import EventStamp, SnapshotVisibility
from connector.missing_key import (
    MissingKeyTally,
    count_missing_key_letters,
)
from connector.snapshot_state import (
    ChunkRow,
    SnapshotRow,
    add_snapshot_counts,
    chunks,
    finish_snapshot,
    get_snapshot,
    insert_chunk,
    next_chunk_no,
    set_snapshot_upper,
    snapshot_progress,
    start_snapshot,
)
from connector.state_common import AnyConn, _as_dict, _dumps, _first, _pairs, _q, _snap_text, _stamp

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
 WHERE pipeline = %s AND key = ANY(%b::text[])
"""

# sent_hash is a binary parameter (%b): a bytea[] in text format is escaped element by element
# in Python by psycopg, ~20 µs per acknowledged upsert; binary, ~0.3 µs (issue 19). The other
# arrays are binary too: psycopg's text array dumper costs ~0.6 µs per element, binary ~0.2 µs
Q_ACK = """
INSERT INTO {schema}.key_state AS k
       (pipeline, key, crm_id, version, source_xid, snapshot, deleted, status, last_error,
        synced_at, updated_at, sent_hash)
SELECT %s, a.key, a.crm_id, a.version, a.source_xid::xid8, a.snapshot::pg_snapshot, a.deleted,
       'synced', NULL, now(), now(), a.sent_hash
  FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[], %b::boolean[],
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
 WHERE pipeline = %s AND key = ANY(%b::text[]) AND status IN ('open', 'retried')
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
    # a snapshot's acks share one chunk snapshot: its text is built once per distinct value
    snap_texts: dict[SnapshotVisibility | None, str | None] = {None: None}
    snaps: list[str | None] = []
    for a in acks:
        snap = a.stamp.snapshot
        text = snap_texts.get(snap, "")
        if text == "":
            text = snap_texts[snap] = _snap_text(snap)
        snaps.append(text)
    await conn.execute(
        _q(Q_ACK, schema),
        (
            pipeline,
            keys,
            [a.crm_id for a in acks],
            [a.stamp.version for a in acks],
            [str(a.stamp.source_xid) for a in acks],
            snaps,
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


# moved out of this module (issue 20: bulk_state, snapshot_state, missing_key); re-exported
# here for the code that reads them as ``state.X``
__all__ = [
    "OPEN_BULK_STATUSES",
    "BulkEntry",
    "BulkFence",
    "BulkJobRow",
    "BulkStatus",
    "ChunkRow",
    "MissingKeyTally",
    "SnapshotRow",
    "add_snapshot_counts",
    "bulk_abandon_fenced",
    "bulk_completed",
    "bulk_created",
    "bulk_durations",
    "bulk_failed",
    "bulk_fences",
    "bulk_finish",
    "bulk_intent",
    "bulk_status_counts",
    "bulk_unfence",
    "bulk_uploaded",
    "chunks",
    "count_missing_key_letters",
    "finish_snapshot",
    "get_snapshot",
    "insert_chunk",
    "next_chunk_no",
    "open_bulk_jobs",
    "set_snapshot_upper",
    "snapshot_progress",
    "start_snapshot",
]
