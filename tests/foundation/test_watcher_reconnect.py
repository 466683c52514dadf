"""The outbox watcher's reconnect goes through the one retry policy (connector/dbpolicy.py): a
killed connection is logged once (class and SQLSTATE, never the message) and the watcher polls
again on a new connection."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from connector import outbox

LOST = "outbox watcher connection lost; reconnecting (AdminShutdown/57P01)"


async def test_the_watcher_reconnects_after_its_connection_is_killed(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    def lost() -> bool:
        return any(r.getMessage() == LOST for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="connector.outbox"):
        async with (
            outbox.OutboxWatcher(
                database,
                "connector",
                "orders",
                lambda: outbox.START,
                min_interval=0.01,
                max_interval=0.02,
            ) as watcher,
            await psycopg.AsyncConnection.connect(database, autocommit=True) as admin,
        ):
            async with asyncio.timeout(20):
                while not lost():
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND backend_type = 'client backend'"
                    )
                    await asyncio.sleep(0.05)
                polls = watcher.polls
                while watcher.polls < polls + 3:  # polling again, on a new connection
                    watcher.event.clear()  # as the reader does: the watcher polls again
                    await asyncio.sleep(0.02)
    assert any(getattr(r, "pipeline", None) == "orders" for r in caplog.records if lost())
