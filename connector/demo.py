"""`connector demo` (what `make demo` runs): the whole connector, end to end, on one machine.

1. an embedded PostgreSQL 16 in a temporary directory and the Zoho CRM emulator on free ports
   (bulk jobs processed at a realistic rate, small request latency);
2. a legacy ``orders`` table filled with realistic rows (``--rows``, default 50,000);
3. a configuration file (trigger capture, ``max_staleness`` 20 s so flushes show), ``init``;
4. the connector (the real runtime, in-process): initial sync by Bulk Write, then a live
   workload (``--rate`` changes/s for ``--duration`` s: new orders, status changes along an
   order's life, edits, cancellations, deletes; skewed so some orders change often) while the
   connector streams the changes; a live view shows what happens;
5. drain, ``verify`` the CRM against the table, print (and ``--report``) a summary.

Exit 0 only when verify finds no mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from connector.demo_workload import Workload, create_orders

log = logging.getLogger(__name__)


def demo_config(
    *,
    dsn: str,
    emulator_url: str,
    port: int,
    max_staleness: str = "20s",
    capture: str = "triggers",
) -> str:
    """The demo's connector.toml (secrets come from the environment, as in production)."""
    return f"""\
[crm]
data_centre = "custom"
accounts_url = "{emulator_url}"
api_url = "{emulator_url}"
upload_url = "{emulator_url}"
client_id = "emulator-client-id"
client_secret_env = "DEMO_ZOHO_CLIENT_SECRET"
refresh_token_env = "DEMO_ZOHO_REFRESH_TOKEN"
edition = "enterprise"
# a local emulator answers in milliseconds; also how long a new owner waits after a crash
request_timeout = "15s"
daily_credit_budget = 50000
credit_reserve = 1000

[database]
dsn = "{dsn}"
pool_size = 8

[server]
host = "127.0.0.1"
port = {port}
drain_timeout = "20s"

[logging]
level = "warning"

[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "delete"
ignore_columns = ["updated_at"]
[pipelines.fields]
order_number   = {{ field = "Name", type = "text" }}
customer_email = {{ field = "Customer_Email", type = "email" }}
status         = {{ field = "Status", type = "picklist" }}
amount         = {{ field = "Amount", type = "currency" }}
quantity       = {{ field = "Quantity", type = "integer" }}
order_date     = {{ field = "Order_Date", type = "date" }}
placed_at      = {{ field = "Placed_At", type = "datetime" }}
notes          = {{ field = "Notes", type = "textarea" }}
is_gift        = {{ field = "Is_Gift", type = "boolean" }}
"""


DEMO_ENV = {
    "DEMO_ZOHO_CLIENT_SECRET": "emulator-client-secret",
    "DEMO_ZOHO_REFRESH_TOKEN": "emulator-refresh-token",
}


# --------------------------------------------------------------------------- the demo itself

SYNC_APIS = ("upsert", "insert", "update", "delete", "bulk_write_job")


@dataclass
class DemoResult:
    rows_in_source: int = 0
    records_in_crm: int = 0
    mismatches: int = -1
    dead_lettered: int = 0
    credits_used: int = 0
    credits_initial_sync: int = 0
    credits_naive: int = 0
    upsert_calls: int = 0
    bulk_jobs: int = 0
    delete_calls: int = 0
    changes: int = 0
    staleness_p50: float | None = None
    staleness_p99: float | None = None
    staleness_max: float | None = None
    initial_sync_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return round(s[i], 3)


def _sync_usage(emu: Any) -> dict[str, dict[str, int]]:
    by_api: dict[str, dict[str, int]] = emu.usage()["by_api"]
    return by_api


def _credits(usage: dict[str, dict[str, int]]) -> int:
    return sum(v.get("credits", 0) for v in usage.values())


def staleness_samples(
    emu: Any, module: str, key_field: str, changes: list[tuple[float, str]], mono_to_wall: float
) -> list[float]:
    """For each committed change: seconds from its commit until the CRM next wrote that record
    (emulator write history, wall clock). Deleted records are measured by their delete."""
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
        later = [h["timestamp"] for h in store.history.get(rid, []) if h["timestamp"] >= t]
        if rid in store.deleted and not later:
            continue
        if later:
            out.append(min(later) - t)
    return out


