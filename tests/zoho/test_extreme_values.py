"""Extreme values of every PostgreSQL type the mapping supports (issue 14 §4): whatever the
row holds, mapping it either gives a record the JSON encoder can write or a ``DataError`` (a
dead letter with its reason) — never another exception, which would stop the pipeline and every
restart. The row image itself (a dead letter's payload) is written losslessly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from connector.crm_values import dumps_json, to_csv_value, to_json_value
from connector.errors import DataError
from connector.outbox import load_row

CRM_TYPES = [
    "text", "textarea", "picklist", "multiselectpicklist", "integer", "bigint", "decimal",
    "currency", "double", "percent", "boolean", "date", "datetime",
]  # fmt: skip

numerics = st.one_of(
    st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "18446744073709551616", "-9223372036854775809",
         "1E+20", "1e-20", "0.000000000000000000001", "999999999999999999", "1000000000000000000",
         "9" * 5000, "1" + "0" * 131071, "-0.0", "1.5e300"]
    ),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.integers(min_value=-(2**200), max_value=2**200).map(str),
)  # fmt: skip
float8s = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e20", "1.7976931348623157e308"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
int8s = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str)
dates = st.sampled_from(
    ["infinity", "-infinity", "4713-01-01 BC", "0001-01-01", "1899-12-31", "1900-01-01",
     "9999-12-31", "10000-01-01", "5874897-12-31"]
)  # fmt: skip
timestamps = st.sampled_from(
    ["infinity", "-infinity", "4713-01-01 00:00:00 BC", "0001-01-01 00:00:00",
     "9999-12-31 23:59:59.999999", "10000-01-01 00:00:00", "294276-12-31 23:59:59",
     "1900-01-01 00:00:00"]
)  # fmt: skip
zones = st.sampled_from(["UTC", "-14:00", "+14:00", "Asia/Kolkata"])

values = st.one_of(
    st.tuples(st.just("numeric"), numerics),
    st.tuples(st.just("float8"), float8s),
    st.tuples(st.just("int8"), int8s),
    st.tuples(st.just("date"), dates),
    st.tuples(st.just("timestamp"), timestamps),
    st.tuples(st.just("timestamptz"), timestamps),
    st.tuples(st.just("boolean"), st.sampled_from(["true", "false"])),
    st.tuples(st.just("text"), st.text(max_size=20)),
)


@pytest.fixture
def conn(database: str) -> Any:
    with psycopg.connect(database, autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        yield c


def _image(conn: Any, pg_type: str, text: str, zone: str) -> Any:
    """The row image to_jsonb gives for ``text`` as ``pg_type`` (None: PostgreSQL refuses it)."""
    try:
        value = text
        if pg_type == "timestamptz" and text[0].isdigit() and not text.endswith(" BC"):
            value = f"{text}{zone}" if zone[0] in "+-" else f"{text} {zone}"
        row = conn.execute(
            f"SELECT jsonb_build_object('id', 1, 'v', %s::{pg_type})::text", (value,)
        ).fetchone()
    except psycopg.DataError:
        return None
    return row[0]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=values, crm_type=st.sampled_from(CRM_TYPES), zone=zones)
def test_any_value_maps_or_is_a_data_error(
    conn: Any, value: tuple[str, str], crm_type: str, zone: str
) -> None:
    pg_type, text = value
    image = _image(conn, pg_type, text, zone)
    if image is None:
        return
    row = load_row(image)
    # the payload is stored losslessly: through dumps_json and back into jsonb, unchanged
    same = conn.execute(
        "SELECT %s::jsonb = %s::jsonb", (image, Jsonb(row, dumps=lambda o: dumps_json(o).decode()))
    ).fetchone()
    assert same == (True,), image[:200]
    try:
        record = to_json_value(row["v"], crm_type, "F")
        cell = to_csv_value(row["v"], crm_type, "F")
    except DataError as exc:
        assert exc.code and str(exc)
        return
    dumps_json({"F": record})  # the record can be sent
    assert isinstance(cell, str)
    if crm_type in ("integer", "bigint") and record is not None:
        assert abs(int(record)) < 10**18
    if crm_type in ("decimal", "currency", "double", "percent") and record is not None:
        assert isinstance(record, Decimal) and record == Decimal(cell)  # every digit kept


@pytest.mark.parametrize(
    ("pg", "crm_type", "code"),
    [
        ("18446744073709551616::numeric", "integer", "NUMBER_OUT_OF_RANGE"),
        ("'1E+20'::float8", "integer", "NUMBER_OUT_OF_RANGE"),
        ("'1E+20'::numeric", "bigint", "NUMBER_OUT_OF_RANGE"),
        ("'1E+20'::numeric", "currency", None),
        ("'NaN'::numeric", "integer", "NOT_A_NUMBER"),
        ("'infinity'::timestamptz", "datetime", "DATE_OUT_OF_RANGE"),
        ("'-infinity'::timestamp", "datetime", "DATE_OUT_OF_RANGE"),
        ("'infinity'::date", "date", "DATE_OUT_OF_RANGE"),
        ("'10000-01-01'::date", "date", "DATE_OUT_OF_RANGE"),
        ("'0044-03-15 BC'::date", "date", "DATE_OUT_OF_RANGE"),
        ("'9999-12-31 23:00-05'::timestamptz", "datetime", "DATE_OUT_OF_RANGE"),
        ("'9999-12-31 23:00+05'::timestamptz", "datetime", None),
        ("'0001-01-01 00:30+01'::timestamptz", "datetime", "DATE_OUT_OF_RANGE"),
    ],
)
def test_values_the_crm_cannot_hold_are_data_errors(
    conn: Any, pg: str, crm_type: str, code: str | None
) -> None:
    image = conn.execute(f"SELECT jsonb_build_object('v', {pg})::text").fetchone()[0]
    v = load_row(image)["v"]
    if code is None:
        dumps_json(to_json_value(v, crm_type, "F"))
        return
    with pytest.raises(DataError) as err:
        to_json_value(v, crm_type, "F")
    assert err.value.code == code and err.value.field == "F"
