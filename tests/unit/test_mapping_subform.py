"""Subform pipelines (issue 21 part 2a): the ``subform_of`` configuration and its validation,
the refusal at start while the engine does not write subforms, the pure mapping of one parent's
complete line set into its subform value (``SubformMapper``), the start-up field check, and the
contract with Zoho's documented row semantics as the emulator models them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from connector.cli import main
from connector.config import PipelineConfig, Settings, check_subforms, parse_settings
from connector.errors import ConfigError

ORDERS: dict[str, Any] = {
    "name": "orders",
    "source_table": "public.orders",
    "key_column": "id",
    "module": "Orders",
    "key_field": "Legacy_Id",
    "fields": {"title": "Name"},
}
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
BASE: dict[str, Any] = {
    "crm": {
        "client_id": "1000.ABC",
        "client_secret_env": "ZOHO_CLIENT_SECRET",
        "refresh_token_env": "ZOHO_REFRESH_TOKEN",
    },
    "database": {"dsn_env": "LEGACY_DSN"},
}

TOML = """
[crm]
client_id = "1000.ABC"
client_secret_env = "ZOHO_CLIENT_SECRET"
refresh_token_env = "ZOHO_REFRESH_TOKEN"

[database]
dsn_env = "LEGACY_DSN"

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


def settings_data(*pipelines: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), "pipelines": [copy.deepcopy(p) for p in pipelines]}


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


def test_subform_refused_until_the_engine_writes_subforms(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(settings_data(ORDERS, LINES))
    assert exc.value.key == "pipelines['order_lines'].subform_of"
    assert "not yet supported by the engine (issue 21)" in str(exc.value)
    assert "docs/related-tables.md" in str(exc.value)
    path = tmp_path / "connector.toml"
    path.write_text(TOML)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "subform_of is not yet supported by the engine (issue 21)" in err
    assert "order_lines" in err
    assert main(["run", "--config", str(path)]) == 2


def test_config_without_subforms_is_unchanged() -> None:
    parse_settings(settings_data(ORDERS))
