"""`connector demo` end to end, small: exit 0 only when verify finds no mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.helpers import ROOT


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
    assert doc["mismatches"] == 0
    assert doc["rows_in_source"] == doc["records_in_crm"] > 2000 - 100
    # every change and every row reached the CRM for far fewer credits than one call each
    assert 0 < doc["credits_used"] < doc["credits_naive"]
    assert doc["upsert_calls"] > 0
    for k in ("staleness_p50", "staleness_p99", "staleness_max", "bulk_jobs"):
        assert k in doc
    assert "verify: the CRM matches the table" in proc.stdout
