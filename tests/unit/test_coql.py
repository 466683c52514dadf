"""The COQL builder (connector/zoho/coql.py): values quoted per Zoho's rule (a single quote
doubled), API names checked, a backslash refused. No database, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.emulator.coql import tokenize
from connector.errors import DataError
from connector.zoho import coql


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", "'plain'"),
        ("O'Brien", "'O''Brien'"),
        ("''", "''''''"),
        ("'", "''''"),
        ('say "hi"', "'say \"hi\"'"),
        ("Zoë ✓ 東京", "'Zoë ✓ 東京'"),
        ("", "''"),
        ("a' or '1'='1", "'a'' or ''1''=''1'"),
    ],
)
def test_string_literals(value: str, literal: str) -> None:
    assert coql.string(value) == literal


@pytest.mark.parametrize("value", ["a\\b", "\\", "end\\", "\\'", "x\\'; select"])
def test_a_backslash_is_refused_with_the_field_named(value: str) -> None:
    with pytest.raises(coql.CoqlValueError, match="backslash") as err:
        coql.equals("Key_Field", value)
    assert isinstance(err.value, DataError)
    assert err.value.field == "Key_Field"
    assert err.value.code == "coql_backslash"


def test_select_with_where_order_and_limit() -> None:
    where = coql.equals("Customer_No", "O'Brien")
    assert (
        coql.select("Orders", ["id", "Name", "id"], where=where, order_by="id", limit=1)
        == "select id, Name from Orders where Customer_No = 'O''Brien' order by id asc limit 1"
    )
    assert (
        coql.select("Leads", ["id"], where=coql.not_null("id"), limit=1)
        == "select id from Leads where id is not null limit 1"
    )
    assert coql.select("Deals", ["Account_Name.Account_Name"], where=coql.not_null("id")) == (
        "select Account_Name.Account_Name from Deals where id is not null"
    )
    assert coql.select("Aufträge", ["$state", "Größe"], where=coql.not_null("id")) == (
        "select $state, Größe from Aufträge where id is not null"
    )


@pytest.mark.parametrize(
    "bad", ["", "Orders where 1=1", "Name, Email", "a.b.c", "x'", "1abc", "a b", "a-b", "a\\b"]
)
def test_names_that_are_not_api_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a Zoho API name"):
        coql.select(bad, ["id"], where=coql.not_null("id"))
    with pytest.raises(ValueError, match="not a Zoho API name"):
        coql.select("Orders", [bad], where=coql.not_null("id"))
    with pytest.raises(ValueError, match="not a Zoho API name"):
        coql.equals(bad, "v")


def test_limits_and_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="positive"):
        coql.select("Orders", ["id"], where=coql.not_null("id"), limit=0)
    with pytest.raises(ValueError, match="at least one field"):
        coql.select("Orders", [], where=coql.not_null("id"))


@given(st.text().filter(lambda v: "\\" not in v))
def test_any_value_without_a_backslash_reads_back_as_itself(value: str) -> None:
    """What the emulator's COQL reader (which takes Zoho's doubled quote) makes of the text is
    exactly one string token holding the value: nothing of it leaks into the query."""
    tokens = tokenize(coql.select("Orders", ["id"], where=coql.equals("Key", value), limit=1))
    kinds = [(kind, v) for kind, v, _ in tokens]
    assert kinds == [
        ("word", "select"),
        ("word", "id"),
        ("word", "from"),
        ("word", "Orders"),
        ("word", "where"),
        ("word", "Key"),
        ("op", "="),
        ("str", value),
        ("word", "limit"),
        ("num", 1),
    ]
