"""Outbox retention (split from ``connector.outbox``): delete, in bounded batches, the rows a
pipeline's ``retention`` lets go (passed by the checkpoint, older than the retention, outside
any open snapshot chunk), the outbox's size and age for the gauges, and what was pruned (so
``connector replay --since`` can say when the asked range is gone). Run by the supervised
retention task (``probes.py``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector.config import PipelineConfig
from connector.outbox import pipeline_name

PRUNE_BATCH = 5_000


@dataclass(frozen=True)
class PruneResult:
    """One retention pass of a pipeline: rows deleted and the transactions it took."""

    rows: int
    batches: int


# One bounded batch, in its own transaction. A row may go when (a) its pipeline's checkpoint
# has passed it, exactly as ``ReadPosition.passed`` says: ``id <= last_id`` and its writer is
# not pending at that position (not in the listed xids, below the open-ended horizon); a
# pipeline without a checkpoint keeps everything; (b) it was captured more than ``retention``
# ago by the database's clock (the replay window: `connector replay --since` reaches back at
# least that far); (c) it is not a row of a snapshot (initial sync) that has not finished.
# Rows of transactions still running are invisible to this statement and cannot be deleted;
# once such a transaction commits its rows are pending at the checkpoint until a read has
# delivered them (``test_prune_never_takes_a_late_commit_before_it_is_read``). SKIP LOCKED and
# the lock_timeout keep the batch from waiting on anyone. The highest offset and capture time
# deleted are kept in ``outbox_pruned`` for `connector replay` (``pruned_bounds``).
_PRUNE_BATCH_SQL = """
WITH victims AS (
    SELECT o.id FROM {outbox} o JOIN {cp} c ON c.pipeline = o.pipeline
     WHERE o.pipeline = %(pipeline)s AND o.id <= c.last_id
       AND (cardinality(c.pending_txids) = 0 OR
            (o.txid < c.pending_txids[array_upper(c.pending_txids, 1)]
             AND o.txid <> ALL(c.pending_txids)))
       AND o.captured_at < clock_timestamp() - %(retention)s::interval
       AND (o.chunk_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM {snapshots} s WHERE s.pipeline = o.pipeline AND s.status <> 'done'))
     ORDER BY o.id LIMIT %(batch)s
     FOR UPDATE OF o SKIP LOCKED
), gone AS (
    DELETE FROM {outbox} d USING victims v WHERE d.id = v.id RETURNING d.id, d.captured_at
), agg AS (
    SELECT count(*) AS n, max(id) AS max_id, max(captured_at) AS max_at FROM gone
), mark AS (
    INSERT INTO {pruned} AS p (pipeline, max_id, max_captured_at, rows_pruned, pruned_at)
    SELECT %(pipeline)s, max_id, max_at, n, now() FROM agg WHERE n > 0
    ON CONFLICT (pipeline) DO UPDATE SET
        max_id = greatest(p.max_id, EXCLUDED.max_id),
        max_captured_at = greatest(p.max_captured_at, EXCLUDED.max_captured_at),
        rows_pruned = p.rows_pruned + EXCLUDED.rows_pruned, pruned_at = now()
)
SELECT n FROM agg
"""


async def prune(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: str | PipelineConfig,
    retention: timedelta,
    *,
    batch: int = PRUNE_BATCH,
    max_batches: int | None = None,
    lock_timeout_ms: int = 2000,
) -> PruneResult:
    """Delete ``pipeline``'s outbox rows that retention may drop (see ``_PRUNE_BATCH_SQL``:
    passed by the checkpoint, captured more than ``retention`` ago, not of an unfinished
    snapshot), ``batch`` rows per transaction, until none is left or ``max_batches`` ran.
    ``conn`` must be in autocommit mode (each batch commits on its own, so locks are short)."""
    pipeline = pipeline_name(pipeline)
    query = sql.SQL(_PRUNE_BATCH_SQL).format(
        outbox=sql.Identifier(schema, "outbox"),
        cp=sql.Identifier(schema, "checkpoints"),
        snapshots=sql.Identifier(schema, "snapshots"),
        pruned=sql.Identifier(schema, "outbox_pruned"),
    )
    params = {"pipeline": pipeline, "retention": retention, "batch": batch}
    total = batches = 0
    while max_batches is None or batches < max_batches:
        async with conn.transaction():
            await conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms"))
            )
            cur = await conn.cursor(row_factory=tuple_row).execute(query, params)
            row = await cur.fetchone()
        n = int(row[0]) if row is not None else 0
        batches += 1
        total += n
        if n < batch:
            break
        await asyncio.sleep(0)  # let the rest of the process run between batches
    return PruneResult(total, batches)


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox holds for a pipeline (the retention task's gauges)."""

    rows: int
    oldest_age_seconds: float  # 0 when empty
    table_bytes: int  # pg_total_relation_size of the whole outbox (all pipelines)


async def outbox_stats(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> OutboxStats:
    """Rows of ``pipeline`` in the outbox (an index-only count: its cost grows with the rows
    kept), the age of the oldest by capture time, and the size of the outbox table with its
    indexes and TOAST."""
    pipeline = pipeline_name(pipeline)
    outbox = sql.Identifier(schema, "outbox")
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT count(*),"
            " coalesce(extract(epoch FROM clock_timestamp() - min(captured_at)), 0)::float8,"
            " pg_total_relation_size(%s::regclass)"
            " FROM {} WHERE pipeline = %s"
        ).format(outbox),
        (outbox.as_string(conn), pipeline),
    )
    row = await cur.fetchone()
    assert row is not None
    return OutboxStats(int(row[0]), max(float(row[1]), 0.0), int(row[2]))


@dataclass(frozen=True)
class PrunedBounds:
    """How far retention has pruned a pipeline, and what is left (for `connector replay`)."""

    max_pruned_id: int | None  # None: nothing pruned yet
    max_pruned_at: datetime | None
    oldest_kept_id: int | None  # None: the outbox holds nothing of the pipeline
    oldest_kept_at: datetime | None


async def pruned_bounds(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str | PipelineConfig
) -> PrunedBounds:
    pipeline = pipeline_name(pipeline)
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT p.max_id, p.max_captured_at, k.id, k.captured_at"
            " FROM (SELECT 1) one"
            " LEFT JOIN {pruned} p ON p.pipeline = %s"
            " LEFT JOIN LATERAL (SELECT id, captured_at FROM {outbox}"
            "   WHERE pipeline = %s ORDER BY id LIMIT 1) k ON true"
        ).format(
            pruned=sql.Identifier(schema, "outbox_pruned"),
            outbox=sql.Identifier(schema, "outbox"),
        ),
        (pipeline, pipeline),
    )
    row = await cur.fetchone()
    assert row is not None
    return PrunedBounds(
        int(row[0]) if row[0] is not None else None,
        row[1],
        int(row[2]) if row[2] is not None else None,
        row[3],
    )
