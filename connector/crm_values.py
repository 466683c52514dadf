"""The CRM's values (split from ``connector.mapping``): one value of a legacy row → the CRM's
JSON or CSV value, and JSON serialisation without float loss (``dumps_json``, ``wide_ints``).

Each CRM data type has its converter; ``json_converter`` / ``csv_converter`` choose one per
column once (with fast paths for a ``str`` in a text field, an in-range ``int``, a ``bool``),
and ``to_json_value`` / ``to_csv_value`` are the general forms they must agree with
(tests/unit/test_mapping_fast.py). A value that does not fit raises ``DataError`` with the
field and the reason (the record is dead-lettered, nothing else is lost).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from connector.errors import DataError

MIN_DATE = date(1900, 1, 1)

_TEXT_TYPES = frozenset({"text", "textarea", "email", "phone", "url", "picklist"})
_DECIMAL_TYPES = frozenset({"decimal", "currency", "double", "percent"})
_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})

#: config type -> CRM field-metadata ``data_type`` values it may map to. Zoho calls a URL field
#: ``website`` and a decimal field ``double``.
COMPATIBLE_DATA_TYPES: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "textarea": frozenset({"textarea"}),
    "email": frozenset({"email"}),
    "phone": frozenset({"phone"}),
    "url": frozenset({"website", "url"}),
    "picklist": frozenset({"picklist"}),
    "multiselectpicklist": frozenset({"multiselectpicklist"}),
    "integer": frozenset({"integer"}),
    "bigint": frozenset({"bigint"}),
    "decimal": frozenset({"decimal", "double"}),
    "double": frozenset({"double", "decimal"}),
    "currency": frozenset({"currency"}),
    "percent": frozenset({"percent"}),
    "boolean": frozenset({"boolean"}),
    "date": frozenset({"date"}),
    "datetime": frozenset({"datetime"}),
    "lookup": frozenset({"lookup"}),
}


def key_text(value: Any, what: str, api: str) -> str:
    """A legacy key as the CRM's text key field holds it (integers and decimals as digits)."""
    if type(value) is str and value:  # the usual key: the text itself (str(value) below)
        return value
    if value is None or (isinstance(value, str) and value == ""):
        raise DataError("MISSING_KEY", f"{what} is NULL or empty", field=api)
    if isinstance(value, bool | dict | list):
        raise DataError("INVALID_KEY", f"{what} holds a {type(value).__name__}", field=api)
    if isinstance(value, Decimal | float):
        return _decimal_text(_to_decimal(value, api))
    return str(value)


def to_json_value(value: Any, crm_type: str, api: str, naive_tz: tzinfo = UTC) -> Any:
    if value is None:
        return None
    if crm_type in _TEXT_TYPES:
        return _text(value)
    if crm_type == "multiselectpicklist":
        return _multiselect(value, api)
    if crm_type == "integer":
        return _integer(value, api)
    if crm_type == "bigint":
        return str(_integer(value, api))
    if crm_type in _DECIMAL_TYPES:
        return _to_decimal(value, api)
    if crm_type == "boolean":
        return _boolean(value, api)
    if crm_type == "date":
        return _date(value, api).isoformat()
    if crm_type == "datetime":
        return _datetime_text(value, api, naive_tz)
    raise ValueError(f"unknown CRM type {crm_type!r}")


def to_csv_value(value: Any, crm_type: str, api: str, naive_tz: tzinfo = UTC) -> str:
    if value is None:
        return ""
    if crm_type in _DECIMAL_TYPES:
        return _decimal_text(_to_decimal(value, api))
    if crm_type == "multiselectpicklist":
        return ";".join(_multiselect(value, api))
    converted = to_json_value(value, crm_type, api, naive_tz)
    if isinstance(converted, bool):
        return "true" if converted else "false"
    return str(converted)


#: a column's value converter, chosen once per mapping (``json_converter`` / ``csv_converter``)
Converter = Callable[[Any], Any]

_INT_LIMIT = 10**18  # 10**MAX_INTEGRAL_DIGITS (defined below)


