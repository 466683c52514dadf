"""Outbox retention in a real `connector run`: ``pipelines.retention`` acts (acknowledged
events older than it are deleted, the metrics move), events inside the window stay, and
`connector replay` refuses a range that was pruned, naming the oldest event kept."""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from connector import operate_replay
from connector.config import load_settings, resolve_secrets
from connector.demo import DEMO_ENV
from connector.errors import ConfigError
from tests.e2e.helpers import (
    ConnectorProcess,
    change_orders,
    connector_running,
    emulator,
    prepare,
    wait_in_sync,
)


async def _outbox_rows(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM connector.outbox WHERE pipeline = 'orders'")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def _metric(body: str, name: str) -> float:
    m = re.search(rf'^{name}\{{pipeline="orders"\}} (\S+)$', body, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


async def _wait(pred: object, what: str, run: ConnectorProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.check_alive()
        if await pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} never happened\n{run.logs()[-3000:]}")


def _with_retention(config: Path, retention: str) -> None:
    text = config.read_text()
    text, n = re.subn(
        r'^(max_staleness = "[^"]*")$', rf'\1\nretention = "{retention}"', text, flags=re.M
    )
    assert n == 1
    config.write_text(text)


@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_retention_prunes_acknowledged_events_in_a_real_run(
    database: str, tmp_path: Path, capture: str
) -> None:
    async with emulator() as emu:
        setup = await prepare(
            database, tmp_path, emu.url, rows=60, max_staleness="1s", capture=capture
        )
        _with_retention(setup.config, "2s")
        started = datetime.now(UTC)
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)
            # a busy connector: changes keep coming while retention passes run every second
            await change_orders(setup.dsn, 300, seed=3)
            await wait_in_sync(setup, run)

            async def empty() -> bool:
                return await _outbox_rows(setup.dsn) == 0

            await _wait(empty, "the outbox emptied by retention", run)
            async with await psycopg.AsyncConnection.connect(setup.dsn) as conn:
                cur = await conn.execute("SELECT rows_pruned FROM connector.outbox_pruned")
                row = await cur.fetchone()
                assert row is not None and int(row[0]) > 60  # the snapshot and the changes
            _, body = await run.get("/metrics")
            assert _metric(body, "connector_outbox_pruned_events_total") == int(row[0])
            assert _metric(body, "connector_outbox_retention_seconds") == 2.0
            assert re.search(r"^connector_outbox_bytes \d", body, re.M)

            async def gauges() -> bool:
                _, body = await run.get("/metrics")
                return _metric(body, "connector_outbox_events") == 0.0

            await _wait(gauges, "connector_outbox_events at 0", run)
            assert "outbox retention: pruned" in run.logs()

            # the range was pruned: replay says so and names what is left
            settings = load_settings(setup.config)
            secrets = resolve_secrets(settings, dict(DEMO_ENV))
            args = argparse.Namespace(
                pipeline="orders",
                from_offset=None,
                since=started.isoformat(),
                to=None,
                key=None,
                dry_run=True,
            )
            with pytest.raises(ConfigError) as err:
                await operate_replay.replay(settings, secrets, args)
            msg = str(err.value)
            assert msg.startswith("--since: replay orders:")
            assert "already pruned by outbox retention" in msg
            assert "retention = 2s" in msg and "the outbox holds no event" in msg
            args.since, args.from_offset = None, 1
            with pytest.raises(ConfigError, match="--from-offset: replay orders: offset 1 "):
                await operate_replay.replay(settings, secrets, args)

            # a new change: kept for the retention window, then the oldest kept is named
            await change_orders(setup.dsn, 1, seed=4)
            await wait_in_sync(setup, run)
            with pytest.raises(ConfigError, match=r"the oldest event kept is offset \d+"):
                await operate_replay.replay(settings, secrets, args)
            args.from_offset = None
            args.since = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            assert (
                await operate_replay.replay(settings, secrets, args) == 0
            )  # after the pruned range


async def test_default_retention_keeps_acknowledged_events(database: str, tmp_path: Path) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=30, max_staleness="1s")
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)

            async def counted() -> bool:
                _, body = await run.get("/metrics")
                return _metric(body, "connector_outbox_events") == 30.0

            await _wait(counted, "connector_outbox_events at 30", run, timeout=90)
            _, body = await run.get("/metrics")
            assert _metric(body, "connector_outbox_pruned_events_total") == 0.0
            assert _metric(body, "connector_outbox_retention_seconds") == 7 * 86400
            assert await _outbox_rows(setup.dsn) == 30
