"""`connector init` in logical mode: creating the slot waits for every transaction holding an
xid anywhere in the cluster. It says what it waits for (pid, database, age) every few seconds,
and gives up with a clear error after ``--wait-timeout``; once the writer ends it completes."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import psycopg
import pytest

from connector.capture import logical
from connector.errors import PermanentError

from .helpers import ORDERS_DDL, SCHEMA, cleanup, pipeline

ROOT = Path(__file__).resolve().parents[2]


def other_database(dsn: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = "postgres"
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


async def test_init_names_the_open_transaction_and_times_out(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = pipeline()
    async with (
        await psycopg.AsyncConnection.connect(database, autocommit=True) as conn,
        await psycopg.AsyncConnection.connect(other_database(database)) as writer,
    ):
        await conn.execute(ORDERS_DDL)
        # a writing transaction (it holds an xid) left open in another database
        await writer.execute("SELECT pg_current_xact_id()")
        pid = writer.info.backend_pid
        try:
            caplog.set_level(logging.WARNING, logger="connector.capture.logical")
            with pytest.raises(PermanentError) as info:
                await logical.install(conn, SCHEMA, cfg, wait_timeout=1.0, report_every=0.2)
            text = str(info.value)
            assert f"pid {pid}" in text and "'postgres'" in text and "--wait-timeout" in text
            waits = [r for r in caplog.records if "waits for open transactions" in r.message]
            assert waits, "no log line while waiting"
            assert f"pid {pid}" in waits[0].waiting_for  # type: ignore[attr-defined]
            assert "transaction open" in waits[0].waiting_for  # type: ignore[attr-defined]
            cur = await conn.execute("SELECT count(*) FROM pg_replication_slots")
            assert await cur.fetchone() == (0,)

            # without a limit it waits (saying so), and completes once the writer commits
            caplog.clear()
            task = asyncio.create_task(logical.install(conn, SCHEMA, cfg, report_every=0.2))
            for _ in range(300):
                if any("waits for open" in r.message for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            assert not task.done()
            await writer.commit()
            await asyncio.wait_for(task, 30)
            cur = await conn.execute("SELECT count(*) FROM pg_replication_slots")
            assert await cur.fetchone() == (1,)
        finally:
            await writer.rollback()
            await cleanup(database, cfg)


async def test_the_cli_init_gives_up_after_wait_timeout(database: str, tmp_path: Path) -> None:
    """`connector init --wait-timeout 1` (the real CLI): exit 1 naming the open transaction's
    pid and the fix; nothing is left half-installed that a second `init` could not finish."""
    from connector.config import load_settings
    from connector.demo import DEMO_ENV
    from tests.e2e.helpers import emulator, prepare

    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1, capture="logical")
        settings = load_settings(setup.config)
        cfg = settings.pipelines[0]
        await cleanup(database, cfg)  # as before a first init: no slot yet
        async with await psycopg.AsyncConnection.connect(other_database(database)) as writer:
            await writer.execute("SELECT pg_current_xact_id()")
            pid = writer.info.backend_pid
            env = {"PYTHONPATH": str(ROOT), **DEMO_ENV}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "connector",
                "--log-level",
                "warning",
                "init",
                "--config",
                str(setup.config),
                "--wait-timeout",
                "1",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            await writer.rollback()
        text = out.decode() + err.decode()
        assert proc.returncode == 1, text
        assert f"pid {pid}" in text and "--wait-timeout" in text and "connector init" in text
        # the writer is gone: a plain init completes
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connector", "init", "--config", str(setup.config), env=env
        )
        assert await asyncio.wait_for(proc.wait(), 120) == 0
