"""`connector verify` of a subform pipeline: its lines compared with the subform rows of its
parent's records, per parent; what ``--repair`` re-captures, and :func:`rewrite_sets`.

A **subform pipeline** (``subform_of``, e.g. ``order_lines`` as the rows of ``Orders.Lines``) is
compared per *parent* (order), as the engine writes it (``connector/emitter_subform.py``): each
order with its complete current line set, no row ids. Its report's keys are order keys
(:func:`verify_subform`):

* the table's lines, grouped by the order their ``parent_column`` names and converted by the
  pipeline's :class:`SubformMapper` (``to_rows``: exactly the rows the engine would send);
* the parent pipeline's records (key field → CRM id), by :func:`crm_records`;
* every subform row, by COQL on the **subform module** (the subform field's ``subform.module``
  in the field metadata, e.g. ``Order_Lines``; Zoho's COQL Overview: "To retrieve records from
  a Subform, specify the Subform module's API name"), keyset-paged on the row id as records are,
  each row naming its record in ``Parent_Id`` (Kaizen #124 "Accessing Subform using Zoho CRM
  APIs"); the same 3 credits per 2,000 rows (that a subform module is charged as any COQL call
  is UNCONFIRMED first-hand), plus one field metadata call.

* **different**: an order in the CRM whose rows, as a multiset (row order is not compared;
  fields by meaning, :func:`same_value`), are not its lines (an order without lines must have
  no rows); the report says how many rows each side holds and shows one row of each side that
  the other lacks;
* **missing**: an order with lines whose record is not in the CRM (records marked deleted under
  ``delete_mode = "mark"`` are not compared: the engine writes no marked order);
* **dead-lettered**: an order one of whose lines has an open dead letter (the order the line is
  under in the table, and the one it was last written or tried under, ``key_state.crm_id``), or
  whose line set cannot be written whole (``SUBFORM_LIMIT``, a value that does not convert).

Repair (:func:`~connector.verify.recapture`, ``connector/verify.py``): the keys re-captured are
lines (:meth:`VerifyReport.repair_keys`): for each mismatched order, its current lines in the
table and the lines last written under it that are no longer there (moved: re-captured with the
order they are under now; deleted: as a delete), so the engine rewrites the order with its
complete current set. :func:`rewrite_sets` also marks each differing order's set to be written
again (``subform_sets``, migration 14): that reaches an order no line event would rewrite.

:func:`~connector.verify.verify` dispatches here; what both comparisons share (the report,
:func:`same_value`, :func:`crm_records`) is in ``connector/verify_common.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from connector import state
from connector.config import PipelineConfig
from connector.emitter_subform import Q_SETS_UNWRITTEN
from connector.errors import ConfigError, DataError
from connector.mapping import SubformMapper, line_order
from connector.state_common import _q
from connector.verify_common import (
    CrmRead,
    Mismatch,
    VerifyReport,
    _coql_pages,
    _counter,
    _lookup_id,
    crm_records,
    open_dead_letter_keys,
    same_value,
    source_rows,
)

# the lines last written (or tried) under the given parents: ``crm_id`` of a line's key_state
# holds the parent's legacy key (a line has no CRM record of its own; emitter_subform)
Q_LINES_UNDER = """
SELECT key, crm_id FROM {schema}.key_state
 WHERE pipeline = %s AND crm_id = ANY(%s::text[]) AND NOT deleted
