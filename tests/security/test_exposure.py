"""What a running connector exposes: `/metrics` holds no row data; the bulk callback endpoint of
a real `connector run` refuses what tests/e2e/test_server.py does not already cover in-process
(a secret in the header, an empty secret, a job created without a callback secret, a chunked
oversize body) and never fetches a URL from a body; secrets never appear in output or logs, also
when the run fails on a bad refresh token or a bad client secret."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from aiohttp import web

from connector import state
from connector.events import EventStamp
from connector.pgembed import free_port
from tests.e2e.helpers import SECRETS, ConnectorProcess, emulator, prepare, wait_in_sync
from tests.security.common import EnvSetup

# distinctive row values: none of them may appear in a scrape
EMAIL = "zebra.private.customer+q7@example.org"
NOTE = "PRIVATE-NOTE-3f9c1e-do-not-export"
ORDER = "ORD-UNIQUE-5b2d7a"
KEY = 987_654_321


async def _bait() -> AsyncIterator[tuple[int, list[str]]]:
    """A listener that records every request it gets."""
    seen: list[str] = []

    async def any_request(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        return web.Response(text="gotcha")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def _oversize_chunks() -> AsyncIterator[bytes]:
    for _ in range(80):
        yield b"y" * 1024  # 80 KB in chunks: no Content-Length announces the size


async def test_metrics_and_callback_endpoint_of_a_running_connector(
    database: str, tmp_path: Path
) -> None:
    async with emulator() as emu:
        setup = await prepare(database, tmp_path, emu.url, rows=20, max_staleness="1s")
        run = ConnectorProcess(setup, tmp_path)
        await run.start()
        bait_cm = _bait()
        bait_port, seen = await bait_cm.__anext__()
        try:
            await run.wait_http("/readyz")
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                await conn.execute(
                    "INSERT INTO public.orders (id, order_number, customer_email, amount,"
                    " quantity, order_date, placed_at, notes)"
                    " VALUES (%s, %s, %s, 12.34, 3, '2024-05-06', now(), %s)",
                    (KEY, ORDER, EMAIL, NOTE),
                )
            await wait_in_sync(setup, run)
            crm = {str(r["parent_id"]): r for r in emu.records("Orders")}
            assert crm[str(KEY)]["Customer_Email"] == EMAIL  # the values did go through
            _, metrics = await run.get("/metrics")
            assert "connector_events_captured_total" in metrics
            for value in (EMAIL, "zebra", NOTE, "PRIVATE-NOTE", ORDER, str(KEY), "12.34"):
                assert value not in metrics, value

            # callbacks: jobs of a pipeline this process does not run, so that nothing acts
            secret = f"cb-{uuid.uuid4().hex}"
            entry = state.BulkEntry("1", EventStamp(1, 1), "insert", 1)
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                job = await state.bulk_intent(conn, "connector", "ghost", "upsert", [entry])
                await state.bulk_created(conn, "connector", job, "crm-job-cb", secret)
                no_secret_job = await state.bulk_intent(
                    conn, "connector", "ghost", "upsert", [entry]
                )
                await state.bulk_created(conn, "connector", no_secret_job, "crm-job-x", None)
            body = {
                "job_id": "crm-job-cb",
                "state": "COMPLETED",
                "download_url": f"http://127.0.0.1:{bait_port}/steal",
                "result": {"download_url": f"http://127.0.0.1:{bait_port}/result.zip"},
            }
            base = f"{run.url}/callbacks/bulk"
            async with aiohttp.ClientSession() as s:

                async def post(url: str, **kw: object) -> int:
                    async with s.post(url, **kw) as r:  # type: ignore[arg-type]
                        await r.read()
                        return r.status

                hdr = {"X-Callback-Secret": "wrong"}
                assert await post(f"{base}/{job}", json=body, headers=hdr) == 401
                assert await post(f"{base}/{job}?secret=", json=body) == 401
                for guess in ("", "None", "null", secret):  # a job without a callback secret
                    url = f"{base}/{no_secret_job}?secret={guess}"
                    assert await post(url, json=body) == 401, guess
                assert await post(f"{base}/{job + 1000}?secret={secret}", json=body) == 404
                assert await post(f"{base}/{job}?secret={secret}", data=_oversize_chunks()) == 413
                hdr = {"X-Callback-Secret": secret}
                assert await post(f"{base}/{job}", json=body, headers=hdr) == 200  # not owned
                assert await post(f"{base}/{job}?secret={secret}", json=body) == 200
            await asyncio.sleep(0.5)
            assert seen == []  # no URL of a body was ever requested
            run.check_alive()
        finally:
            assert await run.stop() == 0, run.logs()[-3000:]
            await bait_cm.aclose()
    logs = run.logs()
    assert secret not in logs
    assert str(bait_port) not in logs and "steal" not in logs  # bodies are not logged
    for value in (*SECRETS, EMAIL, NOTE):
        assert value not in logs, value


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("DEMO_ZOHO_REFRESH_TOKEN", "refresh token is invalid"),
        ("DEMO_ZOHO_CLIENT_SECRET", "client secret does not match"),
    ],
    ids=["bad-refresh-token", "bad-client-secret"],
)
async def test_a_bad_secret_stops_the_run_clearly_without_echoing_it(
    database: str, tmp_path: Path, variable: str, expected: str
) -> None:
    wrong = f"wrong-{variable.lower()}-{uuid.uuid4().hex}"
    pg_password = f"pg-password-{uuid.uuid4().hex}"  # unused by trust auth, must not leak
    async with emulator() as emu:
        base = await prepare(database, tmp_path, emu.url, rows=5)
        setup = EnvSetup(base, {variable: wrong, "PGPASSWORD": pg_password})
        run = ConnectorProcess(setup, tmp_path)
        await run.start()
        assert run.proc is not None
        try:
            rc = await asyncio.wait_for(run.proc.wait(), 60)
        finally:
            await run.stop()
    logs = run.logs()
    assert rc != 0, logs[-3000:]
    assert expected in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    others = [s for s in SECRETS if s != wrong]
    for value in (wrong, pg_password, *others):
        assert value not in logs, value