def json_converter(crm_type: str, api: str, naive_tz: tzinfo = UTC) -> Converter:
    """``lambda value: to_json_value(value, crm_type, api, naive_tz)``, with the CRM type
    dispatched once and a fast path for the values a row image usually holds (a ``str`` for a
    text type, an ``int`` in range for integer/bigint, a ``bool`` for boolean). Same results
    and errors as :func:`to_json_value` (tests/unit/test_mapping_fast.py)."""
    if crm_type not in COMPATIBLE_DATA_TYPES or crm_type == "lookup":
        raise ValueError(f"unknown CRM type {crm_type!r}")
    if crm_type in _TEXT_TYPES:

        def text(value: Any) -> Any:
            if type(value) is str:
                return value
            return None if value is None else _text(value)

        return text
    if crm_type == "integer":

        def integer(value: Any) -> Any:
            if type(value) is int and -_INT_LIMIT < value < _INT_LIMIT:
                return value
            return None if value is None else _integer(value, api)

        return integer
    if crm_type == "bigint":

        def bigint(value: Any) -> Any:
            if type(value) is int and -_INT_LIMIT < value < _INT_LIMIT:
                return str(value)
            return None if value is None else str(_integer(value, api))

        return bigint
    if crm_type == "boolean":

        def boolean(value: Any) -> Any:
            if type(value) is bool:
                return value
            return None if value is None else _boolean(value, api)

        return boolean
    if crm_type in _DECIMAL_TYPES:

        def decimal_(value: Any) -> Any:
            if type(value) is Decimal and value.is_finite():  # what _to_decimal returns
                return value
            return None if value is None else _to_decimal(value, api)

        return decimal_
    if crm_type == "multiselectpicklist":

        def multiselect(value: Any) -> Any:
            return None if value is None else _multiselect(value, api)

        return multiselect
    if crm_type == "date":

        def date_(value: Any) -> Any:
            if type(value) is str and (fast := _date_fast(value)) is not None:
                return fast
            return None if value is None else _date(value, api).isoformat()

        return date_

    def datetime_(value: Any) -> Any:
        if type(value) is str and (fast := _datetime_fast(value)) is not None:
            return fast
        return None if value is None else _datetime_text(value, api, naive_tz)

    return datetime_


def csv_converter(crm_type: str, api: str, naive_tz: tzinfo = UTC) -> Converter:
    """``lambda value: to_csv_value(value, crm_type, api, naive_tz)``, dispatched once, with
    the same fast paths as :func:`json_converter`; same results and errors."""
    if crm_type not in COMPATIBLE_DATA_TYPES or crm_type == "lookup":
        raise ValueError(f"unknown CRM type {crm_type!r}")
    if crm_type in _TEXT_TYPES:

        def text(value: Any) -> str:
            if type(value) is str:
                return value
            return "" if value is None else str(_text(value))

        return text
    if crm_type in ("integer", "bigint"):

        def integer(value: Any) -> str:
            if type(value) is int and -_INT_LIMIT < value < _INT_LIMIT:
                return str(value)
            return "" if value is None else str(_integer(value, api))

        return integer
    if crm_type == "boolean":

        def boolean(value: Any) -> str:
            if value is None:
                return ""
            return "true" if _boolean(value, api) else "false"

        return boolean
    if crm_type in _DECIMAL_TYPES:

        def decimal_(value: Any) -> str:
            if type(value) is Decimal and value.is_finite():  # what _to_decimal returns
                return _decimal_text(value)
            return "" if value is None else _decimal_text(_to_decimal(value, api))

        return decimal_
    if crm_type == "multiselectpicklist":

        def multiselect(value: Any) -> str:
            return "" if value is None else ";".join(_multiselect(value, api))

        return multiselect
    if crm_type == "date":

        def date_(value: Any) -> str:
            if type(value) is str and (fast := _date_fast(value)) is not None:
                return fast
            return "" if value is None else _date(value, api).isoformat()

        return date_

    def datetime_(value: Any) -> str:
        if type(value) is str and (fast := _datetime_fast(value)) is not None:
            return fast
        return "" if value is None else _datetime_text(value, api, naive_tz)

    return datetime_


