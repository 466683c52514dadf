"""Subform pipelines (issue 21 part 2a): the ``subform_of`` configuration and its validation,
the refusal at start while the engine does not write subforms, the pure mapping of one parent's
complete line set into its subform value (``SubformMapper``), the start-up field check, and the
contract with Zoho's documented row semantics as the emulator models them."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector import config_relations
from connector.cli import main
from connector.config import PipelineConfig, Settings, check_subforms, parse_settings
from connector.crm_values import dumps_json
from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.config import SUBFORM_MAX_ROWS as EMULATOR_SUBFORM_MAX_ROWS
from connector.emulator.server import EmulatorHandle
from connector.errors import ConfigError, DataError
from connector.mapping import SUBFORM_MAX_ROWS, RecordMapper, SubformMapper, line_order
from connector.mapping_check import check_mapping, check_subform_mapping
from tests.emulator.conftest import Api
from tests.unit import relations
from tests.unit.relations import TOML_HEAD, settings_data

ORDERS: dict[str, Any] = {**relations.ORDERS, "fields": {"title": "Name"}}
LINES: dict[str, Any] = {
    "name": "order_lines",
    "source_table": "public.order_lines",
    "key_column": "id",
    "subform_of": {"pipeline": "orders", "field": "Lines", "parent_column": "order_id"},
    "fields": {
        "product": "Product",
        "qty": {"field": "Qty", "type": "integer"},
        "price": {"field": "Price", "type": "decimal"},
        "shipped": {"field": "Shipped", "type": "boolean"},
        "due": {"field": "Due", "type": "date"},
    },
}
TOML = (
    TOML_HEAD
    + """
