"""Hostile identifiers from the configuration cannot inject SQL: a source table, key column and
mapped columns with quotes, semicolons, spaces and non-ASCII letters, and a state schema with a
quote. `connector init`, a sync end to end through `connector run` (a subprocess, upserting into
the emulator) and `connector uninstall` all work, and a canary table survives — in both capture
modes."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.e2e.helpers import ConnectorProcess, emulator, wait_in_sync
from tests.security.common import acli, wait_crm, write_config

TABLE = 'Ord"ers; DROP TABLE canary; --'
KEY = 'k"ey; DROP TABLE canary; --'
NAME = "na'me\"; DELETE FROM canary; --"
EMAIL = "e-mail adresse ü"
NOTE = "nöte ✓ ') ; --"
SCHEMA = 'st"ate; DROP TABLE canary; --'


async def _canary_and_objects(dsn: str) -> tuple[int, int, int, int, bool]:
    """(canary rows, triggers on the table, publications, slots, state schema exists)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM public.canary),"
            " (SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal),"
            " (SELECT count(*) FROM pg_publication),"
            " (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),"
            " EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)",
            (sql.Identifier("public", TABLE).as_string(conn), SCHEMA),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3]), bool(row[4])


@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_hostile_identifiers_init_sync_uninstall(
    database: str, tmp_path: Path, capture: str
) -> None:
    table = sql.Identifier("public", TABLE)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in (KEY, NAME, EMAIL, NOTE))
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE public.canary (i int)")
        await conn.execute("INSERT INTO public.canary VALUES (1)")
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} ({} bigint PRIMARY KEY, {} text NOT NULL, {} text, {} text)"
            ).format(table, *(sql.Identifier(c) for c in (KEY, NAME, EMAIL, NOTE)))
        )
        await conn.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES (%s, %s, %s, %s), (%s, %s, %s, %s)").format(
                table, cols
            ),
            (1, 'it\'s "one"; --', "a@example.com", "ü'\"", 2, "two", None, None),
        )
    async with emulator() as emu:
        setup = write_config(
            tmp_path / "connector.toml",
            dsn=database,
            emulator_url=emu.url,
            table=f"public.{TABLE}",
            key=KEY,
            fields={
                NAME: ("Name", "text"),
                EMAIL: ("Customer_Email", "email"),
                NOTE: ("Notes", "textarea"),
            },
            capture=capture,
            schema=SCHEMA,
        )
        done = await acli(setup, "init")
        assert done.returncode == 0, done.stderr[-3000:]
        run = ConnectorProcess(setup, tmp_path)
        await run.start()
        try:
            await wait_crm(emu, lambda crm: set(crm) == {"1", "2"}, run, "initial sync")
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                await conn.execute(
                    sql.SQL("INSERT INTO {} ({}) VALUES (%s, %s, %s, %s)").format(table, cols),
                    (3, "three'; DROP TABLE canary; --", "c@example.com", "✓"),
                )
                await conn.execute(
                    sql.SQL("UPDATE {} SET {} = %s WHERE {} = 2").format(
                        table, sql.Identifier(NAME), sql.Identifier(KEY)
                    ),
                    ('two "updated"',),
                )
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {} = 1").format(table, sql.Identifier(KEY))
                )
            crm = await wait_crm(
                emu,
                lambda crm: set(crm) == {"2", "3"} and crm["2"]["Name"] == 'two "updated"',
                run,
                "the live changes",
            )
            assert crm["3"]["Name"] == "three'; DROP TABLE canary; --"
            assert crm["3"]["Customer_Email"] == "c@example.com"
            assert crm["3"]["Notes"] == "✓"
            await wait_in_sync(setup, run)  # `connector verify`'s code path, same identifiers
        finally:
            assert await run.stop() == 0, run.logs()[-3000:]
        done = await acli(setup, "uninstall")
        assert done.returncode == 0, done.stderr[-3000:]
    canary, triggers_left, publications, slots, state_exists = await _canary_and_objects(database)
    assert canary == 1
    assert (triggers_left, publications, slots) == (0, 0, 0)
    assert state_exists  # uninstall without --drop-state keeps the state
