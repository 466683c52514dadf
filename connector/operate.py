"""The operator verbs: ``run``, ``snapshot``, ``status``, ``replay``, ``dead-letters``, ``verify``.

Each is ``async def verb(settings, secrets, args) -> int`` (exit code), called by ``cli.py``.
docs/operations-cli.md shows every verb with an example and explains how to read ``status``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from connector import db, state, truncate
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.costs import CostModel
from connector.crm_values import wide_ints
from connector.errors import ConfigError, ConnectorError
from connector.events import stamp_of
from connector.outbox import load_json, read_range
from connector.status import format_status, pipeline_status

EXIT_OK = 0
EXIT_MISMATCH = 1


def _pipelines(settings: Settings, names: list[str] | str | None) -> list[PipelineConfig]:
    if not names:
        return list(settings.pipelines)
    if isinstance(names, str):
        names = [names]
    return [settings.pipeline(n) for n in names]


def _only_pipeline(settings: Settings, name: list[str] | str | None, verb: str) -> PipelineConfig:
    """The pipeline a single-pipeline verb works on: the one named, or the only one."""
    if isinstance(name, list):
        if len(name) > 1:
            raise ConfigError("--pipeline", f"{verb} works on one pipeline; name one")
        name = name[0] if name else None
    if name:
        return settings.pipeline(name)
    if len(settings.pipelines) == 1:
        return settings.pipelines[0]
    raise ConfigError(
        "--pipeline",
        f"{verb} works on one pipeline; name one of {[p.name for p in settings.pipelines]}",
    )


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _dump(doc: Any) -> None:
    # wide_ints: a dead letter's payload may hold integers beyond 64 bits (issue 14 §4)
    sys.stdout.write(
        orjson.dumps(wide_ints(doc), default=str, option=orjson.OPT_INDENT_2).decode() + "\n"
    )


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


# --------------------------------------------------------------------------- replay


def _parse_time(text: str, key: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            key, f"expected an ISO timestamp such as 2026-11-26T10:00:00Z, got {text!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass
class ReplayPlan:
    pipeline: str
    events_in_range: int
    keys_in_range: int
    to_send: list[tuple[str, str, int]]  # (key, op of the newest event, offset)
    skipped_older: int  # keys whose newest event in the range is older than what the CRM has

    def credits(self, cost: CostModel) -> tuple[str, int, int]:
        """(api, calls, credits) of the cheaper way to send the upserts."""
        n = sum(1 for _, op, _ in self.to_send if op != "delete")
        if n == 0:
            return "upsert", 0, 0
        up, bulk = cost.upsert_credits(n), cost.bulk_credits(n)
        if bulk < up:
            return "bulk", cost.bulk_jobs(n), bulk
        return "upsert", cost.upsert_calls(n), up


async def plan_replay(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    *,
    from_offset: int | None,
    to_offset: int | None,
    since: datetime | None,
    until: datetime | None,
    key: str | None,
) -> ReplayPlan:
    """Newest event per key in the range; a key is re-sent only if that event is not older
    than the key's acknowledged stamp (so a replay never makes the CRM older)."""
    newest: dict[str, Any] = {}
    events = 0
    async for page in read_range(
        conn,
        schema,
        pipeline.name,
        from_offset=from_offset if from_offset is not None else (None if since else 1),
        to_offset=to_offset,
        since=since,
        until=until,
        key=key,
    ):
        for ev in page:
            events += 1
            if ev.op == "truncate":  # names no key: not replayed (see connector/truncate.py)
                continue
            cur = newest.get(ev.key)
            if cur is None or ev.newer_than(cur):
                newest[ev.key] = ev
    acked = await state.key_states(conn, schema, pipeline.name, list(newest))
    to_send: list[tuple[str, str, int]] = []
    skipped = 0
    for k, ev in sorted(newest.items(), key=lambda kv: kv[1].offset):
        ks = acked.get(k)
        if ks is not None and ks.stamp is not None and ks.stamp.newer_than(stamp_of(ev)):
            skipped += 1
            continue
        to_send.append((k, str(ev.op), ev.offset))
    return ReplayPlan(pipeline.name, events, len(newest), to_send, skipped)


