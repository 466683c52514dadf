"""`connector verify` of a subform pipeline (issue 21; ``connector/verify_subform.py``
``verify_subform``): each order's subform rows in the CRM, read by COQL on the subform module
``Order_Lines``, against its lines in the table, as the engine writes them; ``--repair``
re-captures the lines of each differing order so the engine rewrites it.

Real PostgreSQL with capture (each test in both modes) and the emulator, with the fixtures and
helpers of ``tests/pipeline/test_subform_engine.py``."""

# ruff: noqa: F811  (its fixtures are imported: a test's parameter of the same name uses them)

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from connector.emulator.server import EmulatorHandle
from connector.parents import PARENT_NOT_SYNCED
from connector.verify import VerifyReport, recapture, rewrite_sets, verify
from connector.zoho.client import ZohoClient
from tests.pipeline.conftest import SCHEMA
from tests.pipeline.test_subform_engine import (  # noqa: F401 (fixtures)
    Build,
    Shop,
    build,
    client,
    crm_lines,
    emu,
    lines,
    open_letters,
    orders,
    shop,
)

PARENTS = {"orders": orders(), "order_lines": lines()}


async def run_verify(shop: Shop, client: ZohoClient) -> VerifyReport:
    return await verify(
        pipeline=lines(),
        client=client,
        source_dsn=shop.dsn,
        state_dsn=shop.dsn,
        schema=SCHEMA,
        parents=PARENTS,
    )


async def repair(shop: Shop, report: VerifyReport, *, rewrite: bool = False) -> int:
    """What `connector verify --repair` does with the report: re-capture its lines and
    (``rewrite``) mark each differing order's set to be written again."""
    done = await recapture(
        pipeline=lines(),
        keys=report.repair_keys(),
        source_dsn=shop.dsn,
        state_dsn=shop.dsn,
        schema=SCHEMA,
    )
    if rewrite:
        report.sets_marked = await rewrite_sets(
            pipeline=lines(),
            keys=[m.key for m in report.different],
            state_dsn=shop.dsn,
            schema=SCHEMA,
        )
    return done.total


def order_ids(emu: EmulatorHandle) -> dict[str, str]:
    return {str(r["Legacy_Id"]): str(r["id"]) for r in emu.records("Orders")}


def rows_of(emu: EmulatorHandle, key: str) -> list[dict[str, Any]]:
    rec = next(r for r in emu.records("Orders") if str(r["Legacy_Id"]) == key)
    return list(rec.get("Lines") or [])


async def admin_patch(emu: EmulatorHandle, record_id: str, values: dict[str, Any]) -> None:
    """Edit a record as a person in the CRM would (the emulator's admin API: no credits)."""
    async with (
        aiohttp.ClientSession() as s,
        s.patch(f"{emu.url}/__emulator__/records/Orders/{record_id}", json=values) as r,
    ):
        assert r.status == 200, await r.text()


async def test_after_a_sync_verify_finds_no_mismatch(
    shop: Shop, emu: EmulatorHandle, client: ZohoClient, build: Build
) -> None:
    await shop.write("INSERT INTO public.orders SELECT g, 'o' || g FROM generate_series(1, 4) g")
    await (await build(orders())).drain()
    await shop.write(
        # two equal lines in one order (a multiset), a NULL quantity, an orphan line
        "INSERT INTO public.order_lines VALUES (1, 1, 'a', 1), (2, 1, 'b', 2), (3, 2, 'c', 3),"
        " (4, 3, 'd', 4), (5, 3, 'd', 4), (6, 3, 'e', NULL), (7, NULL, 'x', 1)"
    )
    await (await build(lines())).drain()
    assert crm_lines(emu) == await shop.lines()
    calls, credits = client.calls, client.credits_spent
    report = await run_verify(shop, client)
    assert report.mismatches == 0 and report.dead_lettered == [], report.to_json()
    assert (report.rows_in_source, report.records_in_crm) == (7, 6)  # the orphan has no row
    # one field metadata call (the subform module's name), one COQL page of Orders, one of
    # Order_Lines (limit 2000: 3 credits each)
    assert (report.crm_calls, report.crm_credits) == (
        client.calls - calls,
        client.credits_spent - credits,
    )
    assert report.crm_calls == 3
    assert emu.usage()["by_api"]["coql"]["calls"] == 2
    assert report.line_keys == {} and report.repair_keys() == []
    doc = report.to_json()
    assert doc["mismatches"] == 0 and doc["lines_to_recapture"] == 0


