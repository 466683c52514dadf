"""Least privilege, as docs/security.md documents it: the statements of its "Trigger mode" and
"Logical mode" blocks are taken from the document itself and run by the administrator; then
`connector init` and `connector run` (a subprocess) run as the connector's role — LOGIN,
NOSUPERUSER, no CREATE on the database, REPLICATION only in logical mode — and changes that the
legacy application makes (its own role, no new privilege) reach the emulator."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connector.capture import logical
from connector.demo import demo_config
from connector.demo_workload import create_orders
from connector.pgembed import free_port
from tests.e2e.helpers import ROOT, ConnectorProcess, Setup, change_orders, emulator, wait_in_sync
from tests.security.common import acli

DOC = ROOT / "docs" / "security.md"


def documented_sql(heading: str) -> str:
    """The first ```sql block after ``heading`` in docs/security.md."""
    text = DOC.read_text()
    start = text.index(heading)
    m = re.search(r"```sql\n(.*?)```", text[start:], re.S)
    assert m, f"no SQL block under {heading!r}"
    return m.group(1)


def with_role(dsn: str, role: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["user"] = role
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


async def _origins(admin: str, origin: str) -> int:
    async with await psycopg.AsyncConnection.connect(admin) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = %s", (origin,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _drop_roles(admin: str, roles: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
            (roles,),
        )
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = current_database() AND NOT active"
        )
        idents = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
        await conn.execute(sql.SQL("DROP OWNED BY {}").format(idents))
        await conn.execute(sql.SQL("DROP ROLE {}").format(idents))


ORIGIN_GRANTS = "### Optional: faster logical capture"
FALLBACK_LINE = "does not filter its own writes by replication origin"


@pytest.mark.parametrize(
    ("capture", "heading", "optional"),
    [
        ("triggers", "## Trigger mode", None),
        ("logical", "## Logical mode", None),
        ("logical", "## Logical mode", ORIGIN_GRANTS),
    ],
    ids=["triggers", "logical", "logical-origin"],
)
async def test_init_and_run_as_the_documented_role(
    empty_database: str, tmp_path: Path, capture: str, heading: str, optional: str | None
) -> None:
    admin = empty_database
    dbname = psycopg.conninfo.conninfo_to_dict(admin)["dbname"]
    assert isinstance(dbname, str)
    tag = uuid.uuid4().hex[:8]
    origin = logical.origin_name(logical.object_name("connector", "orders"))
    runtime, owner, app = f"connector_app_{tag}", f"legacy_owner_{tag}", f"legacy_app_{tag}"
    # the legacy side: a table owned by its owner, written by the application's own role
    await create_orders(admin, 80)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app)))
        await conn.execute(
            sql.SQL("ALTER TABLE public.orders OWNER TO {}").format(sql.Identifier(owner))
        )
        await conn.execute(
            sql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {app};"
                " GRANT USAGE ON SEQUENCE public.orders_id_seq TO {app}"
            ).format(app=sql.Identifier(app))
        )
    try:
        # the administrator runs the documented statements, verbatim but for names
        statements = documented_sql(heading)
        if optional is not None:
            statements += documented_sql(optional)
        statements = re.sub(r"\s+PASSWORD '[^']*'", "", statements)  # trust auth in tests
        statements = statements.replace("connector_app", runtime)
        statements = statements.replace("ON DATABASE legacy", f'ON DATABASE "{dbname}"')
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(statements)  # type: ignore[arg-type]
            # origins are per server: one left by another test would mask the "created" check
            await conn.execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin"
                " WHERE roname = %s",
                (origin,),
            )
            cur = await conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls,"
                " has_database_privilege(rolname, current_database(), 'CREATE')"
                " FROM pg_roles WHERE rolname = %s",
                (runtime,),
            )
            attrs = await cur.fetchone()
        assert attrs == (False, False, False, capture == "logical", False, False)

        async with emulator() as emu:
            port = free_port()
            config = tmp_path / "connector.toml"
            config.write_text(
                demo_config(
                    dsn=with_role(admin, runtime),
                    emulator_url=emu.url,
                    port=port,
                    max_staleness="1s",
                    capture=capture,
                )
                .replace('level = "warning"', 'level = "info"')
                # the option is off by default; on, the capture filters by origin or says why not
                .replace('capture = "logical"', 'capture = "logical"\nfilter_own_writes = true')
            )
            setup = Setup(with_role(admin, runtime), config, port, emu.url)
            done = await acli(setup, "init")
            assert done.returncode == 0, done.stderr[-3000:]
            if capture == "triggers":
                # ENABLE ALWAYS is the owner's: init says which statement the owner runs
                assert "ENABLE ALWAYS TRIGGER" in done.stderr, done.stderr[-3000:]
            if capture == "logical":  # the origin exists only with the optional grants
                assert await _origins(admin, origin) == int(optional is not None)
            run = ConnectorProcess(setup, tmp_path)
            await run.start()
            try:
                await run.wait_http("/readyz")
                await wait_in_sync(setup, run)  # the initial sync, read as the runtime role
                await change_orders(with_role(admin, app), 40, seed=7)
                await wait_in_sync(setup, run)  # captured and sent under least privilege
                assert "permission denied" not in run.logs()
                if capture == "logical":  # filtering by origin, or saying why not
                    assert (FALLBACK_LINE in run.logs()) == (optional is None), run.logs()[-3000:]
            finally:
                assert await run.stop() == 0, run.logs()[-3000:]
        async with await psycopg.AsyncConnection.connect(admin) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'connector' AND c.relkind = 'r'"
                " AND pg_get_userbyid(c.relowner) <> %s",
                (runtime,),
            )
            foreign: Any = await cur.fetchone()
            assert foreign == (0,)  # every state table was created by the runtime role
        if capture == "triggers":
            # only the table's owner can drop the trigger (the documented step), then
            # `connector uninstall` as the runtime role removes the rest
            async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT tgname FROM pg_trigger"
                    " WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal"
                )
                names = [str(r[0]) for r in await cur.fetchall()]
                assert len(names) == 2  # the row trigger and the TRUNCATE trigger
                async with conn.transaction():
                    await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
                    for name in names:
                        await conn.execute(
                            sql.SQL("DROP TRIGGER {} ON public.orders").format(sql.Identifier(name))
                        )
        done = await acli(setup, "uninstall")
        assert done.returncode == 0, done.stderr[-3000:]
        async with await psycopg.AsyncConnection.connect(admin) as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal),"
                " (SELECT count(*) FROM pg_publication),"
                " (SELECT count(*) FROM pg_replication_slots"
                "  WHERE database = current_database())"
            )
            assert await cur.fetchone() == (0, 0, 0)
        if optional is not None:
            # without EXECUTE on pg_replication_origin_drop the origin stays (documented): the
            # administrator drops it
            assert await _origins(admin, origin) == 1
            async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
                await conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))
        assert await _origins(admin, origin) == 0
    finally:
        await _drop_roles(admin, [runtime, app, owner])
