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
import collections
import dataclasses
from typing import Any

import pytest

from connector import engine_read, outbox
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
    await _backlog_of_four_versions(legacy, client, make_engine)
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
        await asyncio.wait_for((await make_engine(client, options=options)).run(stop), 60)
        checkpoints.append(await _checkpoint(legacy))
        assert checkpoints[-1] > checkpoints[-2], checkpoints  # progress on every restart
        if checkpoints[-1] >= last:
            break
    assert checkpoints[-1] >= last, checkpoints

    for key, names in _names_written(emu).items():
        first_v4 = next(i for i, n in enumerate(names) if n.endswith("v4"))
        assert all(n.endswith("v4") for n in names[first_v4:]), (key, names)
    assert all(rec["Name"].endswith("v4") for rec in crm_by_key(emu).values())


def _version(name: str) -> int:
    return int(name.rsplit(" v", 1)[1])


async def test_catchup_progresses_while_the_table_keeps_changing_and_no_ack_arrives(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the 60-minute trigger-mode soak on the read-ahead's first version (seed 9051,
    checkpoint still for 27 minutes while 23 restarts each acknowledged thousands of keys): the
    newest row read ahead was merged into the re-read batch, so the batch waited for that
    version's acknowledgement. Rows written between two restarts are newer again, so every
    run had to get each key's latest version acknowledged before being killed. Here no send is
    ever answered while catching up and every key changes between restarts: the checkpoint
    must still move on each restart (a version superseded by a row ahead of the reader needs no
    acknowledgement: that row is re-read), and nothing older than what the CRM had is written."""
    await execute(legacy, *insert_sql(KEYS, tag="v1"))
    await (await make_engine(client)).drain()
    for v in (2, 3):
        await execute(legacy, f"UPDATE public.orders SET name = replace(name, 'v{v - 1}', 'v{v}')")
    await execute(
        legacy, "UPDATE connector.outbox SET captured_at = captured_at - interval '1 hour'"
    )
    await _previous_owner_sent_newest(legacy, client)  # v3 in the CRM, key_state says v1

    real_read, real_upsert = outbox.read_batch, client.upsert
    options = dataclasses.replace(FAST, read_limit=READ_LIMIT)
    checkpoints = [await _checkpoint(legacy)]
    for v in (4, 5, 6):  # the table changes before every restart
        await execute(legacy, f"UPDATE public.orders SET name = replace(name, 'v{v - 1}', 'v{v}')")
        reads = 0
        third_read_done = asyncio.Event()

        async def read_three(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            if reads > 3:  # three batches read, planned and checkpointed: killed here
                third_read_done.set()
                await asyncio.Event().wait()
            return await real_read(*args, **kwargs)

        async def never_answered(*args: Any, **kwargs: Any) -> Any:
            await asyncio.Event().wait()

        monkeypatch.setattr(outbox, "read_batch", read_three)
        monkeypatch.setattr(client, "upsert", never_answered)
        task = asyncio.create_task(
            (await make_engine(client, options=options)).run(asyncio.Event())
        )
        await asyncio.wait_for(third_read_done.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        checkpoints.append(await _checkpoint(legacy))
        assert checkpoints[-1] > checkpoints[-2], checkpoints  # progress on every restart

    monkeypatch.setattr(outbox, "read_batch", real_read)
    monkeypatch.setattr(client, "upsert", real_upsert)
    await (await make_engine(client)).drain()
    for key, names in _names_written(emu).items():
        versions = [_version(n) for n in names]
        assert versions == sorted(versions), (key, names)  # never back to an older version
        assert versions[-1] == 6, (key, names)


def _spy_newest_rows(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Count, per key, how often the catch-up read-ahead asked for its newest row."""
    asked: collections.Counter[str] = collections.Counter()
    real = outbox.newest_rows

    async def spy(conn: Any, schema: str, pipeline: Any, keys: Any, exclude: Any = ()) -> Any:
        asked.update(keys)
        return await real(conn, schema, pipeline, keys, exclude)

    monkeypatch.setattr(outbox, "newest_rows", spy)
    return asked


async def _backlog_of_four_versions(legacy: str, client: ZohoClient, make_engine: Any) -> None:
    """v1 acknowledged; v2, v3, v4 of every key in the outbox, past their deadline; the killed
    previous owner sent v4 and did not store the acknowledgement."""
    await execute(legacy, *insert_sql(KEYS, tag="v1"))
    await (await make_engine(client)).drain()
    for old, new in (("v1", "v2"), ("v2", "v3"), ("v3", "v4")):
        await execute(legacy, f"UPDATE public.orders SET name = replace(name, '{old}', '{new}')")
    # a backlog long past its deadline: the planner sends what it reads at once
    await execute(
        legacy, "UPDATE connector.outbox SET captured_at = captured_at - interval '1 hour'"
    )
    await _previous_owner_sent_newest(legacy, client)  # v4 everywhere; key_state still says v1


