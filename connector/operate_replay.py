"""``connector replay``: plan which outbox rows go out again (the newest version per key in the
range, newer than what the CRM already has unless ``--resend``), check that retention has not
pruned the range, then send them through the pipeline while no ``run`` owns it (or hand the
work to the running connector). Split from ``connector.operate`` (issue 20)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from connector import db, state
from connector.config import PipelineConfig, Settings
from connector.config_secrets import Secrets
from connector.costs import CostModel
from connector.errors import ConfigError, ConnectorError
from connector.events import stamp_of
from connector.operate_common import EXIT_OK
from connector.operate_common import only_pipeline as _only_pipeline
from connector.operate_common import out as _out
from connector.outbox import read_range


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
                parents={p.name: p for p in settings.pipelines},
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
