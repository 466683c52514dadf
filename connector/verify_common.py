"""What `connector verify`'s two comparisons share: the report, values compared by meaning,
and reading both sides.

The ordinary comparison and re-capture are in ``connector/verify.py`` (whose docstring says how
the CRM is read: COQL keyset paging, 3 credits per 2,000 records, a progress line every
50,000), the subform comparison in ``connector/verify_subform.py``; both import these pieces,
and ``connector.verify`` re-exports them.

* :class:`VerifyReport` (with :class:`Mismatch`): what a comparison found, and for a subform
  pipeline the lines ``--repair`` re-captures;
* :func:`same_value`: numbers as decimals (``12.5`` = ``12.50``), datetimes as instants,
  ``NULL`` = empty text, a lookup by its CRM id;
* :func:`source_rows` (the table, as outbox images), :func:`crm_records` (a CRM module's
  records by key; :class:`CrmRead` what reading cost) and :func:`open_dead_letter_keys`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
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
from connector.mapping import line_order
from connector.outbox import load_row

# the verb's logger (its progress lines), as before these pieces left connector/verify.py
log = logging.getLogger("connector.verify")


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
        the lines of the mismatched orders (see ``connector/verify_subform.py``)."""
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
    id, see ``connector/verify.py``'s docstring). ``read`` receives the records read and the
    client's calls and credits spent on them (from its ``calls`` / ``credits_spent`` counters);
    added to what it holds. ``fields``: the CRM fields to read (default: every mapped one)."""
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
