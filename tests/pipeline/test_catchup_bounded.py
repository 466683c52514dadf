"""Catching up after a restart makes progress whatever the backlog (issue 14 §1).

The 60-minute soaks of session 4 stalled in both capture modes: the checkpoint stopped moving
and every restart re-read the same 1.5-2 million events. The catch-up guard of the time (hold
each key re-read from the checkpoint until the reader reaches its newest committed row) kept
every batch unresolved until the reader had read the whole backlog; an owner killed or
restarted more often than it takes to read that far started again from the same checkpoint,
for ever. Now the newest committed row of each key is read ahead with the batch, so the batch
resolves as soon as that version is acknowledged, and each restart moves the checkpoint on.

Deterministic: each engine reads three batches (a third of the versions that are in the
outbox) and is stopped, as a chaos kill would.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from connector import outbox
from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import FAST, EngineFactory, crm_by_key, execute, fetch, insert_sql
from .test_stale_after_restart import _names_written, _previous_owner_sent_newest

KEYS = 300
READ_LIMIT = 100  # one transaction of KEYS rows takes three reads


async def _checkpoint(legacy: str) -> int:
    rows = await fetch(
        legacy, "SELECT last_id FROM connector.checkpoints WHERE pipeline = 'orders'"
    )
    return int(rows[0][0]) if rows else 0


async def test_each_restart_moves_the_checkpoint_while_catching_up(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await execute(legacy, *insert_sql(KEYS, tag="v1"))
    await make_engine(client).drain()
    for old, new in (("v1", "v2"), ("v2", "v3"), ("v3", "v4")):
        await execute(legacy, f"UPDATE public.orders SET name = replace(name, '{old}', '{new}')")
    # a backlog long past its deadline: the planner sends what it reads at once
    await execute(
        legacy, "UPDATE connector.outbox SET captured_at = captured_at - interval '1 hour'"
    )
    await _previous_owner_sent_newest(legacy, client)  # v4 everywhere; key_state still says v1
    last = (await fetch(legacy, "SELECT max(id) FROM connector.outbox"))[0][0]

    real_read = outbox.read_batch
    options = dataclasses.replace(FAST, read_limit=READ_LIMIT)
    checkpoints = [await _checkpoint(legacy)]
    for _ in range(9):  # 9 x 300 rows read cover the 900 rows of v2..v4 three times over
        stop = asyncio.Event()
        reads = 0

        async def read_then_stop(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            if reads == 3:
                stop.set()  # killed after this read, as the chaos runner does
            return await real_read(*args, **kwargs)

        monkeypatch.setattr(outbox, "read_batch", read_then_stop)
        await asyncio.wait_for(make_engine(client, options=options).run(stop), 60)
        checkpoints.append(await _checkpoint(legacy))
        assert checkpoints[-1] > checkpoints[-2], checkpoints  # progress on every restart
        if checkpoints[-1] >= last:
            break
    assert checkpoints[-1] >= last, checkpoints

    for key, names in _names_written(emu).items():
        first_v4 = next(i for i, n in enumerate(names) if n.endswith("v4"))
        assert all(n.endswith("v4") for n in names[first_v4:]), (key, names)
    assert all(rec["Name"].endswith("v4") for rec in crm_by_key(emu).values())
