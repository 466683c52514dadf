"""RecordMapper conversions (zoho-crm-api.md §6) and check_mapping against field metadata."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config import PipelineConfig
from connector.crm_values import dumps_json, to_csv_value, to_json_value
from connector.errors import ConfigError, DataError
from connector.mapping import CSV_DATE_FORMAT, CSV_DATETIME_FORMAT, RecordMapper
from connector.mapping_check import check_mapping
from connector.zoho.client import FieldMeta

FIELDS: dict[str, Any] = {
    "name": {"field": "Name"},
    "email": {"field": "Customer_Email", "type": "email"},
    "status": {"field": "Status", "type": "picklist"},
    "amount": {"field": "Amount", "type": "currency"},
    "quantity": {"field": "Quantity", "type": "integer"},
    "order_date": {"field": "Order_Date", "type": "date"},
    "placed_at": {"field": "Placed_At", "type": "datetime"},
    "notes": {"field": "Notes", "type": "textarea"},
    "is_gift": {"field": "Is_Gift", "type": "boolean"},
}


def pipeline(**over: Any) -> PipelineConfig:
    data: dict[str, Any] = {
        "name": "orders",
        "source_table": "public.orders",
        "key_column": "id",
        "module": "Orders",
        "fields": FIELDS,
    }
    data.update(over)
    return PipelineConfig.model_validate(data)


ROW: dict[str, Any] = {
    "id": 42,
    "name": "  Order 42  ",
    "email": "not-an-email",
    "status": "Paid",
    "amount": Decimal("12345678901234567890.1234567890"),
    "quantity": 3,
    "order_date": "2024-02-29",
    "placed_at": "2024-01-02T03:04:05.987654+00:00",
    "notes": 'line1\nline2, "quoted"',
    "is_gift": False,
}


def test_to_json_full_row() -> None:
    rec = RecordMapper(pipeline()).to_json(ROW)
    assert rec == {
        "parent_id": "42",
        "Name": "  Order 42  ",  # trimmed of nothing
        "Customer_Email": "not-an-email",  # email syntax is the CRM's to judge
        "Status": "Paid",
        "Amount": Decimal("12345678901234567890.1234567890"),
        "Quantity": 3,
        "Order_Date": "2024-02-29",
        "Placed_At": "2024-01-02T03:04:05+00:00",
        "Is_Gift": False,
        "Notes": 'line1\nline2, "quoted"',
    }
    assert next(iter(rec)) == "parent_id"


def test_decimal_serialised_without_float_loss() -> None:
    rec = RecordMapper(pipeline()).to_json(ROW)
    text = dumps_json({"data": [rec]}).decode()
    assert '"Amount":12345678901234567890.1234567890' in text
    parsed = json.loads(text, parse_float=Decimal)
    assert parsed["data"][0]["Amount"] == Decimal("12345678901234567890.1234567890")


@pytest.mark.parametrize(
    ("value", "crm_type", "json_value", "csv_value"),
    [
        (Decimal("1E+3"), "decimal", Decimal("1E+3"), "1000"),
        (Decimal("-0.000001"), "double", Decimal("-0.000001"), "-0.000001"),
        (5, "currency", Decimal(5), "5"),
        (Decimal("7.0"), "integer", 7, "7"),
        ("12", "integer", 12, "12"),
        (123456789012345678, "bigint", "123456789012345678", "123456789012345678"),
        (Decimal("99.5"), "percent", Decimal("99.5"), "99.5"),
        (True, "boolean", True, "true"),
        ("f", "boolean", False, "false"),
        (1, "boolean", True, "true"),
        ("2024-01-02", "date", "2024-01-02", "2024-01-02"),
        (date(1900, 1, 1), "date", "1900-01-01", "1900-01-01"),
        ("2024-01-02T03:04:05.5+00:00", "date", "2024-01-02", "2024-01-02"),
        (
            "2024-01-02T03:04:05.999999+05:30",
            "datetime",
            "2024-01-02T03:04:05+05:30",
            "2024-01-02T03:04:05+05:30",
        ),
        (
            "2024-01-02T03:04:05-08:00",
            "datetime",
            "2024-01-02T03:04:05-08:00",
            "2024-01-02T03:04:05-08:00",
        ),
        (
            "2024-01-02T03:04:05Z",
            "datetime",
            "2024-01-02T03:04:05+00:00",
            "2024-01-02T03:04:05+00:00",
        ),
        (
            "2024-01-02T03:04:05.123",
            "datetime",
            "2024-01-02T03:04:05+00:00",
            "2024-01-02T03:04:05+00:00",
        ),  # naive timestamp read in UTC
        (
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
            "datetime",
            "2024-01-02T03:04:05-03:30",
            "2024-01-02T03:04:05-03:30",
        ),
        (["Red", "Blue"], "multiselectpicklist", ["Red", "Blue"], "Red;Blue"),
        ("Red; Blue;", "multiselectpicklist", ["Red", "Blue"], "Red;Blue"),
        (None, "text", None, ""),
        (None, "integer", None, ""),
        (Decimal("3.10"), "text", "3.10", "3.10"),
        ({"a": 1}, "textarea", '{"a":1}', '{"a":1}'),
        ("Shipped", "picklist", "Shipped", "Shipped"),
        ("https://x.example", "url", "https://x.example", "https://x.example"),
    ],
)
def test_conversion_table(value: Any, crm_type: str, json_value: Any, csv_value: str) -> None:
    assert to_json_value(value, crm_type, "F") == json_value
    assert to_csv_value(value, crm_type, "F") == csv_value


def test_offset_with_seconds_goes_to_utc() -> None:
    odd = timezone(timedelta(minutes=53, seconds=28))
    out = to_json_value(datetime(2000, 1, 1, 12, 0, 0, tzinfo=odd), "datetime", "F")
    assert out == "2000-01-01T11:06:32+00:00"


@pytest.mark.parametrize(
    ("value", "crm_type", "code"),
    [
        ("NaN", "currency", "NOT_A_NUMBER"),
        (Decimal("NaN"), "decimal", "NOT_A_NUMBER"),
        (float("nan"), "double", "NOT_A_NUMBER"),
        ("Infinity", "double", "NOT_A_NUMBER"),
        ("-Infinity", "integer", "NOT_A_NUMBER"),
        ("abc", "currency", "INVALID_NUMBER"),
        (True, "integer", "INVALID_NUMBER"),
        (Decimal("1.5"), "integer", "NOT_AN_INTEGER"),
        ("1899-12-31", "date", "DATE_OUT_OF_RANGE"),
        ("0044-03-15", "date", "DATE_OUT_OF_RANGE"),
        ("1899-12-31T23:59:59+00:00", "datetime", "DATE_OUT_OF_RANGE"),
        ("1900-01-01T00:30:00+01:00", "datetime", "DATE_OUT_OF_RANGE"),
        ("infinity", "date", "DATE_OUT_OF_RANGE"),
        ("0044-03-15 BC", "date", "DATE_OUT_OF_RANGE"),
        ("yesterday", "datetime", "INVALID_DATETIME"),
        ("maybe", "boolean", "INVALID_BOOLEAN"),
        (2, "boolean", "INVALID_BOOLEAN"),
        (["a;b"], "multiselectpicklist", "INVALID_MULTISELECT"),
        (7, "multiselectpicklist", "INVALID_MULTISELECT"),
    ],
)
def test_unrepresentable_values_are_data_errors(value: Any, crm_type: str, code: str) -> None:
    with pytest.raises(DataError) as err:
        to_json_value(value, crm_type, "Some_Field")
    assert err.value.code == code
    assert err.value.field == "Some_Field"
    with pytest.raises(DataError):
        to_csv_value(value, crm_type, "Some_Field")


def test_row_level_errors_name_the_field() -> None:
    mapper = RecordMapper(pipeline())
    with pytest.raises(DataError) as err:
        mapper.to_json({**ROW, "amount": "NaN"})
    assert (err.value.code, err.value.field) == ("NOT_A_NUMBER", "Amount")
    with pytest.raises(DataError) as err:
        mapper.to_json({**ROW, "id": None})
    assert (err.value.code, err.value.field) == ("MISSING_KEY", "parent_id")
    row = dict(ROW)
    del row["quantity"]
    with pytest.raises(DataError) as err:
        mapper.to_csv_values(row)
    assert (err.value.code, err.value.field) == ("MISSING_COLUMN", "Quantity")


def test_csv_values_header_and_field_mappings() -> None:
    mapper = RecordMapper(pipeline())
    header = mapper.csv_header()
    assert header[0] == "parent_id"
    values = mapper.to_csv_values(ROW)
    assert dict(zip(header, values, strict=True)) == {
        "parent_id": "42",
        "Name": "  Order 42  ",
        "Customer_Email": "not-an-email",
        "Status": "Paid",
        "Amount": "12345678901234567890.1234567890",
        "Quantity": "3",
        "Order_Date": "2024-02-29",
        "Placed_At": "2024-01-02T03:04:05+00:00",
        "Notes": 'line1\nline2, "quoted"',
        "Is_Gift": "false",
    }
    mappings = mapper.field_mappings()
    assert [m["index"] for m in mappings] == list(range(len(header)))
    assert [m["api_name"] for m in mappings] == header
    by_name = {m["api_name"]: m for m in mappings}
    assert by_name["Order_Date"]["format"] == CSV_DATE_FORMAT == "yyyy-MM-dd"
    # Date/Time: ISO 8601 with offset, no declared format (Zoho's list has no such pattern)
    assert CSV_DATETIME_FORMAT is None and "format" not in by_name["Placed_At"]
    assert "format" not in by_name["Amount"]


@settings(max_examples=200, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False, places=None))
def test_decimal_round_trips_exactly(d: Decimal) -> None:
    text = dumps_json({"v": to_json_value(d, "decimal", "F")}).decode()
    assert json.loads(text, parse_float=Decimal, parse_int=Decimal)["v"] == d
    assert Decimal(to_csv_value(d, "decimal", "F")) == d


@settings(max_examples=100, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1900, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
        ),
    )
)
def test_datetime_keeps_instant_to_the_second(dt: datetime) -> None:
    out = to_json_value(dt.isoformat(), "datetime", "F")
    back = datetime.fromisoformat(out)
    assert back.utcoffset() == dt.utcoffset()
    assert back == dt.replace(microsecond=0)
    assert "." not in out and not out.endswith("Z")


# ---- check_mapping ------------------------------------------------------------------------------


class FakeFields:
    """Field metadata source for check_mapping (the real client is exercised in
    test_client_emulator.py)."""

    def __init__(self, metas: list[FieldMeta]) -> None:
        self.metas = metas

    async def fields(self, module: str) -> list[FieldMeta]:
        assert module == "Orders"
        return self.metas


def orders_meta(**changes: FieldMeta | None) -> list[FieldMeta]:
    metas = {
        "parent_id": FieldMeta("parent_id", "text", unique=True, mandatory=True),
        "Name": FieldMeta("Name", "text", mandatory=True),
        "Customer_Email": FieldMeta("Customer_Email", "email"),
        "Status": FieldMeta("Status", "picklist"),
        "Amount": FieldMeta("Amount", "currency"),
        "Quantity": FieldMeta("Quantity", "integer"),
        "Order_Date": FieldMeta("Order_Date", "date"),
        "Placed_At": FieldMeta("Placed_At", "datetime"),
        "Notes": FieldMeta("Notes", "textarea"),
        "Is_Gift": FieldMeta("Is_Gift", "boolean"),
        "Deleted": FieldMeta("Deleted", "boolean"),
    }
    for name, meta in changes.items():
        if meta is None:
            metas.pop(name)
        else:
            metas[name] = meta
    return list(metas.values())


async def test_check_mapping_accepts_matching_module() -> None:
    await check_mapping(FakeFields(orders_meta()), pipeline())
    await check_mapping(
        FakeFields(orders_meta()), pipeline(delete_mode="mark", delete_mark_field="Deleted")
    )


@pytest.mark.parametrize(
    ("metas", "over", "key", "expected"),
    [
        (orders_meta(Amount=None), {}, "pipelines['orders'].fields.amount", "no field 'Amount'"),
        (
            orders_meta(Quantity=FieldMeta("Quantity", "text")),
            {},
            "pipelines['orders'].fields.quantity",
            "expected type 'text'",
        ),
        (
            orders_meta(parent_id=None),
            {},
            "pipelines['orders'].key_field",
            "no field 'parent_id'",
        ),
        (
            orders_meta(parent_id=FieldMeta("parent_id", "text")),
            {},
            "pipelines['orders'].key_field",
            "not unique",
        ),
        (
            orders_meta(Notes=FieldMeta("Notes", "textarea", read_only=True)),
            {},
            "pipelines['orders'].fields.notes",
            "read-only",
        ),
        (
            orders_meta(Extra=FieldMeta("Extra", "text", mandatory=True)),
            {},
            "pipelines['orders'].fields",
            "requires field(s) Extra",
        ),
        (
            orders_meta(),
            {"delete_mode": "mark", "delete_mark_field": "Status"},
            "pipelines['orders'].delete_mark_field",
            "expected a boolean field",
        ),
    ],
)
async def test_check_mapping_refuses(
    metas: list[FieldMeta], over: dict[str, Any], key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        await check_mapping(FakeFields(metas), pipeline(**over))
    assert err.value.key == key
    assert expected in str(err.value)


async def test_check_mapping_accepts_zoho_aliases() -> None:
    fields = {
        **FIELDS,
        "site": {"field": "Site", "type": "url"},
        "ratio": {"field": "Ratio", "type": "decimal"},
    }
    metas = orders_meta(Site=FieldMeta("Site", "website"), Ratio=FieldMeta("Ratio", "double"))
    await check_mapping(FakeFields(metas), pipeline(fields=fields))