# Fast paths for the text a row image holds (``to_jsonb`` of a date / timestamptz column):
# the same result as ``_date(value).isoformat()`` / ``_datetime_text(value)`` when they apply,
# None otherwise (the general form then decides, errors included; issue 19).
_AWARE_ISO = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?[+-][0-9]{2}:[0-9]{2}"
)


def _date_fast(value: str) -> str | None:
    """``yyyy-MM-dd`` from 1900-01-01 on. Such a text has nothing to strip and passes
    ``_check_date_text`` (four-digit year, no ``BC``); ``_date`` reads it with the same
    ``date.fromisoformat``."""
    if len(value) != 10 or value[4] != "-" or value[7] != "-" or not value.isascii():
        return None
    try:
        d = date.fromisoformat(value)
    except ValueError:
        return None
    # read as yyyy-MM-dd (ASCII digits, the only 10-character form with both dashes there):
    # its isoformat() is the text itself
    return value if d >= MIN_DATE else None


def _datetime_fast(value: str) -> str | None:
    """``yyyy-MM-ddTHH:mm:ss[.f]±HH:MM`` with a year in 1901..9998: nothing to strip, passes
    ``_check_date_text``, read by the same ``datetime.fromisoformat``; its offset is whole
    minutes and neither the date nor its UTC date (a day at most away) can leave
    1900-01-01..9999-12-31, so ``_datetime_text`` ends in ``isoformat(timespec="seconds")``
    of the same datetime."""
    if not _AWARE_ISO.fullmatch(value):
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if not 1900 < dt.year < 9999 or value[11:13] == "24":  # (24:00 is the next day's 00:00)
        return None
    # isoformat(timespec="seconds") of what was read from ASCII digits: the text up to the
    # seconds, then the offset (a zero offset is written "+00:00")
    offset = value[-6:]
    return value[:19] + ("+00:00" if offset == "-00:00" else offset)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _decimal_text(value) if value.is_finite() else str(value)
    if isinstance(value, dict | list):
        return dumps_json(value).decode()
    return str(value)


def _multiselect(value: Any, api: str) -> list[str]:
    if isinstance(value, str):
        return [item for item in (part.strip() for part in value.split(";")) if item]
    if isinstance(value, list | tuple):
        items = [_text(v) for v in value if v is not None]
        for item in items:
            if ";" in item:
                raise DataError(
                    "INVALID_MULTISELECT",
                    f"multi-select value {item!r} contains ';', the CRM's value separator",
                    field=api,
                )
        return items
    raise DataError(
        "INVALID_MULTISELECT",
        f"expected a list of values or a ';'-separated string, got {type(value).__name__}",
        field=api,
    )


def _to_decimal(value: Any, api: str) -> Decimal:
    if isinstance(value, bool):
        raise DataError("INVALID_NUMBER", "expected a number, got a boolean", field=api)
    try:
        if isinstance(value, Decimal):
            d = value
        elif isinstance(value, int):
            d = Decimal(value)
        elif isinstance(value, float):
            d = Decimal(repr(value)) if math.isfinite(value) else Decimal(str(value))
        elif isinstance(value, str):
            d = Decimal(value.strip())
        else:
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        raise DataError(
            "INVALID_NUMBER", f"cannot read {show_value(value)} as a number", field=api
        ) from None
    if not d.is_finite():
        raise DataError(
            "NOT_A_NUMBER",
            f"{d} cannot be represented in the CRM (not a finite number)",
            field=api,
        )
    return d


#: More digits than any Zoho integer field holds (zoho-crm-api.md §2.5: Long integer 18).
MAX_INTEGRAL_DIGITS = 18


def _in_range(d: Decimal, api: str) -> Decimal:
    if d != 0 and d.adjusted() >= MAX_INTEGRAL_DIGITS:
        raise DataError(
            "NUMBER_OUT_OF_RANGE",
            f"a number of {d.adjusted() + 1} digits before the point cannot be held by a CRM "
            f"integer field (at most {MAX_INTEGRAL_DIGITS} digits)",
            field=api,
        )
    return d


