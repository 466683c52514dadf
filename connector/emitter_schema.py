"""The emitter's schema-change checks (docs/emitter.md): a mapped column dropped or renamed,
or changed type, while the pipeline ran stops the pipeline (``SchemaChanged``) before anything
of the group is sent. ``SchemaChecks`` is a mixin of :class:`connector.emitter.Emitter`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from connector.coalesce import PendingEntry
from connector.config import PipelineConfig
from connector.errors import DataError, SchemaChanged
from connector.events import Op

# One-shot connections to the source (the legacy database) the emitter may hold at once: the
# catalog query below and the sync-flag write-back. Without a bound, one plan's upsert groups
# (hundreds after a mass update, each with a rejected row) each opened its own connection at
# the same moment, and the legacy server refused everyone with "too many clients" (session
# 16's soak, logical mode; invariant 9: capture is invisible to the legacy application).
SOURCE_CONNECTIONS = 2


class SourceConnections:
    """The bound on the emitter's one-shot source connections, and the catalog query shared
    by concurrent callers (``column_types``)."""

    def __init__(self, limit: int = SOURCE_CONNECTIONS) -> None:
        self.slots = asyncio.Semaphore(limit)
        self._lock = asyncio.Lock()
        self._started = 0  # catalog queries started so far
        self._answer: tuple[int, dict[str, str] | None] = (0, None)  # (its query, the answer)
        self.queries = 0  # catalog queries run (tests)

    def slot(self) -> asyncio.Semaphore:
        """``async with`` it around opening a one-shot source connection."""
        return self.slots

    async def column_types(
        self, query: Callable[[], Awaitable[dict[str, str] | None]]
    ) -> dict[str, str] | None:
        """``query()``'s answer from a run that *started after this call*, so a type change
        committed before the caller saw its effect is in it; callers waiting meanwhile share
        one run. A burst of callers costs at most two queries, one connection at a time."""
        asked_after = self._started
        async with self._lock:
            seq, answer = self._answer
            if seq > asked_after:
                return answer
            self._started += 1
            seq = self._started
            self.queries += 1
            answer = await query()
            self._answer = (seq, answer)
            return answer


class SchemaChecks:
    """Source-table columns and types against the mapping: a mixin of ``Emitter``."""

    pipeline: PipelineConfig
    pool: AsyncConnectionPool[Any]
    schema: str
    source_dsn: str | None
    source_connections: SourceConnections
    _start_types: dict[str, str]

    # ------------------------------------------------------------------ schema changes
    async def _check_source_columns(self, entries: Sequence[PendingEntry]) -> None:
        """Before anything of the group is sent: when a row image lacks a mapped column, ask
        the source table whether the column still exists. Gone (dropped or renamed while the
        pipeline ran): raise :class:`SchemaChanged`, so that the pipeline stops with its
        events behind the checkpoint, instead of a dead letter per row. Still there: the image
        predates a schema change that the mapping already follows; the mapper dead-letters it
        (``MISSING_COLUMN``) and `dead-letters retry` re-captures the current row. Deletes need
        only the key and are not checked. Both capture modes: a trigger's ``to_jsonb`` image
        and a decoded pgoutput row both simply lack the column."""
        mapped = [c for c in self.pipeline.fields if c != self.pipeline.key_column]
        if self.pipeline.subform_of is not None:  # the link to the order: as vital as a field
            mapped.append(self.pipeline.subform_of.parent_column)
        missing = sorted(
            {
                c
                for e in entries
                if e.event.op is not Op.DELETE and e.event.row is not None
                for c in mapped
                if c not in e.event.row
            }
        )
        if not missing:
            return
        present = await self._source_columns()
        gone = [c for c in missing if present is None or c not in present]
        if not gone:
            return
        raise self._column_gone(gone[0])

    def _column_gone(self, col: str) -> SchemaChanged:
        p = self.pipeline
        where = (
            f"pipelines['{p.name}'].fields['{col}'] -> {p.fields[col].field!r}"
            if col in p.fields
            else f"pipelines['{p.name}'].subform_of.parent_column: the line's order"
        )
        return SchemaChanged(
            p.name,
            col,
            f"pipeline {p.name}: column {col!r} of {p.source_table} is mapped"
            f" ({where}) but no longer"
            " exists in the table (dropped or renamed). The pipeline is"
            " stopped before sending any record without that field; every captured change is"
            " kept. Fix: map the column's new name, or remove the mapping if it was dropped,"
            " then restart `connector run`: the held changes flow",
        )

    async def _source_columns(self) -> set[str] | None:
        """The source table's current columns (None without a source connection)."""
        types = await self._shared_column_types()
        return None if types is None else set(types)

    async def _shared_column_types(self) -> dict[str, str] | None:
        """:meth:`_source_column_types` for the per-group checks, which run in every group of a
        plan at once: one query at a time, shared by the groups waiting for it
        (``SourceConnections.column_types``)."""
        if self.source_dsn is None:
            return None
        return await self.source_connections.column_types(self._source_column_types)

    async def _source_column_types(self) -> dict[str, str] | None:
        """The source table's current columns and their types (``format_type``)."""
        if self.source_dsn is None:
            return None
        async with (
            self.source_connections.slot(),
            await psycopg.AsyncConnection.connect(self.source_dsn) as conn,
        ):
            cur = await conn.execute(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)"
                " FROM pg_catalog.pg_attribute a"
                " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                (sql.Identifier(*self.pipeline.table_parts).as_string(conn),),
            )
            return {str(r[0]): str(r[1]) for r in await cur.fetchall()}

    async def load_source_types(self) -> None:
        """Load the baseline of :meth:`_check_type_changes`: the mapped columns' source types
        as first recorded (``source_column_types``; kept across restarts and owners, so that a
        restart or a standby's takeover after a type change does not hide it); a mapped column
        without a row gets its current type."""
        types: dict[str, str] | None = None
        with contextlib.suppress(psycopg.errors.UndefinedTable):
            types = await self._source_column_types()
        if types is None:
            return
        mapped = [c for c in self.pipeline.fields if c != self.pipeline.key_column]
        gone = [c for c in mapped if c not in types]
        if gone:
            # restarted without fixing the mapping after a drop or rename: stop again at once
            raise self._column_gone(gone[0])
        current = {c: t for c, t in types.items() if c in mapped}
        table = sql.Identifier(self.schema, "source_column_types")
        async with self.pool.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "DELETE FROM {} WHERE pipeline = %s AND NOT (column_name = ANY(%s))"
                ).format(table),
                (self.pipeline.name, mapped),
            )
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {} (pipeline, column_name, source_type)"
                    " SELECT %s, c, t FROM unnest(%s::text[], %s::text[]) AS u(c, t)"
                    " ON CONFLICT (pipeline, column_name) DO NOTHING"
                ).format(table),
                (self.pipeline.name, list(current), list(current.values())),
            )
            cur = await conn.execute(
                sql.SQL("SELECT column_name, source_type FROM {} WHERE pipeline = %s").format(
                    table
                ),
                (self.pipeline.name,),
            )
            self._start_types = {str(r[0]): str(r[1]) for r in await cur.fetchall()}

    async def _check_type_changes(self, rejected: Sequence[tuple[PendingEntry, DataError]]) -> None:
        """A mapped value that cannot be converted is a per-row dead letter, unless the
        column's type has changed since the pipeline started: then the change of type is the
        cause, and the pipeline stops (:class:`SchemaChanged`) before sending anything of the
        group. Restarting with the mapping unchanged takes the new type as the baseline (values
        the field cannot hold are dead letters from then on): that decision is the
        operator's."""
        if not rejected or not self._start_types:
            return
        by_field = {m.field: c for c, m in self.pipeline.fields.items()}
        columns = sorted({by_field[x.field] for _, x in rejected if x.field in by_field})
        columns = [c for c in columns if c in self._start_types]
        if not columns:
            return
        now = await self._shared_column_types()
        if now is None:
            return
        for col in columns:
            before, after = self._start_types[col], now.get(col)
            if after is None or after == before:
                continue  # a missing column is _check_source_columns' business
            p = self.pipeline
            m = p.fields[col]
            raise SchemaChanged(
                p.name,
                col,
                f"pipeline {p.name}: column {col!r} of {p.source_table} changed type from"
                f" {before} to {after} while the connector ran, and its values no longer"
                f" convert to the CRM field {m.field!r} ({m.type}, pipelines['{p.name}']"
                f".fields['{col}']). The pipeline is stopped before sending; every captured"
                " change is kept. Fix: change the column back, or change (or remove) the"
                " mapping to fit the new type, then restart `connector run`. Restarting with"
                " the mapping unchanged accepts the new type: values the field cannot hold"
                " then become dead letters",
            )
