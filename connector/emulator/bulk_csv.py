"""Bulk write's CSV values (split from ``connector.emulator.bulk``): the date and date-time
formats a field mapping may name, Java-pattern parsing, and one converter per mapped column
that turns a CSV cell into the value the record store keeps (or a field error)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from connector.emulator.config import FieldSpec
from connector.emulator.state import EmulatorState
from connector.emulator.validate import BAD, Checker, csv_value

# Zoho's defaults when field_mappings[].format is absent (v7 create-job notes; reference §6.2).
DEFAULT_DATE_FORMAT = "MM/dd/yyyy"
DEFAULT_DATETIME_FORMAT = "MM/dd/yyyy HH:mm:ss"
# The Date patterns of Zoho's "Allowed formats for fields in create bulk write job API" (PDF
# linked from the create-job page, zoho.com/sites/zweb/images/crm/allowed-formats-for-fields-in-
# create-bulk-write-job-api.pdf), as far as its text could be read; any other declared Date
# format is refused with INVALID_FORMAT.
ALLOWED_DATE_FORMATS = frozenset(
    {
        "dd MMM yy", "yy MMM dd", "MMM/dd/yy", "dd MMM yyyy", "yyyy.MMM.dd", "dd-MMMM-yy",
        "yy-MMMM-dd", "MMMM-dd-yy", "dd.MMMM.yy", "yy.MMMM.dd", "yyyy-MMMM-dd", "dd-MMM-yyyy",
        "dd.MM.yyyy", "MM.dd.yyyy", "dd MMMM yyyy", "MMM-dd-yy", "MMM/dd/yyyy", "MMM dd yyyy",
        "dd/MMM/yyyy", "yyyy/MMMM/dd", "yyyy MMMM dd", "MMM.dd.yy", "yyyy.MM.dd", "dd-MMM-yy",
        "yy-MMM-dd", "MMMM-dd-yyyy", "dd.MM.yy", "MM.dd.yy", "yy.MM.dd", "dd/MM/yyyy",
        "MM/dd/yyyy", "dd MM yyyy", "MM dd yyyy", "dd-MMMM-yyyy", "MMM.dd.yyyy", "yyyy MM dd",
        "dd/MM/yy", "MM/dd/yy", "yy/MM/dd", "MMMM.dd.yyyy", "dd/MMMM/yyyy", "dd.MMM.yyyy",
        "dd/MMM/yy", "yy/MMM/dd", "yyyy/MMM/dd", "yyyy MMM dd", "dd.MMM.yy", "yy.MMM.dd",
        "yyyy.MMMM.dd", "MMMM dd yy", "MMM dd,yyyy", "MMMM dd,yyyy", "dd/MMMM/yy", "yy/MMMM/dd",
        "yyyy-MM-dd",
    }
)  # fmt: skip
# Date/Time: the PDF's date/time list could not be read; only Zoho's default is confirmed. A
# Date/Time column without a declared format also takes ISO 8601 with an offset
# (yyyy-MM-ddTHH:mm:ss±HH:mm), the value format Zoho's Kaizen #13 "Bulk Write API" lists for
# Date/Time cells. Anything else declared is refused (fails safe: a real org may refuse it too).
ALLOWED_DATETIME_FORMATS = frozenset({DEFAULT_DATETIME_FORMAT})
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
_JAVA_TOKENS = [
    ("yyyy", "%Y"),
    ("yy", "%y"),
    ("MMMM", "%B"),
    ("MMM", "%b"),
    ("MM", "%m"),
    ("dd", "%d"),
    ("HH", "%H"),
    ("mm", "%M"),
    ("ss", "%S"),
    ("SSS", "%f"),
    ("XXX", "%z"),
    ("Z", "%z"),
]


def java_to_strptime(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "'":
            j = pattern.index("'", i + 1)
            out.append(pattern[i + 1 : j])
            i = j + 1
            continue
        for java, py in _JAVA_TOKENS:
            if pattern.startswith(java, i):
                out.append(py)
                i += len(java)
                break
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


Converter = Callable[[str], Any]
_NUMERIC_TOKENS = {
    "yyyy": r"(\d{4})",
    "MM": r"(\d{2})",
    "dd": r"(\d{2})",
    "HH": r"(\d{2})",
    "mm": r"(\d{2})",
    "ss": r"(\d{2})",
}


def _numeric_pattern(pattern: str) -> tuple[re.Pattern[str], list[str]] | None:
    """A regex for Java date patterns made of numeric fields only (the fast path)."""
    out: list[str] = []
    order: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "'":
            j = pattern.index("'", i + 1)
            out.append(re.escape(pattern[i + 1 : j]))
            i = j + 1
            continue
        if pattern.startswith("MMM", i) or pattern.startswith("SSS", i):
            return None
        for tok, rx in _NUMERIC_TOKENS.items():
            if pattern.startswith(tok, i):
                out.append(rx)
                order.append(tok)
                i += len(tok)
                break
        else:
            if pattern[i].isalpha():
                return None
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$"), order


def make_csv_converter(
    spec: FieldSpec, fmt: str | None, state: EmulatorState, check: Checker
) -> Converter:
    """A function turning one CSV cell into the value the record API would store, or BAD.
    The cell becomes the JSON value it stands for (``validate.csv_value``; dates in the
    column's format), then the field's JSON checker judges it: one validation for both paths
    (``validate.py``)."""
    dt = spec.data_type
    if dt in ("date", "datetime"):
        pattern = fmt or (DEFAULT_DATE_FORMAT if dt == "date" else DEFAULT_DATETIME_FORMAT)
        conv = _date_converter(pattern, dt == "datetime", state)
        if dt == "datetime" and fmt is None:
            conv = _iso_or(conv)
        parse = _memo(conv)
    else:

        def parse(s: str) -> Any:
            return csv_value(dt, s)

    def convert(s: str) -> Any:
        value = parse(s)
        if value is BAD or check(value) is not None:
            return BAD
        return value

    return convert


def _iso_or(default: Converter) -> Converter:
    """ISO 8601 with an explicit offset (Kaizen #13), else Zoho's default pattern."""

    def convert(s: str) -> Any:
        if _ISO_DATETIME.match(s):
            try:
                return datetime.fromisoformat(s).isoformat()
            except ValueError:
                return BAD
        return default(s)

    return convert


def _memo(conv: Converter, size: int = 65_536) -> Converter:
    """Dates repeat across rows (orders of one day); remember recent conversions."""
    cache: dict[str, Any] = {}

    def cached(s: str) -> Any:
        v = cache.get(s)
        if v is None:
            if len(cache) >= size:
                cache.clear()
            v = cache[s] = conv(s)
        return v

    return cached


def _date_converter(pattern: str, with_time: bool, state: EmulatorState) -> Converter:
    tz = state.clock.tz
    suffix = datetime(2000, 1, 1, tzinfo=tz).isoformat()[19:]
    fast = _numeric_pattern(pattern)
    if fast is not None and {"yyyy", "MM", "dd"} <= set(fast[1]):
        rx, order = fast
        pos = {tok: i + 1 for i, tok in enumerate(order)}

        def convert_fast(s: str) -> Any:
            m = rx.match(s)
            if m is None:
                return BAD
            y, mo, d = int(m.group(pos["yyyy"])), int(m.group(pos["MM"])), int(m.group(pos["dd"]))
            if not ((1 <= mo <= 12 and 1 <= d <= 28) or _valid_date(y, mo, d)):
                return BAD
            if not with_time:
                return f"{y:04d}-{mo:02d}-{d:02d}"
            h = int(m.group(pos["HH"])) if "HH" in pos else 0
            mi = int(m.group(pos["mm"])) if "mm" in pos else 0
            sec = int(m.group(pos["ss"])) if "ss" in pos else 0
            if h > 23 or mi > 59 or sec > 59:
                return BAD
            return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}{suffix}"

        return convert_fast
    py = java_to_strptime(pattern)

    def convert_slow(s: str) -> Any:
        try:
            d = datetime.strptime(s, py)
        except ValueError:
            return BAD
        if not with_time:
            return d.date().isoformat()
        if d.tzinfo is None:
            d = d.replace(tzinfo=tz)  # offset-less: read in the job creator's zone
        return d.replace(microsecond=0).isoformat()

    return convert_slow


def _valid_date(y: int, mo: int, d: int) -> bool:
    try:
        date(y, mo, d)
    except ValueError:
        return False
    return True


# -- upload ------------------------------------------------------------------------------------
