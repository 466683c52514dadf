"""The HTTP server: bulk callback security (401 / 404 / 413, only a wake-up, never a fetch),
/healthz and /readyz from the probe, /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from connector import state
from connector.events import EventStamp
from connector.metrics import Metrics
from connector.pgembed import free_port
from connector.server import HttpServer, ProbeResult, build_app, callback_url


class FakeProbe:
    """The runtime's side of the contract, recording wake-ups."""

    def __init__(self) -> None:
        self.woken: list[tuple[str, int]] = []
        self.ready = True

    def health(self) -> ProbeResult:
        return ProbeResult(True, {"status": "ok"})

    async def readiness(self) -> ProbeResult:
        if self.ready:
            return ProbeResult(True, {"status": "ready", "role": "standby", "pipelines": {}})
        return ProbeResult(False, {"status": "not ready", "checks": {"token": "invalid_token"}})

    def wake_bulk(self, pipeline: str, job_row_id: int) -> bool:
        self.woken.append((pipeline, job_row_id))
        return True


async def _job(dsn: str, secret: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        entry = state.BulkEntry("1", EventStamp(1, 1), "insert", 1)
        job = await state.bulk_intent(conn, "connector", "orders", "upsert", [entry])
        await state.bulk_created(conn, "connector", job, "crm-job-1", secret)
        return job


async def test_bulk_callback_security(database: str) -> None:
    secret = "s3cret-callback-value-0123456789"
    job = await _job(database, secret)
    # a tiny server that records whether anything fetches a URL given in a callback body
    fetched: list[str] = []

    async def bait(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(text="gotcha")

    bait_app = web.Application()
    bait_app.router.add_get("/{tail:.*}", bait)
    bait_runner = web.AppRunner(bait_app)
    await bait_runner.setup()
    bait_port = free_port()
    await web.TCPSite(bait_runner, "127.0.0.1", bait_port).start()

    probe = FakeProbe()
    metrics = Metrics()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database, open=False, min_size=1, max_size=2, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)
    server = HttpServer(build_app(probe, metrics, pool, "connector"), "127.0.0.1", 0)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    good = callback_url(base, job, secret)
    body = {
        "job_id": "crm-job-1",
        "state": "COMPLETED",
        "result": {"download_url": f"http://127.0.0.1:{bait_port}/steal"},
    }
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/callbacks/bulk/{job}", json=body) as r:
                assert r.status == 401
            async with s.post(f"{base}/callbacks/bulk/{job}?secret=wrong", json=body) as r:
                assert r.status == 401
            async with s.post(f"{base}/callbacks/bulk/{job}?secret={secret[:-1]}", json=body) as r:
                assert r.status == 401
            async with s.post(f"{base}/callbacks/bulk/999999?secret={secret}", json=body) as r:
                assert r.status == 404
            async with s.post(f"{base}/callbacks/bulk/abc?secret={secret}", json=body) as r:
                assert r.status == 404
            big = b"x" * (64 * 1024 + 1)
            async with s.post(good, data=big) as r:
                assert r.status == 413
            assert probe.woken == []
            async with s.post(good, json=body) as r:
                assert r.status == 202
                assert "gotcha" not in await r.text()
            assert probe.woken == [("orders", job)]
            async with s.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with s.get(f"{base}/readyz") as r:
                assert r.status == 200
                assert (await r.json())["role"] == "standby"
            probe.ready = False
            async with s.get(f"{base}/readyz") as r:
                assert r.status == 503
                assert (await r.json())["checks"]["token"] == "invalid_token"
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
                assert "connector_ready 0.0" in text
                assert "connector_build_info" in text
        await asyncio.sleep(0.2)
        assert fetched == []  # the body's URL was never fetched
    finally:
        await server.stop()
        await pool.close()
        await bait_runner.cleanup()
