"""End-to-end helpers: the demo's orders table and configuration, the in-process emulator, and
`connector run` as a real subprocess (``sys.executable -m connector run --config …``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from connector import admin
from connector.config import load_settings, resolve_secrets
from connector.demo import DEMO_ENV, demo_config
from connector.demo_workload import create_orders
from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.server import EmulatorHandle
from connector.pgembed import free_port
from connector.verify import VerifyReport, verify
from connector.zoho import ZohoClient

ROOT = Path(__file__).resolve().parents[2]
SECRETS = tuple(DEMO_ENV.values())


def emulator_config(**faults: Any) -> EmulatorConfig:
    cfg = EmulatorConfig.default()
    cfg.bulk.rows_per_second = 20_000.0  # a bulk job takes a moment, as it does in Zoho
    cfg.bulk.tick_seconds = 0.02
    for k, v in faults.items():
        setattr(cfg.faults, k, v)
    return cfg


@contextlib.asynccontextmanager
async def emulator(**faults: Any) -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(emulator_config(**faults)) as emu:
        yield emu


@dataclass
class Setup:
    dsn: str
    config: Path
    port: int
    emulator_url: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
        env.update(DEMO_ENV)
        env["PYTHONPATH"] = str(ROOT)
        return env


async def prepare(
    dsn: str,
    tmp: Path,
    emulator_url: str,
    *,
    rows: int = 300,
    max_staleness: str = "2s",
    capture: str = "triggers",
    drain_timeout: str = "20s",
) -> Setup:
    """Orders table with ``rows`` rows, a connector.toml, ``connector init``."""
    await create_orders(dsn, rows)
    port = free_port()
    text = demo_config(
        dsn=dsn, emulator_url=emulator_url, port=port, max_staleness=max_staleness, capture=capture
    )
    text = text.replace('drain_timeout = "20s"', f'drain_timeout = "{drain_timeout}"')
    text = text.replace('level = "warning"', 'level = "info"')
    path = tmp / "connector.toml"
    path.write_text(text)
    settings = load_settings(path)
    await admin.init(settings, resolve_secrets(settings, dict(DEMO_ENV)))
    return Setup(dsn, path, port, emulator_url)


class ConnectorProcess:
    """`connector run` in a subprocess; stdout/stderr go to files under ``tmp``."""

    def __init__(self, setup: Setup, tmp: Path, name: str = "run", port: int | None = None):
        self.setup = setup
        self.name = name
        self.port = port or setup.port
        self.log_path = tmp / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: Any = None

    async def start(self) -> None:
        config = self.setup.config
        if self.port != self.setup.port:
            text = config.read_text().replace(f"port = {self.setup.port}", f"port = {self.port}")
            config = config.with_name(f"{self.name}.toml")
            config.write_text(text)
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connector",
            "run",
            "--config",
            str(config),
            stdout=self._log,
            stderr=self._log,
            env=self.setup.env(),
            cwd=str(ROOT),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            return r.status, await r.text()

    async def wait_http(
        self, path: str = "/healthz", status: int = 200, timeout: float = 60
    ) -> str:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                code, body = await self.get(path)
                if code == status:
                    return body
                last = (code, body)
            except aiohttp.ClientError as exc:
                last = exc
            await asyncio.sleep(0.2)
        raise AssertionError(f"{path} never answered {status}: {last}\n{self.logs()[-3000:]}")

    async def wait_metric(self, line_prefix: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                _, body = await self.get("/metrics")
                if any(line.startswith(line_prefix) for line in body.splitlines()):
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"metric {line_prefix!r} never seen\n{self.logs()[-3000:]}")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(
                f"connector exited with {self.proc.returncode}\n{self.logs()[-4000:]}"
            )

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._log is not None:
                self._log.close()
        return rc

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def connector_running(
    setup: Setup, tmp: Path, name: str = "run", port: int | None = None
) -> AsyncIterator[ConnectorProcess]:
    """`connector run` started for the block; on the way out it is sent SIGTERM and must exit
    with 0 (a clean drain)."""
    run = ConnectorProcess(setup, tmp, name, port)
    await run.start()
    try:
        yield run
    finally:
        rc = await run.stop()
        assert rc == 0, f"connector exited with {rc}\n{run.logs()[-3000:]}"


async def verify_now(setup: Setup) -> VerifyReport:
    settings = load_settings(setup.config)
    secrets = resolve_secrets(settings, dict(DEMO_ENV))
    async with ZohoClient.from_config(
        settings.crm, client_secret=secrets.client_secret, refresh_token=secrets.refresh_token
    ) as client:
        return await verify(
            pipeline=settings.pipelines[0],
            client=client,
            source_dsn=secrets.dsn,
            state_dsn=secrets.state_dsn,
            schema=settings.database.state_schema,
        )


async def wait_in_sync(setup: Setup, proc: ConnectorProcess | None, timeout: float = 90) -> None:
    """Wait until the CRM equals the table (fails with the last report after ``timeout``)."""
    deadline = time.monotonic() + timeout
    report: VerifyReport | None = None
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        report = await verify_now(setup)
        if report.mismatches == 0 and not report.dead_lettered:
            return
        await asyncio.sleep(0.5)
    logs = proc.logs()[-3000:] if proc is not None else ""
    raise AssertionError(f"CRM never matched the table: {report and report.to_json(5)}\n{logs}")


async def change_orders(dsn: str, n: int, *, seed: int = 1) -> None:
    """``n`` committed business changes (inserts, updates, deletes)."""
    from connector.demo_workload import Workload

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id FROM public.orders")
        ids = [int(r[0]) for r in await cur.fetchall()]
    wl = Workload(dsn, ids, seed=seed)
    await wl.run_count(n)


async def checkpoint(dsn: str) -> tuple[int, int]:
    """(checkpoint last_id, max outbox id) of the orders pipeline."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT (SELECT last_id FROM connector.checkpoints WHERE pipeline = 'orders'),"
            " (SELECT max(id) FROM connector.outbox WHERE pipeline = 'orders')"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0)
