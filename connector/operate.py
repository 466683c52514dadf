"""The operator verbs: ``run``, ``snapshot``, ``status``, ``dead-letters``, ``verify``
(``replay`` is in :mod:`connector.operate_replay`).

Each is ``async def verb(settings, secrets, args) -> int`` (exit code), called by ``cli.py``.
docs/operations-cli.md shows every verb with an example and explains how to read ``status``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from connector import state, truncate
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.errors import ConfigError, ConnectorError
from connector.operate_common import (
    EXIT_MISMATCH,
    EXIT_OK,
)
from connector.operate_common import (
    dump as _dump,
)
from connector.operate_common import (
    only_pipeline as _only_pipeline,
)
from connector.operate_common import (
    out as _out,
)
from connector.operate_common import (
    pipelines as _pipelines,
)
from connector.outbox import load_json
from connector.status import format_status, pipeline_status

__all__ = [
    "EXIT_MISMATCH",
    "EXIT_OK",
    "dead_letters",
    "pipeline_status",
    "run",
    "snapshot",
    "status",
    "verify",
]


# --------------------------------------------------------------------------- run / snapshot


async def run(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector run`: the long-running process (see connector/runtime.py)."""
    from connector.runtime import Runtime

    port = getattr(args, "port", None)
    if port is not None:  # `run --port N`: a second process of the configuration on this host
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update={"port": port})}
        )
    runtime = Runtime(settings, secrets, pipelines=getattr(args, "pipeline", None))
    return await runtime.run()


