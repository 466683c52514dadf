"""`connector demo` (what `make demo` runs): the whole connector, end to end, on one machine.

1. an embedded PostgreSQL 16 in a temporary directory and the Zoho CRM emulator on free ports
   (bulk jobs processed at a realistic rate, small request latency), with an ``Accounts``
   module and, on ``Orders``, the ``Account`` lookup and the ``Lines`` subform
   (:func:`demo_emulator_config`);
2. three related legacy tables filled with realistic rows (``--rows`` orders, default 50,000):
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from connector.demo_workload import ShopWorkload, create_shop, customers_for

if TYPE_CHECKING:
    from connector.emulator import EmulatorConfig

log = logging.getLogger(__name__)

_CONFIG_HEAD = """\
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
"""

_CUSTOMERS_PIPELINE = """
# the parent of the orders' lookup: listed first; a looked-up pipeline ignores (or marks)
# deletes and is not slower than its children
[[pipelines]]
name = "customers"
source_table = "public.customers"
key_column = "id"
module = "Accounts"
key_field = "Legacy_Id"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "ignore"
ignore_columns = ["updated_at"]
[pipelines.fields]
name  = {{ field = "Account_Name", type = "text" }}
email = {{ field = "Email", type = "email" }}
phone = {{ field = "Phone", type = "phone" }}
city  = {{ field = "Billing_City", type = "text" }}
"""

_ORDERS_PIPELINE = """
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

_LOOKUP_FIELD = (
    'customer_id    = {{ field = "Account", type = "lookup", pipeline = "customers" }}\n'
)

_LINES_PIPELINE = """
# order lines: the rows of each order's subform Lines; a change of a line rewrites its order's
# complete line set (Update Records), after the order is in the CRM; an order deleted in the
# CRM takes its rows with it
[[pipelines]]
name = "order_lines"
source_table = "public.order_lines"
key_column = "id"
subform_of = {{ pipeline = "orders", field = "Lines", parent_column = "order_id" }}
capture = "{capture}"
max_staleness = "{max_staleness}"
ignore_columns = ["updated_at"]
[pipelines.fields]
product    = {{ field = "Product", type = "text" }}
quantity   = {{ field = "Qty", type = "integer" }}
unit_price = {{ field = "Unit_Price", type = "currency" }}
"""


def demo_config(
    *,
    dsn: str,
    emulator_url: str,
    port: int,
    max_staleness: str = "20s",
    capture: str = "triggers",
    related_tables: bool = False,
    lines: bool = True,
) -> str:
    """The demo's connector.toml (secrets come from the environment, as in production).

    ``related_tables`` (what ``connector demo`` writes): three pipelines over
    :func:`~connector.demo_workload.create_shop`'s tables, customers → ``Accounts``, orders →
    ``Orders`` with the ``Account`` lookup, order lines → the ``Lines`` subform (``lines``:
    without it, the first two), for :func:`demo_emulator_config`. Without it: the ``orders``
    pipeline alone, over :func:`~connector.demo_workload.create_orders`'s table and the
    emulator's default configuration (what the tests and benchmarks use)."""
    head = _CONFIG_HEAD.format(dsn=dsn, emulator_url=emulator_url, port=port)
    fmt = {"capture": capture, "max_staleness": max_staleness}
    orders = _ORDERS_PIPELINE.format(**fmt)
    if not related_tables:
        return head + orders
    return (
        head
        + _CUSTOMERS_PIPELINE.format(**fmt)
        + orders
        + _LOOKUP_FIELD.format()
        + (_LINES_PIPELINE.format(**fmt) if lines else "")
    )