"""


async def subform_module(client: Any, pipeline: PipelineConfig, parent: PipelineConfig) -> str:
    """The subform module of the pipeline's subform field: ``subform.module`` of the field's
    metadata (``settings/fields?module=<parent module>``, :attr:`FieldMeta.subform_module`)."""
    sub = pipeline.subform_of
    assert sub is not None
    meta = next((f for f in await client.fields(parent.module) if f.api_name == sub.field), None)
    module = getattr(meta, "subform_module", None) if meta is not None else None
    if not module:
        raise ConfigError(
            f"pipelines[{pipeline.name!r}].subform_of.field",
            f"the CRM's field metadata of {parent.module}.{sub.field} names no subform module"
            + (" (no such field)" if meta is None else f" (data_type {meta.data_type!r})")
            + "; verify reads the rows by COQL on it",
        )
    return str(module)


async def crm_subform_rows(
    client: Any, pipeline: PipelineConfig, module: str, read: CrmRead | None = None
) -> list[dict[str, Any]]:
    """Every row of subform module ``module`` with ``Parent_Id`` and the pipeline's row fields
    (COQL keyset paging on the row id; ``read`` as for :func:`crm_records`)."""
    fields = ["Parent_Id", *dict.fromkeys(m.field for m in pipeline.fields.values())]
    out: list[dict[str, Any]] = []
    async for page in _coql_pages(client, module, fields, read, pipeline.name):
        out += page
    return out


@dataclass
class _Lines:
    """The table's lines by order: images, and each line's order (None: no order)."""

    by_order: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    order_of: dict[str, str | None] = field(default_factory=dict)


def _group_lines(mapper: SubformMapper, source: Mapping[str, dict[str, Any]]) -> _Lines:
    out = _Lines()
    for key, line in source.items():
        try:
            order = mapper.parent_key(line)
        except DataError:  # a parent key no order can have ("", …): in no order's set
            order = None
        out.order_of[key] = order
        if order is not None:
            out.by_order.setdefault(order, []).append(line)
    return out


def _unmatched(
    expected: Sequence[dict[str, Any]], actual: Sequence[dict[str, Any]], types: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of ``expected`` and of ``actual`` that the other side lacks, as multisets: each
    row matches at most one row of the other side with every field the same by meaning
    (:func:`same_value` is an equivalence per field, so matching greedily is exact)."""
    left = list(actual)
    lacking: list[dict[str, Any]] = []
    for row in expected:
        for i, cand in enumerate(left):
            if all(same_value(row.get(f), cand.get(f), t) for f, t in types.items()):
                del left[i]
                break
        else:
            lacking.append(row)
    return lacking, left


def compare_subform(  # noqa: PLR0917
    mapper: SubformMapper,
    source: Mapping[str, dict[str, Any]],
    parents: Mapping[str, Mapping[str, Any]],
    rows: Iterable[Mapping[str, Any]],
    dead_orders: Iterable[str] = (),
    lines: _Lines | None = None,
) -> VerifyReport:
    """Compare a subform pipeline's lines (``source``: line key → image) with the CRM: the
    parent records (``parents``: parent key → record with ``id`` and any delete mark) and every
    subform row (``rows``, each with ``Parent_Id``). ``dead_orders``: orders with a line that has
    an open dead letter. The report's keys are order keys (see the module docstring); its
    ``rows_in_source`` counts the lines read, ``records_in_crm`` the subform rows read."""
    pipeline, parent, name = mapper.pipeline, mapper.parent, mapper.field
    report = VerifyReport(pipeline.name, rows_in_source=len(source), line_keys={})
    lines = lines if lines is not None else _group_lines(mapper, source)
    dead = set(dead_orders)
    types = {m.field: m.type for m in pipeline.fields.values()}
    mark = parent.delete_mark_field if parent.delete_mode == "mark" else None
    marked = {k for k, r in parents.items() if mark and r.get(mark) is True}
    ids = {str(r["id"]): k for k, r in parents.items() if r.get("id") and k not in marked}
    held: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        report.records_in_crm += 1
        order = ids.get(_lookup_id(row.get("Parent_Id")) or "")
        if order is not None:
            held.setdefault(order, []).append({f: row.get(f) for f in types})
    for order in sorted((set(lines.by_order) | set(ids.values())) - marked, key=line_order):
        record = parents.get(order)
        if record is None or not record.get("id"):
            if order in dead:
                report.dead_lettered.append(order)
            else:
                report.missing.append(Mismatch(order, "missing"))
            continue
        try:
            expected = mapper.to_rows(lines.by_order.get(order, []), {})
        except DataError:  # the engine dead-letters a set it cannot write whole
            report.dead_lettered.append(order)
            continue
        actual = held.get(order, [])
        lacking, extra = _unmatched(expected, actual, types)
        if not lacking and not extra:
            continue
        if order in dead:
            report.dead_lettered.append(order)
            continue
        report.different.append(
            Mismatch(
                order,
                "different",
                {
                    f"{name} rows": (len(expected), len(actual)),
                    f"{name} row": (lacking[0] if lacking else None, extra[0] if extra else None),
                },
                crm_id=str(record["id"]),
            )
        )
    return report


