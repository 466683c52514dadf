"""Parents first (issue 21 part 2b-ii): a child pipeline's lookup is written only once its parent
is in the CRM, resolved to the parent's CRM id (upsert) or by ``find_by`` (Bulk Write); a child
whose parent is not in the CRM by its deadline, or is dead-lettered, is held
``PARENT_NOT_SYNCED`` and sent again by itself once the parent is acknowledged.

Real PostgreSQL with capture (each test in both modes) on ``customers`` and ``orders``
(``orders.customer_id`` names a customer), the emulator with a lookup field ``Orders.Account``
→ ``Accounts`` (tests/emulator/test_relations.py), one engine per pipeline built by the
composition root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from connector import state
from connector.capture import logical, triggers
from connector.config import PipelineConfig
from connector.costs import CostModel
from connector.emitter_parents import parent_demands, record_demand
from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.engine import Engine
from connector.org import board_for
from connector.parents import PARENT_NOT_SYNCED, RecordRef
from connector.pipeline import build_pipeline, chain_credits
from connector.planner import PendingKey
from connector.verify import verify
from connector.zoho.client import ZohoClient
from tests.emulator.test_relations import relations_config
from tests.pipeline.conftest import FAST, SCHEMA, fetch, make_client, needs_read_while_running

DDL = """
CREATE TABLE public.customers (id bigint PRIMARY KEY, name text, city text);
CREATE TABLE public.orders (id bigint PRIMARY KEY, name text NOT NULL, customer_id bigint);
"""

CHEAP_BULK = CostModel(bulk_job_credits=1)  # every group of more than 10 goes as a bulk job


def customers(**kw: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "customers",
            "source_table": "public.customers",
            "key_column": "id",
            "module": "Accounts",
            "key_field": "Legacy_Id",
            "fields": {"name": {"field": "Name", "type": "text"}},
            "snapshot": "never",
            "delete_mode": "ignore",  # a looked-up pipeline marks or ignores its deletes
            **kw,
        }
    )


def orders(**kw: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "orders",
            "source_table": "public.orders",
            "key_column": "id",
            "module": "Orders",
            "key_field": "Legacy_Id",
            "fields": {
                "name": {"field": "Name", "type": "text"},
                "customer_id": {"field": "Account", "type": "lookup", "pipeline": "customers"},
            },
            "snapshot": "never",
            "max_staleness": "3s",
            **kw,
        }
    )


class Shop:
    """The legacy database with capture installed on both tables, in one capture mode."""

    def __init__(self, dsn: str, mode: str) -> None:
        self.dsn = dsn
        self.mode = mode

    async def write(self, query: str, params: Any = None) -> None:
        """Run one statement (its own transaction); in logical mode, return once capture has
        stored it in the outbox (each touched pipeline's ``last_commit_lsn`` passed the WAL
        position from before the statement)."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            before = (await (await conn.execute("SELECT pg_current_wal_lsn()")).fetchone() or [""])[
                0
            ]
            await conn.execute(query, params)
            if self.mode != "logical":
                return
            touched = [p for p in ("customers", "orders") if f"public.{p}" in query]
            for _ in range(1_500):
                cur = await conn.execute(
                    "SELECT count(*) FROM connector.capture_state"
                    " WHERE pipeline = ANY(%s) AND last_commit_lsn > %s::pg_lsn",
                    (touched, before),
                )
                if (await cur.fetchone() or [0])[0] == len(touched):
                    return
                await asyncio.sleep(0.02)
        raise AssertionError(f"logical capture did not store {query!r}")


@pytest.fixture(params=["triggers", "logical"])
async def shop(database: str, request: pytest.FixtureRequest) -> AsyncIterator[Shop]:
    """Both capture modes: the gate reads only the state tables, whichever mode wrote them."""
    mode = str(request.param)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(DDL)
        for p in (customers(capture=mode), orders(capture=mode)):
            await (logical.install if mode == "logical" else triggers.install)(conn, SCHEMA, p)
    stop = asyncio.Event()
    captures = (
        [
            asyncio.create_task(logical.LogicalCapture(database, SCHEMA, p).run(stop))
            for p in (customers(capture=mode), orders(capture=mode))
        ]
        if mode == "logical"
        else []
    )
    try:
        yield Shop(database, mode)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*captures), 30)


