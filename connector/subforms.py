"""A subform pipeline's line sets, read at send time (issue 21; docs/related-tables.md,
"Subforms").

Zoho replaces a record's whole subform on a write that names it: a row with one of the record's
row ids is kept and updated, a row without an id is created, rows not listed are deleted, and
``[]`` deletes them all (Zoho, "Update Subform Data"; zoho-crm-api.md). So a line change is never
sent alone: its parent is written with the **complete current line set**, and the lines that
moved to another parent or were deleted must rewrite the parent they left. Two parts here:

- :func:`read_line_sets` reads the current lines of many parents in one query, as the row
  images the capture writes to the outbox (``to_jsonb`` under the pinned image settings, so
  ``SubformMapper``'s converters see the same values), and turns each parent's set into its
  subform value (no row ids: decided in session 16, every write names every current line). A
  set that cannot be written whole (over ``SUBFORM_MAX_ROWS`` lines, a line whose value does
  not convert, a parent key the column's type cannot hold) is reported per parent in
  ``failed`` and never sent partly: a partial set would delete the rows left out.
- :func:`parents_touched` says which parents a batch of line events rewrites: each line's new
  parent, and the parent it was last written under when that differs (a line moved to another
  order changes both) or when the line is deleted. The event's image names only the new parent
  (the trigger's NEW row, pgoutput's new tuple; a logical delete carries the key only), so the
  parent a line was last written under comes from a memory the caller keeps (``key_state`` of
  the lines pipeline, per the design).

Used by the subform engine (``connector/emitter_subform.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector.capture import pin_image_settings
from connector.config import PipelineConfig
from connector.errors import DataError
from connector.mapping import SubformMapper, line_order
from connector.outbox import load_row

#: Parent keys per query (one ``= ANY`` array; far below PostgreSQL's limits, and a set of
#: lines per parent is at most ``SUBFORM_MAX_ROWS`` + 1 rows worth reading)
READ_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class LineSets:
    """What :func:`read_line_sets` found, for every parent key asked exactly once."""

    #: parent key → its subform value (``[]``: the parent has no line now, so its rows go)
    values: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: parent key → why its set cannot be written whole (nothing of it is sent)
    failed: dict[str, DataError] = field(default_factory=dict)
    #: lines read from the table
    lines: int = 0
    #: parent key → the keys of the lines in its value (line order), for every set in values
    line_keys: dict[str, list[str]] = field(default_factory=dict)


async def parent_column_type(conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig) -> str:
    """The SQL type of the pipeline's ``subform_of.parent_column`` (``format_type``), so the
    asked keys (text) are cast to it and the column's index serves the lookup."""
    sub = pipeline.subform_of
    if sub is None:
        raise ValueError(f"pipeline {pipeline.name!r} has no subform_of")
    cur = await conn.cursor(row_factory=tuple_row).execute(
        "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attname = %s AND NOT a.attisdropped"
        " AND a.attnum > 0",
        (sql.Identifier(*pipeline.table_parts).as_string(conn), sub.parent_column),
    )
    row = await cur.fetchone()
    if row is None:
        raise DataError(
            "MISSING_COLUMN",
            f"{pipeline.source_table} has no column {sub.parent_column!r}"
            f" (subform_of.parent_column of pipeline {pipeline.name!r})",
        )
    return str(row[0])


