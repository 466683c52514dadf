"""The state schema: fresh install and upgrade path give the same catalog; init is idempotent."""

from __future__ import annotations

from typing import Any

import psycopg

from connector import db

CATALOG = """
SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = %s
ORDER BY 1, 3
"""
CONSTRAINTS = """
SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
WHERE connamespace = %s::regnamespace ORDER BY 1, 2
"""
INDEXES = "SELECT indexdef FROM pg_indexes WHERE schemaname = %s ORDER BY 1"


async def catalog(conn: psycopg.AsyncConnection[Any], schema: str) -> list[Any]:
    out: list[Any] = []
    for q in (CATALOG, CONSTRAINTS, INDEXES):
        cur = await conn.execute(q, (schema,))
        rows = await cur.fetchall()
        out.append([tuple(str(v).replace(schema, "<s>") for v in r) for r in rows])
    return out


async def test_fresh_install_equals_upgrade_path(empty_database: str) -> None:
    versions = [m.version for m in db.migrations()]
    assert versions == sorted(versions) and len(versions) >= 2
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await db.migrate(conn, "fresh") == versions
        # upgrade path: one version per `init` run, as an installation that followed releases
        for v in versions:
            assert await db.migrate(conn, "upgraded", target=v) == [v]
        assert await db.schema_version(conn, "upgraded") == versions[-1]
        assert await catalog(conn, "fresh") == await catalog(conn, "upgraded")


async def test_init_twice_is_a_noop(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        first = await db.migrate(conn, "connector")
        before = await catalog(conn, "connector")
        second = await db.migrate(conn, "connector")
        assert first and second == []
        assert await catalog(conn, "connector") == before


async def test_hostile_schema_name_is_quoted(empty_database: str) -> None:
    hostile = 'state"; DROP TABLE x; --'
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await db.migrate(conn, hostile)
        cur = await conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (hostile,))
        assert await cur.fetchone() == (1,)
        assert await db.schema_version(conn, hostile) == db.migrations()[-1].version
