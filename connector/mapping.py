"""Legacy row image → CRM record: field mapping and type conversion (zoho-crm-api.md §6).

Input rows are outbox row images (docs/architecture.md): what ``to_jsonb(row)`` gives with
``TimeZone=UTC``, parsed with ``parse_float=Decimal`` — so values are ``str``, ``int``,
``Decimal``, ``bool``, ``None``, lists and dicts. Python ``date``/``datetime``/``float`` values are
accepted too.

Rule: a :class:`DataError` only for a value that *cannot be represented* in the CRM's type
(NaN/Infinity, a non-integral value for an integer field, an integer of more than 18 digits,
a date outside 1900-01-01..9999-12-31 or ``infinity``, an unparseable date or boolean, a
multi-select item containing ``;``). No Zoho integer field holds more than 18 digits
(/work/shared/zoho-crm-api.md §2.5: Number 9 digits, Long integer 18): such values (``2^64``,
``1E+20`` for an integer field) are ``NUMBER_OUT_OF_RANGE`` dead letters, never a crash of the
JSON encoder (issue 14 §4). Decimal fields get every digit (the CRM judges their limits).
Everything the CRM can judge by itself (email syntax, text length, picklist membership, digit
limits) is sent as is and the CRM's per-record error is dead-lettered with its own code and field.

Formats:

===================  ====================================  =================================
CRM type             JSON (record APIs)                    CSV (bulk write)
===================  ====================================  =================================
text, textarea,      string, unchanged (no trimming)       same string
email, phone, url,
picklist
multiselectpicklist  array of strings                      items joined with ``;``
integer              JSON number                           digits
bigint               **string** of digits (§6.1)           digits
decimal, currency,   JSON number written from the Decimal  plain decimal notation
double, percent      text (no float round trip)
boolean              true / false                          ``true`` / ``false``
date                 ``yyyy-MM-dd``                        ``yyyy-MM-dd`` (declared format)
datetime             ``yyyy-MM-ddTHH:mm:ss±HH:MM``         same (ISO 8601, no format declared)
lookup               ``{"id": "<parent's CRM id>"}``       the parent's legacy key, resolved
                     (from a caller-supplied resolver)     by ``find_by`` = the parent
                                                           pipeline's ``key_field``
NULL                 null (clears the field)               empty cell (ignore_empty=false)
===================  ====================================  =================================

Lookups (issue 21, docs/related-tables.md): the column holds the parent's legacy key; the JSON
value needs the parent's CRM id, which the mapping does not know (it stays pure): the caller
passes a :class:`LookupResolver`; a parent it cannot resolve is ``PARENT_NOT_SYNCED``, never a
dangling or empty lookup. Bulk Write sends the key itself and lets Zoho resolve it with
``field_mappings[].find_by`` on the parent's unique key field (zoho-crm-api.md §3.2, §6.2).

Datetimes keep their offset, drop fractional seconds (truncated) and are never sent with
``Z``; a timestamp without a zone (``timestamp`` column) is read in ``naive_timezone`` (UTC by
default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from connector.config import CrmType, PipelineConfig
from connector.crm_values import (
    Converter,
    csv_converter,
    json_converter,
    key_text,
    show_value,
)
from connector.errors import ConfigError, DataError

#: Java-style pattern declared in the bulk job's ``field_mappings[].format`` for Date columns
#: (on Zoho's allowed list, docs/zoho-client.md "Fidelity"). Date/Time columns declare no
#: format: the cell is ISO 8601 with its offset (``yyyy-MM-ddTHH:mm:ss±HH:mm``), the Date/Time
#: value Zoho documents for Bulk Write (Kaizen #13), so the time zone is explicit in every cell;
#: ``yyyy-MM-dd'T'HH:mm:ssXXX`` was declared before and is not on any list Zoho publishes.
CSV_DATE_FORMAT = "yyyy-MM-dd"
CSV_DATETIME_FORMAT: str | None = None


class LookupResolver(Protocol):
    """The CRM id of the record that ``pipeline`` synced from legacy key ``key``, or None when
    that parent is not (yet) in the CRM."""

    def __call__(self, pipeline: str, key: str) -> str | None: ...


class RecordMapper:
    """Converts row images of one pipeline into CRM JSON records and bulk CSV rows.

    ``parents``: the pipelines that lookup fields name (by pipeline name), for the bulk
    ``find_by``; required when the pipeline maps a lookup."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        *,
        naive_timezone: tzinfo = UTC,
        parents: Mapping[str, PipelineConfig] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.key_column = pipeline.key_column
        self.key_field = pipeline.key_field
        self._naive_tz = naive_timezone
        self._bulk_zone: tzinfo | None = (
            None if pipeline.bulk_datetime_format == "iso8601" else ZoneInfo(pipeline.bulk_timezone)
        )
        # (column, CRM api_name, CRM type) in config order, key excluded
        self._columns: list[tuple[str, str, CrmType]] = [
            (column, m.field, m.type)
            for column, m in pipeline.fields.items()
            if column != pipeline.key_column
        ]
        # each column's converters, chosen once here rather than by CRM type per value (issue
        # 19); None for a lookup (resolved per call)
        self._json_columns: list[tuple[str, str, Converter | None]] = [
            (column, api, None if t == "lookup" else json_converter(t, api, naive_timezone))
            for column, api, t in self._columns
        ]
        self._csv_columns: list[tuple[str, str, Converter | None, bool]] = [
            (
                column,
                api,
                None if t == "lookup" else csv_converter(t, api, naive_timezone),
                t == "datetime" and self._bulk_zone is not None,
            )
            for column, api, t in self._columns
        ]
        # without lookups or zoned datetimes (the usual mapping), every column is just its
        # converter: to_json / to_csv_values take a comprehension over these (issue 19)
        self._json_plain: list[tuple[str, Converter]] | None = None
        self._csv_plain: list[tuple[str, Converter]] | None = None
        if all(convert is not None for _, _, convert in self._json_columns):
            self._json_plain = [(c, convert) for c, _, convert in self._json_columns if convert]
            self._json_keys = [self.key_field, *(api for _, api, _ in self._json_columns)]
        if all(convert is not None and not zoned for _, _, convert, zoned in self._csv_columns):
            self._csv_plain = [(c, convert) for c, _, convert, _ in self._csv_columns if convert]
        # lookup column -> (parent pipeline name, parent key_field: the bulk find_by)
        self._lookups: dict[str, tuple[str, str]] = {}
        for column, m in pipeline.fields.items():
            if m.type != "lookup":
                continue
            parent = (parents or {}).get(m.pipeline or "")
            if parent is None:
                raise ConfigError(
                    f"pipelines[{pipeline.name!r}].fields.{column}.pipeline",
                    f"column {column!r} looks up pipeline {m.pipeline!r}, which is not"
                    " configured; name the pipeline that syncs the parent table",
                )
            self._lookups[column] = (parent.name, parent.key_field)
        #: (column, CRM api name, parent pipeline) of each lookup field, in config order
        self.lookup_columns: list[tuple[str, str, str]] = [
            (column, pipeline.fields[column].field, parent_name)
            for column, (parent_name, _) in self._lookups.items()
        ]

    @property
    def crm_fields(self) -> list[str]:
        """CRM api names in CSV order: the key field first."""
        return [self.key_field, *(api for _, api, _ in self._columns)]

    # ---- JSON (record APIs) ------------------------------------------------------------------

    def key_of(self, row: dict[str, Any]) -> str:
        return key_text(row.get(self.key_column), f"key column {self.key_column!r}", self.key_field)

    def to_json(self, row: dict[str, Any], resolve: LookupResolver | None = None) -> dict[str, Any]:
        """The CRM record for ``row``: ``key_field`` = the key, then each mapped field.

        Decimal values stay ``Decimal``; serialise with :func:`dumps_json` (the client does).
        A lookup field is ``{"id": resolve(parent pipeline, parent key)}``; ``resolve`` is
        required when the pipeline maps a lookup.
        """
        key = self.key_of(row)
        if self._json_plain is not None:
            try:
                values = [convert(row[column]) for column, convert in self._json_plain]
            except KeyError:
                pass  # a missing column: the loop below raises MISSING_COLUMN in order
            else:
                return dict(zip(self._json_keys, [key, *values], strict=True))
        record: dict[str, Any] = {self.key_field: key}
        for column, api, convert in self._json_columns:
            try:
                value = row[column]
            except KeyError:
                value = self._get(row, column, api)  # raises MISSING_COLUMN
            if convert is None:
                record[api] = self._lookup_json(column, api, value, resolve)
            else:
                record[api] = convert(value)
        return record

    def parent_key(self, row: dict[str, Any], column: str) -> str | None:
        """The parent's legacy key in lookup ``column`` of ``row`` (None: no parent)."""
        if column not in self._lookups:
            raise ValueError(f"column {column!r} is not a lookup")
        value = row.get(column)
        if value is None:
            return None
        return key_text(value, f"lookup column {column!r}", self.pipeline.fields[column].field)

    def _lookup_json(
        self, column: str, api: str, value: Any, resolve: LookupResolver | None
    ) -> dict[str, str] | None:
        if value is None:
            return None  # no parent: null clears the lookup
        if resolve is None:
            raise ValueError(f"column {column!r} is a lookup: to_json needs a resolver")
        pipeline, _ = self._lookups[column]
        key = key_text(value, f"lookup column {column!r}", api)
        crm_id = resolve(pipeline, key)
        if crm_id is None:
            raise DataError(
                "PARENT_NOT_SYNCED",
                f"lookup column {column!r}: the parent with key {show_value(key)} of pipeline"
                f" {pipeline!r} is not in the CRM yet; it is sent once the parent is",
                field=api,
            )
        return {"id": crm_id}

    # ---- CSV (bulk write) --------------------------------------------------------------------

    def csv_header(self) -> list[str]:
        return self.crm_fields

    def to_csv_values(self, row: dict[str, Any]) -> list[str]:
        """One CSV row in :meth:`csv_header` order (key first)."""
        values = [self.key_of(row)]
        if self._csv_plain is not None:
            try:
                values += [convert(row[column]) for column, convert in self._csv_plain]
            except KeyError:
                pass  # a missing column: the loop below raises MISSING_COLUMN in order
            else:
                return values
        for column, api, convert, zoned in self._csv_columns:
            try:
                raw = row[column]
            except KeyError:
                raw = self._get(row, column, api)  # raises MISSING_COLUMN
            if convert is None:  # a lookup: the parent's key; Zoho resolves it by find_by
                values.append(
                    "" if raw is None else key_text(raw, f"lookup column {column!r}", api)
                )
                continue
            value = convert(raw)
            if zoned and value and self._bulk_zone is not None:
                # Zoho's default pattern has no offset: the instant, written in the zone the
                # CRM reads it in (pipelines[].bulk_timezone)
                local = datetime.fromisoformat(value).astimezone(self._bulk_zone)
                value = local.strftime("%m/%d/%Y %H:%M:%S")
            values.append(value)
        return values

    def field_mappings(self) -> list[dict[str, Any]]:
        """``resource[].field_mappings`` for a bulk job over :meth:`csv_header` columns."""
        out: list[dict[str, Any]] = [{"api_name": self.key_field, "index": 0}]
        for i, (column, api, crm_type) in enumerate(self._columns, start=1):
            item: dict[str, Any] = {"api_name": api, "index": i}
            if crm_type == "lookup":
                item["find_by"] = self._lookups[column][1]
            elif crm_type == "date":
                item["format"] = CSV_DATE_FORMAT
            elif crm_type == "datetime" and self._bulk_zone is not None:
                item["format"] = self.pipeline.bulk_datetime_format
            elif crm_type == "datetime" and CSV_DATETIME_FORMAT is not None:
                item["format"] = CSV_DATETIME_FORMAT
            out.append(item)
        return out

    def _get(self, row: dict[str, Any], column: str, api: str) -> Any:
        try:
            return row[column]
        except KeyError:
            raise DataError(
                "MISSING_COLUMN",
                f"the row has no column {column!r} (mapped to {api!r}); "
                "was the column renamed or dropped?",
                field=api,
            ) from None