async def read_line_sets(
    conn: psycopg.AsyncConnection[Any],
    mapper: SubformMapper,
    parent_keys: Iterable[str],
    *,
    column_type: str,
) -> LineSets:
    """The complete current line set of each parent in ``parent_keys``, as its subform value.

    One statement per :data:`READ_BATCH` parents, so each batch's sets come from one snapshot.
    Lines are grouped under the key text as asked (``01`` asked of an integer column finds the
    lines of order 1 and is answered as ``01``), never under a text of their own, so a key is
    never answered ``[]`` (which would delete its rows) because it was written differently.
    ``column_type`` is :func:`parent_column_type`'s answer. Runs in the caller's transaction if
    there is one (as a savepoint), else in its own.
    """
    asked = list(dict.fromkeys(parent_keys))
    failed: dict[str, DataError] = {}
    values: dict[str, list[dict[str, Any]]] = {}
    count = 0
    grouped: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(asked), READ_BATCH):
        batch = asked[i : i + READ_BATCH]
        try:
            found = await _select(conn, mapper, batch, column_type)
        except psycopg.DataError:
            # a key the column's type cannot hold (``abc`` for an integer): find it, one by
            # one, and answer the others (the whole batch failed in one statement)
            found = []
            for key in batch:
                try:
                    found += await _select(conn, mapper, [key], column_type)
                except psycopg.DataError as exc:
                    failed[key] = DataError(
                        "BAD_PARENT_KEY",
                        f"parent key {key!r} of {mapper.parent.name} is not a value of"
                        f" {mapper.pipeline.source_table}.{mapper.parent_column}"
                        f" ({column_type}): {exc.diag.message_primary}",
                        field=mapper.field,
                    )
        for key, image in found:
            grouped.setdefault(key, []).append(image)
            count += 1
    line_keys: dict[str, list[str]] = {}
    for key in asked:
        if key in failed:
            continue
        lines = grouped.get(key, [])
        try:
            values[key] = mapper.to_rows(lines, {})
            line_keys[key] = sorted((mapper.key_of(x) for x in lines), key=line_order)
        except DataError as exc:
            failed[key] = exc.detached()
    return LineSets(values, failed, count, line_keys)


async def _select(
    conn: psycopg.AsyncConnection[Any],
    mapper: SubformMapper,
    keys: Sequence[str],
    column_type: str,
) -> list[tuple[str, dict[str, Any]]]:
    query = sql.SQL(
        "SELECT k.k, to_jsonb(t.*)::text FROM unnest(%s::text[]) AS k(k)"
        " JOIN {table} t ON t.{parent} = k.k::{typ}"
    ).format(
        table=sql.Identifier(*mapper.pipeline.table_parts),
        parent=sql.Identifier(mapper.parent_column),
        typ=sql.SQL(column_type),  # from pg_catalog.format_type, not from configuration text
    )
    async with conn.transaction():
        await pin_image_settings(conn)
        cur = await conn.cursor(row_factory=tuple_row).execute(query, (list(keys),))
        rows = await cur.fetchall()
    return [(str(k), load_row(image)) for k, image in rows]


@dataclass(frozen=True, slots=True)
class LineEvent:
    """One line event as the outbox holds it: the line key, the operation and the image
    (``None`` or key-only for a delete)."""

    key: str
    op: str  # "insert" | "update" | "delete"
    row: Mapping[str, Any] | None


def parents_touched(
    mapper: SubformMapper,
    events: Iterable[LineEvent],
    last_parent: Mapping[str, str | None],
) -> tuple[set[str], dict[str, str | None]]:
    """The parents whose line sets ``events`` change, and the new memory of each line's parent.

    ``last_parent``: line key → the parent the line was last written under (``None`` or absent:
    none known). An insert or update touches the image's parent and, if different, the
    remembered one (the line moved: both orders are rewritten); a line whose parent column is
    NULL belongs to no parent and touches only the one it left. A delete touches the
    remembered parent and, when the image still names one (a trigger's full old row), that
    one too. Events are taken in order; the returned memory holds each line's parent after the
    last one (``None``: deleted or orphaned).
    """
    touched: set[str] = set()
    memory: dict[str, str | None] = {}
    for ev in events:
        before = memory[ev.key] if ev.key in memory else last_parent.get(ev.key)
        if before is not None:
            touched.add(before)
        if ev.op == "delete":
            named = _named_parent(mapper, ev.row)
            if named is not None:
                touched.add(named)
            memory[ev.key] = None
            continue
        if ev.row is None:
            raise ValueError(f"a {ev.op} event of line {ev.key!r} without its image")
        if mapper.parent_column not in ev.row:  # not NULL: absent (an image older than a
            # rename); taken as "no order" it would delete the line's row from its order
            raise DataError(
                "MISSING_COLUMN",
                f"the line has no column {mapper.parent_column!r} (subform_of.parent_column);"
                " was the column renamed or dropped?",
                field=mapper.field,
            )
        now = mapper.parent_key(dict(ev.row))
        if now is not None:
            touched.add(now)
        memory[ev.key] = now
    return touched, memory


def _named_parent(mapper: SubformMapper, row: Mapping[str, Any] | None) -> str | None:
    if row is None or mapper.parent_column not in row:
        return None
    return mapper.parent_key(dict(row))
