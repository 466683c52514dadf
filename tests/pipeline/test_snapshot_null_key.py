"""Initial sync of a table holding rows whose key is NULL: those rows are contained as
MISSING_KEY dead letters (invariant 8, as capture does in both modes), once, and the sync of
every other row goes on (it used to stop the whole process on the outbox's NOT NULL key)."""

from __future__ import annotations

from connector.emulator.server import EmulatorHandle

from .conftest import EngineFactory, execute, fetch, insert_sql, make_client, pipeline_config

NULLABLE_KEY = (
    "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey;"
    " ALTER TABLE public.orders ALTER COLUMN id DROP NOT NULL;"
    " ALTER TABLE public.orders ADD CONSTRAINT orders_id_key UNIQUE (id)"
)
FORGET_CAPTURE = "DELETE FROM connector.outbox; DELETE FROM connector.dead_letters"


async def _letters(dsn: str) -> list[tuple[str, str, str, str]]:
    rows = await fetch(
        dsn,
        "SELECT error_code, status, payload->>'name', error_message FROM connector.dead_letters"
        " WHERE pipeline = 'orders' ORDER BY payload->>'name'",
    )
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


async def test_rows_without_a_key_become_dead_letters_and_the_sync_goes_on(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, NULLABLE_KEY)
    await execute(legacy, *insert_sql(300))
    await execute(
        legacy, "UPDATE public.orders SET id = NULL, name = 'keyless ' || id WHERE id > 298"
    )
    # the rows were there before capture: the initial sync is the only way they are read
    await execute(legacy, FORGET_CAPTURE)
    pipeline = pipeline_config(snapshot="auto", snapshot_chunk_size=100)
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline)).drain()

    status = await fetch(legacy, "SELECT status, rows_read FROM connector.snapshots")
    assert status == [("done", 298)]
    crm = {str(r["parent_id"]) for r in emu.records("Orders")}
    assert crm == {str(i) for i in range(1, 299)}
    letters = await _letters(legacy)
    assert [(c, s, n) for c, s, n, _ in letters] == [
        ("MISSING_KEY", "open", "keyless 299"),
        ("MISSING_KEY", "open", "keyless 300"),
    ]
    assert "key column 'id'" in letters[0][3] and "NULL" in letters[0][3]

    # a restarted initial sync reads the rows again but adds no second open letter
    await execute(legacy, "UPDATE connector.snapshots SET status = 'failed'")
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline)).drain()
    assert len(await _letters(legacy)) == 2


async def test_a_table_of_keyless_rows_only_finishes_with_letters(
    legacy: str, emu: EmulatorHandle, make_engine: EngineFactory
) -> None:
    await execute(legacy, NULLABLE_KEY)
    await execute(legacy, *insert_sql(3))
    await execute(legacy, "UPDATE public.orders SET id = NULL, name = 'keyless ' || id")
    await execute(legacy, FORGET_CAPTURE)
    async with make_client(emu) as client:
        await (await make_engine(client, pipeline_config(snapshot="auto"))).drain()
    assert emu.records("Orders") == []
    assert [n for _, _, n, _ in await _letters(legacy)] == [
        "keyless 1",
        "keyless 2",
        "keyless 3",
    ]
    status = await fetch(legacy, "SELECT status FROM connector.snapshots")
    assert status == [("done",)]