@pytest.fixture
async def remu() -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(relations_config()) as e:
        yield e


@pytest.fixture
async def rclient(remu: EmulatorHandle) -> AsyncIterator[ZohoClient]:
    async with make_client(remu) as c:
        yield c


Build = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def build(shop: Shop, rclient: ZohoClient) -> AsyncIterator[Build]:
    """``await build(pipeline, **build_pipeline options)``: an engine of the shop's pipelines,
    which all name each other as parents (as ``connector run`` passes them)."""
    async with contextlib.AsyncExitStack() as stack:
        recorder = stack.enter_context(chain_credits(rclient))

        async def factory(pipeline: PipelineConfig, **kw: Any) -> Engine:
            kw.setdefault("options", FAST)
            kw.setdefault("snapshot_progress", False)
            kw.setdefault("parents", {"customers": customers(), "orders": orders()})
            built = await stack.enter_async_context(
                build_pipeline(
                    pipeline.model_copy(update={"capture": shop.mode}),
                    client=rclient,
                    state_dsn=shop.dsn,
                    schema=SCHEMA,
                    credits=recorder,
                    **kw,
                )
            )
            return built.engine

        yield factory


def account_ids(emu: EmulatorHandle) -> dict[str, str]:
    return {str(r["Legacy_Id"]): str(r["id"]) for r in emu.records("Accounts")}


def order_accounts(emu: EmulatorHandle) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for r in emu.records("Orders"):
        account = r.get("Account")
        out[str(r["Legacy_Id"])] = None if account is None else str(account["id"])
    return out


async def open_letters(dsn: str, pipeline: str) -> list[state.DeadLetterRow]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await state.list_dead_letters(conn, SCHEMA, pipeline)


async def test_child_waits_for_its_parent_then_goes_with_its_crm_id(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """Orders captured before their customers reach the CRM are not sent; once the customers
    are acknowledged (within the orders' deadline), the orders go with the customers' ids."""
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'Oslo'), (2, 'Bolt', 'Rome')")
    await shop.write(
        "INSERT INTO public.orders VALUES (10, 'o10', 1), (11, 'o11', 2), (12, 'o12', NULL)"
    )
    # "fast": the planner sends each change at once, so the children are planned (and wait)
    # while no parent is in the CRM
    child = await build(orders(max_staleness="30s", freshness="fast"))
    parent = await build(customers())
    stop = asyncio.Event()
    running = asyncio.create_task(child.run(stop))
    try:
        for _ in range(100):  # the order without a customer needs none: it goes at once
            if order_accounts(remu):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert order_accounts(remu) == {"12": None}
        await parent.drain()
        ids = account_ids(remu)
        for _ in range(200):
            if len(order_accounts(remu)) == 3:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    assert order_accounts(remu) == {"10": ids["1"], "11": ids["2"], "12": None}
    assert await open_letters(shop.dsn, "orders") == []


async def test_child_held_at_its_deadline_then_released_by_the_parent(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """A parent not in the CRM by the child's deadline: asked once by COQL, not found, the
    child is held PARENT_NOT_SYNCED naming it; when the parent is acknowledged, the child goes
    again by itself and its dead letter resolves."""
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'Oslo')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    child = await build(orders(max_staleness="1s"))
    await child.drain()  # waits until the deadline, asks, holds
    assert order_accounts(remu) == {}
    letters = await open_letters(shop.dsn, "orders")
    assert [(d.key, d.error_code, d.error_field) for d in letters] == [
        ("10", PARENT_NOT_SYNCED, "Account")
    ]
    assert "customers/1" in letters[0].error_message
    assert letters[0].error_details == {"waiting_for": {"pipeline": "customers", "key": "1"}}
    assert remu.usage()["by_api"].get("coql", {}).get("calls", 0) >= 1  # asked the CRM once

    parent = await build(customers())
    await parent.drain()
    await child.drain()  # the held child is released and sent
    assert order_accounts(remu) == {"10": account_ids(remu)["1"]}
    assert await open_letters(shop.dsn, "orders") == []