async def test_rows_changed_in_the_crm_are_found_and_repaired(
    shop: Shop, emu: EmulatorHandle, client: ZohoClient, build: Build
) -> None:
    await shop.write("INSERT INTO public.orders SELECT g, 'o' || g FROM generate_series(1, 4) g")
    await (await build(orders())).drain()
    await shop.write(
        "INSERT INTO public.order_lines VALUES (1, 1, 'a', 1), (2, 1, 'b', 2), (3, 2, 'c', 3),"
        " (4, 3, 'd', 4)"
    )
    child = await build(lines())
    await child.drain()
    ids = order_ids(emu)
    # by hand in the CRM: order 1's row a gets another quantity (the admin API: the row keeps
    # its id), order 2 loses its row and gets another (Update Records naming Lines), order 4,
    # which never had a line, gets one
    edited = [
        {"id": r["id"], "Qty": 9} if r["Product"] == "a" else {"id": r["id"]}
        for r in rows_of(emu, "1")
    ]
    await admin_patch(emu, ids["1"], {"Lines": edited})
    assert sorted(crm_lines(emu)["1"]) == [("a", 9), ("b", 2)]
    results = await client.update(
        "Orders",
        [
            {"id": ids["2"], "Lines": [{"Product": "z", "Qty": 3}]},
            {"id": ids["4"], "Lines": [{"Product": "y", "Qty": 1}]},
        ],
    )
    assert all(r.ok for r in results)

    report = await run_verify(shop, client)
    assert [m.key for m in report.different] == ["1", "2", "4"], report.to_json()
    assert report.missing == [] and report.extra == [] and report.dead_lettered == []
    first = report.different[0]
    assert first.crm_id == ids["1"]
    assert first.fields["Lines rows"] == (2, 2)  # lines in the table, rows in the CRM
    assert first.fields["Lines row"] == ({"Product": "a", "Qty": 1}, {"Product": "a", "Qty": 9})
    assert report.different[2].fields["Lines rows"] == (0, 1)
    assert report.different[2].fields["Lines row"] == (None, {"Product": "y", "Qty": 1})
    # what --repair re-captures: each differing order's lines; order 4 has none to re-capture
    assert report.line_keys == {"1": ["1", "2"], "2": ["3"], "4": []}
    assert report.repair_keys() == ["1", "2", "3"]
    assert report.unrepairable() == ["4"]
    assert report.to_json()["unrepairable"] == ["4"]

    assert await repair(shop, report) == 3
    await child.drain()
    assert crm_lines(emu)["1"] == [("a", 1), ("b", 2)]
    assert crm_lines(emu)["2"] == [("c", 3)]
    report = await run_verify(shop, client)
    assert [m.key for m in report.different] == ["4"]  # no line of its own to re-capture
    # `--repair` also marks each differing order's set: the engine's pass writes it again
    assert await repair(shop, report, rewrite=True) == 0
    assert report.sets_marked == 1 and report.unrepairable() == []
    for _ in range(100):
        await child.drain()
        if crm_lines(emu)["4"] == []:
            break
        await asyncio.sleep(0.2)
    assert crm_lines(emu)["4"] == []
    report = await run_verify(shop, client)
    assert report.mismatches == 0 and report.dead_lettered == [], report.to_json()
    assert await open_letters(shop.dsn, "order_lines") == []