[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
key_field = "Legacy_Id"
fields = { title = "Name" }

[[pipelines]]
name = "order_lines"
source_table = "public.order_lines"
key_column = "id"
subform_of = { pipeline = "orders", field = "Lines", parent_column = "order_id" }
fields = { product = "Product", qty = { field = "Qty", type = "integer" } }
"""
)


def validated(*pipelines: dict[str, Any]) -> list[PipelineConfig]:
    """The pipelines as ``Settings`` builds them (module filled in), without the engine gate."""
    data = settings_data(*pipelines)
    filled = Settings._subform_module(data)["pipelines"]
    out = [PipelineConfig.model_validate(p) for p in filled]
    check_subforms(out, engine_supports=True)
    return out


def refused(*pipelines: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        validated(*pipelines)
    return exc.value


def lines_with(**changes: Any) -> dict[str, Any]:
    lines = copy.deepcopy(LINES)
    for k, v in changes.items():
        if v is None:
            lines.pop(k, None)
        else:
            lines[k] = v
    return lines


def sub(**changes: Any) -> dict[str, Any]:
    return {**LINES["subform_of"], **changes}


# ---- configuration ------------------------------------------------------------------------


def test_module_omitted_is_the_parents_and_an_equal_module_is_accepted() -> None:
    _, lines = validated(ORDERS, LINES)
    assert lines.module == "Orders"
    assert lines.subform_of is not None and lines.subform_of.field == "Lines"
    _, lines = validated(ORDERS, lines_with(module="Orders"))
    assert lines.module == "Orders"


def test_a_module_other_than_the_parents_is_refused() -> None:
    err = refused(ORDERS, lines_with(module="Order_Lines"))
    assert err.key == "pipelines['order_lines'].module"
    assert "module must be 'Orders'" in str(err) and "'Order_Lines'" in str(err)


def test_subform_of_is_strict() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(settings_data(ORDERS, lines_with(subform_of=sub(colum="x"))))
    assert "pipelines['order_lines'].subform_of.colum" in str(exc.value)
    assert "unknown key" in str(exc.value)
    bad = {"pipeline": "orders", "field": "Lines"}
    with pytest.raises(ConfigError, match=r"subform_of\.parent_column: required key"):
        parse_settings(settings_data(ORDERS, lines_with(subform_of=bad)))


@pytest.mark.parametrize(
    ("lines", "key", "message"),
    [
        (
            lines_with(subform_of=sub(pipeline="invoices")),
            "pipelines['order_lines'].subform_of.pipeline",
            "'invoices', which is not configured",
        ),
        (
            lines_with(subform_of=sub(pipeline="order_lines"), module="Orders"),
            "pipelines['order_lines'].subform_of.pipeline",
            "names itself as its parent",
        ),
        (
            lines_with(fields={**LINES["fields"], "order_id": "Order_Ref"}),
            "pipelines['order_lines'].subform_of.parent_column",
            "remove it from pipelines['order_lines'].fields",
        ),
        (
            lines_with(ignore_columns=["order_id"]),
            "pipelines['order_lines'].subform_of.parent_column",
            "must not be in ignore_columns",
        ),
        (
            lines_with(
                fields={
                    **LINES["fields"],
                    "sku": {"field": "Sku", "type": "lookup", "pipeline": "orders"},
                }
            ),
            "pipelines['order_lines'].fields.sku.type",
            "a subform row holds plain fields only",
        ),
        (
            lines_with(key_field="Line_Id"),
            "pipelines['order_lines'].key_field",
            "a subform row has no unique key field",
        ),
        (
            lines_with(delete_mode="mark", delete_mark_field="Deleted"),
            "pipelines['order_lines'].delete_mode",
            "not possible for subform rows",
        ),
        (
            lines_with(subform_of=sub(field="Name")),
            "pipelines['order_lines'].subform_of.field",
            "is mapped by pipeline 'orders' itself",
        ),
    ],
)
def test_each_rule_names_its_key(lines: dict[str, Any], key: str, message: str) -> None:
    err = refused(ORDERS, lines)
    assert err.key == key
    assert message in str(err)
    # and the same through the whole configuration, before the engine gate
    with pytest.raises(ConfigError) as exc:
        parse_settings(settings_data(ORDERS, lines))
    assert exc.value.key == key


def test_parent_may_not_be_a_subform_pipeline() -> None:
    notes = {
        **copy.deepcopy(LINES),
        "name": "line_notes",
        "source_table": "public.line_notes",
        "subform_of": {"pipeline": "order_lines", "field": "Notes", "parent_column": "line_id"},
        "fields": {"note": "Note"},
    }
    err = refused(ORDERS, LINES, notes)
    assert err.key == "pipelines['line_notes'].subform_of.pipeline"
    assert "'order_lines' is itself a subform pipeline" in str(err)
    with pytest.raises(ConfigError, match="'order_lines' is itself a subform pipeline"):
        parse_settings(settings_data(ORDERS, LINES, notes))


def test_an_unknown_or_own_parent_is_named_even_with_module_omitted() -> None:
    """Without ``module`` the parent's is used; a parent that is missing or the pipeline itself
    is refused by that name, not as a missing module."""
    for parent, message in (("invoices", "which is not configured"), ("order_lines", "itself")):
        with pytest.raises(ConfigError) as exc:
            parse_settings(settings_data(ORDERS, lines_with(subform_of=sub(pipeline=parent))))
        assert exc.value.key == "pipelines['order_lines'].subform_of.pipeline"
        assert message in str(exc.value)


def test_two_subform_pipelines_may_not_fill_the_same_field() -> None:
    other = {**copy.deepcopy(LINES), "name": "old_lines", "source_table": "public.old_lines"}
    err = refused(ORDERS, LINES, other)
    assert err.key == "pipelines['old_lines'].subform_of.field"
    assert "'order_lines' and 'old_lines' both fill subform field 'Lines'" in str(err)
    other["subform_of"] = sub(field="Old_Lines")
    validated(ORDERS, LINES, other)


def test_a_lookup_may_not_point_to_a_subform_pipeline() -> None:
    shipments = {
        "name": "shipments",
        "source_table": "public.shipments",
        "key_column": "id",
        "module": "Shipments",
        "fields": {"line_id": {"field": "Line", "type": "lookup", "pipeline": "order_lines"}},
    }
    err = refused(ORDERS, LINES, shipments)
    assert err.key == "pipelines['shipments'].fields.line_id.pipeline"
    assert "a subform pipeline" in str(err)


def test_subforms_accepted_at_start_and_refused_with_the_switch_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine writes subforms (issue 21): a configuration with a subform pipeline is valid
    and `connector config check` accepts it. The kill switch off refuses it at start, naming
    the key, and `connector run` stops before anything is started."""
    parse_settings(settings_data(ORDERS, LINES))
    path = tmp_path / "connector.toml"
    path.write_text(TOML)
    assert main(["config", "check", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(config_relations, "ENGINE_SUPPORTS_SUBFORMS", False)
    with pytest.raises(ConfigError) as exc:
        parse_settings(settings_data(ORDERS, LINES))
    assert exc.value.key == "pipelines['order_lines'].subform_of"
    assert "not yet supported by the engine (issue 21)" in str(exc.value)
    assert "docs/related-tables.md" in str(exc.value)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "subform_of is not yet supported by the engine (issue 21)" in err
    assert "order_lines" in err
    assert main(["run", "--config", str(path)]) == 2


def test_config_without_subforms_is_unchanged() -> None:
    parse_settings(settings_data(ORDERS))


# ---- the mapper ---------------------------------------------------------------------------


def mapper() -> SubformMapper:
    orders, lines = validated(ORDERS, LINES)
    return SubformMapper(lines, orders)


def line(key: Any, order: Any = 7, **values: Any) -> dict[str, Any]:
    row = {"id": key, "order_id": order, "product": f"p{key}", "qty": 1}
    row.update({"price": None, "shipped": None, "due": None})
    row.update(values)
    return row


def test_known_lines_keep_their_row_id_new_lines_have_none() -> None:
    m = mapper()
    lines = [line(3, qty=30), line(1), line(2)]
    out = m.to_parent_json(lines, {"1": "900001", "3": "900003", "99": "900099"})
    assert out == {
        "Lines": [
            {
                "id": "900001",
                "Product": "p1",
                "Qty": 1,
                "Price": None,
                "Shipped": None,
                "Due": None,
            },
            {"Product": "p2", "Qty": 1, "Price": None, "Shipped": None, "Due": None},
            {
                "id": "900003",
                "Product": "p3",
                "Qty": 30,
                "Price": None,
                "Shipped": None,
                "Due": None,
            },
        ]
    }


def test_no_lines_clear_the_subform() -> None:
    assert mapper().to_parent_json([], {"1": "900001"}) == {"Lines": []}


def test_conversions_are_those_of_the_record_mapper() -> None:
    """The same column types give the same JSON values as RecordMapper.to_json (one converter
    per type, crm_values.json_converter), NULL included."""
    orders, lines = validated(ORDERS, LINES)
    as_record = PipelineConfig.model_validate(
        {**LINES, "module": "Orders", "subform_of": None, "key_field": "Line_Id"}
    )
    rows = [
        line(1, qty=Decimal("4"), price=Decimal("12.50"), shipped="yes", due="2026-01-31"),
        line(2, qty="5", price=3, shipped=False, due=date(2026, 2, 1)),
        line(3, product=None, qty=None, price=None, shipped=None, due=None),
    ]
    subform = SubformMapper(lines, orders).to_rows(rows, {})
    for row, got in zip(rows, subform, strict=True):
        expected = RecordMapper(as_record).to_json(row)
        expected.pop("Line_Id")
        assert got == expected
    assert subform[0]["Price"] == Decimal("12.50") and subform[0]["Shipped"] is True
    assert subform[2] == {"Product": None, "Qty": None, "Price": None, "Shipped": None, "Due": None}
    assert dumps_json(subform[0]) == (
        b'{"Product":"p1","Qty":4,"Price":12.50,"Shipped":true,"Due":"2026-01-31"}'
    )


def test_a_value_that_cannot_be_represented_is_the_same_data_error() -> None:
    with pytest.raises(DataError) as exc:
        mapper().to_rows([line(1, qty="1.5")], {})
    assert exc.value.code == "NOT_AN_INTEGER" and exc.value.field == "Qty"
    with pytest.raises(DataError) as exc:
        mapper().to_rows([{"id": 1, "order_id": 7, "product": "p"}], {})
    assert exc.value.code == "MISSING_COLUMN"


def test_the_key_column_is_sent_only_when_mapped() -> None:
    orders, lines = validated(ORDERS, lines_with(fields={"id": "Line_Id", "product": "Product"}))
    rows = SubformMapper(lines, orders).to_rows([{"id": 5, "order_id": 7, "product": "p"}], {})
    assert rows == [{"Line_Id": "5", "Product": "p"}]


def test_more_than_100_lines_is_subform_limit_never_truncated() -> None:
    assert SUBFORM_MAX_ROWS == EMULATOR_SUBFORM_MAX_ROWS == 100
    m = mapper()
    assert len(m.to_rows([line(i) for i in range(100)], {})) == 100
    with pytest.raises(DataError) as exc:
        m.to_parent_json([line(i, order=42) for i in range(101)], {})
    assert exc.value.code == "SUBFORM_LIMIT" and exc.value.field == "Lines"
    assert "orders '42' has 101 lines" in str(exc.value)
    assert "at most 100 rows" in str(exc.value)


def test_parent_key_is_the_parents_key_text_and_null_is_no_parent() -> None:
    orders, lines = validated(ORDERS, LINES)
    m = SubformMapper(lines, orders)
    for value in (42, Decimal("42"), "A-42", Decimal("4.20")):
        assert m.parent_key(line(1, order=value)) == RecordMapper(orders).key_of(
            {"id": value, "title": "t"}
        )
    assert m.parent_key(line(1, order=None)) is None
    with pytest.raises(DataError) as exc:
        m.parent_key(line(1, order=""))
    assert exc.value.code == "MISSING_KEY"


def test_lines_of_several_parents_or_of_none_are_the_callers_mistake() -> None:
    m = mapper()
    with pytest.raises(ValueError, match="lines of one parent"):
        m.to_rows([line(1, order=7), line(2, order=8)], {})
    with pytest.raises(ValueError, match="lines of one parent"):
        m.to_rows([line(1, order=None)], {})
    with pytest.raises(ValueError, match="two lines with key '1'"):
        m.to_rows([line(1), line(Decimal("1"))], {})


def test_mapper_needs_its_parent() -> None:
    orders, lines = validated(ORDERS, LINES)
    with pytest.raises(ValueError, match="has no subform_of"):
        SubformMapper(orders, orders)
    with pytest.raises(ValueError, match="not 'order_lines'"):
        SubformMapper(lines, lines)


def test_line_order() -> None:
    keys = ["b", "10", "2", "-1", "1.5", "a", "01", "1", "١"]
    assert sorted(keys, key=line_order) == ["-1", "01", "1", "1.5", "2", "10", "a", "b", "١"]


_line_keys = st.one_of(
    st.integers(-(10**12), 10**12),
    st.text(min_size=1, max_size=8),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000),
)


@st.composite
def _line_sets(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, str]]:
    keys = draw(st.lists(_line_keys, max_size=20))
    m = mapper()
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for key in keys:
        text = m.key_of({"id": key})
        if text not in seen:
            seen.add(text)
            lines.append(line(key, qty=draw(st.integers(0, 10**6))))
    known = draw(st.lists(st.sampled_from(sorted(seen)), unique=True) if seen else st.just([]))
    row_ids = {k: f"90000{i}" for i, k in enumerate(known)}
    row_ids.update({f"gone-{i}": f"80000{i}" for i in range(draw(st.integers(0, 3)))})
    return lines, row_ids


@settings(deadline=None, max_examples=200)
@given(case=_line_sets(), data=st.data())
def test_every_line_once_in_order_with_its_id_whatever_the_input_order(
    case: tuple[list[dict[str, Any]], dict[str, str]], data: st.DataObject
) -> None:
    lines, row_ids = case
    m = mapper()
    rows = m.to_rows(lines, row_ids)
    keys = sorted((m.key_of(x) for x in lines), key=line_order)
    by_key = {m.key_of(x): x for x in lines}
    # (a) every input line exactly once, in line_order of the keys
    assert len(rows) == len(lines)
    assert [r["Qty"] for r in rows] == [by_key[k]["qty"] for k in keys]
    assert [r["Product"] for r in rows] == [f"p{by_key[k]['id']}" for k in keys]
    # (b) a row carries an id iff its key has one, and it is that id
    for key, row in zip(keys, rows, strict=True):
        assert ("id" in row) == (key in row_ids)
        assert row.get("id") == row_ids.get(key)
    # (c) independent of the order of the lines: a replay writes the same value
    shuffled = data.draw(st.permutations(lines))
    assert m.to_parent_json(shuffled, dict(reversed(row_ids.items()))) == {"Lines": rows}


# ---- the start-up check against field metadata ---------------------------------------------


@dataclass(frozen=True)
class Meta:
    api_name: str
    data_type: str = "text"
    unique: bool = False
    mandatory: bool = False
    read_only: bool = False
    lookup_module: str | None = None
    subform_module: str | None = None


class Fields:
    def __init__(self, by_module: dict[str, list[Meta]]) -> None:
        self.by_module = by_module
        self.asked: list[str] = []

    async def fields(self, module: str) -> list[Meta]:
        self.asked.append(module)
        return self.by_module[module]


ROW_FIELDS = [
    Meta("Product"),
    Meta("Qty", "integer"),
    Meta("Price", "double"),
    Meta("Shipped", "boolean"),
    Meta("Due", "date"),
]


def crm(lines_field: Meta, rows: list[Meta] = ROW_FIELDS) -> Fields:
    orders = [Meta("Legacy_Id", unique=True), Meta("Name"), lines_field]
    return Fields({"Orders": orders, "Order_Lines": rows})


async def test_check_mapping_accepts_a_subform_and_its_row_fields() -> None:
    orders, lines = validated(ORDERS, LINES)
    client = crm(Meta("Lines", "subform", subform_module="Order_Lines"))
    await check_mapping(client, lines, {"orders": orders})
    assert client.asked == ["Orders", "Order_Lines"]
    # metadata without subform.module: the data_type only
    client = crm(Meta("Lines", "subform"))
    await check_subform_mapping(client, lines, orders)
    assert client.asked == ["Orders"]


@pytest.mark.parametrize(
    ("lines_field", "rows", "key", "message"),
    [
        (Meta("Items", "subform"), ROW_FIELDS, "subform_of.field", "has no field 'Lines'"),
        (Meta("Lines", "text"), ROW_FIELDS, "subform_of.field", "expected a subform field"),
        (
            Meta("Lines", "subform", read_only=True),
            ROW_FIELDS,
            "subform_of.field",
            "is read-only",
        ),
        (
            Meta("Lines", "subform", subform_module="Order_Lines"),
            ROW_FIELDS[1:],
            "fields.product",
            "has no field 'Product'",
        ),
        (
            Meta("Lines", "subform", subform_module="Order_Lines"),
            [Meta("Product"), Meta("Qty", "text"), *ROW_FIELDS[2:]],
            "fields.qty",
            "data_type is 'text'; expected type 'text'",
        ),
        (
            Meta("Lines", "subform", subform_module="Order_Lines"),
            [Meta("Product", read_only=True), *ROW_FIELDS[1:]],
            "fields.product",
            "is read-only",
        ),
    ],
)
async def test_check_mapping_refuses_a_wrong_subform(
    lines_field: Meta, rows: list[Meta], key: str, message: str
) -> None:
    orders, lines = validated(ORDERS, LINES)
    with pytest.raises(ConfigError) as exc:
        await check_mapping(crm(lines_field, rows), lines, {"orders": orders})
    assert exc.value.key == f"pipelines['order_lines'].{key}"
    assert message in str(exc.value)


async def test_check_mapping_of_a_subform_needs_its_parent() -> None:
    _, lines = validated(ORDERS, LINES)
    with pytest.raises(ConfigError, match="'orders', which is not configured"):
        await check_mapping(crm(Meta("Lines", "subform")), lines)


def test_field_metadata_carries_the_subform_module() -> None:
    from connector.zoho.client import _field_meta

    meta = _field_meta(
        {"api_name": "Lines", "data_type": "subform", "subform": {"module": "Order_Lines"}}
    )
    assert meta.subform_module == "Order_Lines"
    assert (
        _field_meta({"api_name": "Name", "data_type": "text", "subform": None}).subform_module
        is None
    )


# ---- the contract with the emulator (Zoho's documented row semantics) ----------------------


def emulator_config() -> EmulatorConfig:
    return EmulatorConfig.from_dict(
        {
            "modules": [
                {
                    "api_name": "Orders",
                    "id": "4876876000000500001",
                    "fields": [
                        {"api_name": "Name", "mandatory": True},
                        {"api_name": "Legacy_Id", "unique": True},
                        {
                            "api_name": "Lines",
                            "data_type": "subform",
                            "subform_module": "Order_Lines",
                            "subform_fields": [
                                {"api_name": "Product"},
                                {"api_name": "Qty", "data_type": "integer"},
                                {"api_name": "Price", "data_type": "decimal"},
                                {"api_name": "Shipped", "data_type": "boolean"},
                                {"api_name": "Due", "data_type": "date"},
                            ],
                        },
                    ],
                }
            ]
        }
    )


@pytest.fixture
async def api() -> AsyncIterator[tuple[EmulatorHandle, Api]]:
    async with start_emulator(emulator_config()) as emu, aiohttp.ClientSession() as s:
        a = Api(emu, s)
        await a.login()
        yield emu, a


async def _write(api: Api, record: dict[str, Any]) -> dict[str, Any]:
    st_, _, body = await api.call(
        "POST",
        "/crm/v8/Orders/upsert",
        data=dumps_json({"data": [record], "duplicate_check_fields": ["Legacy_Id"]}),
        headers={"Content-Type": "application/json"},
    )
    item = body["data"][0]
    assert st_ in (200, 201) and item["status"] == "success", (st_, item)
    return dict(item)


def _stored(emu: EmulatorHandle, key: str) -> list[dict[str, Any]]:
    rec = next(r for r in emu.records("Orders") if r["Legacy_Id"] == key)
    return list(rec["Lines"])


def _values(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' mapped fields (the id apart), as the emulator stores them."""
    fields = ("Product", "Qty", "Price", "Shipped", "Due")
    return [{f: r.get(f) for f in fields} for r in rows]


async def test_the_emulator_stores_exactly_the_lines_given(
    api: tuple[EmulatorHandle, Api],
) -> None:
    emu, client = api
    orders, lines_pipeline = validated(ORDERS, LINES)
    m = SubformMapper(lines_pipeline, orders)
    parent = RecordMapper(orders).to_json({"id": 7, "title": "O7"})

    first = [line(1, qty=1, price=Decimal("9.90")), line(2, qty=2), line(3, qty=3)]
    await _write(client, {**parent, **m.to_parent_json(first, {})})
    stored = _stored(emu, "7")
    assert [(r["Product"], r["Qty"]) for r in stored] == [("p1", 1), ("p2", 2), ("p3", 3)]
    assert _values(stored) == _values(m.to_rows(first, {}))
    # the engine learns the row ids from the record (line order = row order)
    row_ids = {m.key_of(x): r["id"] for x, r in zip(first, stored, strict=True)}

    # line 2 deleted, line 3 changed, line 4 new: one write with the complete current set
    second = [line(4, qty=4), line(3, qty=33), line(1, qty=1, price=Decimal("9.90"))]
    await _write(client, {**parent, **m.to_parent_json(second, row_ids)})
    stored = _stored(emu, "7")
    assert [(r["Product"], r["Qty"]) for r in stored] == [("p1", 1), ("p3", 33), ("p4", 4)]
    assert [r["id"] for r in stored[:2]] == [row_ids["1"], row_ids["3"]]
    assert stored[2]["id"] not in row_ids.values()
    assert _values(stored) == _values(m.to_rows(second, row_ids))
    assert stored[0]["Price"] == Decimal("9.90") and stored[0]["Shipped"] is None

    # a replay of the same set changes nothing
    row_ids = {
        m.key_of(x): r["id"]
        for x, r in zip(sorted(second, key=lambda x: x["id"]), stored, strict=True)
    }
    await _write(client, {**parent, **m.to_parent_json(list(reversed(second)), row_ids)})
    assert _stored(emu, "7") == stored

    # every line deleted: [] clears the subform
    await _write(client, {**parent, **m.to_parent_json([], row_ids)})
    assert _stored(emu, "7") == []
