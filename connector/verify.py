"""`connector verify`: compare the legacy table with the CRM module; re-capture to repair.

Comparison: every source row is converted with the pipeline's :class:`RecordMapper` (exactly
what the emitter would send) and compared, field by field, with the CRM record that holds the
same key. Values are compared by meaning, not by spelling: numbers as decimals (``12.5`` =
``12.50``), datetimes as instants, ``NULL`` = empty text.

Reading the CRM: COQL keyset paging (:meth:`ZohoClient.coql_pages`): ``select … where id >
{last id} order by id asc limit 2000``, 3 credits per 2,000 records (1.5 credits per 1,000).
Unlike paged Get Records (1 credit per 200, refused past 100,000 records with
``PAGINATION_LIMIT_EXCEEDED``) and COQL ``LIMIT offset, n`` (also capped at 100,000), it has no
record limit — Zoho's documented way to read more than 100,000 records (COQL Limitations page).
A progress line is logged every 50,000 records; the report carries the calls and credits spent.

* **missing**: a source row with no CRM record;
* **extra**: a CRM record whose key is not in the table (a delete that did not arrive; with
  ``delete_mode = "mark"`` a record not marked deleted; with ``"ignore"`` never);
* **different**: both exist and at least one mapped field differs;
* **dead-lettered**: rows whose key has an open dead letter, or that cannot be converted
  (they are reported, not counted as mismatches: the connector set them aside on purpose).

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

Repair (``--repair``, also used by ``replay`` and ``dead-letters retry``) **re-captures** the
keys: in one transaction it locks the source rows (``FOR SHARE``), reads their current image and
appends it to the outbox with a fresh ``version`` from the outbox sequence, exactly as the
capture trigger would for a change of that row (a delete event for a key no longer in the
table). A concurrent update of the same row waits for the lock and therefore gets a later
version, so a repair can never make the CRM older than the table (invariants 2 and 7), and the
running connector (or the next ``run``) delivers the events through the normal pipeline.
For a subform pipeline the keys re-captured are lines (:meth:`VerifyReport.repair_keys`): for
each mismatched order, its current lines in the table and the lines last written under it that
are no longer there (moved: re-captured with the order they are under now; deleted: as a
delete), so the engine rewrites the order with its complete current set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector import state
from connector.capture import pin_image_settings
from connector.config import PipelineConfig
from connector.errors import ConfigError, DataError
from connector.mapping import RecordMapper, SubformMapper, line_order
from connector.outbox import load_row
from connector.state_common import _q

log = logging.getLogger(__name__)


_NUMERIC = frozenset({"integer", "bigint", "decimal", "currency", "double", "percent"})


@dataclass
class Mismatch:
    key: str
    kind: str  # missing | extra | different
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # api: (source, crm)
    crm_id: str | None = None


@dataclass
class CrmRead:
    """What reading the CRM side cost: records read, HTTP calls and credits spent."""

    records: int = 0
    calls: int = 0
    credits: int = 0


@dataclass
class VerifyReport:
    pipeline: str
    rows_in_source: int = 0
    records_in_crm: int = 0
    crm_calls: int = 0
    crm_credits: int = 0
    missing: list[Mismatch] = field(default_factory=list)
    extra: list[Mismatch] = field(default_factory=list)
    different: list[Mismatch] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    repaired: int = 0
    #: a subform pipeline's report (its keys are the parent's, i.e. orders): per mismatched
    #: order, the line keys ``--repair`` re-captures; None for any other pipeline
    line_keys: dict[str, list[str]] | None = None
    #: a subform pipeline's ``--repair``: orders whose set the running engine is told to write
    #: again (:func:`rewrite_sets`), whether or not a line of theirs could be re-captured
    sets_marked: int = 0

    @property
    def mismatches(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different)

    def keys(self) -> list[str]:
        return [m.key for m in (*self.missing, *self.extra, *self.different)]

    def repair_keys(self) -> list[str]:
        """The keys ``--repair`` re-captures: the mismatched keys, or for a subform pipeline
        the lines of the mismatched orders (see the module docstring)."""
        if self.line_keys is None:
            return self.keys()
        return sorted({k for o in self.keys() for k in self.line_keys.get(o, ())}, key=line_order)

    def unrepairable(self) -> list[str]:
        """Mismatched keys that re-capturing cannot reach: a subform pipeline's orders with no
        line in the table and none last written under them (rows added in the CRM to an order
        that never had a line): only a line event rewrites an order."""
        if self.line_keys is None:
            return []
        return [o for o in self.keys() if not self.line_keys.get(o) and not self.sets_marked]

    def to_json(self, limit: int = 100) -> dict[str, Any]:
        def show(items: list[Mismatch]) -> list[dict[str, Any]]:
            return [
                {
                    "key": m.key,
                    "crm_id": m.crm_id,
                    "fields": {k: [str(a), str(b)] for k, (a, b) in m.fields.items()},
                }
                for m in items[:limit]
            ]

        doc: dict[str, Any] = {
            "pipeline": self.pipeline,
            "rows_in_source": self.rows_in_source,
            "records_in_crm": self.records_in_crm,
            "crm_calls": self.crm_calls,
            "crm_credits": self.crm_credits,
            "mismatches": self.mismatches,
            "missing": len(self.missing),
            "extra": len(self.extra),
            "different": len(self.different),
            "dead_lettered": len(self.dead_lettered),
            "repaired": self.repaired,
            "examples": {
                "missing": show(self.missing),
                "extra": show(self.extra),
                "different": show(self.different),
            },
        }
        if self.line_keys is not None:  # a subform pipeline: keys are orders, rows are lines
            doc["lines_to_recapture"] = len(self.repair_keys())
            doc["unrepairable"] = self.unrepairable()[:limit]
        return doc


# --------------------------------------------------------------------------- value comparison


def _as_decimal(v: Any) -> Decimal | None:
    if v is None or v == "":
        return None
    try:
        return Decimal(str(v))
    except (InvalidOperation, ValueError):
        return None


def _as_instant(v: Any) -> datetime | str | None:
    if v is None or v == "":
        return None
    try:
        dt = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    except ValueError:
        return str(v)
    return dt.replace(microsecond=0) if dt.tzinfo is not None else dt


def same_value(expected: Any, actual: Any, crm_type: str) -> bool:
    """True when the CRM's ``actual`` holds what the connector sent as ``expected``."""
    if crm_type in _NUMERIC:
        return _as_decimal(expected) == _as_decimal(actual)
    if crm_type == "datetime":
        return _as_instant(expected) == _as_instant(actual)
    if crm_type == "boolean":
        return bool(expected) == bool(actual) if expected is not None else actual in (None, False)
    if crm_type == "multiselectpicklist":
        return sorted(expected or []) == sorted(actual or [])
    if crm_type == "lookup":  # the same parent record: compared by CRM id (Zoho adds its name)
        return _lookup_id(expected) == _lookup_id(actual)
    return (expected if expected not in ("", None) else None) == (
        actual if actual not in ("", None) else None
    )


