"""Test fixtures: one throwaway PostgreSQL cluster per session (wal_level=logical), a fresh
database per test copied from a template that already holds the state schema.

``CONNECTOR_TEST_DSN`` (a superuser DSN to an existing server with wal_level=logical) replaces
the embedded cluster. Nothing in PostgreSQL is mocked.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from connector import db
from connector.pgembed import EmbeddedPostgres

STATE_SCHEMA = "connector"
TEMPLATE_DB = "connector_template"


@dataclass
class Cluster:
    """The session's PostgreSQL; ``server`` is None when CONNECTOR_TEST_DSN is used."""

    base_dsn: str
    server: EmbeddedPostgres | None

    def dsn(self, dbname: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.base_dsn)
        info["dbname"] = dbname
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    external = os.environ.get("CONNECTOR_TEST_DSN")
    if external:
        cluster = Cluster(external, None)
        _make_template(cluster)
        yield cluster
        return
    root = Path(tempfile.mkdtemp(prefix="connector-test-pg-"))
    server = EmbeddedPostgres(root / "data")
    server.start()
    cluster = Cluster(server.dsn(), server)
    try:
        _make_template(cluster)
        yield cluster
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _make_template(cluster: Cluster) -> None:
    with psycopg.connect(cluster.base_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))

    async def _init() -> None:
        async with await psycopg.AsyncConnection.connect(
            cluster.dsn(TEMPLATE_DB), autocommit=True
        ) as conn:
            await db.migrate(conn, STATE_SCHEMA)

    asyncio.run(_init())


@pytest.fixture
def database(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database holding the state schema; yields its DSN; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.base_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    try:
        yield pg_cluster.dsn(name)
    finally:
        with psycopg.connect(pg_cluster.base_dsn, autocommit=True) as conn:
            # logical slots of this database must go before the database can be dropped
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s AND NOT active",
                (name,),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def empty_database(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database without the state schema (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.base_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_cluster.dsn(name)
    finally:
        with psycopg.connect(pg_cluster.base_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
async def aconn(database: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def _fresh_process_token_store() -> Iterator[None]:
    """Clients of one process share access tokens (connector.zoho.auth.PROCESS_TOKEN_STORE),
    keyed by accounts URL and credentials. Emulators of different tests can get the same port
    (and so the same accounts URL), so a token of a stopped emulator must not reach the next
    test's emulator: every test starts with an empty process store."""
    from connector.zoho import auth

    auth.PROCESS_TOKEN_STORE._records.clear()
    yield
    auth.PROCESS_TOKEN_STORE._records.clear()