async def test_parent_already_in_the_crm_is_found_by_coql(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """A parent the connector never synced but the CRM has (same unique key): at the child's
    deadline the COQL lookup finds it and the child goes with that id."""
    async with make_client(remu) as c:
        await c.upsert("Accounts", [{"Name": "Acme", "Legacy_Id": "1"}], ["Legacy_Id"])
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    child = await build(orders(max_staleness="1s"))
    await child.drain()
    assert order_accounts(remu) == {"10": account_ids(remu)["1"]}
    assert await open_letters(shop.dsn, "orders") == []


async def test_unknown_parents_are_asked_fifty_to_a_query(
    shop: Shop, remu: EmulatorHandle, rclient: ZohoClient, build: Build
) -> None:
    """60 orders naming 60 customers the CRM has but the connector never synced: at the
    deadline they are asked for with COQL ``in`` (at most 50 values), two queries in all.
    The engine starts after their deadline, so that the 60 are planned and asked together
    (started before it, they wait first, and on a loaded machine their waits can end in
    different ticks: each smaller group then asks on its own — make test saw 4 queries)."""
    accounts = [{"Name": f"C{i}", "Legacy_Id": str(i)} for i in range(1, 61)]
    for i in range(0, 60, 20):
        await rclient.upsert("Accounts", accounts[i : i + 20], ["Legacy_Id"])
    await shop.write(
        "INSERT INTO public.orders SELECT g, 'o' || g, g FROM generate_series(1, 60) g"
    )
    await asyncio.sleep(1.2)  # past the orders' deadline (1 s)
    child = await build(orders(max_staleness="1s"))
    await child.drain()
    ids = account_ids(remu)
    assert order_accounts(remu) == {str(i): ids[str(i)] for i in range(1, 61)}
    assert remu.usage()["by_api"]["coql"]["calls"] == 2
    assert await open_letters(shop.dsn, "orders") == []


async def test_a_hold_superseded_by_a_newer_outcome_is_resolved_not_sent_again(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """Order 10 is held for its missing customer; its next version is refused by the CRM (a
    name longer than the field). Once the customer is in the CRM, the old hold is over (its
    version will never be sent) and is resolved; the order is not sent again and again."""
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    child = await build(orders(max_staleness="1s"))
    await child.drain()  # held: customer 1 is not in the CRM
    await shop.write("UPDATE public.orders SET name = repeat('x', 300), customer_id = NULL")
    await child.drain()  # v2 names no customer: sent, and refused by the CRM
    before = await open_letters(shop.dsn, "orders")
    assert len(before) == 2 and PARENT_NOT_SYNCED in {d.error_code for d in before}
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'x')")
    await (await build(customers())).drain()
    calls = remu.usage()["by_api"]["upsert"]["calls"]
    await child.drain()
    await asyncio.sleep(2.5)  # more than one release interval
    await child.drain()
    assert remu.usage()["by_api"]["upsert"]["calls"] == calls  # nothing sent again
    letters = await open_letters(shop.dsn, "orders")  # only v2's refusal is left open
    assert len(letters) == 1 and letters[0].error_code != PARENT_NOT_SYNCED


async def test_dead_lettered_parent_holds_its_child_until_fixed(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """A customer the CRM refuses (no Name: mandatory) holds its order at once with the
    parent's reason; fixing the customer releases the order."""
    await shop.write("INSERT INTO public.customers VALUES (1, NULL, 'Oslo')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    parent = await build(customers())
    child = await build(orders(max_staleness="30s"))
    await parent.drain()
    assert [d.key for d in await open_letters(shop.dsn, "customers")] == ["1"]
    await child.drain()  # held at once: no waiting for the deadline
    letters = await open_letters(shop.dsn, "orders")
    assert [(d.key, d.error_code) for d in letters] == [("10", PARENT_NOT_SYNCED)]
    assert "dead-lettered" in letters[0].error_message

    await shop.write("UPDATE public.customers SET name = 'Acme' WHERE id = 1")
    await parent.drain()
    await child.drain()
    assert order_accounts(remu) == {"10": account_ids(remu)["1"]}
    assert await open_letters(shop.dsn, "orders") == []


async def test_reparented_child_lands_with_its_new_parent(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'Oslo'), (2, 'Bolt', 'Rome')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    parent = await build(customers())
    child = await build(orders())
    await parent.drain()
    await child.drain()
    ids = account_ids(remu)
    assert order_accounts(remu) == {"10": ids["1"]}
    await shop.write("UPDATE public.orders SET customer_id = 2 WHERE id = 10")
    await child.drain()
    assert order_accounts(remu) == {"10": ids["2"]}
    await shop.write("UPDATE public.orders SET customer_id = NULL WHERE id = 10")
    await child.drain()
    assert order_accounts(remu) == {"10": None}


async def test_bulk_job_resolves_lookups_by_find_by_once_parents_are_in(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """The Bulk Write path: children whose parents are in the CRM go in one job, their lookups
    resolved by Zoho with find_by on the parent's unique key; a child whose parent is not in
    the CRM stays out of the job and is held at its deadline."""
    await shop.write(
        "INSERT INTO public.customers SELECT g, 'C' || g, 'x' FROM generate_series(1, 20) g"
    )
    parent = await build(customers())
    await parent.drain()
    await shop.write(
        "INSERT INTO public.orders SELECT g, 'o' || g, 1 + g % 21 FROM generate_series(100, 159) g",
    )
    child = await build(orders(max_staleness="1s"), cost=CHEAP_BULK)
    await child.drain()
    usage = remu.usage()["by_api"]
    assert usage.get("bulk_write_job", {}).get("calls", 0) == 1  # one job
    ids = account_ids(remu)
    got = order_accounts(remu)
    expected = {str(g): ids[str(1 + g % 21)] for g in range(100, 160) if 1 + g % 21 <= 20}
    assert got == expected
    held = {d.key for d in await open_letters(shop.dsn, "orders")}
    assert held == {str(g) for g in range(100, 160) if 1 + g % 21 == 21}


async def test_concurrent_engines_never_write_a_dangling_lookup(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """Both engines running while customers and their orders are inserted together, in
    separate transactions in either order: every order ends with its customer's id, none is
    dead-lettered, and no write ever carried an id that was not its customer's."""
    # the parent's own bound is shorter than the child's: without the pull-forward of parents
    # (not built, docs/related-tables.md) a parent waiting for its own deadline past the
    # child's would hold the child until the parent is acknowledged
    parent = await build(customers(max_staleness="2s"))
    child = await build(orders(max_staleness="5s"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(e.run(stop)) for e in (parent, child)]
    try:
        for i in range(1, 31):
            first, second = (
                ("INSERT INTO public.orders VALUES (%s, %s, %s)", (100 + i, f"o{i}", i)),
                ("INSERT INTO public.customers VALUES (%s, %s, 'x')", (i, f"C{i}")),
            )
            if i % 2:
                first, second = second, first
            await shop.write(*first)
            await shop.write(*second)
            await asyncio.sleep(0.02)
        for _ in range(400):
            if len(order_accounts(remu)) == 30:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = account_ids(remu)
    assert order_accounts(remu) == {str(100 + i): ids[str(i)] for i in range(1, 31)}
    for record in remu.records("Orders"):  # every write of every order, not only the last
        own = ids[str(int(record["Legacy_Id"]) - 100)]
        writes = remu.history("Orders", str(record["id"]))
        assert writes and all((w["values"].get("Account") or {}).get("id") == own for w in writes)
    rows = await fetch(shop.dsn, "SELECT count(*) FROM connector.dead_letters")
    assert rows == [(0,)]


async def test_initial_sync_runs_parents_first(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """Both tables hold rows when the connector starts and the child's engine starts first:
    its initial sync reads its first chunk only after the parent's initial sync is done, so
    no child waits for, asks after or is held for a parent."""
    await shop.write(
        "INSERT INTO public.customers SELECT g, 'C' || g, 'x' FROM generate_series(1, 40) g"
    )
    await shop.write(
        "INSERT INTO public.orders SELECT g, 'o' || g, 1 + g % 40 FROM generate_series(100, 299) g"
    )
    both = {"customers": customers(snapshot="auto"), "orders": orders(snapshot="auto")}
    child = await build(orders(snapshot="auto", max_staleness="30s"), parents=both)
    parent = await build(customers(snapshot="auto"), parents=both)
    stop = asyncio.Event()
    child_run = asyncio.create_task(child.run(stop))
    try:
        await asyncio.sleep(0.5)  # the child is up first, waiting for the parent's sync
        assert await fetch(
            shop.dsn, "SELECT count(*) FROM connector.snapshot_chunks WHERE pipeline = 'orders'"
        ) == [(0,)]
        await parent.drain()  # the parent's initial sync, to the end
        for _ in range(400):
            if len(order_accounts(remu)) == 200:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await child_run
    ids = account_ids(remu)
    assert order_accounts(remu) == {str(g): ids[str(1 + g % 40)] for g in range(100, 300)}
    order = await fetch(
        shop.dsn,
        "SELECT min(c.created_at) >= s.finished_at FROM connector.snapshot_chunks c,"
        " connector.snapshots s WHERE c.pipeline = 'orders' AND s.pipeline = 'customers'"
        " GROUP BY s.finished_at",
    )
    assert order == [(True,)]
    assert await fetch(shop.dsn, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
    assert remu.usage()["by_api"].get("coql", {}).get("calls", 0) == 0


async def test_verify_checks_each_lookup_names_the_right_parent(
    shop: Shop, remu: EmulatorHandle, rclient: ZohoClient, build: Build
) -> None:
    """``verify`` on a child pipeline reads the parents' keys and ids and reports a lookup that
    names another parent than the source row's as different; a clean sync has no mismatch."""
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'x'), (2, 'Bolt', 'y')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1), (11, 'o11', 2)")
    await (await build(customers())).drain()
    await (await build(orders())).drain()
    both = {"customers": customers(), "orders": orders()}

    async def check() -> Any:
        return await verify(
            pipeline=orders(),
            client=rclient,
            source_dsn=shop.dsn,
            state_dsn=shop.dsn,
            schema=SCHEMA,
            parents=both,
        )

    clean = await check()
    assert clean.mismatches == 0 and clean.rows_in_source == 2
    ids = account_ids(remu)
    # someone points order 10 at the other account in the CRM
    await rclient.upsert(
        "Orders", [{"Legacy_Id": "10", "Account": {"id": ids["2"]}}], ["Legacy_Id"]
    )
    report = await check()
    assert [(m.key, m.kind, set(m.fields)) for m in report.different] == [
        ("10", "different", {"Account"})
    ]


async def test_a_waiting_child_pulls_its_parent_forward(
    shop: Shop, remu: EmulatorHandle, build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    """Pull-forward (issue 21): the customer's own deadline (10 minutes; "economy" waits for
    company until close to it) is far later than its waiting order's (10 s). The order records
    by when it needs the customer (``parent_demand``), the customers' engine plans that key with
    that deadline, and the order goes with the customer's id, never held. Without it the order
    is held PARENT_NOT_SYNCED at its deadline. The customers' engine says so in its log; the
    order's waits are not logged as bulk-job fences (they are not)."""
    caplog.set_level(logging.INFO, logger="connector")
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'Oslo')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1)")
    child = await build(orders(max_staleness="10s", freshness="fast"))
    parent = await build(customers(max_staleness="10m", freshness="economy"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(e.run(stop)) for e in (child, parent)]
    try:
        for _ in range(600):  # at most 30 s: the order is sent, or held
            if order_accounts(remu) or await open_letters(shop.dsn, "orders"):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert await open_letters(shop.dsn, "orders") == []
    assert order_accounts(remu) == {"10": account_ids(remu)["1"]}
    messages = [r.getMessage() for r in caplog.records]
    assert "parents pulled forward: waiting children need them sooner" in messages
    assert not [m for m in messages if "a bulk job may still write" in m]
    # the need is over once the customer is in the CRM: the parent's next read deletes it
    async with await psycopg.AsyncConnection.connect(shop.dsn, autocommit=True) as conn:
        assert await parent_demands(conn, SCHEMA, "customers", 10) == {}


async def test_a_child_read_pulls_its_new_parent_before_its_own_deadline(
    shop: Shop, remu: EmulatorHandle, build: Build
) -> None:
    """Pull-forward when the child is read (session 22). In "economy" the order is planned at
    its latest moment (here a minute); asking for its customer only then is too late for the
    customer's pipeline to be pulled (it reads needs every 2 s, the order has one margin
    left): the order asks by COQL, finds nothing and is held ``PARENT_NOT_SYNCED`` (the
    demo's lines of every new order, after the bound). Read, the order records at once by
    when it needs the new customer: its deadline less the send lead. An order whose customer
    is in the CRM needs nothing; nothing is sent or asked before the order is due."""
    await shop.write("INSERT INTO public.customers VALUES (1, 'Acme', 'Oslo'), (2, 'B', 'C')")
    await shop.write("INSERT INTO public.orders VALUES (10, 'o10', 1), (20, 'o20', 2)")
    child = await build(orders(max_staleness="60s", freshness="economy"))
    needs = await needs_read_while_running(child, shop.dsn, "customers", ("customers", "2"))
    assert list(needs) == ["1"]
    pending = child.coalescer.pending()
    assert set(pending) == {"10", "20"}  # nothing sent yet
    deadline = pending["10"].live_at.timestamp() + 60  # type: ignore[union-attr]
    lead = child.emitter._send_lead()  # type: ignore[union-attr]
    assert needs["1"] == pytest.approx(deadline - lead, abs=0.01)
    assert remu.records("Orders") == []
    assert "coql" not in remu.state.usage_snapshot()["by_api"]


async def test_engines_of_one_client_count_each_others_calls_due_together(
    shop: Shop, build: Build
) -> None:
    """One org (connector/org.py): two engines on one client share its board; each publishes
    its live pending keys at every plan and counts, as calls ahead of its own, the other's
    calls due by the same moments. Planned alone, three pipelines due together queued their
    calls past the bound (tests/unit/test_planner_org.py). Stopped, an engine leaves it."""
    child = await build(orders())
    parent = await build(customers())
    assert child.client is parent.client
    est = child._given_emitter.latency  # type: ignore[union-attr]
    now = 1_000.0
    due = [PendingKey(f"o{i}", now, False) for i in range(250)]  # three calls, all due at 1003
    assert child._org_calls_ahead(due, 3.0, est) == 0  # the other has published nothing
    mine = [PendingKey("c1", now + 1.0, False), PendingKey("c2", now, True)]  # one in flight
    assert parent._org_calls_ahead(mine, 3.0, est) == 3
    assert child._org_calls_ahead(due, 3.0, est) == 1
    later = [PendingKey("c1", now + 500.0, False)]  # due long after: not ahead of anyone
    assert parent._org_calls_ahead(later, 600.0, est) == 3
    assert child._org_calls_ahead(due, 3.0, est) == 0
    backlog = [PendingKey("c1", now, False, backlog=True)]  # initial-sync rows: no deadline
    parent._org_calls_ahead(backlog, 3.0, est)
    assert child._org_calls_ahead(due, 3.0, est) == 0
    parent._org_calls_ahead(mine, 3.0, est)
    stop = asyncio.Event()
    stop.set()
    await parent.run(stop)  # a run ends by leaving the board
    assert board_for(parent.client.limiter).pipelines() == ["orders"]


async def test_children_needs_keep_the_earliest_and_end_when_the_parent_is_synced(
    shop: Shop,
) -> None:
    """``parent_demand``: per parent the earliest need wins; a need is deleted once the parent
    is in the CRM (synced with an id), or an hour after the moment it named."""
    a, b = RecordRef("customers", "1"), RecordRef("customers", "2")
    async with await psycopg.AsyncConnection.connect(shop.dsn, autocommit=True) as conn:
        await record_demand(conn, SCHEMA, {a: 2_000_000_000.0, b: 2_000_000_000.0})
        await record_demand(conn, SCHEMA, {a: 1_999_999_000.0, b: 2_000_000_500.0})
        await record_demand(conn, SCHEMA, {RecordRef("customers", "3"): 1_000_000_000.0})
        assert await parent_demands(conn, SCHEMA, "customers", 10) == {
            "1": 1_999_999_000.0,
            "2": 2_000_000_000.0,
        }  # customer 3's moment (2001) passed more than an hour ago: deleted
        await conn.execute(
            "INSERT INTO connector.key_state (pipeline, key, crm_id, status)"
            " VALUES ('customers', '1', '99', 'synced')"
        )
        assert await parent_demands(conn, SCHEMA, "customers", 10) == {"2": 2_000_000_000.0}
        assert await parent_demands(conn, SCHEMA, "orders", 10) == {}
