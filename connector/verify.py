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
compared per *parent* (order) by :func:`verify_subform` in ``connector/verify_subform.py`` (its
docstring says how; :func:`rewrite_sets` is there too); :func:`verify` dispatches to it. What
both comparisons share (:class:`VerifyReport`, :func:`same_value`, reading both sides) is in
``connector/verify_common.py``; the public names of both modules are importable from here too.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from connector import state
from connector.capture import pin_image_settings
from connector.config import PipelineConfig
from connector.errors import DataError
from connector.mapping import RecordMapper
from connector.verify_common import (
    PROGRESS_EVERY,
    CrmRead,
    Mismatch,
    VerifyReport,
    crm_records,
    open_dead_letter_keys,
    same_value,
    source_rows,
)
from connector.verify_subform import (
    Q_LINES_UNDER,
    Q_SETS_STALE,
    compare_subform,
    crm_subform_rows,
    rewrite_sets,
    subform_module,
    verify_subform,
)

# the names other modules import from here, some defined in the split-out modules
# (verify_common, verify_subform); PROGRESS_EVERY is read in verify_common (patch it there)
__all__ = [
    "PROGRESS_EVERY",
    "Q_LINES_UNDER",
    "Q_OUTBOX_SEQUENCE",
    "Q_SETS_STALE",
    "CrmRead",
    "Mismatch",
    "Recaptured",
    "VerifyReport",
    "compare",
    "compare_subform",
    "crm_records",
    "crm_subform_rows",
    "open_dead_letter_keys",
    "recapture",
    "rewrite_sets",
    "same_value",
    "source_rows",
    "subform_module",
    "verify",
    "verify_subform",
]

log = logging.getLogger(__name__)


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
