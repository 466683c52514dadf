"""The ``lookup`` mapping type (issue 21 part 1): config validation, the upsert value from a
caller-supplied resolver, the bulk cell and ``find_by``, the start-up field check, and the
refusal at start while the engine does not keep parents first."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.cli import main
from connector.config import PipelineConfig, check_lookups, parse_settings
from connector.errors import ConfigError, DataError
from connector.mapping import RecordMapper
from connector.mapping_check import check_mapping
from tests.unit.relations import CUSTOMERS, ORDERS, TOML_HEAD, settings_data

TOML = (
    TOML_HEAD
    + """
[[pipelines]]
name = "customers"
source_table = "public.customers"
key_column = "id"
module = "Accounts"
key_field = "Legacy_Id"
fields = { name = "Account_Name" }
delete_mode = "ignore"

[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
key_field = "Legacy_Id"
[pipelines.fields]
title = "Name"
customer_id = { field = "Account", type = "lookup", pipeline = "customers" }
"""
)


def pipelines() -> tuple[PipelineConfig, PipelineConfig]:
    return PipelineConfig.model_validate(CUSTOMERS), PipelineConfig.model_validate(ORDERS)


# ---- configuration ------------------------------------------------------------------------


def test_lookup_needs_a_pipeline_and_pipeline_needs_lookup() -> None:
    orders = copy.deepcopy(ORDERS)
    orders["fields"]["customer_id"] = {"field": "Account", "type": "lookup"}
    with pytest.raises(ConfigError, match=r"customer_id.*needs pipeline"):
        parse_settings(settings_data(CUSTOMERS, orders))
    orders["fields"]["customer_id"] = {"field": "Account", "type": "text", "pipeline": "x"}
    with pytest.raises(ConfigError, match=r"customer_id.*only for type 'lookup'"):
        parse_settings(settings_data(CUSTOMERS, orders))


def test_missing_parent_pipeline_is_named() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(settings_data(ORDERS))
    assert exc.value.key == "pipelines['orders'].fields.customer_id.pipeline"
    assert "'customers', which is not configured" in str(exc.value)


def test_own_pipeline_and_cycles_are_refused() -> None:
    orders = copy.deepcopy(ORDERS)
    orders["fields"]["customer_id"]["pipeline"] = "orders"
    with pytest.raises(ConfigError, match="its own pipeline"):
        parse_settings(settings_data(CUSTOMERS, orders))
    customers = copy.deepcopy(CUSTOMERS)
    customers["fields"]["last_order"] = {
        "field": "Last_Order",
        "type": "lookup",
        "pipeline": "orders",
    }
    with pytest.raises(ConfigError, match="cycle"):
        parse_settings(settings_data(customers, ORDERS))


def test_lookups_are_accepted_at_start_and_the_switch_still_refuses(tmp_path: Path) -> None:
    """The engine keeps parents first (issue 21 part 2b-ii): a configuration with a lookup is
    valid, and `connector config check` accepts it; the switch that refused lookups until then
    still refuses them when off."""
    parse_settings(settings_data(CUSTOMERS, ORDERS))
    path = tmp_path / "connector.toml"
    path.write_text(TOML)
    assert main(["config", "check", str(path)]) == 0
    with pytest.raises(ConfigError) as exc:
        check_lookups(list(pipelines()), engine_supports=False)
    assert exc.value.key == "pipelines['orders'].fields.customer_id.pipeline"
    assert "not yet supported by the engine (issue 21)" in str(exc.value)


def test_a_looked_up_pipeline_does_not_delete_and_is_not_slower_than_its_child() -> None:
    """What parents first needs of a parent pipeline once the engine supports lookups: its
    deletes are "mark" or "ignore", and its max_staleness is at most the child's."""
    customers, orders = pipelines()
    deleting = customers.model_copy(update={"delete_mode": "delete"})
    with pytest.raises(ConfigError) as exc:
        check_lookups([deleting, orders], engine_supports=True)
    assert exc.value.key == "pipelines['customers'].delete_mode"
    assert "looked up by orders.customer_id" in str(exc.value) and "'mark'" in str(exc.value)
    slow = customers.model_copy(update={"max_staleness": timedelta(minutes=30)})
    with pytest.raises(ConfigError) as exc:
        check_lookups([slow, orders], engine_supports=True)
    assert exc.value.key == "pipelines['orders'].max_staleness"
    assert "at least the parent's" in str(exc.value)
    # equal bounds, and a parent that marks its deletes, are fine
    check_lookups(
        [customers.model_copy(update={"delete_mode": "mark"}), orders], engine_supports=True
    )
    # without the engine's support, the refusal of lookups comes first
    with pytest.raises(ConfigError, match="not yet supported by the engine"):
        check_lookups([deleting, orders], engine_supports=False)


def test_config_without_lookups_is_unchanged() -> None:
    orders = copy.deepcopy(ORDERS)
    orders["fields"]["customer_id"] = {"field": "Account_Ref", "type": "text"}
    parse_settings(settings_data(CUSTOMERS, orders))


# ---- the mapper ---------------------------------------------------------------------------


def mapper() -> RecordMapper:
    customers, orders = pipelines()
    return RecordMapper(orders, parents={"customers": customers})


def test_upsert_value_comes_from_the_resolver() -> None:
    calls: list[tuple[str, str]] = []

    def resolve(pipeline: str, key: str) -> str | None:
        calls.append((pipeline, key))
        return "4876876000000123001" if key == "42" else None

    m = mapper()
    rec = m.to_json({"id": 7, "title": "O7", "customer_id": 42}, resolve)
    assert rec == {"Legacy_Id": "7", "Name": "O7", "Account": {"id": "4876876000000123001"}}
    assert calls == [("customers", "42")]
    # no parent: the lookup is cleared, the resolver not asked
    assert m.to_json({"id": 7, "title": "O7", "customer_id": None}, resolve)["Account"] is None
    assert m.parent_key({"id": 7, "customer_id": Decimal("42")}, "customer_id") == "42"


def test_unknown_parent_is_parent_not_synced_never_a_dangling_lookup() -> None:
    with pytest.raises(DataError) as exc:
        mapper().to_json({"id": 7, "title": "O7", "customer_id": 99}, lambda p, k: None)
    assert exc.value.code == "PARENT_NOT_SYNCED" and exc.value.field == "Account"
    assert "'customers'" in str(exc.value) and "'99'" in str(exc.value)
    with pytest.raises(ValueError, match="needs a resolver"):
        mapper().to_json({"id": 7, "title": "O7", "customer_id": 99})


def test_bulk_cell_is_the_parent_key_found_by_its_key_field() -> None:
    m = mapper()
    assert m.csv_header() == ["Legacy_Id", "Name", "Account"]
    assert m.to_csv_values({"id": 7, "title": "O7", "customer_id": 42}) == ["7", "O7", "42"]
    assert m.to_csv_values({"id": 7, "title": "O7", "customer_id": None}) == ["7", "O7", ""]
    assert m.field_mappings() == [
        {"api_name": "Legacy_Id", "index": 0},
        {"api_name": "Name", "index": 1},
        {"api_name": "Account", "index": 2, "find_by": "Legacy_Id"},
    ]


def test_mapper_needs_the_parent_pipeline() -> None:
    _, orders = pipelines()
    with pytest.raises(ConfigError, match="customer_id"):
        RecordMapper(orders)


_keys = st.one_of(
    st.integers(-(10**12), 10**12),
    st.text(min_size=1, max_size=20).filter(lambda s: s != ""),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=0, min_value=-(10**9), max_value=10**9
    ),
)


