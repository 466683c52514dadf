"""The processes of a chaos run: the emulator and `connector run` as subprocesses in their own
process groups (killed by group id, never by name), on 127.0.0.1 only, with their output in
files; the emulator's admin API over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from connector.pgembed import free_port

ROOT = Path(__file__).resolve().parents[2]

# Secrets of a chaos run: unusual values, so that finding one in an output means a leak.
CLIENT_ID = "chaos-client-id"
CLIENT_SECRET_ENV = "CHAOS_ZOHO_CLIENT_SECRET"
REFRESH_TOKEN_ENV = "CHAOS_ZOHO_REFRESH_TOKEN"


def secrets_for(seed: int) -> dict[str, str]:
    return {
        CLIENT_SECRET_ENV: f"chaos-secret-{seed:x}-7f3a9c1e5b",
        REFRESH_TOKEN_ENV: f"1000.chaos{seed:x}.refresh-4d2e8b6a0c",
    }


ENTERPRISE_BASE_CREDITS = 50_000  # the emulator's enterprise edition: base + 1,000 per user
ENTERPRISE_CREDITS_PER_USER = 1_000


def emulator_toml(
    secrets: dict[str, str], *, rows_per_second: float = 10_000.0, users: int = 10
) -> str:
    """The default emulator configuration plus an integer ``Rev`` field, the ``Account`` lookup,
    ``Customer_Ref`` text and ``Lines`` subform fields of Orders and an ``Accounts`` module
    (issue 21), the run's
    own client credentials, bulk jobs that take a few seconds (so kills land mid-job), and
    ``users`` licences (the org's daily credits: 50,000 + 1,000 per user)."""
    text = (ROOT / "connector" / "emulator" / "default.toml").read_text()
    assert "users = 10\n" in text, "default.toml changed: update tests/chaos/procs.py"
    text = text.replace("users = 10\n", f"users = {users}\n", 1)
    text = text.replace('client_id = "emulator-client-id"', f'client_id = "{CLIENT_ID}"')
    text = text.replace(
        'client_secret = "emulator-client-secret"',
        f'client_secret = "{secrets[CLIENT_SECRET_ENV]}"',
    )
    text = text.replace(
        'refresh_token = "emulator-refresh-token"',
        f'refresh_token = "{secrets[REFRESH_TOKEN_ENV]}"',
    )
    text = text.replace(
        "rows_per_second = 0.0", f"rows_per_second = {rows_per_second}\ntick_seconds = 0.05"
    )
    text = text.replace("queue_seconds = 0.0", "queue_seconds = 0.3")
    marker = '  { api_name = "Deleted", data_type = "boolean", label = "Deleted" },\n'
    assert marker in text, "default.toml changed: update tests/chaos/procs.py"
    text = text.replace(
        marker,
        marker
        + '  { api_name = "Rev", data_type = "integer", label = "Revision" },\n'
        + '  { api_name = "Account", data_type = "lookup", label = "Account",'
        + ' lookup_module = "Accounts" },\n'
        + '  { api_name = "Customer_Ref", data_type = "text", label = "Customer Ref",'
        + " length = 255 },\n"
        + '  { api_name = "Lines", data_type = "subform", label = "Lines",'
        + ' subform_module = "Order_Lines", subform_fields = ['
        + '{ api_name = "Product", label = "Product" },'
        + ' { api_name = "Qty", data_type = "integer", label = "Qty" }] },\n',
    )
    return text + ACCOUNTS_MODULE


ACCOUNTS_MODULE = (
    "\n[[modules]]\n"
    'api_name = "Accounts"\n'
    'singular_label = "Account"\n'
    'plural_label = "Accounts"\n'
    'id = "4876876000000600001"\n'
    "fields = [\n"
    '  { api_name = "Name", data_type = "text", label = "Account Name", mandatory = true,'
    " length = 255 },\n"
    '  { api_name = "Legacy_Id", data_type = "text", label = "Legacy Id", mandatory = true,'
    " unique = true, length = 255 },\n"
    '  { api_name = "Rev", data_type = "integer", label = "Revision" },\n'
    "]\n"
)


def connector_toml(
    *,
    dsn: str,
    emulator_url: str,
    port: int,
    capture: str,
    max_staleness: str,
    daily_credit_budget: int = 50_000,
) -> str:
    from tests.chaos.model import CUSTOMER_FIELDS, FIELDS, LOOKUPS

    def lines(mapping: dict[str, tuple[str, str]]) -> str:
        return "\n".join(
            f'{col} = {{ field = "{f}", type = "{t}"'
            + (f', pipeline = "{LOOKUPS[col]}"' if t == "lookup" else "")
            + " }"
            for col, (f, t) in mapping.items()
        )

    fields = lines(FIELDS)
    customer_fields = lines(CUSTOMER_FIELDS)
    with_lines = subforms_on()
    return f"""\
[crm]
data_centre = "custom"
accounts_url = "{emulator_url}"
api_url = "{emulator_url}"
upload_url = "{emulator_url}"
client_id = "{CLIENT_ID}"
client_secret_env = "{CLIENT_SECRET_ENV}"
refresh_token_env = "{REFRESH_TOKEN_ENV}"
org_id = "emulator-org"
edition = "enterprise"
daily_credit_budget = {daily_credit_budget}
credit_reserve = 1000
request_timeout = "20s"

[database]
dsn = "{dsn}"
pool_size = 6

[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"
drain_timeout = "10s"

[logging]
level = "info"
format = "json"

# the parent first (issue 21): its deletes are ignored (customers are never deleted here) and
# its bound is the orders' one (a looked-up pipeline may not be slower than its children)
[[pipelines]]
name = "customers"
source_table = "public.customers"
key_column = "id"
module = "Accounts"
key_field = "Legacy_Id"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "ignore"
[pipelines.fields]
{customer_fields}

[[pipelines]]
name = "orders"
source_table = "public.orders"
key_column = "id"
module = "Orders"
capture = "{capture}"
max_staleness = "{max_staleness}"
delete_mode = "delete"
[pipelines.fields]
{fields}
{LINES_PIPELINE.format(capture=capture, max_staleness=max_staleness) if with_lines else ""}"""


def subforms_on() -> bool:
    """Whether the connector accepts subform pipelines: only then does a chaos run sync the
    order lines (the table and its workload are there either way)."""
    from connector import config_relations

    return config_relations.ENGINE_SUPPORTS_SUBFORMS


LINES_PIPELINE = """
# order lines: rows of the subform Orders.Lines (issue 21); each change of a line rewrites its
# order's whole line set, by update, after the order is in the CRM
[[pipelines]]
name = "order_lines"
source_table = "public.order_lines"
key_column = "id"
subform_of = {{ pipeline = "orders", field = "Lines", parent_column = "order_id" }}
capture = "{capture}"
max_staleness = "{max_staleness}"
[pipelines.fields]
product = "Product"
qty = {{ field = "Qty", type = "integer" }}
"""


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNECTOR_", "CHAOS_"))}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


class Child:
    """A subprocess in its own session (process group); output appended to ``log``."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdout=fh,
                stderr=fh,
                env=self.env,
                cwd=str(ROOT),
                start_new_session=True,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def kill(self) -> int | None:
        """SIGKILL the process group and reap the process."""
        if self.proc is None:
            return None
        self.signal(signal.SIGKILL)
        return await self.proc.wait()

    async def stop(self, timeout: float = 40) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return await self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Emulator(Child):
    def __init__(self, workdir: Path, toml: str, env: dict[str, str]) -> None:
        self.port = free_port()
        config = workdir / "emulator.toml"
        config.write_text(toml)
        super().__init__(
            [
                sys.executable,
                "-m",
                "tests.chaos.emulator_main",
                "--port",
                str(self.port),
                "--config",
                str(config),
            ],
            workdir / "emulator.log",
            env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await super().start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"emulator exited:\n{self.output()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.admin("GET", "usage")
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("emulator did not answer within 30 s")

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        url = f"{self.url}/__emulator__/{path}"
        async with self._session.request(method, url, json=body) as r:
            r.raise_for_status()
            return await r.json(content_type=None)

    async def all_history(self, module: str = "Orders", fields: str = "") -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        # millions of writes after a long soak: the 120 s session default aborted one (issue 14)
        url = f"{self.url}/__emulator__/chaos-history/{module}"
        params = {"fields": fields} if fields else None
        async with self._session.get(
            url, params=params, timeout=aiohttp.ClientTimeout(total=1800)
        ) as r:
            r.raise_for_status()
            return await r.json(content_type=None)

    async def faults(self, **changes: Any) -> Any:
        return await self.admin("POST", "faults", changes)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.stop(10)


class Connector(Child):
    """`connector run --config F` (restartable; every start appends to the same log)."""

    def __init__(self, workdir: Path, config: Path, port: int, env: dict[str, str]) -> None:
        super().__init__(
            [sys.executable, "-m", "connector", "run", "--config", str(config)],
            workdir / "connector.log",
            env,
        )
        self.config = config
        self.port = port
        self.exits: list[int | None] = []

    async def kill(self) -> int | None:
        rc = await super().kill()
        self.exits.append(rc)
        return rc

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.get(f"http://127.0.0.1:{self.port}{path}") as r,
        ):
            return r.status, await r.text()

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Another verb against the same configuration (``status --json``, …)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connector",
            args[0],
            "--config",
            str(self.config),
            *args[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
