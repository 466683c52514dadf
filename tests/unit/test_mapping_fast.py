"""The per-column converters chosen once per mapping (issue 19: ``json_converter`` /
``csv_converter``, with fast paths for a ``str`` text, an in-range ``int``, a ``bool``) give
exactly what the general converters ``to_json_value`` / ``to_csv_value`` give, values and
errors alike, for generated values of every CRM type the mapping supports."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector import crm_values
from connector.crm_values import (
    COMPATIBLE_DATA_TYPES,
    csv_converter,
    json_converter,
    to_csv_value,
    to_json_value,
)
from tests.unit.outcomes import outcome

TYPES = sorted(t for t in COMPATIBLE_DATA_TYPES if t != "lookup")
ZONES: list[tzinfo] = [UTC, ZoneInfo("Europe/Paris"), timezone(timedelta(hours=-5, minutes=-30))]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**19), max_value=10**19),
    st.sampled_from([0, 1, -1, 10**18 - 1, 10**18, -(10**18) + 1, -(10**18), 2**63, 2**64]),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(places=2, min_value=-(10**6), max_value=10**6),
    st.floats(),
    st.text(),
    st.sampled_from(
        [
            "true",
            " Yes ",
            "off",
            "0",
            "1",
            "maybe",
            "",
            "a;b; c",
            "12",
            " 42 ",
            "1e3",
            "1.5",
            "NaN",
            "infinity",
            "-infinity",
            "2024-02-29",
            "1899-12-31",
            "10000-01-01",
            "0044-03-15 BC",
            "2024-05-06T07:08:09.123+02:00",
            "2024-05-06 07:08:09",
            "1900-01-01T00:00:00+05:00",
            "2024-13-01",
        ]
    ),
    st.dates(),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=14))])),
)
VALUES = st.one_of(
    _scalars,
    st.lists(st.one_of(st.none(), st.text(), st.integers(), st.booleans()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=1500, deadline=None)
@given(
    crm_type=st.sampled_from(TYPES),
    value=VALUES,
    zone=st.sampled_from(ZONES),
)
def test_fast_converters_match_the_general_ones(crm_type: str, value: Any, zone: tzinfo) -> None:
    to_json = json_converter(crm_type, "Field_X", zone)
    to_csv = csv_converter(crm_type, "Field_X", zone)
    assert outcome(to_json, value) == outcome(to_json_value, value, crm_type, "Field_X", zone)
    assert outcome(to_csv, value) == outcome(to_csv_value, value, crm_type, "Field_X", zone)


@pytest.mark.parametrize("crm_type", TYPES)
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        1,
        2,
        10**18 - 1,
        10**18,
        -(10**18),
        "x",
        "",
        Decimal("1.50"),
        Decimal("NaN"),
        1.5,
        date(2024, 1, 2),
        datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ],
)
def test_edges(crm_type: str, value: Any) -> None:
    assert outcome(json_converter(crm_type, "F"), value) == outcome(
        to_json_value, value, crm_type, "F"
    )
    assert outcome(csv_converter(crm_type, "F"), value) == outcome(
        to_csv_value, value, crm_type, "F"
    )


def test_int_limit_is_the_crm_integer_bound() -> None:
    assert crm_values._INT_LIMIT == 10**crm_values.MAX_INTEGRAL_DIGITS


def test_unknown_type_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown CRM type"):
        json_converter("lookup", "F")
    with pytest.raises(ValueError, match="unknown CRM type"):
        csv_converter("nope", "F")
