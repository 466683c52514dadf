"""`connector demo` (what `make demo` runs): the whole connector, end to end, on one machine.

1. an embedded PostgreSQL 16 in a temporary directory and the Zoho CRM emulator on free ports
   (bulk jobs processed at a realistic rate, small request latency), with an ``Accounts``
   module and, on ``Orders``, the ``Account`` lookup and the ``Lines`` subform
   (:func:`demo_emulator_config`);
2. three related legacy tables filled with realistic rows (``--rows`` orders, default 20,000):
   ``customers`` (one per 5 orders), ``orders`` (``customer_id`` names a customer) and
   ``order_lines`` (1-5 per order; ``order_id`` names an order, ``ON DELETE CASCADE``);
3. a configuration file with three pipelines (trigger capture, ``max_staleness`` 20 s so
   flushes show): customers → ``Accounts``, orders → ``Orders`` with the ``Account`` lookup,
   order lines → the rows of each order's ``Lines`` subform; ``init``;
4. the connector (the real runtime, in-process): initial sync (customers, then orders, then
   lines: the engine keeps parents first), then a live workload (``--rate`` business
   operations/s for ``--duration`` s: new orders with their lines, status changes along an
   order's life, edits, cancellations, deletes; new customers, customer edits, orders moved to
   another customer; lines added, changed, moved and deleted; skewed so some orders change
   often) while the connector streams the changes; a live view shows each table;
5. drain, ``verify`` each pipeline against the CRM, print (and ``--report``) a summary.

Exit 0 only when no verify finds a mismatch (and the CRM holds as many lines as the table).

The configuration files are written by ``connector/demo_config.py``, the live view and the
summary drawn by ``connector/demo_view.py``, the tables filled and changed by
``connector/demo_shop.py`` (over ``connector/demo_workload.py``); the names other modules use
are importable from here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg

from connector.demo_config import DEMO_ENV, demo_config, demo_emulator_config
from connector.demo_shop import ShopWorkload, create_shop, customers_for
from connector.demo_view import (
    SENT_APIS,
    TABLES,
    DemoResult,
    LiveView,
    Table,
    TableResult,
    _clean,
    _console,
    _credits,
    _summary,
    _sync_usage,
    _watch,
    crm_counts,
    ledger_credits,
    source_counts,
)

# the names other modules import from here, some defined in the split-out modules
# (demo_config: the configuration; demo_view: the tables, the live view and the summary)
__all__ = [
    "DEMO_ENV",
    "SENT_APIS",
    "SYNC_APIS",
    "TABLES",
    "DemoResult",
    "LiveView",
    "Table",
    "TableResult",
    "crm_counts",
    "demo_config",
    "demo_emulator_config",
    "ledger_credits",
    "main",
    "run_demo",
    "source_counts",
    "staleness_samples",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the demo itself

SYNC_APIS = ("upsert", "insert", "update", "delete", "bulk_write_job")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return round(s[i], 3)


def staleness_samples(
    emu: Any,
    module: str,
    key_field: str,
    changes: list[tuple[float, str]],
    mono_to_wall: float,
    *,
    apis: frozenset[str] | None = None,
) -> list[float]:
    """For each committed change: seconds from its commit until the CRM next wrote that record
    (emulator write history, wall clock; ``apis``: only writes by these APIs, e.g. the
    ``update`` that carries an order's lines). Deleted records are measured by their delete."""
    store = emu.state.store(module)
    by_key: dict[str, str] = {}
    for rid, rec in list(store.records.items()) + list(store.deleted.items()):
        k = rec.get(key_field)
        if k is not None:
            by_key[str(k)] = rid
    out: list[float] = []
    for mono, key in changes:
        rid = by_key.get(key)
        if rid is None:
            continue
        t = mono + mono_to_wall
        later = [
            h["timestamp"]
            for h in store.history.get(rid, [])
            if h["timestamp"] >= t and (apis is None or h["api"] in apis or h["api"] == "delete")
        ]
        if rid in store.deleted and not later:
            continue
        if later:
            out.append(min(later) - t)
    return out


Q_SNAPSHOTS_DONE = """
SELECT s.pipeline FROM connector.snapshots s LEFT JOIN connector.checkpoints c USING (pipeline)
 WHERE s.pipeline = ANY(%s) AND s.status = 'done'
   AND coalesce(c.last_id, 0) >= coalesce(
       (SELECT max(o.id) FROM connector.outbox o
         WHERE o.pipeline = s.pipeline AND o.op = 'snapshot'), 0)
"""


async def _snapshots_done(
    dsn: str, pipelines: list[str], runtime_task: asyncio.Task[int]
) -> dict[str, float]:
    """Wait until every pipeline's initial sync is done and acknowledged; the seconds each
    took from the call."""
    t0 = time.monotonic()
    done: dict[str, float] = {}
    while len(done) < len(pipelines):
        if runtime_task.done():
            raise RuntimeError("the connector stopped during the initial sync (see the log)")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(Q_SNAPSHOTS_DONE, (pipelines,))
            for (name,) in await cur.fetchall():
                done.setdefault(str(name), round(time.monotonic() - t0, 2))
        if len(done) < len(pipelines):
            await asyncio.sleep(0.5)
    return done


async def _drained(dsn: str, runtime: Any, runtime_task: asyncio.Task[int]) -> None:
    """Flush everything now and wait until every committed change is acknowledged."""
    from connector.status import pipeline_status

    while True:
        if runtime_task.done():
            raise RuntimeError("the connector stopped while draining (see the log)")
        for runner in runtime.runners.values():
            if runner.engine is not None:
                runner.engine.flush_all()
        idle = True
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for p in runtime.pipelines:
                doc = await pipeline_status(conn, runtime.settings, p)
                if doc["pending_keys"] != 0 or doc["capture"]["lag_events"] != 0:
                    idle = False
                    break
        if idle:
            return
        await asyncio.sleep(0.5)


async def _verify_all(
    settings: Any, secrets: Any, dsn: str, result: DemoResult
) -> dict[str, dict[str, Any]]:
    """``verify`` each pipeline (lookups checked against their parents' CRM ids); a subform
    pipeline that ``verify`` does not compare yet is noted, not counted."""
    from connector.errors import ConfigError
    from connector.verify import verify
    from connector.zoho import PgTokenStore, ZohoClient

    parents = {p.name: p for p in settings.pipelines}
    docs: dict[str, dict[str, Any]] = {}
    async with ZohoClient.from_config(
        settings.crm,
        client_secret=secrets.client_secret,
        refresh_token=secrets.refresh_token,
        token_store=PgTokenStore(secrets.state_dsn, settings.database.state_schema),
    ) as client:
        for p in settings.pipelines:
            tr = result.tables[p.name]
            try:
                rep = await verify(
                    pipeline=p,
                    client=client,
                    source_dsn=dsn,
                    state_dsn=dsn,
                    schema=settings.database.state_schema,
                    parents=parents,
                )
            except ConfigError as exc:
                if p.subform_of is None:
                    raise
                tr.note = f"subform rows not verified: {exc}"
                continue
            doc = rep.to_json(5)
            docs[p.name] = doc
            tr.verified = True
            tr.mismatches = rep.mismatches
            tr.missing, tr.extra, tr.different = doc["missing"], doc["extra"], doc["different"]
            tr.dead_lettered = len(rep.dead_lettered)
            # what verify read (for a subform pipeline: lines in the table, rows in the CRM)
            tr.rows_in_source = rep.rows_in_source
            tr.records_in_crm = rep.records_in_crm
    return docs


async def run_demo(
    *, rows: int, duration: float, rate: float, report: str | None, keep: bool
) -> int:
    from connector import admin, config_relations
    from connector.config import load_settings, resolve_secrets
    from connector.emulator import start_emulator
    from connector.logs import add_secrets
    from connector.metrics import Metrics
    from connector.pgembed import EmbeddedPostgres, free_port
    from connector.runtime import Runtime

    began = time.monotonic()
    result = DemoResult()
    max_staleness = "20s"
    with_lines = config_relations.ENGINE_SUPPORTS_SUBFORMS
    tables = TABLES if with_lines else TABLES[:2]
    tmp = Path(tempfile.mkdtemp(prefix="connector-demo-"))
    out = _console()
    out.print(
        f"[bold]connector demo[/bold]: {rows} orders of {customers_for(rows)} customers with 1-5"
        f" lines each, {duration:.0f}s of live changes at {rate:g}/s (work dir {tmp})"
    )
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # pgserver's platformdirs
    pg = EmbeddedPostgres(tmp / "pg")
    await asyncio.to_thread(pg.start)
    rc = 1
    try:
        dsn = pg.dsn()
        async with start_emulator(demo_emulator_config()) as emu:
            out.print(f"PostgreSQL 16 on port {pg.port}, Zoho CRM emulator at {emu.url}")
            initial = await create_shop(dsn, rows)
            initial = {t.pipeline: initial[t.table] for t in TABLES}
            config = tmp / "connector.toml"
            config.write_text(
                demo_config(
                    dsn=dsn,
                    emulator_url=emu.url,
                    port=free_port(),
                    max_staleness=max_staleness,
                    related_tables=True,
                    lines=with_lines,
                )
            )
            settings = load_settings(config)
            secrets = resolve_secrets(settings, {**os.environ, **DEMO_ENV})
            add_secrets(secrets.values())
            await admin.init(settings, secrets)
            out.print(
                f"legacy tables: public.customers {initial['customers']} rows, public.orders"
                f" {initial['orders']} rows (customer_id → customers), public.order_lines"
                f" {initial['order_lines']} rows (order_id → orders, ON DELETE CASCADE);"
                f" capture installed (triggers); configuration {config}"
            )
            if not with_lines:
                out.print(
                    "[yellow]subforms are switched off in this build"
                    " (ENGINE_SUPPORTS_SUBFORMS): order lines are not synced[/yellow]"
                )
            # the planner's bulk latency estimate until it has measured one job: the emulator
            # processes 10,000 rows/s, so a 25,000-row job takes seconds, not the default 2 min
            runtime = Runtime(
                settings,
                secrets,
                metrics=Metrics(),
                lease_retry=0.5,
                engine_options={"default_bulk_latency": 10.0},
            )
            runtime_task = asyncio.create_task(runtime.run(), name="demo:runtime")
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute("SELECT id FROM public.orders")
                ids = [int(r[0]) for r in await cur.fetchall()]
                cur = await conn.execute("SELECT id FROM public.customers")
                customer_ids = [int(r[0]) for r in await cur.fetchall()]
            workload = ShopWorkload(dsn, ids, customer_ids)
            view = LiveView(
                runtime,
                emu,
                workload=workload,
                dsn=dsn,
                tables=tables,
                rows=initial,
                max_staleness=max_staleness,
            )
            stop_view = asyncio.Event()
            interrupted = False
            synced: dict[str, float] = {}
            watcher = asyncio.create_task(_watch(view, stop_view), name="demo:view")
            try:
                view.phase = "initial sync (customers → orders → lines)"
                t0 = time.monotonic()
                synced = await _snapshots_done(dsn, [t.pipeline for t in tables], runtime_task)
                result.initial_sync_seconds = round(time.monotonic() - t0, 2)
                result.credits_initial_sync = _credits(_sync_usage(emu))
                view.phase = "live changes"
                mono_to_wall = time.time() - time.monotonic()
                await workload.run(duration, rate, stop=runtime.stopping)
                view.phase = "draining"
                await _drained(dsn, runtime, runtime_task)
            except RuntimeError as exc:
                out.print(f"[red]{exc}[/red]")
                interrupted = True
            finally:
                stop_view.set()
                await watcher
                runtime.request_stop()
                rc = await runtime_task
            if rc != 0 or interrupted:
                if rc != 0:
                    out.print("[red]the connector stopped with an error (see the log)[/red]")
                rc = 1
                return 1
            ledger = await ledger_credits(dsn)  # flushed when the runtime stopped
            source = await source_counts(dsn)
            crm = crm_counts(emu, tables)
            stats = workload.stats
            for t in tables:
                result.tables[t.pipeline] = TableResult(
                    pipeline=t.pipeline,
                    target=t.target,
                    rows_in_source=source[t.pipeline],
                    records_in_crm=crm[t.pipeline],
                    changes=stats.rows(t.table),
                    credits=ledger.get(t.pipeline, 0),
                    initial_sync_seconds=synced.get(t.pipeline),
                )
            verify_docs = await _verify_all(settings, secrets, dsn, result)
            usage = _sync_usage(emu)
            changes = {
                "customers": stats.customer_changes,
                "orders": stats.changes,
                "order_lines": stats.line_changes,
            }
            all_samples: list[float] = []
            for t in tables:
                samples = staleness_samples(
                    emu, t.module, t.key_field, changes[t.table], mono_to_wall, apis=t.history_apis
                )
                all_samples += samples
                tr = result.tables[t.pipeline]
                tr.staleness_p50 = _percentile(samples, 0.5)
                tr.staleness_p99 = _percentile(samples, 0.99)
                tr.staleness_max = _percentile(samples, 1.0)
            checked = [tr for tr in result.tables.values() if tr.verified]
            result.rows_in_source = sum(tr.rows_in_source for tr in result.tables.values())
            result.records_in_crm = sum(tr.records_in_crm for tr in result.tables.values())
            result.mismatches = sum(tr.mismatches for tr in checked)
            result.dead_lettered = sum(tr.dead_lettered for tr in checked)
            result.subform_rows_verified = all(tr.verified for tr in result.tables.values())
            result.credits_used = sum(usage.get(a, {}).get("credits", 0) for a in SYNC_APIS)
            result.changes = stats.total
            result.row_changes = sum(stats.rows(t.table) for t in tables)
            result.credits_naive = sum(initial[t.pipeline] for t in tables) + result.row_changes
            result.upsert_calls = usage.get("upsert", {}).get("calls", 0)
            result.update_calls = usage.get("update", {}).get("calls", 0)
            result.bulk_jobs = usage.get("bulk_write_job", {}).get("calls", 0)
            result.delete_calls = usage.get("delete", {}).get("calls", 0)
            result.staleness_p50 = _percentile(all_samples, 0.5)
            result.staleness_p99 = _percentile(all_samples, 0.99)
            result.staleness_max = _percentile(all_samples, 1.0)
            result.total_seconds = round(time.monotonic() - began, 1)
            rc = 0 if _clean(result) else 1
            _summary(out, result, verify_docs, max_staleness)
    finally:
        await asyncio.to_thread(pg.stop, "fast")
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        if report:
            text = json.dumps(result.to_json(), indent=2) + "\n"
            await asyncio.to_thread(Path(report).write_text, text)
    return rc


def main(args: argparse.Namespace) -> int:
    """`connector demo` (called by cli.py)."""
    return asyncio.run(
        run_demo(
            rows=args.rows,
            duration=args.duration,
            rate=args.rate,
            report=args.report,
            keep=bool(getattr(args, "keep", False)),
        )
    )
