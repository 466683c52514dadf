"""``Engine.flush_all`` sends everything pending now; entries it sent that come back for a
retry (a transient failure) are flushed again after the backoff, not at their deadline (the
cause of ``test_postgres_restart_while_running`` failing under load: acknowledgements that
could not be stored during the restart came back after the test's single flush)."""

from __future__ import annotations

import asyncio

from connector.emulator.server import EmulatorHandle

from .conftest import EngineFactory, execute, insert_sql, make_client, wait_for


async def test_entries_of_a_flush_that_fail_transiently_are_flushed_again(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    async with make_client(emu) as client:
        engine = await make_engine(client)  # max_staleness 10 min: nothing leaves on its own
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(stop))
        try:
            await execute(legacy, *insert_sql(150))
            await wait_for(lambda: len(engine.coalescer.pending()) == 150)
            emu.set_faults(burst_429=40)  # more than the client's own retries
            engine.flush_all()
            await wait_for(lambda: len(emu.records("Orders")) == 150, timeout=60)
            await wait_for(lambda: engine.checkpoint.last_id >= 150, timeout=30)
            assert not task.done()
            assert client.retries >= 20  # both calls of the flush failed after their retries
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