async def verify_subform(
    *,
    pipeline: PipelineConfig,
    client: Any,
    source_dsn: str,
    state_dsn: str,
    schema: str,
    parents: Mapping[str, PipelineConfig] | None = None,
) -> VerifyReport:
    """Compare a subform pipeline's lines with the subform rows of its parent's records, per
    order (see the module docstring); ``parents`` holds the parent pipeline. The report's keys
    are order keys; its :attr:`VerifyReport.line_keys` the lines ``--repair`` re-captures."""
    sub = pipeline.subform_of
    assert sub is not None
    parent = (parents or {}).get(sub.pipeline)
    if parent is None:
        raise ConfigError(
            f"pipelines[{pipeline.name!r}].subform_of.pipeline",
            f"pipeline {pipeline.name!r} is a subform of pipeline {sub.pipeline!r}, which is"
            " not configured",
        )
    mapper = SubformMapper(pipeline, parent)
    source = await source_rows(source_dsn, pipeline)
    lines = _group_lines(mapper, source)
    read = CrmRead()
    calls0, credits0 = _counter(client, "calls"), _counter(client, "credits_spent")
    module = await subform_module(client, pipeline, parent)
    read.calls = _counter(client, "calls") - calls0
    read.credits = _counter(client, "credits_spent") - credits0
    records = await crm_records(client, parent, read, fields=[parent.key_field])
    rows = await crm_subform_rows(client, pipeline, module, read)
    async with await psycopg.AsyncConnection.connect(state_dsn, autocommit=True) as conn:
        dead = await open_dead_letter_keys(conn, schema, pipeline.name)
        dead.discard("")  # MISSING_KEY letters name no line
        known = await state.key_states(conn, schema, pipeline.name, sorted(dead))
        dead_orders = {lines.order_of.get(k) for k in dead} | {ks.crm_id for ks in known.values()}
        report = compare_subform(
            mapper, source, records, rows, {o for o in dead_orders if o}, lines
        )
        mismatched = report.keys()
        line_keys: dict[str, list[str]] = {o: [] for o in mismatched}
        for key, order in lines.order_of.items():
            if order in line_keys:
                line_keys[order].append(key)
        if mismatched:  # lines last written under a mismatched order that are not in it now
            cur = await conn.cursor(row_factory=tuple_row).execute(
                _q(Q_LINES_UNDER, schema), (pipeline.name, mismatched)
            )
            for key, order in await cur.fetchall():
                if lines.order_of.get(key) != order:
                    line_keys[order].append(key)
    report.line_keys = {o: sorted(ks, key=line_order) for o, ks in line_keys.items()}
    report.crm_calls = read.calls
    report.crm_credits = read.credits
    return report


# orders whose subform set the lines' engine writes again: the statement the engine uses for
# a set it could not write ('' is no CRM id, so the pass, emitter_subform.Q_SETS_MOVED, every
# 10 s, writes the set again)
Q_SETS_STALE = Q_SETS_UNWRITTEN


async def rewrite_sets(
    *, pipeline: PipelineConfig, keys: Sequence[str], state_dsn: str, schema: str
) -> int:
    """``--repair`` of a subform pipeline: tell its engine to write the current line set of
    each order in ``keys`` again (``subform_sets``, migration 14; the engine's pass
    ``SubformWrites.rewrite_moved_sets`` writes each order in the CRM within about 10 s,
    read from the table under the order's lock). This reaches an order that no line event
    would rewrite (rows added in the CRM to an order that never had a line). Returns the
    orders marked."""
    if pipeline.subform_of is None:
        raise ValueError(f"pipeline {pipeline.name!r} is not a subform pipeline")
    keys = sorted(set(keys))
    if not keys:
        return 0
    async with await psycopg.AsyncConnection.connect(state_dsn, autocommit=True) as conn:
        await conn.execute(_q(Q_SETS_STALE, schema), (pipeline.name, keys))
    return len(keys)