def _integer(value: Any, api: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if -(10**MAX_INTEGRAL_DIGITS) < value < 10**MAX_INTEGRAL_DIGITS:
            return value
        d = Decimal(value)
    else:
        d = _to_decimal(value, api)
    _in_range(d, api)
    if d != d.to_integral_value():
        raise DataError("NOT_AN_INTEGER", f"{_decimal_text(d)} is not a whole number", field=api)
    return int(d)


def _decimal_text(d: Decimal) -> str:
    """Plain notation, every digit kept (``1E+3`` → ``1000``, ``1.50`` stays ``1.50``)."""
    text = format(d, "f")
    return "0" if text in ("-0", "-0.0") else text


def _boolean(value: Any, api: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise DataError("INVALID_BOOLEAN", f"cannot read {show_value(value)} as a boolean", field=api)


def _date(value: Any, api: str) -> date:
    if isinstance(value, datetime):
        d = value.date()
    elif isinstance(value, date):
        d = value
    elif isinstance(value, str):
        text = value.strip()
        _check_date_text(text, api)
        try:
            d = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text).date()
        except ValueError:
            raise DataError(
                "INVALID_DATE", f"cannot read {show_value(value)} as a date", field=api
            ) from None
    else:
        raise DataError("INVALID_DATE", f"cannot read {show_value(value)} as a date", field=api)
    if d < MIN_DATE:
        raise DataError(
            "DATE_OUT_OF_RANGE", f"date {d.isoformat()} is before 1900-01-01", field=api
        )
    return d


def _datetime_text(value: Any, api: str, naive_tz: tzinfo) -> str:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        _check_date_text(value.strip(), api)
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise DataError(
                "INVALID_DATETIME", f"cannot read {show_value(value)} as a date and time", field=api
            ) from None
    else:
        raise DataError(
            "INVALID_DATETIME", f"cannot read {show_value(value)} as a date and time", field=api
        )
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=naive_tz)
    try:
        offset = dt.utcoffset()
        assert offset is not None
        if offset % _MINUTE:
            # an offset with seconds (historic local mean time) has no ±HH:MM form: use UTC
            dt = dt.astimezone(UTC)
        in_utc = dt.astimezone(UTC).date()
    except OverflowError:  # year 1 or 9999 moved past Python's range by the offset
        raise DataError(
            "DATE_OUT_OF_RANGE",
            f"timestamp {dt.replace(tzinfo=None).isoformat()} is outside 1900..9999",
            field=api,
        ) from None
    if in_utc < MIN_DATE or dt.date() < MIN_DATE:
        raise DataError(
            "DATE_OUT_OF_RANGE", f"timestamp {dt.isoformat()} is before 1900-01-01", field=api
        )
    # the same text as dt.replace(microsecond=0).isoformat(), one datetime fewer (issue 19)
    return dt.isoformat(timespec="seconds")


_MINUTE = timedelta(minutes=1)
_OUT_OF_RANGE_DATE = re.compile(r"[+-]?\d{5,}-|.* BC\Z")


def _check_date_text(text: str, api: str) -> None:
    """PostgreSQL's ``infinity``, years past 9999 and BC dates: not representable."""
    if text.lower() in ("infinity", "-infinity", "+infinity") or _OUT_OF_RANGE_DATE.match(text):
        raise DataError(
            "DATE_OUT_OF_RANGE",
            f"{show_value(text)} cannot be represented in the CRM"
            " (dates run 1900-01-01..9999-12-31)",
            field=api,
        )


def show_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- JSON serialisation without float loss ------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError("non-finite Decimal cannot be sent as JSON")
        return orjson.Fragment(_decimal_text(obj).encode())
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps_json(obj: Any) -> bytes:
    """orjson with ``Decimal`` written as a JSON number from its exact digits, and integers
    beyond 64 bits (which orjson refuses) too: a row image holding ``2^64`` is stored as it is
    (a dead letter's payload), never a crash."""
    try:
        return orjson.dumps(obj, default=_default)
    except TypeError:
        return orjson.dumps(wide_ints(obj), default=_default)


def wide_ints(obj: Any) -> Any:
    """``obj`` with integers beyond 64 bits as JSON fragments (orjson refuses them)."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        if -(2**63) <= obj < 2**64:
            return obj
        return orjson.Fragment(str(obj).encode())
    if isinstance(obj, dict):
        return {k: wide_ints(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [wide_ints(v) for v in obj]
    return obj
