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


# --------------------------------------------------------------------------- test tiers
# `unit` (no database: nothing of the test asks for the session's PostgreSQL), `db` (a real
# PostgreSQL), `e2e` (tests/e2e: the connector as a process, or the whole stack), `chaos`
# (tests/chaos: fault injection). `make test-fast` runs `-m "unit and not slow"`. A test that
# starts a PostgreSQL of its own marks itself `db`; any tier marker set by hand is kept.
TIERS = ("unit", "db", "e2e", "chaos")
_DIRECTORY_TIERS = {"e2e": "e2e", "chaos": "chaos"}
# unit files that are minutes of exhaustive search (planner properties, the credits benchmark
# against its brute-force bound): `slow`, so that `make test-fast` (`unit and not slow`) stays
# quick; `make test` runs them
_SLOW_UNIT_FILES = {"test_planner.py", "test_planner_v2.py", "test_credits_bench.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        parts = Path(str(item.path)).relative_to(tests).parts
        tier = _DIRECTORY_TIERS.get(parts[0]) if len(parts) > 1 else None
        if tier is None:
            needs = getattr(item, "fixturenames", ())
            tier = "db" if "pg_cluster" in needs else "unit"
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit" and parts[-1] in _SLOW_UNIT_FILES:
            item.add_marker(pytest.mark.slow)