async def snapshot(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector snapshot [--restart]`: run (or resume) the initial sync now, then exit.

    It runs the pipeline the same way ``run`` does (it takes the pipeline's lease, so it waits
    if a ``run`` owns the pipeline) until the snapshot is done and every event up to the end
    of the snapshot is acknowledged."""
    from connector.runtime import Runtime

    runtime = Runtime(
        settings,
        secrets,
        pipelines=getattr(args, "pipeline", None),
        mode="snapshot",
        restart_snapshot=bool(getattr(args, "restart", False)),
        serve_http=False,
        snapshot_progress=None,  # a progress bar on a terminal, log lines otherwise
    )
    return await runtime.run()


async def status(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector status [--json]`."""
    docs: list[dict[str, Any]] = []
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as conn:
        source: psycopg.AsyncConnection[Any] | None = None
        if secrets.dsn != secrets.state_dsn:
            source = await psycopg.AsyncConnection.connect(secrets.dsn, autocommit=True)
        try:
            for p in _pipelines(settings, getattr(args, "pipeline", None)):
                docs.append(await pipeline_status(conn, settings, p, source))
        finally:
            if source is not None:
                await source.close()
    if getattr(args, "json", False):
        _dump({"generated_at": datetime.now(UTC), "pipelines": docs})
    else:
        _out("\n\n".join(format_status(d) for d in docs))
    return EXIT_OK


# --------------------------------------------------------------------------- dead letters


async def dead_letters(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector dead-letters [--pipeline P] list [--all] [--json] | show ID | retry [ID…|--all]
    | discard ID…`.

    ``retry`` re-captures the key's *current* source row (the source may have been fixed since
    the CRM rejected it) and marks the letter ``retried``; a successful send resolves it."""
    from connector.verify import recapture

    schema = settings.database.state_schema
    pipelines = _pipelines(settings, args.pipeline)
    verb = args.dl_verb
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as conn:
        set_json_loads(load_json, conn)  # payloads: integers of any size, exactly
        if verb == "list":
            rows: list[state.DeadLetterRow] = []
            for p in pipelines:
                rows += await state.list_dead_letters(
                    conn, schema, p.name, None if args.all else "open"
                )
            if args.json:
                _dump([_dl_json(r) for r in rows])
                return EXIT_OK
            if not rows:
                _out("no dead letters" + ("" if args.all else " open"))
                return EXIT_OK
            kw = max(14, *(len(r.key) for r in rows))  # a uuid key is 36 wide
            pw = max(12, *(len(r.pipeline) for r in rows))
            _out(
                f"{'ID':>6}  {'PIPELINE':<{pw}} {'KEY':<{kw}} {'STATUS':<9} {'CODE':<22} "
                "FIELD / MESSAGE"
            )
            for r in rows:
                what = f"{r.error_field + ': ' if r.error_field else ''}{r.error_message}"
                _out(
                    f"{r.id:>6}  {r.pipeline:<{pw}} {r.key:<{kw}} {r.status:<9} "
                    f"{r.error_code:<22} {what[:80]}"
                )
            return EXIT_OK
        found = await _dead_letters_by_id(conn, schema, pipelines, getattr(args, "ids", None))
        if verb == "show":
            row = next((r for r in found if r.id == args.id), None)
            if row is None:
                found = await _dead_letters_by_id(conn, schema, pipelines, [args.id])
                row = found[0] if found else None
            if row is None:
                raise ConnectorError(f"no dead letter with id {args.id}")
            _dump(_dl_json(row))
            return EXIT_OK
        if verb == "discard":
            return await _mark(conn, schema, pipelines, args.ids, "discarded")
        # retry
        if not args.ids and not args.all:
            raise ConfigError("dead-letters retry", "give letter ids or --all")
        total = 0
        for p in pipelines:
            open_rows = await state.list_dead_letters(conn, schema, p.name, "open", 1_000_000)
            chosen = [r for r in open_rows if args.all or r.id in set(args.ids)]
            keyless = [r for r in chosen if r.key == ""]
            if keyless:
                # MISSING_KEY letters: there is no key to re-read; the row must get a key at
                # the source, which then flows as a normal insert by itself
                _out(
                    f"{p.name}: {len(keyless)} letter(s) skipped: the source row has no"
                    f" {p.key_column}; set it in {p.source_table} and the row syncs by itself"
                )
                chosen = [r for r in chosen if r.key != ""]
            if not chosen:
                continue
            keys = sorted({r.key for r in chosen})
            done = await recapture(
                pipeline=p,
                keys=keys,
                source_dsn=secrets.dsn,
                state_dsn=secrets.state_dsn,
                schema=schema,
            )
            marked = await state.mark_dead_letters(
                conn, schema, p.name, [r.id for r in chosen], "retried"
            )
            total += len(marked)
            _out(
                f"{p.name}: {len(marked)} letter(s) retried: {len(done.updated)} current row(s)"
                f" and {len(done.deleted)} delete(s) re-captured"
            )
        if total == 0:
            _out("nothing to retry (no matching open dead letters)")
        return EXIT_OK


async def _dead_letters_by_id(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipelines: list[PipelineConfig],
    ids: list[int] | None,
) -> list[state.DeadLetterRow]:
    if not ids:
        return []
    out: list[state.DeadLetterRow] = []
    for p in pipelines:
        for r in await state.list_dead_letters(conn, schema, p.name, None, 1_000_000):
            if r.id in ids:
                out.append(r)
    return out


async def _mark(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipelines: list[PipelineConfig],
    ids: list[int],
    status: str,
) -> int:
    total = 0
    for p in pipelines:
        total += len(await state.mark_dead_letters(conn, schema, p.name, ids, status))
    _out(f"{total} dead letter(s) {status}")
    if total < len(set(ids)):
        # say why the others were not: unknown, or already resolved / discarded
        known = {r.id: r for r in await _dead_letters_by_id(conn, schema, pipelines, ids)}
        for i in sorted(set(ids)):
            r = known.get(i)
            if r is None:
                _out(f"  letter {i}: no such dead letter")
            elif r.status not in ("open", "retried") or r.status == status:
                _out(f"  letter {i}: already {r.status}, nothing to do")
    return EXIT_OK if total else EXIT_MISMATCH


def _dl_json(r: state.DeadLetterRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "pipeline": r.pipeline,
        "key": r.key,
        "version": r.version,
        "outbox_id": r.outbox_id,
        "status": r.status,
        "error_code": r.error_code,
        "error_field": r.error_field,
        "error_message": r.error_message,
        "error_details": r.error_details,
        "api": r.api,
        "attempts": r.attempts,
        "created_at": r.created_at,
        "payload": r.payload,
    }


# --------------------------------------------------------------------------- verify


async def verify(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector verify --pipeline P [--repair] [--json]`: exit 1 when mismatches remain
    (with ``--repair``: when a mismatched key could not be re-captured)."""
    from connector.verify import recapture, rewrite_sets
    from connector.verify import verify as compare_all
    from connector.zoho import PgTokenStore, ZohoClient

    pipeline = _only_pipeline(settings, args.pipeline, "verify")
    schema = settings.database.state_schema
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as st:
        cur = await st.execute(
            sql.SQL("SELECT coalesce(max(id), 0) FROM {} WHERE pipeline = %s").format(
                sql.Identifier(schema, "outbox")
            ),
            (pipeline.name,),
        )
        row = await cur.fetchone()
        seen_upto = int(row[0]) if row else 0  # a TRUNCATE up to here is in the comparison
        held = await truncate.held(st, schema, pipeline.name)
    async with ZohoClient.from_config(
        settings.crm,
        client_secret=secrets.client_secret,
        refresh_token=secrets.refresh_token,
        token_store=PgTokenStore(secrets.state_dsn, schema),
    ) as client:
        report = await compare_all(
            pipeline=pipeline,
            client=client,
            source_dsn=secrets.dsn,
            state_dsn=secrets.state_dsn,
            schema=schema,
            parents={p.name: p for p in settings.pipelines},
        )
    if args.repair and report.mismatches:
        done = await recapture(
            pipeline=pipeline,
            keys=report.repair_keys(),  # a subform pipeline: the lines of mismatched orders
            source_dsn=secrets.dsn,
            state_dsn=secrets.state_dsn,
            schema=schema,
        )
        report.repaired = done.total
        if pipeline.subform_of is not None:  # and every differing order's set written again
            report.sets_marked = await rewrite_sets(
                pipeline=pipeline,
                keys=[m.key for m in report.different],
                state_dsn=secrets.state_dsn,
                schema=schema,
            )
    resolved = 0
    if held and (report.mismatches == 0 or report.repaired):
        # the CRM now matches the table, or the difference is re-captured behind every held
        # TRUNCATE that the comparison saw: they are reconciled
        async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as st:
            resolved = await truncate.resolve(st, schema, pipeline.name, seen_upto)
    doc = report.to_json()
    doc["truncates_held"] = len(held)
    doc["truncates_reconciled"] = resolved
    if args.json:
        _dump(doc)
    else:
        sub = pipeline.subform_of
        crm_side = (
            f"{report.records_in_crm} records in {pipeline.module} (read with"
            f" {report.crm_calls} COQL call(s)"
            if sub is None
            else f"{report.records_in_crm} rows of {pipeline.module}.{sub.field} (read with"
            f" {report.crm_calls} call(s): field metadata and COQL"
        )
        _out(
            f"verify {pipeline.name}: {report.rows_in_source} rows in {pipeline.source_table}, "
            f"{crm_side}, {report.crm_credits} credit(s))"
        )
        _out(
            ("  " if sub is None else f"  {sub.pipeline} (by their lines): ")
            + f"missing {len(report.missing)}, extra {len(report.extra)}, "
            f"different {len(report.different)}, dead-lettered {len(report.dead_lettered)}"
        )
        for kind in ("missing", "extra", "different"):
            for m in doc["examples"][kind][:10]:
                detail = ", ".join(f"{f}: {a!r} != {b!r}" for f, (a, b) in m["fields"].items())
                _out(f"  {kind:<9} key {m['key']}" + (f"  {detail}" if detail else ""))
        if held:
            _out(
                f"  {len(held)} TRUNCATE(s) of {pipeline.source_table} held (on_truncate ="
                f' "hold"): CRM records of rows it removed show as extra'
                + ("; now reconciled" if resolved else "; --repair deletes (or marks) them")
            )
        if report.repaired:
            _out(
                f"  re-captured {report.repaired} key(s) into the outbox; the running connector"
                " sends them — run verify again once `status` shows nothing pending"
            )
        if report.sets_marked:
            _out(
                f"  {report.sets_marked} order(s) marked for their line set to be written again:"
                " the running connector writes each within about 10 s"
            )
        if args.repair and report.unrepairable():
            _out(
                f"  {len(report.unrepairable())} key(s) of {sub.pipeline if sub else '?'} with"
                " no line to re-capture (rows in the CRM, no line in the table ever written"
                " there): only a change of one of their lines rewrites their rows"
            )
    if report.mismatches == 0:
        return EXIT_OK
    if (
        args.repair
        and report.repaired >= len(set(report.repair_keys()))
        and not report.unrepairable()
    ):
        return EXIT_OK  # every mismatch re-captured: the repair succeeded
    return EXIT_MISMATCH
