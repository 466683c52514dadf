"""``outbox.load_row`` (parsed once per outbox row, issue 19) answers exactly what
``json.loads(data, parse_float=Decimal, parse_int=_parse_int)`` answers: the same values and
types (a Decimal for every non-integer number, an int up to 4000 digits, a Decimal beyond), the
same errors, for text and for bytes in any JSON encoding."""

from __future__ import annotations

import decimal
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.outbox import _parse_int, load_row


def _reference(data: str | bytes) -> Any:
    return json.loads(data, parse_float=decimal.Decimal, parse_int=_parse_int)


def _same(a: Any, b: Any) -> bool:
    # repr tells int from Decimal and float nan from itself; == alone would not
    return repr(a) == repr(b) and type(a) is type(b)


_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=3990, max_value=4010).map(lambda n: "9" * n),  # digit runs
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_leaves = st.one_of(st.none(), st.booleans(), st.text(max_size=30), _numbers)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)


def _text(v: Any) -> str:
    """JSON text; strings of digits from _numbers become bare JSON numbers."""
    if isinstance(v, str) and v and (v[0].isdigit() or v[0] == "-") and _is_number(v):
        return v
    if isinstance(v, list):
        return "[" + ", ".join(_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_text(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def _is_number(s: str) -> bool:
    try:
        json.loads(s, parse_int=lambda t: 0, parse_float=lambda t: 0.0)
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(_values, st.sampled_from(["str", "utf-8", "utf-16", "utf-32-le"]))
def test_load_row_is_json_loads_with_decimals(value: Any, form: str) -> None:
    text = _text(value)
    data: str | bytes = text if form == "str" else text.encode(form)
    assert _same(load_row(data), _reference(data))


@pytest.mark.parametrize(
    "data",
    [
        '{"a": ' + "1" * 4000 + "}",  # 4000 digits in a longer text: an int
        '{"a": ' + "1" * 4001 + "}",  # 4001 digits: a Decimal, as before
        '{"a": -' + "1" * 4000 + "}",
        "[" + "1" * 3998 + "]",  # a short text at the limit
        '{"n": 1.50, "x": 1E+3, "i": -0, "f": NaN}',
        b'{"k": "\xc3\xa9"}',
    ],
)
def test_load_row_edges(data: str | bytes) -> None:
    assert _same(load_row(data), _reference(data))


@pytest.mark.parametrize("data", ["\ufeff{}", "{", b"{\xff}", "", "[1,]"])
def test_load_row_errors_as_json_loads(data: str | bytes) -> None:
    with pytest.raises(ValueError) as ours:
        load_row(data)
    with pytest.raises(ValueError) as theirs:
        _reference(data)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
