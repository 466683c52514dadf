"""Fixtures for the pipeline tests: a legacy ``orders`` table with capture installed, the CRM
emulator in-process, a client pointed at it, and an engine factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from connector.capture import triggers
from connector.config import PipelineConfig
from connector.emitter import CreditRecorder
from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.server import EmulatorHandle
from connector.engine import Engine, EngineOptions
from connector.pipeline import build_pipeline, chain_credits
from connector.zoho.client import RetryPolicy, ZohoClient

SCHEMA = "connector"

ORDERS_DDL = """
CREATE TABLE public.orders (
    id             bigint PRIMARY KEY,
    name           text NOT NULL,
    customer_email text,
    status         text,
    amount         numeric(12, 2),
    quantity       integer,
    order_date     date,
    placed_at      timestamptz,
    notes          text,
    is_gift        boolean,
    synced         boolean NOT NULL DEFAULT false
)
"""

FIELDS: dict[str, Any] = {
    "name": {"field": "Name", "type": "text"},
    "customer_email": {"field": "Customer_Email", "type": "email"},
    "status": {"field": "Status", "type": "picklist"},
    "amount": {"field": "Amount", "type": "currency"},
    "quantity": {"field": "Quantity", "type": "integer"},
    "order_date": {"field": "Order_Date", "type": "date"},
    "placed_at": {"field": "Placed_At", "type": "datetime"},
    "notes": {"field": "Notes", "type": "textarea"},
    "is_gift": {"field": "Is_Gift", "type": "boolean"},
}

STATUSES = ["New", "Paid", "Shipped", "Delivered", "Cancelled", "Refunded"]


def pipeline_config(**overrides: Any) -> PipelineConfig:
    data: dict[str, Any] = {
        "name": "orders",
        "source_table": "public.orders",
        "key_column": "id",
        "module": "Orders",
        "key_field": "parent_id",
        "fields": FIELDS,
        "snapshot": "never",
    }
    data.update(overrides)
    return PipelineConfig.model_validate(data)


def insert_sql(n: int, start: int = 1, tag: str = "v1") -> tuple[str, tuple[Any, ...]]:
    """Insert n valid orders with ids start..start+n-1 in one statement."""
    return (
        "INSERT INTO public.orders (id, name, customer_email, status, amount, quantity,"
        " order_date, placed_at, notes, is_gift)"
        " SELECT g, 'Order ' || g || ' ' || %s, 'buyer' || g || '@example.org',"
        " (ARRAY['New','Paid','Shipped','Delivered','Cancelled','Refunded'])[1 + g %% 6],"
        " (g %% 1000) + 0.25, (g %% 7)::int, DATE '2024-01-01' + (g %% 300)::int,"
        " TIMESTAMPTZ '2024-01-01 10:00:00+00' + g * interval '1 minute',"
        " 'note ' || g, g %% 2 = 0"
        " FROM generate_series(%s::bigint, %s::bigint) AS g",
        (tag, start, start + n - 1),
    )


@pytest.fixture
async def legacy(database: str) -> AsyncIterator[str]:
    """The test database with public.orders and the trigger capture installed."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(ORDERS_DDL)
        await triggers.install(conn, SCHEMA, pipeline_config(sync_flag_column="synced"))
    yield database


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorHandle]:
    async with start_emulator() as handle:
        yield handle


def emulator_with(**bulk: Any) -> EmulatorConfig:
    cfg = EmulatorConfig.default()
    return cfg.model_copy(update={"bulk": cfg.bulk.model_copy(update=bulk)})


def make_client(emu: EmulatorHandle, **kwargs: Any) -> ZohoClient:
    return ZohoClient(
        accounts_url=emu.url,
        api_url=emu.url,
        upload_url=emu.url,
        client_id="emulator-client-id",
        client_secret=SecretStr("emulator-client-secret"),
        refresh_token=SecretStr("emulator-refresh-token"),
        org_id="emulator-org",
        retry=RetryPolicy(max_attempts=10, backoff_base=0.01, backoff_max=0.2),
        **kwargs,
    )


@pytest.fixture
async def client(emu: EmulatorHandle) -> AsyncIterator[ZohoClient]:
    async with make_client(emu) as c:
        yield c


EngineFactory = Callable[..., Awaitable[Engine]]

