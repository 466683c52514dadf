"""`connector init` in logical mode: creating the slot waits for every transaction holding an
xid anywhere in the cluster. It says what it waits for (pid, database, age) every few seconds,
and gives up with a clear error after ``--wait-timeout``; once the writer ends it completes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
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


def test_the_cli_has_wait_timeout() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "connector", "init", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "--wait-timeout" in out