def demo_emulator_config() -> EmulatorConfig:
    """The emulator's default configuration plus what the three tables map to: an ``Accounts``
    module (``Legacy_Id`` unique: Bulk Write finds an order's account by it) and, on
    ``Orders``, the lookup ``Account`` → Accounts and the subform ``Lines`` (module
    ``Order_Lines``: Product, Qty, Unit_Price). Bulk jobs take seconds (10,000 rows/s), calls
    10-40 ms."""
    from connector.emulator import EmulatorConfig
    from connector.emulator.config import FieldSpec, ModuleSpec

    cfg = EmulatorConfig.default()
    orders = cfg.module("Orders")
    assert orders is not None, "the emulator's default configuration has no Orders module"
    orders.fields = [
        *orders.fields,
        FieldSpec(
            api_name="Account", data_type="lookup", label="Account", lookup_module="Accounts"
        ),
        FieldSpec(
            api_name="Lines",
            data_type="subform",
            label="Lines",
            subform_module="Order_Lines",
            subform_fields=[
                FieldSpec(api_name="Product", label="Product"),
                FieldSpec(api_name="Qty", data_type="integer", label="Qty"),
                FieldSpec(api_name="Unit_Price", data_type="currency", label="Unit Price"),
            ],
        ),
    ]
    accounts = ModuleSpec(
        api_name="Accounts",
        singular_label="Account",
        plural_label="Accounts",
        id="4876876000000600001",
        system_duplicate_check_fields=["Account_Name"],
        fields=[
            FieldSpec(api_name="Account_Name", label="Account Name", mandatory=True, length=255),
            FieldSpec(api_name="Legacy_Id", label="Legacy Id", mandatory=True, unique=True),
            FieldSpec(api_name="Email", data_type="email", label="Email"),
            FieldSpec(api_name="Phone", data_type="phone", label="Phone"),
            FieldSpec(api_name="Billing_City", label="Billing City"),
        ],
    )
    data = cfg.model_dump()
    data["modules"] = [*data["modules"], accounts.model_dump()]
    demo = EmulatorConfig.from_dict(data)  # validated as a whole (lookup targets)
    demo.bulk.rows_per_second = 10_000.0  # a 25,000-row job takes a few seconds
    demo.bulk.queue_seconds = 0.5
    demo.faults.latency = "uniform"
    demo.faults.latency_ms = 10.0
    demo.faults.latency_max_ms = 40.0
    return demo


DEMO_ENV = {
    "DEMO_ZOHO_CLIENT_SECRET": "emulator-client-secret",
    "DEMO_ZOHO_REFRESH_TOKEN": "emulator-refresh-token",
}


# --------------------------------------------------------------------------- the demo itself

SYNC_APIS = ("upsert", "insert", "update", "delete", "bulk_write_job")
SENT_APIS = ("upsert", "bulk", "update", "delete")


@dataclass(frozen=True)
class Table:
    """One legacy table of the demo and where it goes in the CRM."""

    pipeline: str
    table: str
    target: str  # what the live view and summary call it
    module: str
    key_field: str
    # a subform pipeline's writes are Update Records of its parent module
    history_apis: frozenset[str] | None = None


TABLES = (
    Table("customers", "customers", "Accounts", "Accounts", "Legacy_Id"),
    Table("orders", "orders", "Orders", "Orders", "parent_id"),
    Table(
        "order_lines", "order_lines", "Orders.Lines", "Orders", "parent_id", frozenset({"update"})
    ),
)


@dataclass
class TableResult:
    pipeline: str
    target: str
    rows_in_source: int = 0
    records_in_crm: int = 0  # for order lines: subform rows
    changes: int = 0  # rows written by the live workload
    credits: int = 0  # this pipeline's credits (the connector's credit ledger)
    initial_sync_seconds: float | None = None
    verified: bool = False
    mismatches: int = -1
    missing: int = 0
    extra: int = 0
    different: int = 0
    dead_lettered: int = 0
    staleness_p50: float | None = None
    staleness_p99: float | None = None
    staleness_max: float | None = None
    note: str = ""