def _never_back_to_older(emu: EmulatorHandle, last: int) -> None:
    for key, names in _names_written(emu).items():
        versions = [_version(n) for n in names]
        assert versions == sorted(versions), (key, names)
        assert versions[-1] == last, (key, names)


@pytest.mark.parametrize("acked_cache", [10_000, 1])
async def test_each_key_is_read_ahead_once_per_catchup(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
    acked_cache: int,
) -> None:
    """Session 16's 60-minute trigger-mode soak: one catch-up read 386,786 rows ahead for
    48,000 keys, because every batch asked again for the newest row of every key it held,
    though the first answer already was newer than anything a previous owner could have sent.
    Each key is now looked up once per catch-up. Three batches hold v2 of the 300 keys, three
    v3, three v4: before, each key was looked up three times. Never stale either way, also when
    the acknowledged stamps leave memory at once (``acked_cache = 1``: an older version read
    later is dropped against the stamp reloaded from key_state)."""
    await _backlog_of_four_versions(legacy, client, make_engine)
    asked = _spy_newest_rows(monkeypatch)
    options = dataclasses.replace(FAST, read_limit=READ_LIMIT, acked_cache=acked_cache)
    await asyncio.wait_for((await make_engine(client, options=options)).drain(), 60)
    assert len(asked) == KEYS
    assert max(asked.values()) == 1, asked.most_common(3)
    _never_back_to_older(emu, 4)


async def test_keys_beyond_the_remembered_bound_are_looked_up_again(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keys remembered in one catch-up are bounded (``READ_AHEAD_REMEMBERED``, memory):
    beyond the bound a key is looked up in every batch that holds it, as before. Correct
    either way."""
    monkeypatch.setattr(engine_read, "READ_AHEAD_REMEMBERED", READ_LIMIT)
    await _backlog_of_four_versions(legacy, client, make_engine)
    asked = _spy_newest_rows(monkeypatch)
    options = dataclasses.replace(FAST, read_limit=READ_LIMIT)
    await asyncio.wait_for((await make_engine(client, options=options)).drain(), 60)
    counts = sorted(asked.values())
    assert counts.count(1) == READ_LIMIT  # the first batch's keys, remembered
    assert counts[-1] == 3  # the others: once per batch holding one of their versions
    _never_back_to_older(emu, 4)


async def test_a_dead_lettered_newest_version_still_drops_older_ones_read_later(
    legacy: str,
    emu: EmulatorHandle,
    client: ZohoClient,
    make_engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reasoning behind looking a key up once, where it is thinnest: the newest version
    read ahead is rejected by the CRM (dead-lettered), its stamp leaves memory at once
    (``acked_cache = 1``), and the key's older versions come in later batches without a second
    look-up. key_state holds the dead-lettered version, so they are dropped: the CRM keeps v3,
    what the previous owner sent, and never gets v2 after it."""
    await execute(legacy, *insert_sql(KEYS, tag="v1"))
    await (await make_engine(client)).drain()
    for old, new in (("v1", "v2"), ("v2", "v3")):
        await execute(legacy, f"UPDATE public.orders SET name = replace(name, '{old}', '{new}')")
    await _previous_owner_sent_newest(legacy, client)  # v3 in the CRM; key_state says v1
    await execute(legacy, "UPDATE public.orders SET name = replace(name, 'v3', 'v4')")
    await execute(legacy, "UPDATE public.orders SET name = name || repeat('x', 300) WHERE id = 7")
    await execute(
        legacy, "UPDATE connector.outbox SET captured_at = captured_at - interval '1 hour'"
    )
    asked = _spy_newest_rows(monkeypatch)
    options = dataclasses.replace(FAST, read_limit=READ_LIMIT, acked_cache=1)
    await asyncio.wait_for((await make_engine(client, options=options)).drain(), 60)
    assert asked["7"] == 1
    letters = await fetch(
        legacy, "SELECT key FROM connector.dead_letters WHERE pipeline = 'orders' AND key = '7'"
    )
    assert letters, "the over-long v4 of key 7 was not dead-lettered"
    names = _names_written(emu)["7"]
    first_v3 = next(i for i, n in enumerate(names) if n.endswith("v3"))
    assert not any(n.endswith("v2") for n in names[first_v3:]), names
    assert all(
        _version(n) == 4 for k, ns in _names_written(emu).items() if k != "7" for n in ns[-1:]
    )
