"""``RecordMapper`` chooses each column's conversion once (issue 19); what it produces must stay
exactly what the per-value functions ``to_json_value`` / ``to_csv_value`` produce: the same
values, and for a bad value the same ``DataError`` (code, message, field)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, get_args
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config import CrmType, PipelineConfig
from connector.errors import DataError
from connector.mapping import RecordMapper, key_text, to_csv_value, to_json_value

TYPES = [t for t in get_args(CrmType) if t != "lookup"]


def _mapper(crm_type: str, zone: str | None, naive: tzinfo) -> RecordMapper:
    data: dict[str, Any] = {
        "name": "p",
        "source_table": "public.t",
        "key_column": "id",
        "module": "Leads",
        "key_field": "Legacy_Id",
        "fields": {"c": {"field": "F", "type": crm_type}, "d": {"field": "G", "type": "text"}},
        "snapshot": "never",
    }
    if zone is not None:
        data["bulk_datetime_format"] = "MM/dd/yyyy HH:mm:ss"
        data["bulk_timezone"] = zone
    return RecordMapper(PipelineConfig.model_validate(data), naive_timezone=naive)


def _outcome(f: Any) -> Any:
    try:
        return ("ok", repr(f()))
    except DataError as exc:
        return ("error", exc.code, str(exc), exc.field)
    except (ValueError, TypeError) as exc:
        return ("raise", type(exc).__name__, str(exc))


def _reference_json(m: RecordMapper, row: dict[str, Any], crm_type: str) -> dict[str, Any]:
    record: dict[str, Any] = {"Legacy_Id": m.key_of(row)}
    record["F"] = to_json_value(row["c"], crm_type, "F", m._naive_tz)
    record["G"] = to_json_value(row["d"], "text", "G", m._naive_tz)
    return record


def _reference_csv(m: RecordMapper, row: dict[str, Any], crm_type: str) -> list[str]:
    values = [m.key_of(row)]
    for column, api, t in (("c", "F", crm_type), ("d", "G", "text")):
        value = to_csv_value(row[column], t, api, m._naive_tz)
        if t == "datetime" and value and m._bulk_zone is not None:
            local = datetime.fromisoformat(value).astimezone(m._bulk_zone)
            value = local.strftime("%m/%d/%Y %H:%M:%S")
        values.append(value)
    return values


_datetimes = st.datetimes(
    min_value=datetime(1899, 12, 30), max_value=datetime(9999, 12, 31), timezones=st.none()
) | st.datetimes(
    min_value=datetime(1899, 12, 30),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.decimals(places=3, allow_nan=True, allow_infinity=True),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["1", "0", "yes", "off", " 12.50 ", "a;b", "infinity", "10000-01-01"]),
    _datetimes,
    _datetimes.map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.isoformat()),
    st.dates(),
    st.lists(st.one_of(st.none(), st.text(max_size=5), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(Decimal("1E+3")),
    st.just(date(1899, 1, 1)),
)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(TYPES),
    _values,
    _values,
    st.sampled_from([None, "UTC", "Asia/Kolkata", "America/St_Johns"]),
    st.sampled_from([UTC, ZoneInfo("Europe/Paris")]),
)
def test_mapper_output_is_the_per_value_functions(
    crm_type: str, c: Any, d: Any, zone: str | None, naive: tzinfo
) -> None:
    m = _mapper(crm_type, zone, naive)
    row = {"id": 7, "c": c, "d": d}
    assert _outcome(lambda: m.to_json(row)) == _outcome(lambda: _reference_json(m, row, crm_type))
    assert _outcome(lambda: m.to_csv_values(row)) == _outcome(
        lambda: _reference_csv(m, row, crm_type)
    )


def test_missing_column_error_unchanged() -> None:
    m = _mapper("integer", None, UTC)
    for f in (m.to_json, m.to_csv_values):
        out = _outcome(lambda f=f: f({"id": 1, "d": "x"}))  # type: ignore[misc]
        assert out[0] == "error" and out[1] == "MISSING_COLUMN" and out[3] == "F"
    assert key_text(7, "k", "Legacy_Id") == "7"