FAST = EngineOptions(
    poll_interval=0.05, drain_timeout=5.0, bulk_poll_initial=0.05, bulk_poll_max=0.5
)


@pytest.fixture
async def make_engine(legacy: str) -> AsyncIterator[EngineFactory]:
    """``await make_engine(client[, pipeline], **build_pipeline options)``: an Engine built by
    the composition root (``connector.pipeline.build_pipeline``), as ``connector run`` builds
    it; its pool, emitter and credit hook stay open until the test ends. One credit recorder
    per client, as the runtime has one per org."""
    async with contextlib.AsyncExitStack() as stack:
        recorders: dict[int, CreditRecorder] = {}

        async def factory(
            client: ZohoClient, pipeline: PipelineConfig | None = None, **kw: Any
        ) -> Engine:
            kw.setdefault("options", FAST)
            kw.setdefault("snapshot_progress", False)
            if id(client) not in recorders:
                recorders[id(client)] = stack.enter_context(chain_credits(client))
            built = await stack.enter_async_context(
                build_pipeline(
                    pipeline or pipeline_config(),
                    client=client,
                    state_dsn=legacy,
                    schema=SCHEMA,
                    credits=recorders[id(client)],
                    **kw,
                )
            )
            return built.engine

        yield factory


async def drain_into_a_new_emulator(dsn: str, pipeline: PipelineConfig) -> list[dict[str, Any]]:
    """Start an emulator, drain the pipeline's outbox into it through an engine built by the
    composition root, and return the Orders records it ends with."""
    async with (
        start_emulator() as emu,
        make_client(emu) as client,
        build_pipeline(
            pipeline, client=client, state_dsn=dsn, schema=SCHEMA, options=FAST
        ) as built,
    ):
        await built.engine.drain()
        return list(emu.records("Orders"))


async def execute(dsn: str, query: str, params: Any = None) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query, params)


async def fetch(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


def crm_by_key(emu: EmulatorHandle) -> dict[str, dict[str, Any]]:
    return {str(r["parent_id"]): r for r in emu.records("Orders")}


def credits_by_api(emu: EmulatorHandle) -> dict[str, int]:
    usage = emu.usage()["by_api"]
    return {k: int(v.get("credits", 0)) for k, v in usage.items() if v.get("credits")}


BULK_SIDE_CALLS = ("bulk_upload", "bulk_job_details", "bulk_download")


def paid_by_api(emu: EmulatorHandle) -> dict[str, int]:
    """Credits by API without the bulk side calls (upload, job status, download: 1 credit each
    since "All other APIs: 1"; how many depends on polling): what jobs and upserts cost."""
    return {k: v for k, v in credits_by_api(emu).items() if k not in BULK_SIDE_CALLS}


async def assert_crm_matches(emu: EmulatorHandle, dsn: str) -> None:
    """The CRM holds exactly the legacy table's rows (by key, name, status, amount)."""
    rows = await fetch(dsn, "SELECT id::text, name, status, amount FROM public.orders")
    crm = {k: r for k, r in crm_by_key(emu).items() if not r.get("Deleted")}
    assert set(crm) == {r[0] for r in rows}
    for key, name, status, amount in rows:
        rec = crm[key]
        assert rec["Name"] == name, key
        assert rec.get("Status") == status, key
        assert float(rec.get("Amount")) == float(amount), key


def wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> Any:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.02)

    return asyncio.wait_for(loop(), timeout)


async def needs_read_while_running(
    engine: Any, dsn: str, parent: str, synced: tuple[str, str]
) -> dict[str, float]:
    """Run ``engine`` until ``parent_demand`` names some key of ``parent`` (at most 20 s), with
    ``synced`` = (pipeline, key) marked in the CRM first; returns the needs (session 22: a
    child read pulls its new parents forward at once)."""
    import asyncio

    import psycopg

    from connector.emitter_parents import parent_demands

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO connector.key_state (pipeline, key, crm_id, status)"
            " VALUES (%s, %s, '99', 'synced')",
            synced,
        )
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    needs: dict[str, float] = {}
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(400):  # at most 20 s; the tests' children are due after 59 s
                needs = await parent_demands(conn, SCHEMA, parent, 10)
                if needs:
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    return needs
