"""`connector run` when the CRM cannot be read at start (connector.startup_wait).

Real PostgreSQL, the emulator and `connector run` as a subprocess (the default backoff: 5 s
doubling, up to 5 s of jitter):

1. the org is out of API credits at start: Zoho answers the field-metadata call HTTP 429
   ``TOO_MANY_REQUESTS`` (/work/shared/zoho-crm-api.md §4.4; the emulator's credit ledger, §4.1,
   set through its admin route). The process stays up: /healthz 200, /readyz 503 with the
   ``crm_fields: waiting — …`` line, ``connector_startup_wait_seconds{reason="http_429"}`` > 0, a
   WARNING per attempt. Credits back: it becomes ready and syncs the rows;
2. SIGTERM during that wait: exit 0 at once, no traceback;
3. a permanent problem (a module the org does not have: ``INVALID_MODULE``, §5) still exits 2
   at once, not waiting.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import psycopg

from tests.e2e.helpers import SECRETS, ConnectorProcess, emulator, prepare

WAIT_LINE = "waiting — HTTP 429 from the CRM (API credits spent or concurrency limit)"


async def _credits(emu_url: str, **body: int) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{emu_url}/__emulator__/credits", json=body) as r,
    ):
        assert r.status == 200
        doc: dict[str, int] = await r.json()
        return doc


async def _gauge(run: ConnectorProcess, reason: str) -> float:
    _, body = await run.get("/metrics")
    prefix = f'connector_startup_wait_seconds{{reason="{reason}"}} '
    for line in body.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    raise AssertionError(f"no {prefix!r} in /metrics")


async def _waiting(run: ConnectorProcess, timeout: float = 60) -> dict[str, object]:
    """/readyz once it shows the waiting line (503)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        run.check_alive()
        try:
            code, body = await run.get("/readyz")
        except aiohttp.ClientError as exc:
            last = exc
        else:
            last = (code, body)
            doc = json.loads(body)
            line = str(doc.get("checks", {}).get("crm_fields", ""))
            if code == 503 and line.startswith(WAIT_LINE):
                return doc  # type: ignore[no-any-return]
        await asyncio.sleep(0.2)
    raise AssertionError(f"/readyz never showed the waiting line: {last}\n{run.logs()[-3000:]}")


async def test_out_of_credits_at_start_waits_then_syncs(database: str, tmp_path: Path) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        await _credits(emu.url, remaining=0)
        run = ConnectorProcess(setup, tmp_path, "credits-out")
        await run.start()
        try:
            doc = await _waiting(run)
            assert doc["status"] == "not ready"
            assert await run.wait_http("/healthz", 200)  # alive: no restart needed
            line = doc["checks"]["crm_fields"]  # type: ignore[index]
            assert "next try in" in line and line.endswith(" s"), line
            # the gauge counts the seconds waited (refreshed every second while waiting)
            deadline = time.monotonic() + 20
            while await _gauge(run, "http_429") <= 0:
                assert time.monotonic() < deadline, "connector_startup_wait_seconds stayed 0"
                await asyncio.sleep(0.3)
            logs = run.logs()
            assert "start-up CRM checks: attempt 1 failed (http_429" in logs
            assert "next try in" in logs
            assert "Traceback" not in logs
            assert not [s for s in SECRETS if s in logs]  # no secret in any log line

            # credits are back: the next try passes, the pipeline starts and syncs
            await _credits(emu.url, reset=1)
            await run.wait_http("/readyz", 200, timeout=60)
            assert await _gauge(run, "http_429") == 0.0
            assert "start-up CRM checks passed at attempt" in run.logs()

            async def synced(n: int) -> bool:
                return len(emu.records("Orders")) >= n

            deadline = time.monotonic() + 60
            while not await synced(5):
                assert time.monotonic() < deadline, emu.records("Orders")
                await asyncio.sleep(0.3)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                await c.execute(
                    "INSERT INTO public.orders (order_number, customer_email, amount, quantity,"
                    " order_date, placed_at) VALUES ('SO-START-1', 's@example.com', 1, 1,"
                    " current_date, now())"
                )
            deadline = time.monotonic() + 60
            while not any(r.get("Name") == "SO-START-1" for r in emu.records("Orders")):
                assert time.monotonic() < deadline, "the new row never reached the CRM"
                await asyncio.sleep(0.3)
        finally:
            rc = await run.stop()
        assert rc == 0, run.logs()[-3000:]