@settings(deadline=None)  # a 200 ms deadline fails on a loaded machine, not on the code
@given(key=_keys)
def test_child_points_to_the_key_the_parent_was_written_with(key: Any) -> None:
    """The parent's record carries ``key_of`` of its row; the child's bulk cell and the key the
    resolver is asked for are that same text, so find_by / key_state find the parent."""
    customers, _ = pipelines()
    parent_key = RecordMapper(customers).key_of({"id": key, "name": "x"})
    child = mapper()
    asked: list[str] = []
    child.to_json({"id": 1, "title": "t", "customer_id": key}, lambda p, k: asked.append(k) or "1")
    assert asked == [parent_key]
    assert child.to_csv_values({"id": 1, "title": "t", "customer_id": key})[2] == parent_key


# ---- the start-up check against field metadata ---------------------------------------------


@dataclass(frozen=True)
class Meta:
    api_name: str
    data_type: str = "text"
    unique: bool = False
    mandatory: bool = False
    read_only: bool = False
    lookup_module: str | None = None


class Fields:
    def __init__(self, metas: list[Meta]) -> None:
        self.metas = metas

    async def fields(self, module: str) -> list[Meta]:
        return self.metas


def orders_fields(account: Meta) -> Fields:
    return Fields([Meta("Legacy_Id", unique=True), Meta("Name"), account])


async def test_check_mapping_accepts_a_lookup_to_the_parent_module() -> None:
    customers, orders = pipelines()
    client = orders_fields(Meta("Account", "lookup", lookup_module="Accounts"))
    await check_mapping(client, orders, {"customers": customers})


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (Meta("Account", "text"), "data_type is 'text'"),
        (Meta("Account", "lookup", lookup_module="Contacts"), "points to module 'Contacts'"),
    ],
)
async def test_check_mapping_refuses_a_wrong_lookup_field(meta: Meta, message: str) -> None:
    customers, orders = pipelines()
    with pytest.raises(ConfigError) as exc:
        await check_mapping(orders_fields(meta), orders, {"customers": customers})
    assert exc.value.key == "pipelines['orders'].fields.customer_id"
    assert message in str(exc.value)


async def test_field_metadata_of_the_emulator_carries_the_target_module() -> None:
    from connector.zoho.client import _field_meta

    meta = _field_meta(
        {
            "api_name": "Account",
            "data_type": "lookup",
            "lookup": {"module": {"api_name": "Accounts"}},
        }
    )
    assert meta.lookup_module == "Accounts"
    assert (
        _field_meta({"api_name": "Name", "data_type": "text", "lookup": None}).lookup_module is None
    )
