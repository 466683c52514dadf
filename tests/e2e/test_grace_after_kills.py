"""Kills a few seconds apart must not keep a pipeline from writing (issue 14 §1: the chaos
stack's outbox lag of 470 s against < 45 s without faults). A new owner after an unclean stop
waits ``crm.request_timeout`` before its first CRM write (requests of the killed owner may
still land: tests/e2e/test_inflight_after_kill.py). Each restart used to wait the full timeout
again, although an owner killed during its own wait never wrote: in the 10-minute soak of seed
9051 (triggers) 15 kills and PostgreSQL restarts cost 15 × 20 s, the connector's CPU stayed
idle and its outbox lag peaked at 204 s. Now the wait ends ``request_timeout`` after the last
takeover that followed an owner that *wrote* (``checkpoints.crm_quiet_until``)."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path

import psycopg

from tests.e2e.helpers import ConnectorProcess, Setup, emulator, prepare, wait_in_sync

WAITING = "the previous owner did not stop cleanly"


async def _quiet_until(dsn: str) -> datetime | None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT crm_quiet_until FROM connector.checkpoints WHERE pipeline = 'orders'"
        )
        row = await cur.fetchone()
    return None if row is None else row[0]


async def _started_waiting(proc: ConnectorProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while WAITING not in proc.logs():
        proc.check_alive()
        assert time.monotonic() < deadline, proc.logs()[-3000:]
        await asyncio.sleep(0.1)


async def _kill(proc: ConnectorProcess) -> None:
    proc.send(signal.SIGKILL)
    assert await proc.stop() == -signal.SIGKILL


async def test_an_owner_killed_during_its_wait_does_not_restart_the_wait(
    database: str, tmp_path: Path
) -> None:
    async with emulator() as emu:
        setup: Setup = await prepare(database, tmp_path, emu.url, rows=20, max_staleness="1s")
        first = ConnectorProcess(setup, tmp_path, "first")
        await first.start()
        await first.wait_http("/readyz")
        await wait_in_sync(setup, first)
        assert await _quiet_until(database) is None  # it writes: nothing to wait for
        await _kill(first)  # it wrote: the next owner waits the full request_timeout

        second = ConnectorProcess(setup, tmp_path, "second")
        await second.start()
        await _started_waiting(second)
        deadline = await _quiet_until(database)
        assert deadline is not None
        await _kill(second)  # killed during its wait: it never wrote

        third = ConnectorProcess(setup, tmp_path, "third")
        await third.start()
        await _started_waiting(third)  # the first owner's requests may still land: it waits
        assert await _quiet_until(database) == deadline  # ... but only until the same time
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("UPDATE public.orders SET order_number = 'after' WHERE id = 3")
        await wait_in_sync(setup, third, timeout=120)
        assert await _quiet_until(database) is None  # writing: a successor waits in full
        assert await third.stop() == 0
