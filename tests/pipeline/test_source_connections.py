"""The emitter's connections to the source database are bounded (session 16).

The 60-minute soak's fault-free logical-mode connector logged 845 "upsert call failed" with
``FATAL: sorry, too many clients already`` (``max_connections`` 200) from its 28th minute on.
Each upsert group with a row the mapping rejected asked the source's catalog whether a column
had changed type, on a connection of its own, before its HTTP call: all the groups of one plan
(hundreds after a mass update) connected at the same moment. A legacy server with fewer
connections to spare would refuse its own application too (invariant 9). Now the groups share
one catalog query at a time (``SourceConnections.column_types``), and every one-shot source
connection takes one of ``SOURCE_CONNECTIONS`` slots first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from connector.costs import CostModel
from connector.emitter_schema import SOURCE_CONNECTIONS, SourceConnections
from connector.zoho.client import ZohoClient

from .conftest import EngineFactory, execute, fetch, insert_sql

ROWS = 3_000
UPSERT_ONLY = CostModel(bulk_job_credits=10**9)


async def test_the_groups_of_one_plan_share_a_few_source_connections(
    legacy: str,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await execute(legacy, *insert_sql(ROWS))
    bad = list(range(50, ROWS + 1, 100))  # one row the mapping rejects in each group of 100
    await execute(legacy, "UPDATE public.orders SET amount = 'NaN' WHERE id = ANY(%s)", (bad,))

    real = psycopg.AsyncConnection.connect
    connecting = peak = calls = 0

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        """A connect that takes 50 ms, counting the one-shot ones (no keyword arguments: the
        reader, the watcher and the pool pass some) in progress at once."""
        nonlocal connecting, peak, calls
        if kwargs:
            return await real(*args, **kwargs)
        calls += 1
        connecting += 1
        peak = max(peak, connecting)
        try:
            await asyncio.sleep(0.05)
            return await real(*args, **kwargs)
        finally:
            connecting -= 1

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", slow_connect)
    engine = await make_engine(client, cost=UPSERT_ONLY)
    await asyncio.wait_for(engine.drain(), 120)

    letters = await fetch(legacy, "SELECT key::int FROM connector.dead_letters ORDER BY 1")
    assert [k for (k,) in letters] == bad  # every group had a rejected row: the path ran
    assert calls >= 1
    assert peak <= SOURCE_CONNECTIONS, f"{peak} one-shot source connections opened at once"
    assert calls <= 2 * (ROWS // 100) // 5, f"{calls} catalog connections for {ROWS // 100} groups"


async def test_each_caller_gets_an_answer_from_a_query_started_after_it_asked() -> None:
    """The shared query keeps the check exact: a type change committed before a caller saw a
    rejected row is in the answer it gets (a run already in progress when it asked is not
    enough), and a burst of callers costs at most two runs."""
    conns = SourceConnections()
    version = 0
    started: list[int] = []

    async def query() -> dict[str, str]:
        started.append(version)
        await asyncio.sleep(0.02)
        return {"amount": f"v{started[-1]}"}

    first = asyncio.create_task(conns.column_types(query))
    await asyncio.sleep(0.005)  # the first run is in progress
    version = 1  # "ALTER TABLE" commits; the callers below saw its effect
    burst = await asyncio.gather(*(conns.column_types(query) for _ in range(50)))
    assert (await first) == {"amount": "v0"}
    assert all(answer == {"amount": "v1"} for answer in burst)
    assert conns.queries == 2 and started == [0, 1]