async def test_sigterm_during_the_start_up_wait_exits_0(database: str, tmp_path: Path) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        await _credits(emu.url, remaining=0)
        run = ConnectorProcess(setup, tmp_path, "sigterm")
        await run.start()
        await _waiting(run)
        started = time.monotonic()
        rc = await run.stop(signal.SIGTERM, timeout=15)
        assert rc == 0, run.logs()[-3000:]
        assert time.monotonic() - started < 5
        logs = run.logs()
        assert "Traceback" not in logs
        assert "stop requested while waiting for the start-up CRM checks" in logs


async def test_a_permanent_error_still_exits_2_at_once(database: str, tmp_path: Path) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        setup.config.write_text(
            setup.config.read_text().replace('module = "Orders"', 'module = "Order"')
        )
        run = ConnectorProcess(setup, tmp_path, "bad-module")
        started = time.monotonic()
        await run.start()
        assert run.proc is not None
        rc = await asyncio.wait_for(run.proc.wait(), 60)
        await run.stop()
        assert rc == 2, run.logs()[-3000:]
        assert time.monotonic() - started < 30
        logs = run.logs()
        assert "configuration error: pipelines['orders'].module" in logs
        assert "start-up CRM checks: attempt" not in logs
        assert "Traceback" not in logs


async def test_crm_and_accounts_unreachable_at_start_wait_in_process(
    database: str, tmp_path: Path
) -> None:
    """Nothing listens at the CRM's and the accounts server's address (a closed port): the
    start-up checks wait with reason ``unreachable`` (in-process, short backoff); a stop ends
    the wait with 0."""
    from connector.config import load_settings, resolve_secrets
    from connector.demo import DEMO_ENV
    from connector.metrics import Metrics
    from connector.pgembed import free_port
    from connector.runtime import Runtime
    from connector.startup_wait import StartupBackoff

    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
    closed = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "unreachable.toml"
    path.write_text(setup.config.read_text().replace(emu.url, closed))
    settings = load_settings(path)
    metrics = Metrics()
    rt = Runtime(
        settings,
        resolve_secrets(settings, dict(DEMO_ENV)),
        metrics=metrics,
        serve_http=False,
        handle_signals=False,
        startup_backoff=StartupBackoff(initial=0.2, maximum=0.5, jitter=0),
    )
    task = asyncio.create_task(rt.run())
    try:
        deadline = time.monotonic() + 30
        while rt.startup.attempt < 3:
            assert not task.done(), task
            assert time.monotonic() < deadline, "the start-up checks did not retry"
            await asyncio.sleep(0.05)
        assert rt.startup.reason == "unreachable"
        ready = await rt.readiness()
        assert not ready.ok
        line = ready.detail["checks"]["crm_fields"]
        assert "unreachable" in line, line
        value = metrics.registry.get_sample_value(
            "connector_startup_wait_seconds", {"reason": "unreachable"}
        )
        assert value is not None and value > 0
    finally:
        rt.request_stop()
        assert await asyncio.wait_for(task, 15) == 0


async def test_crm_5xx_at_start_waits_then_starts(database: str, tmp_path: Path) -> None:
    """Every CRM call answered 500 ``INTERNAL_ERROR`` (the emulator's fault switch, reference
    §5 / emulator item 15): reason ``http_5xx``; once the CRM answers, the pipelines start."""
    from connector.config import load_settings, resolve_secrets
    from connector.demo import DEMO_ENV
    from connector.metrics import Metrics
    from connector.runtime import Runtime
    from connector.startup_wait import StartupBackoff

    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=5)
        emu.set_faults(error_rate=1.0)
        settings = load_settings(setup.config)
        rt = Runtime(
            settings,
            resolve_secrets(settings, dict(DEMO_ENV)),
            metrics=Metrics(),
            serve_http=False,
            handle_signals=False,
            startup_backoff=StartupBackoff(initial=0.2, maximum=0.5, jitter=0),
        )
        task = asyncio.create_task(rt.run())
        try:
            deadline = time.monotonic() + 30
            while rt.startup.attempt < 2:
                assert not task.done(), task
                assert time.monotonic() < deadline, "the start-up checks did not retry"
                await asyncio.sleep(0.05)
            assert rt.startup.reason == "http_5xx"
            line = (await rt.readiness()).detail["checks"]["crm_fields"]
            assert "HTTP 500 from the CRM (server error)" in line, line
            assert not rt.runners  # no pipeline started meanwhile
            emu.set_faults(error_rate=0.0)
            deadline = time.monotonic() + 30
            while not (rt.startup.done and "orders" in rt.runners):
                assert not task.done(), task
                assert time.monotonic() < deadline, "never started after the CRM recovered"
                await asyncio.sleep(0.05)
            assert rt.startup.readiness_line() is None
        finally:
            rt.request_stop()
            assert await asyncio.wait_for(task, 30) == 0
