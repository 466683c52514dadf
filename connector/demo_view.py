"""What ``connector demo`` shows: its three tables (:data:`TABLES`), the live view
(:class:`LiveView`, refreshed by :func:`_watch`: rich on a terminal, else a line every 5 s),
the counts it reads (rows in the tables, records in the emulator, the connector's credit
ledger) and the summary (:func:`_summary` of a :class:`DemoResult`). ``connector/demo.py``
runs the demo with them and re-exports these names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from connector.demo_shop import ShopWorkload

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


def _sync_usage(emu: Any) -> dict[str, dict[str, int]]:
    by_api: dict[str, dict[str, int]] = emu.usage()["by_api"]
    return by_api


def _credits(usage: dict[str, dict[str, int]]) -> int:
    return sum(v.get("credits", 0) for v in usage.values())


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
