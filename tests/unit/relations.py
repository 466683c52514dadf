"""Shared settings fixtures of the related-tables tests (lookups, subform pipelines)."""

from __future__ import annotations

import copy
from typing import Any

#: the settings around the pipelines (secrets by environment variable name only)
BASE: dict[str, Any] = {
    "crm": {
        "client_id": "1000.ABC",
        "client_secret_env": "ZOHO_CLIENT_SECRET",
        "refresh_token_env": "ZOHO_REFRESH_TOKEN",
    },
    "database": {"dsn_env": "LEGACY_DSN"},
}

#: BASE as the head of a TOML file; the tests append their ``[[pipelines]]``
TOML_HEAD = """
[crm]
client_id = "1000.ABC"
client_secret_env = "ZOHO_CLIENT_SECRET"
refresh_token_env = "ZOHO_REFRESH_TOKEN"

[database]
dsn_env = "LEGACY_DSN"
"""


def settings_data(*pipelines: dict[str, Any]) -> dict[str, Any]:
    """BASE with deep copies of ``pipelines``, ready for ``parse_settings``."""
    return {**copy.deepcopy(BASE), "pipelines": [copy.deepcopy(p) for p in pipelines]}


#: a parent pipeline (Accounts) and a child pipeline whose ``customer_id`` looks it up (a
#: looked-up pipeline's deletes are "mark" or "ignore": config_relations._check_parents)
CUSTOMERS: dict[str, Any] = {
    "name": "customers",
    "source_table": "public.customers",
    "key_column": "id",
    "module": "Accounts",
    "key_field": "Legacy_Id",
    "fields": {"name": "Account_Name"},
    "delete_mode": "ignore",
}
ORDERS: dict[str, Any] = {
    "name": "orders",
    "source_table": "public.orders",
    "key_column": "id",
    "module": "Orders",
    "key_field": "Legacy_Id",
    "fields": {
        "title": "Name",
        "customer_id": {"field": "Account", "type": "lookup", "pipeline": "customers"},
    },
}
