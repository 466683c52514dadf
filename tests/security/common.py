"""Helpers of the security tests: a connector.toml for any table/key/columns/state schema
(written with TOML-escaped strings), the CLI as a subprocess, and waiting for the emulator.
`connector run` itself is the e2e helpers' ConnectorProcess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connector.emulator.server import EmulatorHandle
from connector.pgembed import free_port
from tests.e2e.helpers import ROOT, ConnectorProcess, Setup


def q(text: str) -> str:
    """A TOML basic string (JSON string syntax is valid TOML for these characters)."""
    return json.dumps(text)


def write_config(
    path: Path,
    *,
    dsn: str,
    emulator_url: str,
    table: str,
    key: str,
    fields: dict[str, tuple[str, str]],
    capture: str = "triggers",
    schema: str = "connector",
    max_staleness: str = "1s",
    refresh_token_env: str = "DEMO_ZOHO_REFRESH_TOKEN",
) -> Setup:
    port = free_port()
    mapped = "\n".join(
        f"{q(col)} = {{ field = {q(f)}, type = {q(t)} }}" for col, (f, t) in fields.items()
    )
    path.write_text(
        f"""\
[crm]
data_centre = "custom"
accounts_url = {q(emulator_url)}
api_url = {q(emulator_url)}
upload_url = {q(emulator_url)}
client_id = "emulator-client-id"
client_secret_env = "DEMO_ZOHO_CLIENT_SECRET"
refresh_token_env = {q(refresh_token_env)}
edition = "enterprise"
daily_credit_budget = 50000
credit_reserve = 1000

[database]
dsn = {q(dsn)}
state_schema = {q(schema)}
pool_size = 4

[server]
host = "127.0.0.1"
port = {port}
drain_timeout = "10s"

[logging]
level = "info"

[[pipelines]]
name = "orders"
source_table = {q(table)}
key_column = {q(key)}
module = "Orders"
capture = {q(capture)}
max_staleness = {q(max_staleness)}
delete_mode = "delete"
[pipelines.fields]
{mapped}
"""
    )
    return Setup(dsn, path, port, emulator_url)


def cli(
    setup: Setup, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m connector <args> --config <setup.config>`` (blocking; use asyncio.to_thread)."""
    return subprocess.run(
        [sys.executable, "-m", "connector", *args, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        env=env or setup.env(),
        cwd=str(ROOT),
        timeout=120,
        check=False,
    )


async def acli(
    setup: Setup, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, setup, *args, env=env)


async def wait_crm(
    emu: EmulatorHandle,
    pred: Callable[[dict[str, dict[str, Any]]], bool],
    run: ConnectorProcess,
    what: str,
    timeout: float = 60,
) -> dict[str, dict[str, Any]]:
    """Wait until ``pred(records by parent_id)`` holds (the CRM side of a sync)."""
    deadline = time.monotonic() + timeout
    crm: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        run.check_alive()
        crm = {str(r["parent_id"]): r for r in emu.records("Orders")}
        if pred(crm):
            return crm
        await asyncio.sleep(0.2)
    raise AssertionError(f"CRM never reached: {what}; has {sorted(crm)}\n{run.logs()[-3000:]}")


class EnvSetup(Setup):
    """A Setup whose subprocess environment is changed by ``extra`` (e.g. a wrong secret)."""

    def __init__(self, base: Setup, extra: dict[str, str]) -> None:
        super().__init__(base.dsn, base.config, base.port, base.emulator_url)
        self.extra = extra

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(self.extra)
        return env
