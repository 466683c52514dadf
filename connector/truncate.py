"""TRUNCATE of a captured table: what a pipeline does with the outbox's ``truncate`` event.

Both capture modes put one ``truncate`` event (key ``''``, no row image) into the outbox, in its
place in the stream: trigger mode from a statement-level ``AFTER TRUNCATE`` trigger, logical mode
from pgoutput's Truncate message. A TRUNCATE deletes rows without row events, so the keys it
removed are not in the event; what the CRM should do is a decision the operator owns
(``pipelines.on_truncate``, docs/capture.md "TRUNCATE"):

* ``hold`` (default): the CRM records stay. The pipeline goes on with every other change, and
  the truncate is recorded in ``truncations``; a log line (error), the metrics
  ``connector_truncates_total{action="held"}`` and ``connector_truncates_open``, the alert
  ``ConnectorTruncateHeld`` and a ``status`` line show it until ``connector verify --repair``
  (which sees the CRM records whose rows are gone as *extra* and re-captures them as deletes)
  marks it resolved.
* ``propagate``: a delete event per key known to be in the CRM (``key_state``, not deleted) or
  pending in the engine, at the truncate's version, goes through the pipeline like any delete
  (``delete_mode``: deleted, marked, or ignored). A row written after the TRUNCATE (in the same
  transaction or later) has a higher version, so it is never deleted.

A truncate event read again (after a restart) is recorded once and, propagated, yields the same
deletes again, which the coalescer drops when they are not newer than what was acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector.config import PipelineConfig
from connector.events import ChangeEvent, Op
from connector.metrics import Metrics

log = logging.getLogger(__name__)

REPAIR_ADVICE = (
    "run `connector verify --pipeline {name} --repair` to delete (or mark) the CRM records whose "
    'rows are gone, or set on_truncate = "propagate" for this pipeline; `connector snapshot` '
    "does not help (it only upserts the rows that exist)"
)


async def _known_keys(conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str) -> list[str]:
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT key FROM {} WHERE pipeline = %s AND NOT deleted AND crm_id IS NOT NULL"
        ).format(sql.Identifier(schema, "key_state")),
        (pipeline,),
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def _known_count(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: PipelineConfig
) -> int:
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT count(*) FROM {} WHERE pipeline = %s AND NOT deleted AND crm_id IS NOT NULL"
        ).format(sql.Identifier(schema, "key_state")),
        (pipeline.name,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def handle(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    event: ChangeEvent,
    *,
    pending_keys: Iterable[str] = (),
    metrics: Metrics | None = None,
) -> list[ChangeEvent]:
    """Record the truncate ``event`` (once) and return the change events it stands for: none
    when held, a delete per known or pending key when propagated. ``conn`` in autocommit."""
    assert event.op is Op.TRUNCATE
    action = "propagated" if pipeline.on_truncate == "propagate" else "held"
    known = await _known_keys(conn, schema, pipeline.name) if action == "propagated" else []
    crm_keys = len(known) if action == "propagated" else await _known_count(conn, schema, pipeline)
    cur = await conn.execute(
        sql.SQL(
            "INSERT INTO {} (pipeline, outbox_id, version, source_time, action, crm_keys)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(schema, "truncations")),
        (pipeline.name, event.offset, event.version, event.captured_at, action, crm_keys),
    )
    if cur.rowcount == 1:
        extra = {
            "pipeline": pipeline.name,
            "table": pipeline.source_table,
            "offset": event.offset,
            "source_time": event.captured_at.isoformat(),
            "crm_keys": crm_keys,
        }
        if action == "held":
            log.error(
                "TRUNCATE of the source table: the CRM records are kept (on_truncate = "
                '"hold"); ' + REPAIR_ADVICE.format(name=pipeline.name),
                extra=extra,
            )
        else:
            log.warning(
                "TRUNCATE of the source table: applying delete_mode = %r to every key known "
                'in the CRM (on_truncate = "propagate")',
                pipeline.delete_mode,
                extra=extra,
            )
        if metrics is not None:
            metrics.truncates_total.labels(pipeline=pipeline.name, action=action).inc()
            if action == "held":
                metrics.truncates_open.labels(pipeline=pipeline.name).set(
                    await held_count(conn, schema, pipeline.name)
                )
    if action == "held":
        return []
    keys = dict.fromkeys([*known, *pending_keys])
    return [
        ChangeEvent(
            offset=event.offset,
            pipeline=event.pipeline,
            op=Op.DELETE,
            key=key,
            version=event.version,
            source_xid=event.source_xid,
            row=None,
            captured_at=event.captured_at,
        )
        for key in keys
        if key != ""
    ]


async def held_count(conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str) -> int:
    """TRUNCATEs held and not yet resolved by ``verify --repair``."""
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT count(*) FROM {} WHERE pipeline = %s AND action = 'held'"
            " AND resolved_at IS NULL"
        ).format(sql.Identifier(schema, "truncations")),
        (pipeline,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def held(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str
) -> list[dict[str, Any]]:
    """The unresolved held TRUNCATEs of ``pipeline``, oldest first (for ``status``)."""
    cur = await conn.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT outbox_id, source_time, crm_keys FROM {} WHERE pipeline = %s"
            " AND action = 'held' AND resolved_at IS NULL ORDER BY outbox_id"
        ).format(sql.Identifier(schema, "truncations")),
        (pipeline,),
    )
    return [
        {"offset": int(r[0]), "source_time": r[1], "crm_keys": int(r[2])}
        for r in await cur.fetchall()
    ]


async def resolve(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str, up_to_offset: int
) -> int:
    """Mark the held TRUNCATEs at or before ``up_to_offset`` resolved (``verify --repair``
    re-captured the difference after them). Returns how many."""
    cur = await conn.execute(
        sql.SQL(
            "UPDATE {} SET resolved_at = now() WHERE pipeline = %s AND action = 'held'"
            " AND resolved_at IS NULL AND outbox_id <= %s"
        ).format(sql.Identifier(schema, "truncations")),
        (pipeline, up_to_offset),
    )
    return cur.rowcount
