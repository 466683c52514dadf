"""An upsert still in the CRM's hands when its process is killed must not land after a newer
version of the same record (invariant 2). Found by the 60-minute chaos soak (seed 1475118702):
two records written Rev 48 then 47 — the killed owner's request, held by an emulator latency
spike, was applied after the restarted process had sent the newer version. A new owner now waits
``crm.request_timeout`` before writing when the previous owner did not stop cleanly
(connector/runtime.py, ``_engine_after_grace``)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psycopg

from tests.e2e.helpers import ConnectorProcess, emulator, prepare, wait_in_sync

LATENCY_S = 6.0


async def _set_name(dsn: str, value: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE public.orders SET order_number = %s WHERE id = 7", (value,))


async def test_an_upsert_in_flight_when_the_owner_dies_never_lands_after_a_newer_one(
    database: str, tmp_path: Path
) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=20, max_staleness="1s")
        first = ConnectorProcess(setup, tmp_path, "first")
        await first.start()
        await first.wait_http("/readyz")
        await wait_in_sync(setup, first)

        # the CRM holds every request for 6 s; the owner sends "older" and is killed meanwhile
        emu.set_faults(latency="fixed", latency_ms=LATENCY_S * 1000)
        await _set_name(database, "older")
        await first.wait_metric("connector_api_in_flight_requests 1.0", timeout=30)
        held_since = time.monotonic()
        first.send(signal.SIGKILL)
        assert await first.stop() == -signal.SIGKILL
        emu.set_faults(latency="none", latency_ms=0.0)

        await _set_name(database, "newer")
        second = ConnectorProcess(setup, tmp_path, "second")
        await second.start()
        await wait_in_sync(setup, second, timeout=120)
        # let the killed owner's request finish in the CRM whatever the new owner did
        await asyncio.sleep(max(0.0, held_since + LATENCY_S + 1.0 - time.monotonic()))
        assert await second.stop() == 0
        logs = second.logs()

    (rec,) = [r for r in emu.records("Orders") if str(r.get("parent_id")) == "7"]
    names = [h["values"].get("Name") for h in emu.history("Orders", str(rec["id"]))]
    assert rec["Name"] == "newer", names
    assert "newer" in names and "older" not in names[names.index("newer") :], names
    assert "the previous owner did not stop cleanly" in logs
