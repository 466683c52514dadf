"""The CRM the contract suite runs against: the emulator by default, a real Zoho org when the
environment provides credentials (docs/zoho-client.md, "Running the contract suite against a
real org"):

    ZOHO_LIVE_CLIENT_ID, ZOHO_LIVE_CLIENT_SECRET, ZOHO_LIVE_REFRESH_TOKEN  (a self-client grant)
    ZOHO_LIVE_DC          data centre: us, eu, in, au, cn, jp, ca, sa (default us)
    ZOHO_LIVE_MODULE      module API name (default Orders)
    ZOHO_LIVE_KEY_FIELD   its unique text field holding the legacy key (default parent_id)
    ZOHO_LIVE_NAME_FIELD  a text field every probe record fills (default Name)
    ZOHO_LIVE_BULK=1      also run the Bulk Write contract (500 credits per job)

Live, the suite writes only probe records (keys starting ``__contract_probe_``) and deletes
them at the end of each test, whatever the outcome; emulator-only checks (fault injection,
the admin API) are skipped there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from connector.zoho.client import RetryPolicy, ZohoClient
from connector.zoho_hosts import DATA_CENTRES, UPLOAD_HOSTS

LIVE = bool(os.environ.get("ZOHO_LIVE_REFRESH_TOKEN"))


@dataclass
class Crm:
    """What a contract test needs: a client factory, the module and its fields, probe keys."""

    live: bool
    module: str
    key_field: str
    name_field: str
    bulk_allowed: bool
    emulator: EmulatorHandle | None
    _client_kw: dict[str, Any]
    prefix: str = field(default_factory=lambda: f"__contract_probe_{uuid.uuid4().hex[:8]}_")
    written: set[str] = field(default_factory=set)  # CRM ids of probe records

    def client(self, **kw: Any) -> ZohoClient:
        return ZohoClient(**{**self._client_kw, **kw})

    def key(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def record(self, i: int, **extra: Any) -> dict[str, Any]:
        return {self.key_field: self.key(i), self.name_field: f"contract probe {i}", **extra}

    def emulator_only(self) -> EmulatorHandle:
        if self.emulator is None:
            pytest.skip("emulator-only check (fault injection / admin API)")
        return self.emulator


@pytest.fixture
async def crm() -> AsyncIterator[Crm]:
    retry = RetryPolicy(max_attempts=8, backoff_base=0.01, backoff_max=0.5, retry_after_max=5)
    async with AsyncExitStack() as stack:
        if LIVE:
            dc = os.environ.get("ZOHO_LIVE_DC", "us")
            accounts, api = DATA_CENTRES[dc]
            kw: dict[str, Any] = {
                "accounts_url": accounts,
                "default_api_url": api,
                "upload_url": UPLOAD_HOSTS[dc],
                "client_id": os.environ["ZOHO_LIVE_CLIENT_ID"],
                "client_secret": SecretStr(os.environ["ZOHO_LIVE_CLIENT_SECRET"]),
                "refresh_token": SecretStr(os.environ["ZOHO_LIVE_REFRESH_TOKEN"]),
                "request_timeout": 60.0,
                "retry": retry,
                "concurrency": 5,
            }
            emu = None
        else:
            emu = await stack.enter_async_context(start_emulator())
            kw = {
                "accounts_url": emu.url,
                "client_id": "emulator-client-id",
                "client_secret": SecretStr("emulator-client-secret"),
                "refresh_token": SecretStr("emulator-refresh-token"),
                "request_timeout": 30.0,
                "retry": retry,
            }
        crm = Crm(
            live=LIVE,
            module=os.environ.get("ZOHO_LIVE_MODULE", "Orders") if LIVE else "Orders",
            key_field=os.environ.get("ZOHO_LIVE_KEY_FIELD", "parent_id") if LIVE else "parent_id",
            name_field=os.environ.get("ZOHO_LIVE_NAME_FIELD", "Name") if LIVE else "Name",
            bulk_allowed=(not LIVE) or os.environ.get("ZOHO_LIVE_BULK") == "1",
            emulator=emu,
            _client_kw=kw,
        )
        try:
            yield crm
        finally:
            await _cleanup(crm)


async def _cleanup(crm: Crm) -> None:
    """Delete every probe record the test wrote (by id, and by key prefix for the rest)."""
    async with crm.client() as client:
        ids = set(crm.written)
        rows = await client.coql(
            f"select id from {crm.module} where {crm.key_field} like '{crm.prefix}%' limit 200"
        )
        ids.update(str(r["id"]) for r in rows)
        if ids:
            await client.delete(crm.module, sorted(ids))