async def test_repair_rewrites_the_orders_lines_left_and_reaches_missing_orders(
    shop: Shop, emu: EmulatorHandle, client: ZohoClient, build: Build
) -> None:
    """Verify runs beside the lines pipeline, before it has sent the latest changes: order 1's
    only line moved to order 2, a line deleted from order 3, a new order 5 with a line, not in
    the CRM yet. The lines last written under an order and no longer in it
    (``key_state.crm_id``) are among the lines re-captured for it (the moved one with the
    order it is under now, the deleted one as a delete), so the engine rewrites it; order 5
    is missing, and its line, re-captured, is written once the order is in the CRM."""
    await shop.write("INSERT INTO public.orders SELECT g, 'o' || g FROM generate_series(1, 3) g")
    parent = await build(orders())
    await parent.drain()
    await shop.write(
        "INSERT INTO public.order_lines VALUES (1, 1, 'a', 1), (3, 3, 'c', 3), (4, 3, 'd', 4)"
    )
    child = await build(lines())
    await child.drain()
    await shop.write(
        "UPDATE public.order_lines SET order_id = 2 WHERE id = 1",
        "DELETE FROM public.order_lines WHERE id = 3",
        "INSERT INTO public.orders VALUES (5, 'o5')",
        "INSERT INTO public.order_lines VALUES (9, 5, 'e', 5)",
    )
    report = await run_verify(shop, client)
    assert [m.key for m in report.different] == ["1", "2", "3"], report.to_json()
    assert report.different[0].fields["Lines rows"] == (0, 1)  # its line left: no line now
    assert [m.key for m in report.missing] == ["5"]
    assert report.line_keys == {"1": ["1"], "2": ["1"], "3": ["3", "4"], "5": ["9"]}
    assert report.repair_keys() == ["1", "3", "4", "9"]
    assert report.unrepairable() == []

    assert await repair(shop, report) == 4  # line 3 as a delete
    await parent.drain()  # order 5 reaches the CRM
    for _ in range(50):
        await child.drain()
        if crm_lines(emu) == await shop.lines():
            break
    assert crm_lines(emu) == await shop.lines()
    assert crm_lines(emu)["1"] == [] and crm_lines(emu)["5"] == [("e", 5)]
    report = await run_verify(shop, client)
    assert report.mismatches == 0 and report.dead_lettered == [], report.to_json()


async def test_an_order_with_an_open_line_dead_letter_is_dead_lettered_not_different(
    shop: Shop, emu: EmulatorHandle, client: ZohoClient, build: Build
) -> None:
    """Order 2's newest version is refused (no Name: mandatory), so line 1 moved into it is
    held PARENT_NOT_SYNCED: order 2's rows lack it on purpose. Order 3 has 101 lines: over
    Zoho's subform limit, never written (SUBFORM_LIMIT). Both are dead-lettered, no
    mismatch; order 1, which line 1 left, was rewritten and matches."""
    await shop.write("INSERT INTO public.orders SELECT g, 'o' || g FROM generate_series(1, 3) g")
    orders_engine = await build(orders())
    await orders_engine.drain()
    await shop.write(
        "INSERT INTO public.order_lines VALUES (1, 1, 'a', 1), (2, 1, 'b', 2)",
        "INSERT INTO public.order_lines SELECT g, 3, 'p' || g, g FROM generate_series(10, 110) g",
    )
    child = await build(lines())
    await child.drain()
    await shop.write("UPDATE public.orders SET name = NULL WHERE id = 2")
    await orders_engine.drain()  # refused: order 2 is dead-lettered
    await shop.write("UPDATE public.order_lines SET order_id = 2 WHERE id = 1")
    await child.drain()
    assert crm_lines(emu) == {"1": [("b", 2)], "2": [], "3": []}
    letters = await open_letters(shop.dsn, "order_lines")
    assert {d.error_code for d in letters} == {PARENT_NOT_SYNCED, "SUBFORM_LIMIT"}

    report = await run_verify(shop, client)
    assert report.mismatches == 0, report.to_json()
    assert report.dead_lettered == ["2", "3"]
    assert report.repair_keys() == []
