"""`connector init` / `connector uninstall`: the state schema and capture objects."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg

from connector import db
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets

log = logging.getLogger(__name__)


@dataclass
class InitReport:
    migrations_applied: list[int] = field(default_factory=list)
    schema_version: int = 0
    pipelines: dict[str, str] = field(default_factory=dict)


async def install_capture(
    conn: psycopg.AsyncConnection[object],
    schema: str,
    pipeline: PipelineConfig,
    *,
    wait_timeout: float | None = None,
) -> None:
    if pipeline.capture == "triggers":
        from connector.capture import triggers

        await triggers.install(conn, schema, pipeline)
    else:
        from connector.capture import logical

        await logical.install(conn, schema, pipeline, wait_timeout=wait_timeout)


async def uninstall_capture(
    conn: psycopg.AsyncConnection[object], schema: str, pipeline: PipelineConfig
) -> None:
    from connector.capture import logical, triggers

    # both, so that a pipeline whose mode was changed leaves nothing behind
    await triggers.uninstall(conn, schema, pipeline)
    await logical.uninstall(conn, schema, pipeline)


async def init(
    settings: Settings,
    secrets: Secrets,
    pipelines: list[str] | None = None,
    *,
    wait_timeout: float | None = None,
) -> InitReport:
    """Create or migrate the state schema, then install capture for each pipeline. Idempotent.
    ``wait_timeout``: how long a logical pipeline's slot creation may wait for transactions
    open in the cluster (None: as long as it takes, with a warning every few seconds)."""
    schema = settings.database.state_schema
    report = InitReport()
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as conn:
        report.migrations_applied = await db.migrate(conn, schema)
        report.schema_version = await db.schema_version(conn, schema)
        for p in settings.pipelines:
            if pipelines and p.name not in pipelines:
                continue
            if p.capture == "triggers":
                await _need_trigger_privilege(conn, p)
            await install_capture(conn, schema, p, wait_timeout=wait_timeout)
            report.pipelines[p.name] = p.capture
    return report


async def _need_trigger_privilege(
    conn: psycopg.AsyncConnection[object], pipeline: PipelineConfig
) -> None:
    """Trigger capture needs the TRIGGER privilege on the table: say so by name (PostgreSQL's
    own error is only "permission denied for table …")."""
    from connector.errors import ConnectorError

    table = psycopg.sql.Identifier(*pipeline.table_parts).as_string(conn)
    cur = await conn.execute(
        "SELECT current_user::text, pg_catalog.to_regclass(%s) IS NOT NULL"
        " AND NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass(%s), 'TRIGGER')",
        (table, table),
    )
    row = await cur.fetchone()
    role, lacking = tuple(row) if isinstance(row, tuple) else ("", False)
    if lacking:
        raise ConnectorError(
            f"role {role} lacks the TRIGGER privilege on {pipeline.source_table}, which trigger"
            f" capture needs: GRANT TRIGGER ON {table} TO {role} (or use capture = 'logical')"
        )


async def uninstall(
    settings: Settings,
    secrets: Secrets,
    pipelines: list[str] | None = None,
    *,
    drop_state: bool = False,
    force: bool = False,
) -> list[str]:
    """Remove capture (and with ``drop_state`` the state schema). Refuses while a running
    connector owns one of the pipelines, unless ``force`` (that connector then reports the
    capture missing: docs/operations.md, ConnectorCaptureMissing)."""
    from connector.errors import ConnectorError
    from connector.status import Q_OWNER

    schema = settings.database.state_schema
    done: list[str] = []
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as conn:
        chosen = [p for p in settings.pipelines if not pipelines or p.name in pipelines]
        if not force:
            for p in chosen:
                cur = await conn.execute(Q_OWNER, (db.advisory_key(schema, "pipeline", p.name),))
                owner = await cur.fetchone()
                if owner is not None:
                    raise ConnectorError(
                        f"pipeline {p.name} is owned by a running connector (database session"
                        f" {owner[0]}, {owner[1] or 'no application_name'}): stop it first;"
                        " --force removes the capture anyway (it then captures nothing)"
                    )
        for p in chosen:
            await uninstall_capture(conn, schema, p)
            done.append(p.name)
        if drop_state and not pipelines:
            await conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(schema)
                )
            )
    return done
