"""``mapping._datetime_text`` (once per datetime value of every event, issue 19 trimmed it)
answers exactly what it answered before: the same text, or the same ``DataError``, for
naive and aware datetimes in any zone (offsets with seconds, DST folds), dates and strings."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.crm_values import MIN_DATE, _check_date_text, _datetime_text, show_value
from connector.errors import DataError


def _before(value: Any, api: str, naive_tz: tzinfo) -> str:
    """The function as it was before issue 19 (verbatim)."""
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
        if offset % timedelta(minutes=1):
            dt = dt.astimezone(UTC)
        in_utc = dt.astimezone(UTC).date()
    except OverflowError:
        raise DataError(
            "DATE_OUT_OF_RANGE",
            f"timestamp {dt.replace(tzinfo=None).isoformat()} is outside 1900..9999",
            field=api,
        ) from None
    if in_utc < MIN_DATE or dt.date() < MIN_DATE:
        raise DataError(
            "DATE_OUT_OF_RANGE", f"timestamp {dt.isoformat()} is before 1900-01-01", field=api
        )
    return dt.replace(microsecond=0).isoformat()


def _outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except DataError as exc:
        return ("error", exc.code, str(exc), exc.field)


_zones = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=5, minutes=30)),
        timezone(timedelta(hours=-3, seconds=17)),  # an offset with seconds
        timezone(timedelta(microseconds=1)),
        ZoneInfo("Europe/Amsterdam"),  # local mean time before 1937: offsets with seconds
        ZoneInfo("America/St_Johns"),
        ZoneInfo("Pacific/Kiritimati"),
    ]
)
_datetimes = st.datetimes(timezones=st.none() | _zones, allow_imaginary=True)
_values = st.one_of(
    _datetimes,
    _datetimes.map(lambda d: d.isoformat()),
    _datetimes.map(lambda d: " " + d.isoformat(sep=" ", timespec="milliseconds")),
    st.dates(),
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["infinity", "-infinity", "10000-01-01T00:00:00", "2024-02-30T00:00:00"]),
    st.text(max_size=20),
    st.integers(),
    st.none(),
)


@settings(max_examples=1500, deadline=None)
@given(_values, _zones)
def test_datetime_text_unchanged(value: Any, naive_tz: tzinfo) -> None:
    assert _outcome(_datetime_text, value, "F", naive_tz) == _outcome(_before, value, "F", naive_tz)
