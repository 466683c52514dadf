"""The demo's configuration: its connector.toml (:func:`demo_config`: the three pipelines of
``connector demo``, or the ``orders`` pipeline alone that the tests and benchmarks use), the
Zoho CRM emulator's configuration (:func:`demo_emulator_config`: an ``Accounts`` module and, on
``Orders``, the ``Account`` lookup and the ``Lines`` subform) and the secrets' environment
(:data:`DEMO_ENV`). Used by ``connector/demo.py``, which re-exports these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connector.emulator import EmulatorConfig


_CONFIG_HEAD = """\
[crm]
data_centre = "custom"
accounts_url = "{emulator_url}"
api_url = "{emulator_url}"
upload_url = "{emulator_url}"
client_id = "emulator-client-id"
client_secret_env = "DEMO_ZOHO_CLIENT_SECRET"
refresh_token_env = "DEMO_ZOHO_REFRESH_TOKEN"
edition = "enterprise"
# a local emulator answers in milliseconds; also how long a new owner waits after a crash
request_timeout = "15s"
daily_credit_budget = 50000
credit_reserve = 1000

[database]
dsn = "{dsn}"
pool_size = 8

[server]
host = "127.0.0.1"
port = {port}
drain_timeout = "20s"

[logging]
level = "warning"
"""

_CUSTOMERS_PIPELINE = """
# the parent of the orders' lookup: listed first; a looked-up pipeline ignores (or marks)
# deletes and is not slower than its children
[[pipelines]]
name = "customers"
source_table = "public.customers"
key_column = "id"
module = "Accounts"
key_field = "Legacy_Id"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "ignore"
ignore_columns = ["updated_at"]
[pipelines.fields]
name  = {{ field = "Account_Name", type = "text" }}
email = {{ field = "Email", type = "email" }}
phone = {{ field = "Phone", type = "phone" }}
city  = {{ field = "Billing_City", type = "text" }}
"""

_ORDERS_PIPELINE = """
[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "delete"
ignore_columns = ["updated_at"]
[pipelines.fields]
order_number   = {{ field = "Name", type = "text" }}
customer_email = {{ field = "Customer_Email", type = "email" }}
status         = {{ field = "Status", type = "picklist" }}
amount         = {{ field = "Amount", type = "currency" }}
quantity       = {{ field = "Quantity", type = "integer" }}
order_date     = {{ field = "Order_Date", type = "date" }}
placed_at      = {{ field = "Placed_At", type = "datetime" }}
notes          = {{ field = "Notes", type = "textarea" }}
is_gift        = {{ field = "Is_Gift", type = "boolean" }}
"""

_LOOKUP_FIELD = (
    'customer_id    = {{ field = "Account", type = "lookup", pipeline = "customers" }}\n'
)

_LINES_PIPELINE = """
# order lines: the rows of each order's subform Lines; a change of a line rewrites its order's
# complete line set (Update Records), after the order is in the CRM; an order deleted in the
# CRM takes its rows with it
[[pipelines]]
name = "order_lines"
source_table = "public.order_lines"
key_column = "id"
subform_of = {{ pipeline = "orders", field = "Lines", parent_column = "order_id" }}
capture = "{capture}"
max_staleness = "{max_staleness}"
ignore_columns = ["updated_at"]
[pipelines.fields]
product    = {{ field = "Product", type = "text" }}
quantity   = {{ field = "Qty", type = "integer" }}
unit_price = {{ field = "Unit_Price", type = "currency" }}
"""


def demo_config(
    *,
    dsn: str,
    emulator_url: str,
    port: int,
    max_staleness: str = "20s",
    capture: str = "triggers",
    related_tables: bool = False,
    lines: bool = True,
) -> str:
    """The demo's connector.toml (secrets come from the environment, as in production).

    ``related_tables`` (what ``connector demo`` writes): three pipelines over
    :func:`~connector.demo_shop.create_shop`'s tables, customers → ``Accounts``, orders →
    ``Orders`` with the ``Account`` lookup, order lines → the ``Lines`` subform (``lines``:
    without it, the first two), for :func:`demo_emulator_config`. Without it: the ``orders``
    pipeline alone, over :func:`~connector.demo_workload.create_orders`'s table and the
    emulator's default configuration (what the tests and benchmarks use)."""
    head = _CONFIG_HEAD.format(dsn=dsn, emulator_url=emulator_url, port=port)
    fmt = {"capture": capture, "max_staleness": max_staleness}
    orders = _ORDERS_PIPELINE.format(**fmt)
    if not related_tables:
        return head + orders
    return (
        head
        + _CUSTOMERS_PIPELINE.format(**fmt)
        + orders
        + _LOOKUP_FIELD.format()
        + (_LINES_PIPELINE.format(**fmt) if lines else "")
    )


def demo_emulator_config() -> EmulatorConfig:
    """The emulator's default configuration plus what the three tables map to: an ``Accounts``
    module (``Legacy_Id`` unique: Bulk Write finds an order's account by it) and, on
    ``Orders``, the lookup ``Account`` → Accounts and the subform ``Lines`` (module
    ``Order_Lines``: Product, Qty, Unit_Price). Bulk jobs take seconds (10,000 rows/s), calls
    10-40 ms."""
    from connector.emulator import EmulatorConfig
    from connector.emulator.config import FieldSpec, ModuleSpec

    cfg = EmulatorConfig.default()
    orders = cfg.module("Orders")
    assert orders is not None, "the emulator's default configuration has no Orders module"
    orders.fields = [
        *orders.fields,
        FieldSpec(
            api_name="Account", data_type="lookup", label="Account", lookup_module="Accounts"
        ),
        FieldSpec(
            api_name="Lines",
            data_type="subform",
            label="Lines",
            subform_module="Order_Lines",
            subform_fields=[
                FieldSpec(api_name="Product", label="Product"),
                FieldSpec(api_name="Qty", data_type="integer", label="Qty"),
                FieldSpec(api_name="Unit_Price", data_type="currency", label="Unit Price"),
            ],
        ),
    ]
    accounts = ModuleSpec(
        api_name="Accounts",
        singular_label="Account",
        plural_label="Accounts",
        id="4876876000000600001",
        system_duplicate_check_fields=["Account_Name"],
        fields=[
            FieldSpec(api_name="Account_Name", label="Account Name", mandatory=True, length=255),
            FieldSpec(api_name="Legacy_Id", label="Legacy Id", mandatory=True, unique=True),
            FieldSpec(api_name="Email", data_type="email", label="Email"),
            FieldSpec(api_name="Phone", data_type="phone", label="Phone"),
            FieldSpec(api_name="Billing_City", label="Billing City"),
        ],
    )
    data = cfg.model_dump()
    data["modules"] = [*data["modules"], accounts.model_dump()]
    demo = EmulatorConfig.from_dict(data)  # validated as a whole (lookup targets)
    demo.bulk.rows_per_second = 10_000.0  # a 25,000-row job takes a few seconds
    demo.bulk.queue_seconds = 0.5
    demo.faults.latency = "uniform"
    demo.faults.latency_ms = 10.0
    demo.faults.latency_max_ms = 40.0
    return demo


DEMO_ENV = {
    "DEMO_ZOHO_CLIENT_SECRET": "emulator-client-secret",
    "DEMO_ZOHO_REFRESH_TOKEN": "emulator-refresh-token",
}
