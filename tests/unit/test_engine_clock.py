"""The engine's injectable clock (``engine_common.Clock``): intervals and deadlines go by it,
so a test moves time instead of sleeping. Here: the CRM's remaining-credits reading is trusted
for ``credit_probe_interval`` after the last call, then the ledger is (``_crm_remaining_fresh``),
and a fence ends by the engine's wall clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from pydantic import SecretStr

from connector.config import PipelineConfig
from connector.engine import Engine, EngineOptions
from connector.engine_common import Clock, SystemClock
from connector.zoho.client import ZohoClient
from tests.unit.engine_parts import offline_engine


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1_000.0
        self.slept: list[float] = []
        self.waited: list[float] = []

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    async def wait_any(self, events: Any, timeout: float) -> None:
        self.waited.append(timeout)
        if not any(e.is_set() for e in events):
            self.advance(timeout)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def _engine(clock: Clock | None = None, **options: Any) -> Engine:
    pipeline = PipelineConfig.model_validate(
        {
            "name": "orders",
            "source_table": "orders",
            "key_column": "id",
            "module": "Deals",
            "fields": {"title": "Deal_Name"},
        }
    )
    client = ZohoClient(
        accounts_url="http://127.0.0.1:9",
        client_id="id",
        client_secret=SecretStr("s"),
        refresh_token=SecretStr("r"),
    )
    return offline_engine(
        pipeline,
        client,
        daily_credit_budget=1_000,
        credit_reserve=0,
        options=EngineOptions(**options),
        clock=clock,
    )


def test_the_default_clock_is_the_real_one() -> None:
    assert isinstance(_engine().clock, SystemClock)


def test_the_crm_reading_goes_stale_by_the_engines_clock_not_by_sleeping() -> None:
    clock = FakeClock()
    eng = _engine(clock, credit_probe_interval=30.0)
    eng.client.calls = 1
    eng.client.credits_remaining = 0  # the CRM said: out of credits
    assert eng._credits_left == 0  # trusted right after the call
    clock.advance(29.0)
    assert eng._credits_left == 0
    clock.advance(2.0)  # 31 s without a call: the ledger decides again (nothing spent)
    assert eng._credits_left == 1_000
    eng.client.calls = 2  # a new call, a new reading
    assert eng._credits_left == 0
    assert clock.slept == []


def test_an_orphan_fence_ends_by_the_engines_wall_clock() -> None:
    clock = FakeClock()
    eng = _engine(clock)
    eng._add_fence(7, ["k1", "k2"], 60.0)
    assert eng._fences[7] == clock.wall + 60.0


async def test_the_engines_idle_wait_goes_by_its_clock() -> None:
    """Between plans the engine waits for a kick, a new outbox row or ``stop``, at most until
    the plan's next wake-up: by its clock, so a fake clock moves time instead of sleeping."""
    clock = FakeClock()
    eng = _engine(clock)
    listener = SimpleNamespace(event=asyncio.Event())
    start = clock.now()
    await eng._sleep(asyncio.Event(), listener, 42.0)  # type: ignore[arg-type]
    assert clock.waited == [42.0]
    assert clock.now() == start + 42.0
    # a kick already given: no wait at all, and the kick is consumed
    eng._kick.set()
    await eng._sleep(asyncio.Event(), listener, 42.0)  # type: ignore[arg-type]
    assert clock.waited == [42.0]
    assert not eng._kick.is_set()


async def test_the_system_clock_waits_for_the_first_event_or_the_timeout() -> None:
    clock = SystemClock()
    a, b = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, b.set)
    await asyncio.wait_for(clock.wait_any((a, b), 600.0), 60)  # returns on b, not after 600 s
    assert b.is_set() and not a.is_set()
    await asyncio.wait_for(clock.wait_any((asyncio.Event(),), 0.01), 60)  # the timeout
