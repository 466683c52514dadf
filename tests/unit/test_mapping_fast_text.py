"""The date / timestamp text fast paths of the per-column converters (issue 19: a row image's
``yyyy-MM-dd`` and ``yyyy-MM-ddTHH:mm:ss[.f]±HH:MM`` are converted without the general
parse) give exactly what the general converters give, values and errors alike: generated
texts as ``to_jsonb`` writes them, and the edges around the fast paths' conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.crm_values import csv_converter, json_converter, to_csv_value, to_json_value
from tests.unit.outcomes import outcome

ZONES: list[tzinfo] = [UTC, ZoneInfo("Europe/Paris"), timezone(timedelta(hours=-5, minutes=-30))]

_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m))
)
_aware = st.datetimes(
    min_value=datetime(1899, 12, 30),  # naive bounds: the zones are drawn
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=_offsets,
)
TEXTS = st.one_of(
    _aware.map(lambda d: d.isoformat()),
    _aware.map(lambda d: d.isoformat(timespec="milliseconds")),
    _aware.map(lambda d: d.date().isoformat()),
    _aware.map(lambda d: d.isoformat().replace("+00:00", "-00:00")),
)

EDGES = [
    "2026-12-05T18:37:24.123456+00:00",
    "2026-12-05T18:37:24-00:00",
    "1901-01-01T00:30:00+01:00",
    "1900-01-01T00:30:00+01:00",
    "1900-12-31T23:30:00-01:00",
    "9998-12-31T23:00:00-01:00",
    "9999-12-31T23:00:00-01:00",
    "2026-02-30T00:00:00+00:00",
    "2026-12-05T24:00:00+00:00",
    "2026-12-05T18:37:60+00:00",
    "2026-12-05T18:37:24.1+05:30",
    "2026-12-05T18:37:24+24:00",
    "2026-12-05T18:37:24.1234567+00:00",
    "2026-12-05T18:37:24+00:00:30",
    "2026-12-05 18:37:24+00:00",
    " 2026-12-05T18:37:24+00:00",
    "2026-12-05T18:37:24",
    "\u0661\u0662\u0663\u0664-01-01T00:00:00+00:00",
    "2026-12-05",
    "2024-02-29",
    "2026-02-29",
    "1899-12-31",
    "1900-01-01",
    "2026-W49-6",
    "20261205",
    "2026-13-01",
    "\u0661\u0662\u0663\u0664-01-01",
    "2026-12-5 ",
]


def _same(value: str, zone: tzinfo) -> None:
    for crm_type in ("date", "datetime"):
        assert outcome(json_converter(crm_type, "F", zone), value) == outcome(
            to_json_value, value, crm_type, "F", zone
        )
        assert outcome(csv_converter(crm_type, "F", zone), value) == outcome(
            to_csv_value, value, crm_type, "F", zone
        )


@settings(max_examples=1500, deadline=None)
@given(value=TEXTS, zone=st.sampled_from(ZONES))
def test_text_fast_paths_match_the_general_converters(value: str, zone: tzinfo) -> None:
    _same(value, zone)


@pytest.mark.parametrize("value", EDGES)
@pytest.mark.parametrize("zone", ZONES)
def test_text_fast_path_edges(value: str, zone: tzinfo) -> None:
    _same(value, zone)
