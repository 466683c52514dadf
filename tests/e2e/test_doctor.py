"""`connector doctor` against the emulator and a real PostgreSQL: all checks pass on a good
installation, and each common mistake fails its own check with a fix (exit 1), or exit 2 for a
configuration the file itself gets wrong."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector import doctor
from connector.config import load_settings, resolve_secrets
from connector.demo import DEMO_ENV
from connector.emulator import start_emulator
from connector.emulator.config import TokenSpec
from tests.e2e.helpers import ROOT, emulator_config, prepare

pytestmark = pytest.mark.slow


async def _run(config: Path, *args: str) -> tuple[int, str, str]:
    env = {"PYTHONPATH": str(ROOT), **DEMO_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "doctor",
        "--config",
        str(config),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _by_name(report: doctor.DoctorReport) -> dict[str, list[doctor.Check]]:
    out: dict[str, list[doctor.Check]] = {}
    for c in report.checks:
        out.setdefault(f"{c.area}.{c.name}", []).append(c)
    return out


async def _doctor(config: Path, **kw: Any) -> doctor.DoctorReport:
    settings = load_settings(config)
    return await doctor.doctor(settings, resolve_secrets(settings, dict(DEMO_ENV)), **kw)


@pytest.mark.parametrize("capture", ["triggers", "logical"])
async def test_all_checks_pass_with_bulk_round_trip(
    database: str, tmp_path: Path, capture: str
) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5, capture=capture)
        rc, out, err = await _run(setup.config, "--bulk")
        assert rc == 0, out + err
        assert "FAIL" not in out
        for needle in (
            "database.reachable",
            "database.state_schema",
            "database.columns",
            "database.privileges",
            "database.capture",
            "crm.token",
            "crm.hosts",
            "crm.scope",
            "crm.org",
            "crm.mapping",
            "crm.credits",
            "roundtrip.upsert",
            "roundtrip.bulk",
        ):
            assert f"ok   {needle}" in out, (needle, out)
        if capture == "logical":
            assert "ok   database.wal_level" in out
        # the probe is gone from the CRM afterwards, and nothing else was written
        keys = [r.get("parent_id") for r in emu.state.records_of("Orders")]
        assert "__connector_probe__" not in keys
        # the round trip wrote one record by upsert and one job by bulk write
        assert emu.state.ledger.used_sum >= 500


async def test_json_report_and_no_roundtrip(database: str, tmp_path: Path) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        rc, out, _ = await _run(setup.config, "--json", "--no-roundtrip")
        assert rc == 0
        doc = json.loads(out)
        assert doc["ok"] is True and doc["failed"] == 0
        assert not [c for c in doc["checks"] if c["area"] == "roundtrip"]
        assert all(set(c) >= {"area", "name", "status", "detail", "fix"} for c in doc["checks"])


async def test_missing_scope_names_the_scope(database: str, tmp_path: Path) -> None:
    cfg = emulator_config()
    cfg.auth.refresh_tokens = [
        TokenSpec(
            refresh_token="emulator-refresh-token",
            scopes=[
                "ZohoCRM.modules",
                "ZohoCRM.settings",
                "ZohoCRM.users",
                "ZohoCRM.org",
                "ZohoCRM.bulk",
                "ZohoFiles.files",
            ],
        )
    ]
    async with start_emulator(cfg) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        report = await _doctor(setup.config, roundtrip=False)
        scope = [c for c in report.checks if c.name == "scope" and c.status == "fail"]
        assert len(scope) == 1, report.text()
        assert "ZohoCRM.coql.READ" in scope[0].detail
        assert "ZohoCRM.coql.READ" in scope[0].fix
        assert report.exit_code == 1


async def test_wrong_data_centre_host(database: str, tmp_path: Path) -> None:
    cfg = emulator_config()
    # the org lives in another data centre: its token answer names another API domain
    cfg.api_domain = "https://www.zohoapis.eu"
    async with start_emulator(cfg) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        report = await _doctor(setup.config, roundtrip=False)
        hosts = _by_name(report)["crm.hosts"][0]
        assert hosts.status == "fail", report.text()
        assert "https://www.zohoapis.eu" in hosts.detail
        assert "crm.data_centre" in hosts.fix


async def test_unreachable_accounts_server(database: str, tmp_path: Path) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
    # the emulator is gone: nothing answers at the configured accounts URL
    report = await _doctor(setup.config, roundtrip=False)
    token = _by_name(report)["crm.token"][0]
    assert token.status == "fail", report.text()
    assert "crm.data_centre" in token.fix
    assert report.exit_code == 1


async def test_field_type_mismatch_crm_and_source(database: str, tmp_path: Path) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        text = setup.config.read_text()
        # CRM side: Quantity is an integer field; source side: notes (text) -> a boolean field
        text = text.replace(
            'quantity       = { field = "Quantity", type = "integer" }',
            'quantity       = { field = "Quantity", type = "text" }',
        )
        text = text.replace(
            'is_gift        = { field = "Is_Gift", type = "boolean" }',
            'notes_flag     = { field = "Is_Gift", type = "boolean" }',
        )
        setup.config.write_text(text)
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("ALTER TABLE public.orders ADD COLUMN notes_flag text")
        report = await _doctor(setup.config, roundtrip=False)
        checks = _by_name(report)
        mapping = checks["crm.mapping"][0]
        assert mapping.status == "fail", report.text()
        assert "fields.quantity" in mapping.detail
        columns = [c for c in checks["database.columns"] if c.status == "fail"]
        assert any("notes_flag" in c.detail and "boolean" in c.detail for c in columns)
        assert report.exit_code == 1


async def test_bulk_row_the_crm_rejects(database: str, tmp_path: Path) -> None:
    cfg = emulator_config(skip_rows_field="parent_id", skip_rows_pattern="^__connector")
    async with start_emulator(cfg) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        report = await _doctor(setup.config, bulk=True)
        checks = _by_name(report)
        assert checks["roundtrip.upsert"][0].status == "ok", report.text()
        bulk = checks["roundtrip.bulk"][0]
        assert bulk.status == "fail", report.text()
        assert "rejected the probe row" in bulk.detail


async def test_database_mistakes(database: str, tmp_path: Path) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("DROP TRIGGER IF EXISTS zz ON public.orders")
            cur = await conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass"
                " AND NOT tgisinternal"
            )
            for (name,) in await cur.fetchall():
                await conn.execute(
                    psycopg.sql.SQL("DROP TRIGGER {} ON public.orders").format(
                        psycopg.sql.Identifier(name)
                    )
                )
        report = await _doctor(setup.config, roundtrip=False)
        capture = _by_name(report)["database.capture"][0]
        assert capture.status == "fail"
        assert "connector init" in capture.fix
        # a database that does not exist: one failing check, the CRM checks still run
        text = setup.config.read_text()
        dsn = database.rsplit("dbname=", 1)[0] + "dbname=nosuchdb"
        if "dbname=" not in database:
            dsn = database.rsplit("/", 1)[0] + "/nosuchdb"
        setup.config.write_text(text.replace(database, dsn))
        report = await _doctor(setup.config, roundtrip=False)
        reach = _by_name(report)["database.reachable"][0]
        assert reach.status == "fail"
        assert "database.dsn" in reach.fix
        assert _by_name(report)["crm.token"][0].status == "ok"


async def test_config_error_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[crm]\nclient_id = 'x'\n")
    rc, _, err = await _run(bad)
    assert rc == 2, err


def test_compare_values() -> None:
    from decimal import Decimal

    assert doctor.compare("currency", Decimal("1234.56"), 1234.56) is None
    assert doctor.compare("currency", Decimal("1234.56"), 1234.5) is not None
    assert (
        doctor.compare("datetime", "2024-02-29T13:45:30+05:30", "2024-02-29T08:15:30+00:00") is None
    )
    assert doctor.compare("datetime", "2024-02-29T13:45:30+05:30", "2024-02-29T13:45:30+00:00")
    assert doctor.compare("boolean", True, True) is None
    assert doctor.compare("boolean", True, False)
    assert doctor.compare("text", "ünï", "ünï") is None
    assert doctor.compare("date", "2024-02-29", "2024-03-01")


async def test_a_deferrable_primary_key_fails_replica_identity(
    database: str, tmp_path: Path
) -> None:
    """A primary key made DEFERRABLE after `init` (logical mode) leaves the table without a
    replica identity: doctor says so and names the fix (capture-logical.md)."""
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1, capture="logical")
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute(
                "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey,"
                " ADD PRIMARY KEY (id) DEFERRABLE"
            )
        report = await _doctor(setup.config, roundtrip=False)
        check = _by_name(report)["database.replica_identity"][0]
        assert check.status == "fail"
        assert "DEFERRABLE" in check.detail
        assert "REPLICA IDENTITY USING INDEX" in check.fix and "FULL" in check.fix


async def test_second_run_reuses_the_shared_token(database: str, tmp_path: Path) -> None:
    async with start_emulator(emulator_config()) as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=1)
        rc1, out1, err1 = await _run(setup.config, "--no-roundtrip")
        rc2, out2, err2 = await _run(setup.config, "--no-roundtrip")
        assert (rc1, rc2) == (0, 0), out1 + err1 + out2 + err2
        assert "a new access token minted" in out1
        assert "the shared access token reused (none minted)" in out2
