"""TRUNCATE of the legacy table, in both capture modes, through the real runtime (capture,
engine, metrics) with the operator verbs (docs/capture.md, "TRUNCATE"; DESIGN.md invariant 11):

* ``on_truncate = "hold"`` (default): the CRM records stay; the truncate is captured and shows
  in a log line, ``connector_truncates_total`` / ``connector_truncates_open``, ``status`` and
  ``verify`` (the records as extra); ``verify --repair`` reconciles it and clears the hold;
  rows written after the TRUNCATE flow on meanwhile.
* ``on_truncate = "propagate"``: every record of a key known before the TRUNCATE is deleted;
  a row inserted after it in the same transaction is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector import operate
from tests.e2e.helpers import emulator, prepare, wait_in_sync
from tests.e2e.test_operate import Running, ns

MODES = ["triggers", "logical"]


@pytest.fixture(params=MODES)
async def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def on_truncate() -> str:
    return "hold"


@pytest.fixture
async def running(
    database: str, tmp_path: Path, mode: str, on_truncate: str
) -> AsyncIterator[tuple[Running, Any]]:
    async with emulator() as emu:
        setup = await prepare(
            database, tmp_path, emu.url, rows=30, max_staleness="1s", capture=mode
        )
        text = setup.config.read_text()
        setup.config.write_text(
            text.replace(
                'delete_mode = "delete"', f'delete_mode = "delete"\non_truncate = "{on_truncate}"'
            )
        )
        r = Running(setup)
        r.task = asyncio.create_task(r.runtime.run())
        await wait_in_sync(setup, None)
        try:
            yield r, emu
        finally:
            r.runtime.request_stop()
            assert await r.task == 0


def insert(key: int, name: str) -> str:
    return (
        "INSERT INTO public.orders (id, order_number, customer_email, amount, quantity,"
        f" order_date, placed_at) VALUES ({key}, '{name}', 'a@example.org', 1, 1, '2024-01-01',"
        " now())"
    )


def live_keys(emu: Any) -> set[str]:
    return {str(rec["parent_id"]) for rec in emu.records("Orders") if not rec.get("Deleted")}


async def wait_until(pred: Any, what: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def truncations(dsn: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT action, crm_keys, resolved_at IS NOT NULL FROM connector.truncations"
        )
        return list(await cur.fetchall())


def metric(r: Running, name: str, **labels: str) -> float:
    value = r.runtime.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_truncate_is_held_and_shown_until_verify_repair(
    running: tuple[Running, Any], capsys: Any, caplog: pytest.LogCaptureFixture
) -> None:
    r, emu = running
    dsn = r.setup.dsn
    assert len(live_keys(emu)) == 30
    caplog.set_level(logging.ERROR, logger="connector.truncate")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("TRUNCATE public.orders")
        await conn.execute(insert(1001, "after"))

    async def held() -> bool:
        return bool(await truncations(dsn)) and "1001" in live_keys(emu)

    await wait_until(held, "the held truncate and the later insert")
    assert await truncations(dsn) == [("held", 30, False)]
    # the CRM deletes are held: the 30 records stay, the later row arrived
    assert live_keys(emu) == {str(i) for i in range(1, 31)} | {"1001"}
    # log line, with the right advice (snapshot does not reconcile)
    lines = [rec.getMessage() for rec in caplog.records if "TRUNCATE" in rec.getMessage()]
    assert len(lines) == 1 and "verify --pipeline orders --repair" in lines[0]
    # metrics
    assert metric(r, "connector_truncates_total", pipeline="orders", action="held") == 1
    assert metric(r, "connector_events_captured_total", pipeline="orders", op="truncate") == 1
    assert metric(r, "connector_events_captured_total", pipeline="orders", op="insert") >= 1
    await wait_until(
        lambda: _true(metric(r, "connector_truncates_open", pipeline="orders") == 1),
        "connector_truncates_open = 1",
    )
    # status
    capsys.readouterr()
    assert await operate.status(r.settings, r.secrets, ns()) == 0
    text = capsys.readouterr().out
    assert "TRUNCATE     held, 30 CRM record(s) kept" in text and "--repair" in text
    assert await operate.status(r.settings, r.secrets, ns(json=True)) == 0
    doc = json.loads(capsys.readouterr().out)["pipelines"][0]
    assert [t["crm_keys"] for t in doc["truncates_held"]] == [30]
    # verify shows the difference; --repair reconciles and clears the hold
    assert await operate.verify(r.settings, r.secrets, ns(pipeline="orders", repair=False)) == 1
    out = capsys.readouterr().out
    assert "missing 0, extra 30, different 0" in out and "TRUNCATE" in out
    assert await truncations(dsn) == [("held", 30, False)]  # not without a repair
    assert await operate.verify(r.settings, r.secrets, ns(pipeline="orders", repair=True)) == 0
    assert "now reconciled" in capsys.readouterr().out
    await wait_in_sync(r.setup, None)
    assert live_keys(emu) == {"1001"}
    assert await truncations(dsn) == [("held", 30, True)]
    await wait_until(
        lambda: _true(metric(r, "connector_truncates_open", pipeline="orders") == 0),
        "connector_truncates_open = 0",
    )
    assert await operate.status(r.settings, r.secrets, ns()) == 0
    assert "TRUNCATE" not in capsys.readouterr().out


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("on_truncate", ["propagate"])
async def test_truncate_propagated_deletes_the_known_records(
    running: tuple[Running, Any],
) -> None:
    r, emu = running
    dsn = r.setup.dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("BEGIN")
        await conn.execute(insert(2001, "x"))
        await conn.execute("TRUNCATE public.orders")
        # written after the TRUNCATE in the same transaction: stays
        await conn.execute(insert(5, "again"))
        await conn.execute("COMMIT")

    async def done() -> bool:
        return live_keys(emu) == {"5"}

    await wait_until(done, "only key 5 left in the CRM")
    assert await truncations(dsn) == [("propagated", 30, False)]
    assert metric(r, "connector_truncates_total", pipeline="orders", action="propagated") == 1
    await wait_in_sync(r.setup, None)
    names = {rec["Name"] for rec in emu.records("Orders") if not rec.get("Deleted")}
    assert names == {"again"}
