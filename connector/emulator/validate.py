"""One validation of field values for both write paths (issue 15 item 10).

The JSON record APIs (insert / update / upsert) and Bulk Write rows are judged by the same
checkers (:func:`make_checker`), as Zoho documents each field type (zoho-crm-api.md §2.5, v7
insert-records "Sample Attributes"): text lengths (single line 255, multi line per field,
phone 30), email and URL syntax, picklist membership, integer 9 digits, long integer 18 digits
(a string), currency / decimal / double 16 digits before the point and at most 9 after, percent
5 digits, booleans, ``yyyy-MM-dd`` dates and ISO date-times with an offset.

A Bulk Write CSV cell is first turned into the value the JSON API would receive
(:func:`csv_value`: numbers exactly, as :class:`~decimal.Decimal`, never through a float; a
multi-select split on ``;``; ``true``/``false``; dates in the column's declared ``format``,
converted in ``bulk.py``) and then checked by the same checker, so one value gets one verdict and
is stored the same on both paths. Number digits are counted on the exact decimal: the JSON body
of a record write is parsed with ``Decimal`` floats (``app.py``), so ``9999999999999999.99`` is
accepted (16 digits before the point, 2 after) and stored unrounded on both paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from connector.emulator.config import SUBFORM_MAX_ROWS, FieldSpec

# Zoho: currency / decimal fields take at most 9 digits after the point (zoho-crm-api.md §2.5).
# Whether more are rounded or refused is not documented: refusing fails safe (nothing changes
# a value silently).
MAX_DECIMAL_PLACES = 9

Checker = Callable[[Any], "dict[str, Any] | None"]

EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+'-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
URL_RE = re.compile(r"^(https?://)?[A-Za-z0-9.-]+\.[A-Za-z]{2,}(:[0-9]+)?(/\S*)?$")
ID_RE = re.compile(r"^[0-9]{1,19}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[+-]\d{2}:\d{2}|Z)$")


def _digits_before_point(value: float | int | Decimal) -> int:
    return len(str(abs(int(value))))


def _decimal_places(value: float | int | Decimal) -> int:
    if isinstance(value, int):
        return 0
    d = value if isinstance(value, Decimal) else Decimal(repr(value))
    exponent = d.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def make_checker(spec: FieldSpec, strict_picklists: bool, max_len_str: bool) -> Checker:
    """A function returning None when a JSON value is valid for the field, else extra details."""
    dt = spec.data_type
    limit = spec.max_length
    max_len: Any = str(limit) if max_len_str else limit
    expected = {"expected_data_type": dt}
    too_long = {"maximum_length": max_len}

    if dt in ("text", "textarea", "phone"):

        def check_text(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str):
                return expected
            return too_long if len(v) > limit else None

        return check_text
    if dt == "email":

        def check_email(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str):
                return expected
            if len(v) > limit:
                return too_long
            return None if (v == "" or EMAIL_RE.match(v)) else expected

        return check_email
    if dt == "website":

        def check_url(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str):
                return expected
            if len(v) > limit:
                return too_long
            return None if (v == "" or URL_RE.match(v)) else expected

        return check_url
    if dt == "picklist":
        allowed = frozenset(spec.picklist)
        supported = {"supported_values": list(spec.picklist)}

        def check_pick(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str):
                return expected
            if len(v) > limit:
                return too_long
            if strict_picklists and v not in allowed:
                return supported
            return None

        return check_pick
    if dt == "multiselectpicklist":
        allowed_m = frozenset(spec.picklist)
        supported_m = {"supported_values": list(spec.picklist)}

        def check_multi(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                return expected
            if strict_picklists and any(x not in allowed_m for x in v):
                return supported_m
            return None

        return check_multi
    if dt == "integer":

        def check_int(v: Any) -> dict[str, Any] | None:
            if isinstance(v, bool) or not isinstance(v, int):
                return expected
            return too_long if _digits_before_point(v) > limit else None

        return check_int
    if dt == "bigint":

        def check_long(v: Any) -> dict[str, Any] | None:
            if isinstance(v, bool):
                return expected
            if isinstance(v, str):
                if not re.fullmatch(r"-?\d+", v):
                    return expected
                return too_long if len(v.lstrip("-")) > limit else None
            if isinstance(v, int):
                return too_long if _digits_before_point(v) > limit else None
            return expected

        return check_long
    if dt in ("double", "currency", "decimal", "percent"):

        def check_num(v: Any) -> dict[str, Any] | None:
            if isinstance(v, bool) or not isinstance(v, int | float | Decimal):
                return expected
            if isinstance(v, float) and not math.isfinite(v):
                return expected
            if isinstance(v, Decimal) and not v.is_finite():
                return expected
            if _digits_before_point(v) > limit:
                return too_long
            return expected if _decimal_places(v) > MAX_DECIMAL_PLACES else None

        return check_num
    if dt == "boolean":

        def check_bool(v: Any) -> dict[str, Any] | None:
            return None if isinstance(v, bool) else expected

        return check_bool
    if dt == "date":

        def check_date(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str) or not DATE_RE.match(v):
                return expected
            try:
                date.fromisoformat(v)
            except ValueError:
                return expected
            return None

        return check_date
    if dt == "datetime":

        def check_dt(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, str) or not DATETIME_RE.match(v):
                return expected
            try:
                datetime.fromisoformat(v)
            except ValueError:
                return expected
            return None

        return check_dt
    if dt == "lookup":
        # {"id": "<record id>"} (zoho-crm-api.md §2.5 / §6.1); that the id exists in the target
        # module is checked by the record store (records.py), which sees the other modules
        def check_lookup(v: Any) -> dict[str, Any] | None:
            if isinstance(v, dict) and isinstance(v.get("id"), str) and ID_RE.match(v["id"]):
                return None
            return expected

        return check_lookup
    if dt == "subform":
        # a JSON array of row objects, at most SUBFORM_MAX_ROWS of them (Subform API v8); which
        # rows are kept, replaced or removed is decided by the record store (records.py). More
        # rows than the limit: the error code is not documented (UNCONFIRMED), INVALID_DATA
        # with details.limit refuses the write (fail safe)
        row_checkers = {
            f.api_name: make_checker(f, strict_picklists, max_len_str) for f in spec.subform_fields
        }

        def check_subform(v: Any) -> dict[str, Any] | None:
            if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
                return expected
            if len(v) > SUBFORM_MAX_ROWS:
                return {"limit": SUBFORM_MAX_ROWS}
            for r in v:
                rid = r.get("id")
                if rid is not None and not (isinstance(rid, str) and ID_RE.match(rid)):
                    return {"api_name": "id", "parent_api_name": spec.api_name}
                for name, value in r.items():
                    chk = row_checkers.get(name)
                    if chk is None or value is None or value == "":
                        continue  # unknown keys are ignored, as on the record itself
                    bad = chk(value)
                    if bad is not None:
                        return {**bad, "api_name": name, "parent_api_name": spec.api_name}
            return None

        return check_subform
    raise ValueError(f"unsupported data type {dt}")  # pragma: no cover - Literal guards it


class Bad:
    """A CSV cell that is not a value of the column's type (``INVALID_DATA-<field>``)."""

    __slots__ = ()


BAD = Bad()
_INT_RE = re.compile(r"^-?\d+$")
_NUM_RE = re.compile(r"^-?\d+(\.\d+)?$")


def csv_value(data_type: str, cell: str) -> Any:
    """The JSON value a non-empty CSV cell stands for (before the field's checker runs), or
    :data:`BAD` when the text is not of the type at all. Dates are converted by the bulk
    module (they depend on the column's declared format)."""
    if data_type in ("integer",):
        return int(cell) if _INT_RE.match(cell) else BAD
    if data_type == "bigint":
        return cell if _INT_RE.match(cell) else BAD  # long integers travel as strings (§6.1)
    if data_type in ("double", "currency", "decimal", "percent"):
        if not _NUM_RE.match(cell):
            return BAD
        try:
            return Decimal(cell) if "." in cell else int(cell)
        except InvalidOperation:  # pragma: no cover - the regex admits only digits
            return BAD
    if data_type == "boolean":  # CSV booleans: true/false (UNCONFIRMED, §6.2)
        low = cell.lower()
        return True if low == "true" else False if low == "false" else BAD
    if data_type == "multiselectpicklist":  # ';'-separated (UNCONFIRMED, §6.2)
        return [x for x in cell.split(";") if x]
    return cell
