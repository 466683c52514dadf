"""`connector demo` end to end, small: three related tables (customers → Accounts, orders →
Orders with the Account lookup, order lines → the Lines subform of Orders), each verified
clean; exit 0 only when verify finds no mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.helpers import ROOT

TABLES = ("customers", "orders", "order_lines")


def test_demo_small_run_is_verified_clean(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "connector",
            "demo",
            "--rows",
            "2000",
            "--duration",
            "10",
            "--rate",
            "40",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    tables = doc["tables"]
    assert sorted(tables) == sorted(TABLES)
    # each table verified clean, and the CRM holds every row of it
    for name in TABLES:
        t = tables[name]
        assert t["verified"], (name, t["note"])
        assert (t["mismatches"], t["missing"], t["extra"], t["different"]) == (0, 0, 0, 0), t
        assert t["rows_in_source"] == t["records_in_crm"] > 0, t
        assert t["changes"] > 0, t  # the live workload wrote each table
        assert t["credits"] > 0, t
        assert t["initial_sync_seconds"] is not None, t
    assert doc["mismatches"] == 0
    assert doc["subform_rows_verified"] is True
    # about one customer per 5 orders, 1-5 lines per order; the lines are the CRM's Lines rows
    customers, orders, lines = (tables[n]["rows_in_source"] for n in TABLES)
    assert orders > 2000 - 100
    assert 2000 // 5 <= customers < orders // 3
    assert 2 * orders < lines < 4 * orders
    assert tables["order_lines"]["records_in_crm"] == lines
    assert doc["rows_in_source"] == doc["records_in_crm"] == customers + orders + lines
    # every change and every row reached the CRM for far fewer credits than one call each;
    # lines go by Update Records (Bulk Write takes no subform), records by upsert
    assert 0 < doc["credits_used"] < doc["credits_naive"]
    assert doc["upsert_calls"] > 0
    assert doc["update_calls"] > 0
    for k in ("staleness_p50", "staleness_p99", "staleness_max", "bulk_jobs"):
        assert k in doc
    assert "verify: the CRM matches the tables" in proc.stdout
    assert "not verified" not in proc.stdout