def _fmt_retention(d: timedelta) -> str:
    secs = int(d.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs and secs % n == 0:
            return f"{secs // n}{unit}"
    return f"{secs}s"


async def check_not_pruned(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    *,
    from_offset: int | None,
    since: datetime | None,
) -> None:
    """Refuse a replay range that reaches events outbox retention has already deleted
    (``outbox_pruned``), naming the oldest event kept. Retention deletes only events older
    than ``pipelines.retention``: a range starting inside that window is never refused."""
    from connector.outbox_retention import pruned_bounds

    b = await pruned_bounds(conn, schema, pipeline.name)
    if b.max_pruned_id is None or b.max_pruned_at is None:
        return
    if from_offset is not None:
        if from_offset > b.max_pruned_id:
            return
        key, asked = "--from-offset", f"offset {from_offset}"
    elif since is not None:
        if since > b.max_pruned_at:
            return
        key, asked = "--since", f"{since.isoformat()}"
    else:
        return
    if b.oldest_kept_id is not None and b.oldest_kept_at is not None:
        kept = (
            f"the oldest event kept is offset {b.oldest_kept_id}, captured at"
            f" {b.oldest_kept_at.astimezone(UTC).isoformat()}: replay from there"
            f" (--from-offset {b.oldest_kept_id}, or --since with that time or later)"
        )
    else:
        kept = "the outbox holds no event of this pipeline now"
    raise ConfigError(
        key,
        f"replay {pipeline.name}: {asked} is in a range already pruned by outbox retention"
        f" (pipelines['{pipeline.name}'].retention = {_fmt_retention(pipeline.retention)}):"
        f" events up to offset {b.max_pruned_id}, captured up to"
        f" {b.max_pruned_at.astimezone(UTC).isoformat()}, may be gone; {kept}."
        " To bring the CRM in line with the source for older changes, run"
        " `connector verify --repair`",
    )


async def replay(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """`connector replay --pipeline P (--from-offset N | --since T) [--to X] [--key K]
    [--dry-run]`.

    The newest event of each key in the range is re-sent unless the CRM already acknowledged a
    newer version of that key (never stale: invariant 2; the same final state however often
    it is replayed: invariant 7). Two ways, chosen by who owns the pipeline:

    * no ``run`` owns it: this process takes the pipeline's lease and sends the range through
      its own coalescer / planner / emitter (``Engine.replay``, acknowledged versions sent
      again);
    * a ``run`` owns it: the keys' *current* rows are re-captured into the outbox (see
      connector/verify.py, ``recapture``) and the running connector sends them, ordered after
      any concurrent change of the same row.
    """
    from connector.verify import recapture

    pipeline = _only_pipeline(settings, args.pipeline, "replay")
    schema = settings.database.state_schema
    since = _parse_time(args.since, "--since") if args.since else None
    to_offset: int | None = None
    until: datetime | None = None
    if args.to:
        if args.to.isdigit():
            to_offset = int(args.to)
        else:
            until = _parse_time(args.to, "--to")
    if to_offset is not None and args.from_offset is not None and to_offset < args.from_offset:
        raise ConfigError("--to", f"offset {to_offset} is before --from-offset {args.from_offset}")
    if until is not None and since is not None and until <= since:
        raise ConfigError("--to", f"{args.to} is not after --since {args.since}")
    async with await psycopg.AsyncConnection.connect(secrets.state_dsn, autocommit=True) as conn:
        await check_not_pruned(conn, schema, pipeline, from_offset=args.from_offset, since=since)
        await _check_replay_range(conn, schema, pipeline, args.from_offset, args.key)
        plan = await plan_replay(
            conn,
            schema,
            pipeline,
            from_offset=args.from_offset,
            to_offset=to_offset,
            since=since,
            until=until,
            key=args.key,
        )
    api, calls, credits = plan.credits(CostModel())
    deletes = sum(1 for _, op, _ in plan.to_send if op == "delete")
    _out(
        f"replay {pipeline.name}: {plan.events_in_range} events in range, "
        f"{plan.keys_in_range} keys; {len(plan.to_send)} to re-send, "
        f"{plan.skipped_older} skipped (the CRM already has a newer version)"
    )
    if args.dry_run:
        _out(
            f"  would send {len(plan.to_send) - deletes} record(s) by {api} "
            f"({calls} call(s), {credits} credits) and {deletes} delete(s)"
            " (if no newer change arrives first; the planner decides at send time)"
        )
        for k, op, off in plan.to_send[:50]:
            _out(f"  key {k}: {'delete' if op == 'delete' else 'upsert'} (newest event @{off})")
        if len(plan.to_send) > 50:
            _out(f"  ... and {len(plan.to_send) - 50} more")
        _out("dry run: nothing sent")
        return EXIT_OK
    if await _replay_here(
        settings, secrets, pipeline, args, since=since, until=until, to_offset=to_offset
    ):
        return EXIT_OK
    done = await recapture(
        pipeline=pipeline,
        keys=[k for k, _, _ in plan.to_send],
        source_dsn=secrets.dsn,
        state_dsn=secrets.state_dsn,
        schema=schema,
    )
    _out(
        "a running connector owns the pipeline: re-captured the current row of each key for it"
        f" to send ({len(done.updated)} row(s), {len(done.deleted)} delete(s)"
        + (f", outbox offsets {done.first_offset}..{done.last_offset}" if done.total else "")
        + "; see `connector status`)"
    )
    return EXIT_OK


async def _check_replay_range(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    pipeline: PipelineConfig,
    from_offset: int | None,
    key: str | None,
) -> None:
    """An offset past the end of the outbox or a key it never held is a mistake: say so
    (exit 1) rather than replaying nothing silently."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT coalesce(max(id), 0), count(*) FILTER (WHERE key = %s)"
            " FROM {} WHERE pipeline = %s"
        ).format(sql.Identifier(schema, "outbox")),
        (key, pipeline.name),
    )
    row = await cur.fetchone()
    last, key_events = (int(row[0]), int(row[1])) if row else (0, 0)
    if from_offset is not None and from_offset > last:
        raise ConnectorError(
            f"--from-offset {from_offset} is past the end of {pipeline.name}'s outbox (last"
            f" offset {last}); `connector status` shows the checkpoint offset"
        )
    if key is not None and key_events == 0:
        raise ConnectorError(
            f"the outbox of {pipeline.name} holds no event of {pipeline.key_column} {key!r}"
            " (never captured, or pruned by retention); `connector dead-letters retry` or"
            " `connector verify --repair` re-send a key's current row"
        )


async def _replay_here(
    settings: Settings,
    secrets: Secrets,
    pipeline: PipelineConfig,
    args: argparse.Namespace,
    *,
    since: datetime | None,
    until: datetime | None,
    to_offset: int | None,
) -> bool:
    """When no ``run`` owns the pipeline: take its lease and send the range through this
    process's own coalescer / planner / emitter (``Engine.replay``, acknowledged versions sent
    again). False when another process owns the pipeline."""
    from connector.pipeline import build_pipeline
    from connector.runtime import PipelineLease
    from connector.zoho import PgTokenStore, ZohoClient

    schema = settings.database.state_schema
    lease = PipelineLease(
        secrets.state_dsn,
        db.advisory_key(schema, "pipeline", pipeline.name),
        name=pipeline.name,
        owner="replay",
    )
    if not await lease.try_acquire():
        return False
    try:
        async with (
            ZohoClient.from_config(
                settings.crm,
                client_secret=secrets.client_secret,
                refresh_token=secrets.refresh_token,
                token_store=PgTokenStore(secrets.state_dsn, schema),
            ) as client,
            build_pipeline(
                pipeline,
                client=client,
                state_dsn=secrets.state_dsn,
                source_dsn=secrets.dsn,
                schema=schema,
                daily_credit_budget=settings.crm.daily_credit_budget,
                credit_reserve=settings.crm.credit_reserve,
                snapshot="never",
                snapshot_progress=False,
            ) as built,
        ):
            report = await built.engine.replay(
                from_offset=args.from_offset,
                to_offset=to_offset,
                since=since,
                until=until,
                key=args.key,
                resend=True,
            )
    finally:
        await lease.release()
    _out(
        f"replayed {report.events} event(s): the newest version of {report.sent_keys} key(s)"
        " sent again (none older than what the CRM acknowledged)"
    )
    return True


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
    from connector.verify import recapture
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
        )
    if args.repair and report.mismatches:
        done = await recapture(
            pipeline=pipeline,
            keys=report.keys(),
            source_dsn=secrets.dsn,
            state_dsn=secrets.state_dsn,
            schema=schema,
        )
        report.repaired = done.total
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
        _out(
            f"verify {pipeline.name}: {report.rows_in_source} rows in {pipeline.source_table}, "
            f"{report.records_in_crm} records in {pipeline.module} (read with"
            f" {report.crm_calls} COQL call(s), {report.crm_credits} credit(s))"
        )
        _out(
            f"  missing {len(report.missing)}, extra {len(report.extra)}, "
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
    if report.mismatches == 0:
        return EXIT_OK
    if args.repair and report.repaired >= len(set(report.keys())):
        return EXIT_OK  # every mismatch re-captured: the repair succeeded
    return EXIT_MISMATCH