@dataclass
class DemoResult:
    rows_in_source: int = 0  # every table
    records_in_crm: int = 0  # Accounts and Orders records and Lines rows
    mismatches: int = -1  # over the pipelines verify compared
    dead_lettered: int = 0
    credits_used: int = 0
    credits_initial_sync: int = 0
    credits_naive: int = 0
    upsert_calls: int = 0
    update_calls: int = 0
    bulk_jobs: int = 0
    delete_calls: int = 0
    changes: int = 0  # business operations (transactions) of the live workload
    row_changes: int = 0  # rows they wrote, over the three tables
    staleness_p50: float | None = None
    staleness_p99: float | None = None
    staleness_max: float | None = None
    initial_sync_seconds: float = 0.0
    total_seconds: float = 0.0
    subform_rows_verified: bool = False
    tables: dict[str, TableResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = dict(vars(self))
        doc["tables"] = {k: dict(vars(v)) for k, v in self.tables.items()}
        return doc


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


def crm_counts(emu: Any, tables: tuple[Table, ...]) -> dict[str, int]:
    """Records in the CRM per pipeline; for a subform pipeline, the rows of its subform."""
    out: dict[str, int] = {}
    for t in tables:
        store = emu.state.store(t.module)
        if t.history_apis is None:
            out[t.pipeline] = len(store.records)
        else:
            out[t.pipeline] = sum(len(r.get("Lines") or ()) for r in store.records.values())
    return out


async def source_counts(dsn: str) -> dict[str, int]:
    from psycopg import sql

    out: dict[str, int] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for t in TABLES:
            q = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", t.table))
            row = await (await conn.execute(q)).fetchone()
            out[t.pipeline] = int(row[0]) if row else 0
    return out


async def ledger_credits(dsn: str) -> dict[str, int]:
    """Credits the connector recorded per pipeline (its credit ledger, flushed every 2 s)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(pipeline, ''), sum(credits) FROM connector.credit_ledger GROUP BY 1"
        )
        return {str(p): int(c) for p, c in await cur.fetchall()}


class LiveView:
    """What the connector does with each table, refreshed twice a second (rich on a terminal,
    else a line every 5 s)."""

    def __init__(
        self,
        runtime: Any,
        emu: Any,
        *,
        workload: ShopWorkload,
        dsn: str,
        tables: tuple[Table, ...],
        rows: dict[str, int],
        max_staleness: str,
    ) -> None:
        self.console = _console()
        self.runtime = runtime
        self.emu = emu
        self.workload = workload
        self.dsn = dsn
        self.tables = tables
        self.initial_rows = rows
        self.max_staleness = max_staleness
        self.phase = "starting"
        self.started = time.monotonic()
        self._last_line = 0.0
        self._last_refresh = 0.0
        self.source: dict[str, int] = dict(rows)
        self.ledger: dict[str, int] = {}

    async def refresh(self) -> None:
        """Rows in the tables and credits per pipeline: read from PostgreSQL every 2 s."""
        if time.monotonic() - self._last_refresh < 2.0:
            return
        self._last_refresh = time.monotonic()
        with contextlib.suppress(psycopg.Error):
            self.source = await source_counts(self.dsn)
            self.ledger = await ledger_credits(self.dsn)

    def _metric(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    def table(self, t: Table) -> dict[str, Any]:
        p = t.pipeline
        sent = {
            api: int(
                self._metric(
                    "connector_records_emitted_total", pipeline=p, api=api, outcome="success"
                )
            )
            for api in SENT_APIS
        }
        return {
            "snapshot": self._metric("connector_snapshot_progress_ratio", pipeline=p),
            "source": self.source.get(p, 0),
            "changes": self.workload.stats.rows(t.table),
            "captured": int(self._metric("connector_outbox_lag_events", pipeline=p)),
            "pending": int(self._metric("connector_pending_keys", pipeline=p)),
            "oldest": self._metric("connector_oldest_pending_change_age_seconds", pipeline=p),
            "sent": sent,
            "credits": self.ledger.get(p, 0),
        }

    def snapshot(self) -> dict[str, Any]:
        usage = _sync_usage(self.emu)
        stats = self.workload.stats
        return {
            "phase": self.phase,
            "elapsed": time.monotonic() - self.started,
            "tables": {t.pipeline: self.table(t) for t in self.tables},
            "crm": crm_counts(self.emu, self.tables),
            "operations": stats.total,
            "credits": _credits(usage),
            "naive": sum(self.initial_rows.values()) + sum(stats.rows_changed.values()),
            "upsert_calls": usage.get("upsert", {}).get("calls", 0),
            "update_calls": usage.get("update", {}).get("calls", 0),
            "bulk_jobs": usage.get("bulk_write_job", {}).get("calls", 0),
        }

    def render(self) -> Any:
        from rich.table import Table as RichTable

        s = self.snapshot()
        t = RichTable(title=f"connector demo — {s['phase']}  ({s['elapsed']:.0f}s)", expand=False)
        t.add_column("", style="bold")
        docs = [s["tables"][x.pipeline] for x in self.tables]
        for x in self.tables:
            t.add_column(f"{x.table} → {x.target}", justify="right")

        def row(label: str, cells: list[str]) -> None:
            t.add_row(label, *cells)

        row("initial sync", [f"{d['snapshot'] * 100:.0f}%" for d in docs])
        row("rows in the table", [str(d["source"]) for d in docs])
        row("records / rows in the CRM", [str(s["crm"][x.pipeline]) for x in self.tables])
        row("rows changed live", [str(d["changes"]) for d in docs])
        row("outbox events not checkpointed", [str(d["captured"]) for d in docs])
        row("pending keys (coalesced)", [str(d["pending"]) for d in docs])
        row(f"oldest pending (max {self.max_staleness})", [f"{d['oldest']:.1f}s" for d in docs])
        row(
            "sent upsert / bulk / update / delete",
            [" / ".join(str(d["sent"][a]) for a in SENT_APIS) for d in docs],
        )
        row("credits (connector's ledger)", [str(d["credits"]) for d in docs])
        t.add_section()
        t.add_row(
            "all tables",
            f"{s['operations']} live operations",
            f"{s['upsert_calls']} upsert / {s['update_calls']} update calls, "
            f"{s['bulk_jobs']} bulk jobs",
            f"{s['credits']} credits (one call per row: {s['naive']})",
        )
        return t

    def line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < 5:
            return
        self._last_line = now
        s = self.snapshot()
        parts = [
            f"{p} pending {d['pending']} oldest {d['oldest']:.1f}s sync {d['snapshot'] * 100:.0f}%"
            for p, d in s["tables"].items()
        ]
        self.console.print(
            f"[{s['elapsed']:5.0f}s] {s['phase']}: {s['operations']} operations; "
            + "; ".join(parts)
            + f"; credits {s['credits']} (naive {s['naive']})"
        )


async def _watch(view: LiveView, stop: asyncio.Event) -> None:
    if view.console.is_terminal:
        from rich.live import Live

        with Live(view.render(), console=view.console, refresh_per_second=4) as live:
            while not stop.is_set():
                await view.refresh()
                live.update(view.render())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            live.update(view.render())
    else:
        while not stop.is_set():
            await view.refresh()
            view.line()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


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


def _clean(r: DemoResult) -> bool:
    """No verify found a mismatch, and every table's rows are in the CRM (for the lines, also
    when ``verify`` could not compare them)."""
    return r.mismatches == 0 and all(
        tr.rows_in_source == tr.records_in_crm for tr in r.tables.values()
    )


def _console() -> Any:
    """A rich console; into a file or pipe, 120 columns wide (rich's default there is 80, which
    wraps the three tables' columns)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def _summary(
    out: Any, r: DemoResult, verify_docs: dict[str, dict[str, Any]], max_staleness: str
) -> None:
    from rich.table import Table as RichTable

    t = RichTable(title="connector demo: summary")
    t.add_column("")
    trs = list(r.tables.values())
    for tr in trs:
        t.add_column(f"{tr.pipeline} → {tr.target}", justify="right")

    def row(label: str, cells: list[str]) -> None:
        t.add_row(label, *cells)

    def verdict(tr: TableResult) -> str:
        if not tr.verified:
            return "not verified"
        return f"{tr.mismatches} ({tr.missing}/{tr.extra}/{tr.different})"

    row("rows in source / in the CRM", [f"{x.rows_in_source} / {x.records_in_crm}" for x in trs])
    row("verify mismatches (missing/extra/different)", [verdict(x) for x in trs])
    row("dead-lettered", [str(x.dead_lettered) if x.verified else "-" for x in trs])
    row("initial sync done after", [f"{x.initial_sync_seconds}s" for x in trs])
    row("rows changed live", [str(x.changes) for x in trs])
    row("credits (connector's ledger)", [str(x.credits) for x in trs])
    row(
        f"staleness p50 / p99 / max (max {max_staleness})",
        [f"{x.staleness_p50}s / {x.staleness_p99}s / {x.staleness_max}s" for x in trs],
    )
    out.print(t)

    s = RichTable(title="all tables", show_header=False)
    s.add_column("")
    s.add_column("", justify="right")
    s.add_row("initial sync", f"{r.initial_sync_seconds}s, {r.credits_initial_sync} credits")
    s.add_row("live changes", f"{r.changes} operations, {r.row_changes} rows")
    s.add_row("credits used (one call per row would cost)", f"{r.credits_used} ({r.credits_naive})")
    s.add_row(
        "upsert / update calls, bulk jobs, delete calls",
        f"{r.upsert_calls} / {r.update_calls}, {r.bulk_jobs}, {r.delete_calls}",
    )
    s.add_row(
        "staleness p50 / p99 / max",
        f"{r.staleness_p50}s / {r.staleness_p99}s / {r.staleness_max}s",
    )
    s.add_row("total time", f"{r.total_seconds}s")
    out.print(s)
    for tr in trs:
        if tr.note:
            out.print(f"[yellow]{tr.pipeline}: {tr.note}[/yellow]")
        doc = verify_docs.get(tr.pipeline)
        if doc and doc["mismatches"]:
            out.print(f"{tr.pipeline}: examples {json.dumps(doc['examples'], default=str)}")
        if tr.rows_in_source != tr.records_in_crm:
            out.print(
                f"[red]{tr.pipeline}: {tr.rows_in_source} rows in the table,"
                f" {tr.records_in_crm} in the CRM[/red]"
            )
    if not _clean(r):
        out.print("[red]verify found mismatches[/red]")
    elif r.subform_rows_verified:
        out.print("[green]verify: the CRM matches the tables[/green]")
    else:
        out.print(
            "[green]verify: the CRM matches the tables it compared[/green] (customers, orders"
            " and their lookups; the order lines' subform rows were not verified, only counted)"
        )


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