# ---- subforms (issue 21 part 2a) ---------------------------------------------------------------

#: Rows one record holds at most in one subform: "Each record's subform can have a maximum of
#: 100 subform records" (Subform API v8, https://www.zoho.com/crm/developer/docs/api/v8/subforms.html;
#: the emulator enforces the same limit, connector/emulator/config.py).
SUBFORM_MAX_ROWS = 100

_NUMERIC_KEY = re.compile(r"-?[0-9]+(?:\.[0-9]+)?\Z")


def line_order(key: str) -> tuple[int, Decimal, str]:
    """The order of subform rows: by line key text (:meth:`SubformMapper.key_of`). Keys written
    as plain numbers (ASCII digits, optional sign and fraction: what ``key_text`` makes of an
    integer or numeric key column) come first, numerically, as ``ORDER BY`` a numeric key does
    (``2`` before ``10``); every other key after them by code point; equal numbers (``1.0``,
    ``1``) by text. A total order on distinct keys, so the rows' order depends on the key set
    only."""
    if _NUMERIC_KEY.match(key):
        return 0, Decimal(key), key
    return 1, Decimal(0), key


class SubformMapper:
    """Converts the COMPLETE current line set of one parent into the value of its subform
    field (``subform_of.field``), for the parent's upsert (docs/related-tables.md, Subforms).

    Zoho replaces the whole row set on a write that names the subform (update-subforms.html):
    a row with the ``id`` of one of the record's rows keeps and updates it, a row without an
    id is created, rows not listed are deleted, ``[]`` deletes them all. So a line whose row id
    is known (``row_ids``: line key → subform row id, from an earlier write's answer) is sent
    with it, a new line without one, and a line gone from the table is simply not listed; a
    parent whose lines were all deleted gets ``[]``. The same lines and ids always give the
    same value (rows ordered by :func:`line_order`, independent of the order of ``lines``):
    a replay writes the same set (idempotent).

    Each mapped column becomes a row field, converted by the same per-type converter that
    :class:`RecordMapper` uses (``crm_values.json_converter``; NULL → null). The key column is
    not sent unless it is mapped in ``fields`` (a subform row has no key field; mapping it,
    e.g. ``id = "Line_Id"``, puts the line key in a row field). ``parent_column`` is the link
    and never a row field (``check_subforms`` refuses it in ``fields``).

    A line whose ``parent_column`` is NULL belongs to no parent: :meth:`parent_key` is None
    and the caller leaves it out of every parent's row set (it is not an error of the line;
    an order that loses a line that way gets it deleted at its next write).
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        parent: PipelineConfig,
        *,
        naive_timezone: tzinfo = UTC,
    ) -> None:
        sub = pipeline.subform_of
        if sub is None:
            raise ValueError(f"pipeline {pipeline.name!r} has no subform_of")
        if sub.pipeline != parent.name:
            raise ValueError(
                f"pipeline {pipeline.name!r} is a subform of {sub.pipeline!r}, not {parent.name!r}"
            )
        self.pipeline = pipeline
        self.parent = parent
        self.field = sub.field
        self.parent_column = sub.parent_column
        self.key_column = pipeline.key_column
        # (column, row field api_name, converter) in config order; the key column too if mapped
        self._columns: list[tuple[str, str, Converter]] = [
            (column, m.field, json_converter(m.type, m.field, naive_timezone))
            for column, m in pipeline.fields.items()
        ]

    def key_of(self, line: dict[str, Any]) -> str:
        """The line's key text (``key_text``, as :meth:`RecordMapper.key_of`)."""
        return key_text(line.get(self.key_column), f"key column {self.key_column!r}", self.field)

    def parent_key(self, line: dict[str, Any]) -> str | None:
        """The parent's legacy key in ``parent_column``: the same text as the parent pipeline's
        ``RecordMapper.key_of`` for that parent row (``key_text``); None when NULL (no parent)."""
        value = line.get(self.parent_column)
        if value is None:
            return None
        return key_text(value, f"parent column {self.parent_column!r}", self.field)

    def to_rows(
        self, lines: Sequence[dict[str, Any]], row_ids: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """The subform field's value for ``lines``, every current line of one parent.

        Each row: ``"id"`` when ``row_ids`` has the line's key, then the mapped fields. More
        than :data:`SUBFORM_MAX_ROWS` lines: ``DataError SUBFORM_LIMIT`` naming the parent and
        the count (Zoho would refuse the write; lines are never dropped). Lines of different
        parents, of no parent or with the same key are the caller's mistake: ``ValueError``.
        """
        parents = {self.parent_key(line) for line in lines}
        if None in parents or len(parents) > 1:
            shown = sorted(show_value(k) for k in parents)
            raise ValueError(f"lines of one parent expected, got parent keys {', '.join(shown)}")
        if len(lines) > SUBFORM_MAX_ROWS:
            parent = show_value(next(iter(parents)))
            raise DataError(
                "SUBFORM_LIMIT",
                f"{self.parent.name} {parent} has {len(lines)} lines in"
                f" {self.pipeline.source_table}; Zoho holds at most {SUBFORM_MAX_ROWS} rows in"
                f" subform {self.parent.module}.{self.field}, so the record is not written"
                " (no line is dropped)",
                field=self.field,
            )
        keyed: dict[str, dict[str, Any]] = {}
        for line in lines:
            key = self.key_of(line)
            if key in keyed:
                raise ValueError(f"two lines with key {show_value(key)}")
            keyed[key] = line
        rows: list[dict[str, Any]] = []
        for key in sorted(keyed, key=line_order):
            line = keyed[key]
            row: dict[str, Any] = {}
            row_id = row_ids.get(key)
            if row_id is not None:
                row["id"] = row_id
            for column, api, convert in self._columns:
                try:
                    value = line[column]
                except KeyError:
                    raise DataError(
                        "MISSING_COLUMN",
                        f"the line has no column {column!r} (mapped to {self.field}.{api});"
                        " was the column renamed or dropped?",
                        field=api,
                    ) from None
                row[api] = convert(value)
            rows.append(row)
        return rows

    def to_parent_json(
        self, lines: Sequence[dict[str, Any]], row_ids: Mapping[str, str]
    ) -> dict[str, Any]:
        """``{subform field: rows}``: the part of the parent's record this pipeline fills (the
        engine merges it into the parent's upsert). No lines: ``{field: []}``, which deletes
        every row of the parent's subform."""
        return {self.field: self.to_rows(lines, row_ids)}
