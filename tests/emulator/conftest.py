from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from connector.emulator import EmulatorConfig, start_emulator
from connector.emulator.server import EmulatorHandle


class Api:
    """A plain-HTTP client for the tests: remembers the token, returns (status, headers, body)."""

    def __init__(self, emu: EmulatorHandle, session: aiohttp.ClientSession) -> None:
        self.emu = emu
        self.session = session
        self.token: str | None = None

    async def login(self) -> str:
        async with self.session.post(
            f"{self.emu.url}/oauth/v2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "emulator-client-id",
                "client_secret": "emulator-client-secret",
                "refresh_token": "emulator-refresh-token",
            },
        ) as r:
            body = await r.json()
        self.token = body["access_token"]
        return self.token

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> tuple[int, dict[str, str], Any]:
        headers = dict(kwargs.pop("headers", {}) or {})
        if auth and self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Zoho-oauthtoken {self.token}"
        url = path if path.startswith("http") else self.emu.url + path
        async with self.session.request(method, url, headers=headers, **kwargs) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            body: Any
            if not raw:
                body = None
            elif "json" in ctype:
                import orjson

                body = orjson.loads(raw)
            else:
                body = raw
            return r.status, dict(r.headers), body


def make_config(**overrides: Any) -> EmulatorConfig:
    cfg = EmulatorConfig.default()
    data = cfg.model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return EmulatorConfig.model_validate(data)


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(make_config()) as e:
        yield e


@pytest.fixture
async def api(emu: EmulatorHandle) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as s:
        a = Api(emu, s)
        await a.login()
        yield a


def order(i: int, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "Name": f"Order {i}",
        "parent_id": str(i),
        "Customer_Email": f"c{i}@example.org",
        "Status": "New",
        "Amount": 10.5 + i,
        "Quantity": i % 7 + 1,
        "Order_Date": "2026-03-02",
        "Placed_At": "2026-03-02T09:14:05+00:00",
        "Notes": "n",
        "Is_Gift": False,
        "Deleted": False,
    }
    rec.update(extra)
    return rec
