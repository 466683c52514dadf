"""Connections, the state schema and its migrations.

Migrations are the numbered ``sql/NNNN_name.sql`` files, applied in order by ``connector init``
under an advisory lock, each in its own transaction, recorded in ``schema_migrations``. The
schema name comes from configuration and is always substituted as a quoted identifier.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

log = logging.getLogger(__name__)

_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


def migrations() -> list[Migration]:
    out: list[Migration] = []
    for entry in resources.files("connector.sql").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    out.sort(key=lambda m: m.version)
    return out


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory-lock key from names (schema, purpose, pipeline)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def render(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(schema=sql.Identifier(schema))


async def migrate(
    conn: psycopg.AsyncConnection[Any], schema: str, target: int | None = None
) -> list[int]:
    """Apply pending migrations up to ``target`` (all by default). Returns the versions applied.

    Idempotent: a second run applies nothing. Serialised by an advisory lock, so two processes
    running ``init`` at once do not race.
    """
    applied: list[int] = []
    ident = sql.Identifier(schema)
    await conn.set_autocommit(True)
    lock = advisory_key(schema, "migrate")
    await conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
    try:
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is None:
            # only then: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
            # schema exists, which a least-privilege role does not have
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        cur = await conn.execute(sql.SQL("SELECT version FROM {}.schema_migrations").format(ident))
        done = {int(r[0]) for r in await cur.fetchall()}
        for mig in migrations():
            if mig.version in done or (target is not None and mig.version > target):
                continue
            async with conn.transaction():
                await conn.execute(render(mig.text, schema))
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)"
                    ).format(ident),
                    (mig.version, mig.name),
                )
            log.info("applied migration", extra={"version": mig.version, "migration": mig.name})
            applied.append(mig.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))
    return applied


async def schema_version(conn: psycopg.AsyncConnection[Any], schema: str) -> int:
    cur = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{quote_ident(schema)}.schema_migrations",)
    )
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(
            sql.Identifier(schema)
        )
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def fetch_value(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> Any:
    """The first column of the first row of ``query`` (None when there is no row), whatever
    the connection's row factory (tuples or ``dict_row``)."""
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    if row is None:
        return None
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def connect(
    dsn: str, *, autocommit: bool = True
) -> psycopg.AsyncConnection[dict[str, object]]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit, row_factory=dict_row)
