"""`connector run` as a real process: SIGTERM drain with an honest checkpoint, restart, CRM equals
the table; SIGKILL of the owner with a hot standby taking over; the /metrics scrape; no secret in
any log line, metric or status output."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from connector.config import load_settings
from connector.metrics import Metrics
from connector.operate import pipeline_status
from tests.e2e.helpers import (
    ROOT,
    SECRETS,
    ConnectorProcess,
    change_orders,
    checkpoint,
    connector_running,
    emulator,
    prepare,
    wait_in_sync,
)

GRACE_LINE = "the previous owner did not stop cleanly"


async def test_sigterm_drains_honestly_and_a_restart_converges(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=500, max_staleness="12s")
        run = ConnectorProcess(setup, tmp_path, "first")
        await run.start()
        await run.wait_http("/readyz")
        await wait_in_sync(setup, run)  # initial sync (upsert: 500 rows cost less than a job)

        # changes that wait for their deadline (12 s) are pending when SIGTERM arrives
        await change_orders(database, 60, seed=11)
        settings = load_settings(setup.config)
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            doc = await pipeline_status(conn, settings, settings.pipelines[0])
        assert doc["pending_keys"] > 0  # waiting for their deadline when SIGTERM arrives
        rc = await run.stop(signal.SIGTERM)
        assert rc == 0, run.logs()[-3000:]
        assert "connector stopped cleanly" in run.logs()

        # the checkpoint is honest: it never passes an event whose key is not acknowledged
        async with await psycopg.AsyncConnection.connect(database) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM connector.outbox o"
                " JOIN connector.checkpoints c ON c.pipeline = o.pipeline"
                " LEFT JOIN connector.key_state k ON k.pipeline = o.pipeline AND k.key = o.key"
                " WHERE o.id <= c.last_id AND o.txid <> ALL(c.pending_txids)"
                "   AND (k.version IS NULL OR k.version < o.version)"
            )
            row = await cur.fetchone()
            assert row is not None and row[0] == 0
        # more changes while nothing runs; the restart sends them and the pending ones
        await change_orders(database, 40, seed=12)
        again = ConnectorProcess(setup, tmp_path, "second")
        await again.start()
        await again.wait_http("/readyz")
        await wait_in_sync(setup, again, timeout=120)
        assert await again.stop() == 0
        # the first run drained and said so: the second one did not wait for its requests
        assert GRACE_LINE not in again.logs()
        last, newest = await checkpoint(database)
        assert last == newest


async def test_sigkill_of_the_owner_hot_standby_takes_over(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=200, max_staleness="2s")
        owner = ConnectorProcess(setup, tmp_path, "owner")
        await owner.start()
        await owner.wait_metric('connector_pipeline_up{pipeline="orders"} 1.0')
        standby = ConnectorProcess(setup, tmp_path, "standby", port=setup.port + 1)
        await standby.start()
        await standby.wait_http("/readyz")  # a healthy standby is ready (docs/operations.md)
        _, body = await standby.get("/readyz")
        assert json.loads(body)["role"] == "standby"
        await standby.wait_metric('connector_pipeline_up{pipeline="orders"} 0.0')

        writer = asyncio.create_task(change_orders(database, 150, seed=21))
        await asyncio.sleep(0.3)
        owner.send(signal.SIGKILL)
        assert await owner.stop() == -signal.SIGKILL
        await writer
        await standby.wait_metric('connector_pipeline_up{pipeline="orders"} 1.0', timeout=60)
        await wait_in_sync(setup, standby, timeout=120)  # nothing lost
        assert "pipeline lease acquired" in standby.logs()
        # the owner was killed: the standby waited crm.request_timeout before writing, so an
        # upsert the owner had in flight cannot land after a newer one (invariant 2)
        assert GRACE_LINE in standby.logs()
        assert await standby.stop() == 0


async def test_metrics_scrape_has_every_documented_metric(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=50)
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)
            _, text = await run.get("/metrics")
    scraped = {
        m.group(1)
        for line in text.splitlines()
        if (m := re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", line)) and not line.startswith("#")
    }
    declared = {
        m.group(1).removesuffix("_total")
        for line in text.splitlines()
        if (m := re.match(r"^# TYPE (\S+) ", line))
    }
    # every metric family of DESIGN.md §6 (the Metrics class documents them) is exported
    expected = {f.name for f in Metrics().registry.collect()}
    assert expected <= declared, expected - declared
    for name in (
        "connector_events_captured_total",
        "connector_outbox_lag_events",
        "connector_outbox_lag_seconds",
        "connector_oldest_pending_change_age_seconds",
        "connector_records_emitted_total",
        "connector_api_calls_total",
        "connector_api_credits_spent_total",
        "connector_api_credits_remaining",
        "connector_api_request_duration_seconds_bucket",
        "connector_bulk_jobs_in_flight",
        "connector_dead_letters_open",
        "connector_checkpoint_offset",
        "connector_replication_slot_lag_bytes",
        "connector_pipeline_up",
    ):
        assert name in scraped, name
    # alerts and dashboard only use what a real scrape shows
    try:
        from tests.deploy.promql import metric_names_in_promql
        from tests.deploy.test_alerts_dashboard import _dashboard_exprs, _rules
    except ImportError:  # pragma: no cover - deploy tests absent
        return
    exported = Metrics().names()
    used: set[str] = set()
    for rule in _rules():
        used |= metric_names_in_promql(rule["expr"])
    for expr in _dashboard_exprs():
        used |= metric_names_in_promql(expr)
    used = {n for n in used if n.startswith("connector_")}
    assert used <= exported, used - exported


async def test_no_secret_in_logs_metrics_or_status(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=100)
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await change_orders(database, 30, seed=31)
            await wait_in_sync(setup, run)
            _, metrics = await run.get("/metrics")
            _, ready = await run.get("/readyz")
            outputs = [metrics, ready]
            for verb in (["status"], ["status", "--json"], ["dead-letters", "list"]):
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "connector",
                        verb[0],
                        "--config",
                        str(setup.config),
                        *verb[1:],
                    ],
                    capture_output=True,
                    text=True,
                    env=setup.env(),
                    cwd=str(ROOT),
                    timeout=60,
                    check=False,
                )
                assert proc.returncode == 0, proc.stderr
                outputs += [proc.stdout, proc.stderr]
            status = json.loads(outputs[4])
            assert status["pipelines"][0]["pipeline"] == "orders"
            access_tokens = list(emu.state.tokens.access)
            assert access_tokens  # the connector did obtain access tokens
        outputs.append(run.logs())
    blob = "\n".join(outputs)
    for secret in (*SECRETS, *access_tokens):
        assert secret not in blob


async def test_lost_lease_connection_stops_the_pipeline_then_it_recovers(
    database: str, tmp_path: Path
):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=50, max_staleness="2s")
        async with connector_running(setup, tmp_path) as run:
            await run.wait_metric('connector_pipeline_up{pipeline="orders"} 1.0')
            await wait_in_sync(setup, run)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'connector-lease-orders'"
                )
                assert [r[0] for r in await cur.fetchall()] == [True]
            for _ in range(100):
                if "lost the pipeline lease" in run.logs():
                    break
                await asyncio.sleep(0.1)
            assert "lost the pipeline lease" in run.logs()
            # nobody else holds the lock: the same process takes the pipeline again
            await run.wait_metric('connector_pipeline_up{pipeline="orders"} 1.0')
            await change_orders(database, 20, seed=41)
            await wait_in_sync(setup, run)


async def test_logical_capture_pipeline_runs_end_to_end(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=100, capture="logical")
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)
            await change_orders(database, 40, seed=51)
            await wait_in_sync(setup, run)
            await run.wait_metric('connector_replication_slot_lag_bytes{pipeline="orders"}')


def _cli(setup_config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args, "--config", str(setup_config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=120,
        check=False,
    )


async def test_snapshot_verb_and_bad_mapping_refused(database: str, tmp_path: Path):
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=150)
        proc = await asyncio.to_thread(_cli, setup.config, setup.env(), "snapshot")
        assert proc.returncode == 0, proc.stderr[-3000:]
        await wait_in_sync(setup, None, timeout=10)
        # a mapping that does not fit the CRM module is refused at start, naming the key
        bad = setup.config.with_name("bad.toml")
        bad.write_text(
            setup.config.read_text().replace(
                'quantity       = { field = "Quantity", type = "integer" }',
                'quantity       = { field = "Quantity", type = "text" }',
            )
        )
        proc = await asyncio.to_thread(_cli, bad, setup.env(), "run")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "pipelines['orders'].fields.quantity" in proc.stderr
        assert "integer" in proc.stderr


async def test_postgresql_restart_is_survived(pg_cluster, database: str, tmp_path: Path):
    if pg_cluster.server is None:
        import pytest

        pytest.skip("needs the embedded cluster (CONNECTOR_TEST_DSN is set)")
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=100, max_staleness="2s")
        async with connector_running(setup, tmp_path) as run:
            await run.wait_http("/readyz")
            await wait_in_sync(setup, run)
            await change_orders(database, 30, seed=61)
            await asyncio.to_thread(pg_cluster.server.restart, "fast")
            await change_orders(database, 30, seed=62)
            await wait_in_sync(setup, run, timeout=120)  # nothing lost, process still alive


async def test_bulk_write_callback_from_the_crm_wakes_the_owner(database: str, tmp_path: Path):
    async with emulator() as emu:
        # 6,000 rows: one Bulk Write job (500 credits) beats 60 upserts (600 credits)
        setup = await prepare(database, tmp_path, emu.url, rows=6000, max_staleness="10m")
        text = setup.config.read_text().replace(
            "drain_timeout =", f'public_url = "http://127.0.0.1:{setup.port}"\ndrain_timeout ='
        )
        setup.config.write_text(text)
        async with connector_running(setup, tmp_path) as run:
            await wait_in_sync(setup, run, timeout=120)
            calls = emu.callbacks()
            assert calls, "the CRM was given no callback URL"
            assert all(c["url"].startswith(f"{run.url}/callbacks/bulk/") for c in calls)
            assert "secret=" in calls[0]["url"]
            assert [c.get("http_status") for c in calls] == [202] * len(calls)
            assert emu.usage()["by_api"]["bulk_write_job"]["calls"] == len(calls) == 1
        # the callback URL's secret never appears in a log line
        secret = calls[0]["url"].split("secret=", 1)[1]
        assert secret not in run.logs()
