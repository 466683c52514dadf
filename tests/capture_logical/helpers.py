"""Shared helpers for the logical-capture tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg

from connector.capture import logical
from connector.config import PipelineConfig
from tests.capture.helpers import dead_letters

SCHEMA = "connector"
ORDERS_DDL = "CREATE TABLE orders (id int PRIMARY KEY, v text)"


def pipeline(
    table: str = "orders", key: str = "id", fields: tuple[str, ...] = ("v",), **kw: Any
) -> PipelineConfig:
    return PipelineConfig(
        name="orders",
        source_table=table,
        key_column=key,
        module="Orders",
        capture="logical",
        fields={f: f"F_{f}" for f in fields},
        **kw,
    )


async def outbox(dsn: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute(
            "SELECT id, op, key, version, source_xid::text AS source_xid, source_lsn::text AS"
            " source_lsn, row::text AS row_text, row FROM connector.outbox ORDER BY id"
        )
        return await cur.fetchall()


async def wait_for(pred: Callable[[], Awaitable[bool]], what: str, deadline: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not await pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_rows(dsn: str, n: int, deadline: float = 30.0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal rows
        rows = await outbox(dsn)
        return len(rows) >= n

    await wait_for(enough, f"{n} outbox rows", deadline)
    return rows


@contextlib.asynccontextmanager
async def running(capture: logical.LogicalCapture) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(capture.run(stop), name="logical-capture")
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            if not task.done():
                task.cancel()


async def cleanup(dsn: str, cfg: PipelineConfig) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await logical.uninstall(conn, SCHEMA, cfg)


@contextlib.asynccontextmanager
async def installed(
    dsn: str, cfg: PipelineConfig, *ddl: str
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to ``dsn`` after running ``ddl`` and installing the logical
    capture of ``cfg``; the capture is uninstalled on the way out."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in ddl:
            await conn.execute(statement)
        await logical.install(conn, SCHEMA, cfg)
        try:
            yield conn
        finally:
            await cleanup(dsn, cfg)


async def dead_letters_of(dsn: str) -> list[dict[str, Any]]:
    """The dead letters in ``dsn``, read on a connection of their own."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await dead_letters(conn)