class LiveView:
    """What the connector is doing, refreshed twice a second (rich on a terminal, else lines)."""

    def __init__(self, runtime: Any, emu: Any, workload: Workload | None, rows: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=False)
        self.runtime = runtime
        self.emu = emu
        self.workload = workload
        self.rows = rows
        self.phase = "starting"
        self.started = time.monotonic()
        self._last_line = 0.0

    def _metric(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    def snapshot(self) -> dict[str, Any]:
        usage = _sync_usage(self.emu)
        wl = self.workload.stats if self.workload else None
        sent = {
            api: int(
                self._metric(
                    "connector_records_emitted_total", pipeline="orders", api=api, outcome="success"
                )
            )
            for api in ("upsert", "bulk", "delete")
        }
        changes = wl.total if wl else 0
        return {
            "phase": self.phase,
            "elapsed": time.monotonic() - self.started,
            "captured": int(self._metric("connector_outbox_lag_events", pipeline="orders")),
            "changes": changes,
            "pending": int(self._metric("connector_pending_keys", pipeline="orders")),
            "oldest": self._metric(
                "connector_oldest_pending_change_age_seconds", pipeline="orders"
            ),
            "sent": sent,
            "bulk_in_flight": int(self._metric("connector_bulk_jobs_in_flight", pipeline="orders")),
            "credits": _credits(usage),
            "naive": self.rows + changes,
            "upsert_calls": usage.get("upsert", {}).get("calls", 0),
            "bulk_jobs": usage.get("bulk_write_job", {}).get("calls", 0),
            "snapshot": self._metric("connector_snapshot_progress_ratio", pipeline="orders"),
        }

    def render(self) -> Any:
        from rich.table import Table

        s = self.snapshot()
        t = Table(title=f"connector demo — {s['phase']}  ({s['elapsed']:.0f}s)", expand=False)
        t.add_column("what", style="bold")
        t.add_column("value", justify="right")
        t.add_row("initial sync", f"{s['snapshot'] * 100:.0f}%")
        t.add_row("live changes committed", str(s["changes"]))
        t.add_row("outbox events not yet checkpointed", str(s["captured"]))
        t.add_row("pending keys (coalesced)", str(s["pending"]))
        t.add_row("oldest pending change", f"{s['oldest']:.1f}s (max_staleness 20s)")
        t.add_row(
            "sent by upsert / bulk / delete",
            f"{s['sent']['upsert']} / {s['sent']['bulk']} / {s['sent']['delete']}",
        )
        t.add_row("upsert calls / bulk jobs", f"{s['upsert_calls']} / {s['bulk_jobs']}")
        t.add_row("bulk jobs in flight", str(s["bulk_in_flight"]))
        t.add_row("credits spent", f"{s['credits']}  (one call per change: {s['naive']})")
        return t

    def line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < 5:
            return
        self._last_line = now
        s = self.snapshot()
        self.console.print(
            f"[{s['elapsed']:5.0f}s] {s['phase']}: changes {s['changes']}, pending {s['pending']}, "
            f"oldest {s['oldest']:.1f}s, sent upsert/bulk/delete "
            f"{s['sent']['upsert']}/{s['sent']['bulk']}/{s['sent']['delete']}, "
            f"credits {s['credits']} (naive {s['naive']})"
        )


async def _watch(view: LiveView, stop: asyncio.Event) -> None:
    if view.console.is_terminal:
        from rich.live import Live

        with Live(view.render(), console=view.console, refresh_per_second=4) as live:
            while not stop.is_set():
                live.update(view.render())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            live.update(view.render())
    else:
        while not stop.is_set():
            view.line()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def _snapshot_done(dsn: str, runtime_task: asyncio.Task[int]) -> None:
    while True:
        if runtime_task.done():
            raise RuntimeError("the connector stopped during the initial sync (see the log)")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT s.status = 'done' AND coalesce(c.last_id, 0) >= coalesce("
                " (SELECT max(id) FROM connector.outbox WHERE pipeline = 'orders'"
                "  AND op = 'snapshot'), 0)"
                " FROM connector.snapshots s LEFT JOIN connector.checkpoints c USING (pipeline)"
                " WHERE s.pipeline = 'orders'"
            )
            row = await cur.fetchone()
        if row is not None and row[0]:
            return
        await asyncio.sleep(0.5)


async def _drained(dsn: str, runtime: Any, runtime_task: asyncio.Task[int]) -> None:
    """Flush everything now and wait until every committed change is acknowledged."""
    while True:
        if runtime_task.done():
            raise RuntimeError("the connector stopped while draining (see the log)")
        runner = runtime.runners.get("orders")
        if runner is not None and runner.engine is not None:
            runner.engine.flush_all()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            from connector.status import pipeline_status

            doc = await pipeline_status(conn, runtime.settings, runtime.pipelines[0])
        if doc["pending_keys"] == 0 and doc["capture"]["lag_events"] == 0:
            return
        await asyncio.sleep(0.5)


async def run_demo(
    *, rows: int, duration: float, rate: float, report: str | None, keep: bool
) -> int:
    from connector import admin
    from connector.config import load_settings, resolve_secrets
    from connector.emulator import EmulatorConfig, start_emulator
    from connector.logs import add_secrets
    from connector.metrics import Metrics
    from connector.pgembed import EmbeddedPostgres, free_port
    from connector.runtime import Runtime
    from connector.verify import verify
    from connector.zoho import PgTokenStore, ZohoClient

    began = time.monotonic()
    result = DemoResult()
    tmp = Path(tempfile.mkdtemp(prefix="connector-demo-"))
    out = _console()
    out.print(
        f"[bold]connector demo[/bold]: {rows} orders, {duration:.0f}s of live changes at "
        f"{rate:g}/s (work dir {tmp})"
    )
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # pgserver's platformdirs
    pg = EmbeddedPostgres(tmp / "pg")
    await asyncio.to_thread(pg.start)
    try:
        dsn = pg.dsn()
        cfg = EmulatorConfig.default()
        cfg.bulk.rows_per_second = 10_000.0  # a 25,000-row job takes a few seconds
        cfg.bulk.queue_seconds = 0.5
        cfg.faults.latency = "uniform"
        cfg.faults.latency_ms = 10.0
        cfg.faults.latency_max_ms = 40.0
        async with start_emulator(cfg) as emu:
            out.print(f"PostgreSQL 16 on port {pg.port}, Zoho CRM emulator at {emu.url}")
            await create_orders(dsn, rows)
            config = tmp / "connector.toml"
            config.write_text(demo_config(dsn=dsn, emulator_url=emu.url, port=free_port()))
            settings = load_settings(config)
            secrets = resolve_secrets(settings, {**os.environ, **DEMO_ENV})
            add_secrets(secrets.values())
            await admin.init(settings, secrets)
            out.print(
                f"legacy table public.orders: {rows} rows; capture installed (triggers); "
                f"configuration {config}"
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
            workload = Workload(dsn, ids)
            view = LiveView(runtime, emu, workload, rows)
            stop_view = asyncio.Event()
            interrupted = False
            watcher = asyncio.create_task(_watch(view, stop_view), name="demo:view")
            try:
                view.phase = "initial sync (Bulk Write)"
                t0 = time.monotonic()
                await _snapshot_done(dsn, runtime_task)
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
                return 1
            async with ZohoClient.from_config(
                settings.crm,
                client_secret=secrets.client_secret,
                refresh_token=secrets.refresh_token,
                token_store=PgTokenStore(secrets.state_dsn, settings.database.state_schema),
            ) as client:
                rep = await verify(
                    pipeline=settings.pipelines[0],
                    client=client,
                    source_dsn=dsn,
                    state_dsn=dsn,
                    schema=settings.database.state_schema,
                )
            usage = _sync_usage(emu)
            samples = staleness_samples(
                emu, "Orders", "parent_id", workload.stats.changes, mono_to_wall
            )
            result.rows_in_source = rep.rows_in_source
            result.records_in_crm = rep.records_in_crm
            result.mismatches = rep.mismatches
            result.dead_lettered = len(rep.dead_lettered)
            result.credits_used = sum(usage.get(a, {}).get("credits", 0) for a in SYNC_APIS)
            result.changes = workload.stats.total
            result.credits_naive = rows + workload.stats.total
            result.upsert_calls = usage.get("upsert", {}).get("calls", 0)
            result.bulk_jobs = usage.get("bulk_write_job", {}).get("calls", 0)
            result.delete_calls = usage.get("delete", {}).get("calls", 0)
            result.staleness_p50 = _percentile(samples, 0.5)
            result.staleness_p99 = _percentile(samples, 0.99)
            result.staleness_max = _percentile(samples, 1.0)
            result.total_seconds = round(time.monotonic() - began, 1)
            _summary(out, result, rep.to_json(5))
    finally:
        await asyncio.to_thread(pg.stop, "fast")
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if report:
        text = json.dumps(result.to_json(), indent=2) + "\n"
        await asyncio.to_thread(Path(report).write_text, text)
    return 0 if result.mismatches == 0 else 1


def _console() -> Any:
    from rich.console import Console

    return Console()


def _summary(out: Any, r: DemoResult, verify_doc: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="connector demo: summary")
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("rows in source / records in CRM", f"{r.rows_in_source} / {r.records_in_crm}")
    t.add_row(
        "verify mismatches (missing/extra/different)",
        f"{r.mismatches} ({verify_doc['missing']}/{verify_doc['extra']}/{verify_doc['different']})",
    )
    t.add_row("dead-lettered", str(r.dead_lettered))
    t.add_row("initial sync", f"{r.initial_sync_seconds}s, {r.credits_initial_sync} credits")
    t.add_row("live changes", str(r.changes))
    t.add_row(
        "credits used (one call per change would cost)", f"{r.credits_used} ({r.credits_naive})"
    )
    t.add_row(
        "upsert calls / bulk jobs / delete calls",
        f"{r.upsert_calls} / {r.bulk_jobs} / {r.delete_calls}",
    )
    t.add_row(
        "staleness p50 / p99 / max", f"{r.staleness_p50}s / {r.staleness_p99}s / {r.staleness_max}s"
    )
    t.add_row("total time", f"{r.total_seconds}s")
    out.print(t)
    if r.mismatches == 0:
        out.print("[green]verify: the CRM matches the table[/green]")
    else:
        out.print("[red]verify found mismatches[/red]")


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
