"""Bad input gives a clear, specific error and loses nothing else: a source table without a
primary key, a key column that is not unique, a CRM module without the mapped field or the
unique key field (refused at start, naming the key); row values that cannot be converted (NULL
key, a date before 1900, NaN, a wrong type) are dead-lettered with their code while the other
rows reach the CRM. (CRM rejections — too long, bad picklist, invalid email, missing mandatory —
are in tests/pipeline/test_dead_letters.py; configuration mistakes in
tests/foundation/test_config.py.)"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from connector.capture import logical, triggers
from connector.emulator import EmulatorConfig, start_emulator
from connector.errors import ConfigError
from connector.mapping_check import check_mapping
from tests.pipeline.conftest import (
    FIELDS,
    SCHEMA,
    drain_into_a_new_emulator,
    make_client,
    pipeline_config,
)


async def _exec(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for s in statements:
            await conn.execute(s)


@pytest.mark.parametrize(
    ("ddl", "fragment"),
    [
        ("CREATE TABLE public.orders (id bigint, name text)", "primary key or a unique index"),
        (
            "CREATE TABLE public.orders (id bigint, other bigint, name text, UNIQUE (id, other))",
            "primary key or a unique index",
        ),
    ],
    ids=["no-primary-key", "key-not-unique-alone"],
)
async def test_source_without_a_unique_key_is_refused_in_trigger_mode(
    database: str, ddl: str, fragment: str
) -> None:
    await _exec(database, ddl)
    pipeline = pipeline_config(fields={"name": "Name"})
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(ConfigError) as err:
            await triggers.install(conn, SCHEMA, pipeline)
    assert err.value.key == "pipelines['orders'].key_column"
    assert fragment in str(err.value)
    # nothing was installed: no trigger on the table
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass"
            " AND NOT tgisinternal"
        )
        assert (await cur.fetchone()) == (0,)


async def test_source_without_a_unique_key_is_refused_in_logical_mode(database: str) -> None:
    await _exec(database, "CREATE TABLE public.orders (id bigint, name text)")
    pipeline = pipeline_config(fields={"name": "Name"}, capture="logical")
    with pytest.raises(ConfigError) as err:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await logical.install(conn, SCHEMA, pipeline)
    assert err.value.key == "pipelines['orders'].key_column"
    assert "not unique" in str(err.value)


def _module_without(*missing: str, key_unique: bool = True) -> EmulatorConfig:
    cfg = EmulatorConfig.default()
    module = cfg.modules[0]
    fields = [
        f.model_copy(update={"unique": key_unique}) if f.api_name == "parent_id" else f
        for f in module.fields
        if f.api_name not in missing
    ]
    return cfg.model_copy(update={"modules": [module.model_copy(update={"fields": fields})]})


@pytest.mark.parametrize(
    ("cfg", "key", "fragment"),
    [
        (_module_without("Amount"), "pipelines['orders'].fields.amount", "Amount"),
        (_module_without("parent_id"), "pipelines['orders'].key_field", "has no field"),
        (_module_without(key_unique=False), "pipelines['orders'].key_field", "not unique"),
    ],
    ids=["mapped-field-missing", "key-field-missing", "key-field-not-unique"],
)
async def test_crm_module_without_the_field_is_refused(
    cfg: EmulatorConfig, key: str, fragment: str
) -> None:
    async with start_emulator(cfg) as emu, make_client(emu) as client:
        with pytest.raises(ConfigError) as err:
            await check_mapping(client, pipeline_config())
    assert err.value.key == key
    assert fragment in str(err.value)


CONVERSION_DDL = """
CREATE TABLE public.orders (
    id        bigint UNIQUE,         -- unique, but NULL is possible: a NULL key
    name      text NOT NULL,
    amount    numeric,               -- NaN is a numeric value in PostgreSQL
    quantity  text,                  -- mapped as integer: 'abc' is the wrong type
    order_date date
)
"""


async def test_values_that_cannot_be_converted_are_dead_lettered(database: str) -> None:
    await _exec(database, CONVERSION_DDL)
    fields: dict[str, Any] = {
        "name": FIELDS["name"],
        "amount": {"field": "Amount", "type": "currency"},
        "quantity": {"field": "Quantity", "type": "integer"},
        "order_date": {"field": "Order_Date", "type": "date"},
    }
    pipeline = pipeline_config(fields=fields)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await triggers.install(conn, SCHEMA, pipeline)
        await conn.execute(
            "INSERT INTO public.orders SELECT g, 'Order ' || g, g + 0.5, (g % 9)::text,"
            " DATE '2024-01-01' + g FROM generate_series(1, 40) AS g"
        )
        await conn.execute("UPDATE public.orders SET order_date = '1899-12-31' WHERE id = 5")
        await conn.execute("UPDATE public.orders SET amount = 'NaN' WHERE id = 6")
        await conn.execute("UPDATE public.orders SET quantity = 'abc' WHERE id = 7")
    records = await drain_into_a_new_emulator(database, pipeline)
    crm = {str(r["parent_id"]): r for r in records}
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute(
            "SELECT key, error_code, error_field, error_message FROM connector.dead_letters"
            " ORDER BY key"
        )
        letters = await cur.fetchall()
    by_code = {code: (key, field, msg) for key, code, field, msg in letters}
    assert by_code["DATE_OUT_OF_RANGE"][:2] == ("5", "Order_Date")
    assert by_code["NOT_A_NUMBER"][:2] == ("6", "Amount")
    assert by_code["INVALID_NUMBER"][:2] == ("7", "Quantity")
    assert all(msg.strip() for *_, msg in letters)
    assert len(letters) == 3
    # the other rows are all in the CRM, untouched by their neighbours' errors
    assert set(crm) == {str(k) for k in range(1, 41)} - {"5", "6", "7"}
    assert crm["8"]["Amount"] == 8.5 and crm["8"]["Quantity"] == 8


async def test_a_row_with_a_null_key_is_dead_lettered(database: str) -> None:
    await _exec(database, CONVERSION_DDL)
    pipeline = pipeline_config(fields={"name": FIELDS["name"]})
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await triggers.install(conn, SCHEMA, pipeline)
        await conn.execute("INSERT INTO public.orders (id, name) VALUES (1, 'a'), (NULL, 'b')")
    records = await drain_into_a_new_emulator(database, pipeline)
    assert {str(r["parent_id"]) for r in records} == {"1"}
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute("SELECT error_code FROM connector.dead_letters")
        assert await cur.fetchall() == [("MISSING_KEY",)]
