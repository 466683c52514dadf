"""Best-effort state writes (issue 20: one helper, one log line): a runner's bookkeeping write
that fails is logged, without the error's message, and does not stop the runner."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from connector.errors import SchemaChanged
from connector.runtime import PipelineRunner

SCHEMA = "connector"


def _runner(pool: AsyncConnectionPool[Any], dsn: str) -> PipelineRunner:
    runtime: Any = SimpleNamespace(
        pool=pool,
        schema=SCHEMA,
        owner="test-owner",
        lease_retry=1.0,
        secrets=SimpleNamespace(state_dsn=dsn),
    )
    pipeline: Any = SimpleNamespace(name="orders")
    return PipelineRunner(runtime, pipeline)


async def test_failing_state_writes_are_logged_and_the_runner_carries_on(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        # the bookkeeping tables are gone: every write fails with a database error
        await conn.execute("DROP TABLE connector.pipeline_halts, connector.checkpoints CASCADE")
    async with AsyncConnectionPool(
        database, kwargs={"autocommit": True}, min_size=1, open=False
    ) as pool:
        runner = _runner(pool, database)
        secret = "column-secret-value"
        with caplog.at_level(logging.WARNING, logger="connector.dbpolicy"):
            await runner._record_halt(SchemaChanged("orders", "amount", secret))
            await runner._record_clean_stop()
    lines = [r for r in caplog.records if r.name == "connector.dbpolicy"]
    assert [r.getMessage() for r in lines] == [
        "state write failed: the halt's reason (UndefinedTable/42P01); carrying on",
        "state write failed: the clean stop (UndefinedTable/42P01); carrying on",
    ]
    assert all(getattr(r, "pipeline", None) == "orders" for r in lines)
    assert secret not in caplog.text


async def test_an_unreachable_database_is_logged_and_the_runner_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = "host=127.0.0.1 port=1 dbname=x user=x password=hunter2 connect_timeout=1"
    async with AsyncConnectionPool(dsn, min_size=1, timeout=0.5, open=False) as pool:
        runner = _runner(pool, dsn)
        with caplog.at_level(logging.WARNING, logger="connector.dbpolicy"):
            await runner._record_clean_stop()
    assert "state write failed: the clean stop (PoolTimeout); carrying on" in caplog.text
    assert "hunter2" not in caplog.text
