"""Schema changes of the source table while `connector run` runs (the real runtime, in-process),
both capture modes: ADD COLUMN (unmapped) flows on; DROP or RENAME of a mapped column stops that
pipeline before any record is sent without the field, with a clear error naming the column and
the fix (log, status, metric); nothing captured is lost: after the mapping is fixed and the
connector restarted, the held changes reach the CRM."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector import operate
from connector.config import load_settings, resolve_secrets
from connector.demo import DEMO_ENV
from connector.metrics import Metrics
from connector.runner import PipelineRunner
from connector.runtime import Runtime
from tests.e2e.helpers import emulator, prepare, wait_in_sync


def _runtime(config: Path) -> Runtime:
    settings = load_settings(config)
    return Runtime(
        settings,
        resolve_secrets(settings, dict(DEMO_ENV)),
        metrics=Metrics(),
        serve_http=False,
        handle_signals=False,
        lease_retry=0.2,
    )


def _writes(emu: Any) -> int:
    return sum(len(h) for h in emu.state.store("Orders").history.values())


async def _sql(dsn: str, *stmts: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for s in stmts:
            await conn.execute(s)


async def _one(dsn: str, query: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def _until(pred: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} never happened")


@pytest.mark.parametrize("change", ["drop", "rename"])
@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_mapped_column_dropped_or_renamed_stops_the_pipeline_and_loses_nothing(
    database: str,
    tmp_path: Path,
    capsys: Any,
    caplog: Any,
    monkeypatch: Any,
    capture: str,
    change: str,
) -> None:
    # the halt's reason is stored slowly here: whoever sees the pipeline "failed" must find its
    # reason at once (CI once read the state between the two; this makes that gap certain)
    record_halt = PipelineRunner._record_halt

    async def slow_record_halt(self: PipelineRunner, exc: Any) -> None:
        await asyncio.sleep(0.5)
        await record_halt(self, exc)

    monkeypatch.setattr(PipelineRunner, "_record_halt", slow_record_halt)
    async with emulator() as emu:
        setup = await prepare(
            database, tmp_path, emu.url, rows=20, max_staleness="1s", capture=capture
        )
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await wait_in_sync(setup, None)
            # ADD COLUMN (unmapped): changes flow on untouched
            await _sql(
                setup.dsn,
                "ALTER TABLE public.orders ADD COLUMN loyalty_tier text",
                "UPDATE public.orders SET loyalty_tier = 'gold', notes = 'after add' WHERE id <= 5",
            )
            await wait_in_sync(setup, None)
            assert rt.runners["orders"].state == "running"
            before = _writes(emu)

            if change == "drop":
                ddl = "ALTER TABLE public.orders DROP COLUMN quantity"
            else:
                ddl = "ALTER TABLE public.orders RENAME COLUMN quantity TO qty"
            await _sql(
                setup.dsn,
                ddl,
                "UPDATE public.orders SET notes = 'held' WHERE id BETWEEN 6 AND 10",
            )
            await _until(
                lambda: getattr(rt.runners.get("orders"), "state", None) == "failed",
                "the pipeline stop",
            )
            assert not task.done()  # only that pipeline stopped, not the process
            assert _writes(emu) == before  # nothing sent without the field
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.dead_letters") == 0
            cp = await _one(
                setup.dsn, "SELECT last_id FROM connector.checkpoints WHERE pipeline = 'orders'"
            )
            held = await _one(
                setup.dsn,
                f"SELECT count(*) FROM connector.outbox WHERE pipeline = 'orders' AND id > {cp}",
            )
            assert held >= 5
            errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert any("'quantity'" in m and "pipelines['orders'].fields" in m for m in errors)
            sample = rt.metrics.registry.get_sample_value(
                "connector_schema_change_stops_total", {"pipeline": "orders"}
            )
            assert sample == 1.0
            ns = argparse.Namespace(pipeline=None, json=False)
            assert await operate.status(rt.settings, rt.secrets, ns) == 0
            out = capsys.readouterr().out
            assert "STOPPED (schema change)" in out and "'quantity'" in out
            assert "Fix: map the column's new name" in out
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0

        # restarted without a fix: the pipeline stops again at once, nothing is sent
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await _until(
                lambda: getattr(rt.runners.get("orders"), "state", None) == "failed",
                "the stop at start",
            )
            assert _writes(emu) == before
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.pipeline_halts") == 1
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0

        # the operator fixes the mapping and restarts: the held changes flow
        text = setup.config.read_text()
        line = 'quantity       = { field = "Quantity", type = "integer" }\n'
        assert line in text
        fixed = "" if change == "drop" else line.replace("quantity      ", "qty           ")
        setup.config.write_text(text.replace(line, fixed))
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await wait_in_sync(setup, None)
            store = emu.state.store("Orders")
            notes = {str(r.get("parent_id")): r.get("Notes") for r in store.records.values()}
            assert all(notes[str(k)] == "held" for k in range(6, 11)), notes
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.dead_letters") == 0
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.pipeline_halts") == 0
            assert rt.runners["orders"].state == "running"
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0


@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_type_change_that_breaks_a_mapped_value_stops_the_pipeline(
    database: str, tmp_path: Path, capsys: Any, capture: str
) -> None:
    async with emulator() as emu:
        setup = await prepare(
            database, tmp_path, emu.url, rows=20, max_staleness="1s", capture=capture
        )
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await wait_in_sync(setup, None)
            await _sql(setup.dsn, "ALTER TABLE public.orders ALTER COLUMN quantity TYPE text")
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0
        # a restart (or a standby taking over) after the type change does not hide it
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await wait_in_sync(setup, None)
            before = _writes(emu)
            await _sql(
                setup.dsn,
                "UPDATE public.orders SET quantity = 'a dozen', notes = 'held'"
                " WHERE id BETWEEN 6 AND 10",
            )
            await _until(
                lambda: getattr(rt.runners.get("orders"), "state", None) == "failed",
                "the pipeline stop",
            )
            assert not task.done()
            assert _writes(emu) == before
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.dead_letters") == 0
            ns = argparse.Namespace(pipeline=None, json=False)
            assert await operate.status(rt.settings, rt.secrets, ns) == 0
            out = capsys.readouterr().out
            assert "STOPPED (schema change)" in out
            assert "column 'quantity' of public.orders changed type from integer to text" in out
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0

        # fixed by removing the mapping: the held changes flow
        text = setup.config.read_text()
        line = 'quantity       = { field = "Quantity", type = "integer" }\n'
        setup.config.write_text(text.replace(line, ""))
        rt = _runtime(setup.config)
        task = asyncio.create_task(rt.run())
        try:
            await wait_in_sync(setup, None)
            store = emu.state.store("Orders")
            notes = {str(r.get("parent_id")): r.get("Notes") for r in store.records.values()}
            assert all(notes[str(k)] == "held" for k in range(6, 11)), notes
            assert await _one(setup.dsn, "SELECT count(*) FROM connector.dead_letters") == 0
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 60) == 0