def _lookup_id(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("id")
    return None if v in (None, "") else str(v)


# --------------------------------------------------------------------------- reading both sides


async def _column_type(conn: psycopg.AsyncConnection[Any], pipeline: PipelineConfig) -> str:
    schema, table = pipeline.table_parts
    cur = await conn.cursor(row_factory=tuple_row).execute(
        "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attname = %s AND NOT a.attisdropped",
        (sql.Identifier(schema, table).as_string(conn), pipeline.key_column),
    )
    row = await cur.fetchone()
    if row is None:
        raise DataError(
            "MISSING_COLUMN", f"{pipeline.source_table} has no column {pipeline.key_column!r}"
        )
    return str(row[0])


async def source_rows(dsn: str, pipeline: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Every row of the source table as its outbox image (``to_jsonb`` with pinned settings)."""
    out: dict[str, dict[str, Any]] = {}
    table = sql.Identifier(*pipeline.table_parts)
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await pin_image_settings(conn)
        cur = conn.cursor(name="verify_source", row_factory=tuple_row)
        await cur.execute(
            sql.SQL("SELECT {key}::text, to_jsonb(t.*)::text FROM {table} t").format(
                key=sql.Identifier(pipeline.key_column), table=table
            )
        )
        while rows := await cur.fetchmany(5000):
            for key, image in rows:
                if key is not None:
                    out[str(key)] = load_row(image)
        await cur.close()
    return out


PROGRESS_EVERY = 50_000


def _counter(client: Any, name: str) -> int:
    value = getattr(client, name, 0)
    return value if isinstance(value, int) else 0


async def crm_records(
    client: Any,
    pipeline: PipelineConfig,
    read: CrmRead | None = None,
    fields: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every CRM record of the module that has a key, by key (COQL keyset paging on the record
    id, see the module docstring). ``read`` receives the records read and the client's calls
    and credits spent on them (from its ``calls`` / ``credits_spent`` counters); added to what
    it holds. ``fields``: the CRM fields to read (default: every mapped one)."""
    if fields is None:
        mapped = (m.field for c, m in pipeline.fields.items() if c != pipeline.key_column)
        fields = [pipeline.key_field, *mapped]
    fields = list(dict.fromkeys([*fields, pipeline.delete_mark_field or ""]))
    fields = [f for f in fields if f]
    out: dict[str, dict[str, Any]] = {}
    async for page in _coql_pages(client, pipeline.module, fields, read, pipeline.name):
        for rec in page:
            key = rec.get(pipeline.key_field)
            if key is None or key == "":
                continue
            out[str(key)] = rec
    return out


async def _coql_pages(
    client: Any, module: str, fields: Sequence[str], read: CrmRead | None, pipeline: str
) -> AsyncIterator[list[dict[str, Any]]]:
    """:meth:`ZohoClient.coql_pages`, counting into ``read`` what it reads and spends, with a
    progress line every :data:`PROGRESS_EVERY` records."""
    read = read if read is not None else CrmRead()
    calls0 = _counter(client, "calls") - read.calls
    credits0 = _counter(client, "credits_spent") - read.credits
    next_progress = PROGRESS_EVERY
    async for page in client.coql_pages(module, fields):
        read.records += len(page)
        read.calls = _counter(client, "calls") - calls0
        read.credits = _counter(client, "credits_spent") - credits0
        if read.records >= next_progress:
            log.info(
                "verify: %d CRM records read, %d credits",
                read.records,
                read.credits,
                extra={"pipeline": pipeline, "records": read.records},
            )
            next_progress = (read.records // PROGRESS_EVERY + 1) * PROGRESS_EVERY
        yield page
    read.calls = _counter(client, "calls") - calls0
    read.credits = _counter(client, "credits_spent") - credits0


async def open_dead_letter_keys(
    conn: psycopg.AsyncConnection[Any], schema: str, pipeline: str
) -> set[str]:
    rows = await state.list_dead_letters(conn, schema, pipeline, "open", limit=1_000_000)
    return {r.key for r in rows}


def compare(  # noqa: PLR0917
    pipeline: PipelineConfig,
    source: dict[str, dict[str, Any]],
    crm: dict[str, dict[str, Any]],
    dead_letter_keys: set[str] = frozenset(),  # type: ignore[assignment]
    parents: Mapping[str, PipelineConfig] | None = None,
    parent_ids: Mapping[str, Mapping[str, str]] | None = None,
) -> VerifyReport:
    """``parents`` / ``parent_ids``: for a pipeline with lookups, the pipelines they name and,
    per such pipeline, legacy key → CRM id of its records in the CRM: a lookup is right when
    it names the CRM record of the parent the source row names (issue 21)."""
    report = VerifyReport(pipeline.name, rows_in_source=len(source))
    mapper = RecordMapper(pipeline, parents=parents)
    ids = parent_ids or {}

    def resolve(pipeline: str, key: str) -> str | None:
        return ids.get(pipeline, {}).get(key)

    types = {m.field: m.type for c, m in pipeline.fields.items() if c != pipeline.key_column}
    mark = pipeline.delete_mark_field if pipeline.delete_mode == "mark" else None
    live_crm = 0
    for rec in crm.values():
        if mark and rec.get(mark) is True:
            continue
        live_crm += 1
    report.records_in_crm = live_crm
    for key, row in source.items():
        try:
            expected = mapper.to_json(row, resolve)
        except DataError as exc:
            if exc.code == "PARENT_NOT_SYNCED" and key not in dead_letter_keys:
                # the parent the row names is not in the CRM: the child cannot be right there
                found = crm.get(key)
                if found is None:
                    report.missing.append(Mismatch(key, "missing"))
                else:
                    field = exc.field or "?"
                    report.different.append(
                        Mismatch(
                            key,
                            "different",
                            {field: ("<a parent that is not in the CRM>", found.get(field))},
                            crm_id=_str(found.get("id")),
                        )
                    )
                continue
            report.dead_lettered.append(key)
            continue
        found = crm.get(key)
        if found is None or (mark and found.get(mark) is True):
            if key in dead_letter_keys:
                report.dead_lettered.append(key)
            else:
                report.missing.append(Mismatch(key, "missing"))
            continue
        rec = found
        diffs: dict[str, tuple[Any, Any]] = {}
        for api, crm_type in types.items():
            if not same_value(expected.get(api), rec.get(api), crm_type):
                diffs[api] = (expected.get(api), rec.get(api))
        if diffs:
            if key in dead_letter_keys:
                report.dead_lettered.append(key)
            else:
                report.different.append(
                    Mismatch(key, "different", diffs, crm_id=_str(rec.get("id")))
                )
    if pipeline.delete_mode != "ignore":
        for key, rec in crm.items():
            if key in source or (mark and rec.get(mark) is True):
                continue
            report.extra.append(Mismatch(key, "extra", crm_id=_str(rec.get("id"))))
    return report


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


async def verify(
    *,
    pipeline: PipelineConfig,
    client: Any,
    source_dsn: str,
    state_dsn: str,
    schema: str,
    parents: Mapping[str, PipelineConfig] | None = None,
) -> VerifyReport:
    """Compare the pipeline's source table with its CRM module. With lookup fields (``parents``:
    the configuration's pipelines by name), each parent module's keys and ids are read too
    (their calls and credits are in the report) and each lookup is checked to name the CRM
    record of the parent its source row names. A subform pipeline is compared per order with
    the subform rows of its parent's records (:func:`verify_subform`; ``parents`` must hold
    the parent pipeline)."""
    if pipeline.subform_of is not None:
        return await verify_subform(
            pipeline=pipeline,
            client=client,
            source_dsn=source_dsn,
            state_dsn=state_dsn,
            schema=schema,
            parents=parents,
        )
    source = await source_rows(source_dsn, pipeline)
    read = CrmRead()
    crm = await crm_records(client, pipeline, read)
    parent_ids: dict[str, dict[str, str]] = {}
    for column, m in pipeline.fields.items():
        if m.type != "lookup" or m.pipeline is None or m.pipeline in parent_ids:
            continue
        if parents is None or m.pipeline not in parents:
            raise ValueError(f"column {column!r} looks up pipeline {m.pipeline!r}: pass parents")
        parent = parents[m.pipeline]
        records = await crm_records(client, parent, read, fields=[parent.key_field])
        parent_ids[m.pipeline] = {k: str(r["id"]) for k, r in records.items() if r.get("id")}
    async with await psycopg.AsyncConnection.connect(state_dsn, autocommit=True) as conn:
        dead = await open_dead_letter_keys(conn, schema, pipeline.name)
    report = compare(pipeline, source, crm, dead, parents, parent_ids)
    report.crm_calls = read.calls
    report.crm_credits = read.credits
    return report


# --------------------------------------------------------------------------- subform pipelines

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


# --------------------------------------------------------------------------- re-capture


@dataclass
class Recaptured:
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    first_offset: int | None = None
    last_offset: int | None = None

    @property
    def total(self) -> int:
        return len(self.updated) + len(self.deleted)


# orders whose subform set the lines' engine writes again: '' is no CRM id, so each differs
# from its order's key_state crm_id (emitter_subform.Q_SETS_MOVED, every 10 s)
Q_SETS_STALE = """
INSERT INTO {schema}.subform_sets AS s (pipeline, parent_key, crm_id)
SELECT %s, k, '' FROM unnest(%s::text[]) AS k ORDER BY k
ON CONFLICT (pipeline, parent_key) DO UPDATE SET crm_id = '', written_at = now()
"""


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


Q_OUTBOX_SEQUENCE = "SELECT pg_catalog.pg_get_serial_sequence(%s, 'id')"


async def recapture(
    *,
    pipeline: PipelineConfig,
    keys: Iterable[str],
    source_dsn: str,
    state_dsn: str,
    schema: str,
    batch: int = 5000,
) -> Recaptured:
    """Append the current source image of ``keys`` to the outbox as fresh events (see module
    docstring); keys no longer in the table get a delete event with a key-only image."""
    todo = sorted(set(keys))
    result = Recaptured()
    if not todo:
        return result
    same_db = source_dsn == state_dsn
    async with await psycopg.AsyncConnection.connect(source_dsn) as src:
        ctype = await _column_type(src, pipeline)
        await src.commit()
        st = src if same_db else await psycopg.AsyncConnection.connect(state_dsn)
        try:
            cur = await st.cursor(row_factory=tuple_row).execute(
                Q_OUTBOX_SEQUENCE, (sql.Identifier(schema, "outbox").as_string(st),)
            )
            seq_row = await cur.fetchone()
            assert seq_row is not None and seq_row[0] is not None
            seq = str(seq_row[0])
            await st.commit()
            for i in range(0, len(todo), batch):
                await _recapture_batch(
                    src, st, pipeline, todo[i : i + batch], ctype, seq, schema, result
                )
        finally:
            if st is not src:
                await st.close()
    log.info(
        "re-captured keys into the outbox",
        extra={
            "pipeline": pipeline.name,
            "updated": len(result.updated),
            "deleted": len(result.deleted),
        },
    )
    return result


async def _recapture_batch(  # noqa: PLR0917
    src: psycopg.AsyncConnection[Any],
    st: psycopg.AsyncConnection[Any],
    pipeline: PipelineConfig,
    keys: Sequence[str],
    ctype: str,
    seq: str,
    schema: str,
    result: Recaptured,
) -> None:
    key = sql.Identifier(pipeline.key_column)
    table = sql.Identifier(*pipeline.table_parts)
    typ = sql.SQL(ctype)  # from pg_catalog.format_type, not from configuration text
    await pin_image_settings(src)
    cur = await src.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "SELECT t.{key}::text, to_jsonb(t.*)::text FROM {table} t"
            " WHERE t.{key} = ANY(%s::text[]::{typ}[]) ORDER BY t.{key} FOR SHARE"
        ).format(key=key, table=table, typ=typ),
        (list(keys),),
    )
    found = {str(k): img for k, img in await cur.fetchall()}
    cur = await src.cursor(row_factory=tuple_row).execute("SELECT pg_current_xact_id()::text")
    xid_row = await cur.fetchone()
    assert xid_row is not None
    source_xid = str(xid_row[0])
    gone = [k for k in keys if k not in found]
    images: list[tuple[str, str, str]] = [(k, "update", img) for k, img in found.items()]
    if gone:
        cur = await src.cursor(row_factory=tuple_row).execute(
            sql.SQL(
                "SELECT k, jsonb_build_object({col}, k::{typ})::text FROM unnest(%s::text[]) k"
            ).format(col=sql.Literal(pipeline.key_column), typ=typ),
            (gone,),
        )
        images += [(str(k), "delete", img) for k, img in await cur.fetchall()]
    cur = await st.cursor(row_factory=tuple_row).execute(
        sql.SQL(
            "WITH src AS (SELECT k, op, r, pg_catalog.nextval({seq}::regclass) AS v"
            " FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS u(k, op, r, o)"
            " ORDER BY o)"
            " INSERT INTO {outbox} (id, pipeline, op, key, version, source_xid, row)"
            " SELECT v, %s, op, k, v, %s::text::xid8, r::jsonb FROM src RETURNING id"
        ).format(seq=sql.Literal(seq), outbox=sql.Identifier(schema, "outbox")),
        (
            [i[0] for i in images],
            [i[1] for i in images],
            [i[2] for i in images],
            pipeline.name,
            source_xid,
        ),
    )
    ids = [int(r[0]) for r in await cur.fetchall()]
    # a re-capture must reach the CRM even when the mapped record equals the last one sent
    # (the CRM's copy was edited or lost): the emitter skips identical records by this hash
    await state.forget_sent(st, schema, pipeline.name, [i[0] for i in images])
    # state first (the events exist), then release the source rows' locks
    await st.commit()
    if st is not src:
        await src.commit()
    if ids:
        result.first_offset = min(ids) if result.first_offset is None else result.first_offset
        result.last_offset = max(ids)
    result.updated += [i[0] for i in images if i[1] == "update"]
    result.deleted += [i[0] for i in images if i[1] == "delete"]
