"""The emitter's sync-flag write-back: ``sync_flag_column`` set on the legacy rows whose
acknowledged image is still current (docs/emitter.md). ``SyncFlags`` is a mixin of
:class:`connector.emitter.Emitter`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from connector.capture import OWN_WRITE_PREFIX, pin_image_settings
from connector.config import PipelineConfig
from connector.crm_values import dumps_json
from connector.emitter_outcome import _Results
from connector.emitter_schema import SourceConnections
from connector.errors import DataError
from connector.events import ChangeEvent, Op

# the emitter's logger: records keep the name they had before the split
log = logging.getLogger("connector.emitter")


class SyncFlags:
    """Writes ``sync_flag_column`` back to the source table: a mixin of ``Emitter``."""

    pipeline: PipelineConfig
    source_dsn: str | None
    source_connections: SourceConnections

    async def write_sync_flags(self, events: Sequence[ChangeEvent]) -> int:
        """Set ``sync_flag_column`` on the legacy rows that are still at the acknowledged
        image (compared without the ignored columns). The trigger ignores updates that touch
        only ignored columns, so this does not produce a capture event."""
        column = self.pipeline.sync_flag_column
        rows = [e for e in events if e.op is not Op.DELETE and e.row is not None]
        if column is None or self.source_dsn is None or not rows:
            return 0
        table = sql.Identifier(*self.pipeline.table_parts)
        key = sql.Identifier(self.pipeline.key_column)
        ignored = list(self.pipeline.ignore_columns)
        async with (
            self.source_connections.slot(),  # bounded: every group of a plan gets here at once
            await psycopg.AsyncConnection.connect(self.source_dsn) as conn,
        ):
            if self.pipeline.capture == "logical":
                # first in the transaction: the decoder then skips its row changes (the
                # flag is an ignored column; without an old image pgoutput cannot tell)
                await conn.execute(
                    "SELECT pg_catalog.pg_logical_emit_message(true, %s, '')", (OWN_WRITE_PREFIX,)
                )
            key_type = await _column_type(conn, self.pipeline)
            await pin_image_settings(conn)
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE {table} AS t SET {flag} = true"
                    " FROM unnest(%s::text[], %s::text[]) AS u(k, img)"
                    " WHERE t.{key} = u.k::{ktype}"
                    " AND (to_jsonb(t.*) - %s::text[]) = (u.img::jsonb - %s::text[])"
                    " AND t.{flag} IS DISTINCT FROM true"
                ).format(
                    table=table,
                    flag=sql.Identifier(column),
                    key=key,
                    ktype=sql.SQL(key_type),
                ),
                (
                    [e.key for e in rows],
                    [dumps_json(e.row).decode() for e in rows],
                    ignored,
                    ignored,
                ),
            )
            await conn.commit()
            return cur.rowcount

    async def _sync_flags(self, res: _Results) -> None:
        if self.pipeline.sync_flag_column is None or not res.acked_events:
            return
        try:
            await self.write_sync_flags(res.acked_events)
        except psycopg.Error as exc:  # the flag is a convenience; the ack is already stored
            log.warning(
                "could not write the sync flag",
                extra={"pipeline": self.pipeline.name, "error": type(exc).__name__},
            )


async def _column_type(conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig) -> str:
    cur = await conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attname = %s AND NOT a.attisdropped",
        (sql.Identifier(*pipeline.table_parts).as_string(conn), pipeline.key_column),
    )
    row = await cur.fetchone()
    if row is None:
        raise DataError("MISSING_COLUMN", f"key column {pipeline.key_column!r} not found")
    return str(row[0])
