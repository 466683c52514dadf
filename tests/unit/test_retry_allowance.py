"""``retry_allowance`` (issue 18): the time budget for 429/5xx retries inside ``max_staleness``
goes from the pipeline's configuration through the engine into ``plan()``, and acts there:
changes leave earlier by that much."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from connector.config import PipelineConfig
from connector.events import ChangeEvent, Op
from connector.planner import PendingKey, PlannerInput, plan
from connector.zoho.client import ZohoClient
from tests.unit.engine_parts import offline_engine


def pipeline(**kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {
        "name": "orders",
        "source_table": "orders",
        "key_column": "id",
        "module": "Deals",
        "fields": {"title": "Deal_Name"},
    }
    return PipelineConfig.model_validate({**base, **kw})


def test_config_parses_and_bounds_retry_allowance() -> None:
    assert pipeline().retry_allowance == timedelta(0)
    assert pipeline(retry_allowance="20s").retry_allowance == timedelta(seconds=20)
    with pytest.raises(ValidationError, match="retry_allowance"):
        pipeline(max_staleness="30s", retry_allowance="20s")  # more than half the budget


def test_allowance_makes_a_change_leave_earlier() -> None:
    def inp(now: float, allowance: float) -> PlannerInput:
        return PlannerInput(
            now=now,
            pending=[PendingKey("k", 0.0)],
            max_staleness=600.0,
            credits_left=10**6,
            reserve=0,
            concurrency=10,
            upsert_latency=1.0,
            bulk_latency=120.0,
            retry_allowance=allowance,
        )

    # at 550 s a lone change still waits without an allowance (due at ~592 s) ...
    assert plan(inp(550.0, 0.0)).is_empty
    # ... and is due now with 60 s for retries: it must leave while a storm can still pass
    assert plan(inp(550.0, 60.0)).upserts == [["k"]]
    assert plan(inp(0.0, 60.0)).wake_at == pytest.approx(plan(inp(0.0, 0.0)).wake_at - 60.0)  # type: ignore[operator]


class _Emitter:
    def __init__(self) -> None:
        from connector.latency import LatencyEstimator

        self.latency = LatencyEstimator(default_upsert=1.0)


@pytest.mark.parametrize("allowance", [0.0, 45.0])
def test_engine_passes_the_configured_allowance_to_the_planner(
    allowance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[PlannerInput] = []
    import connector.engine_plan as engine_mod

    def spy(inp: PlannerInput) -> Any:
        seen.append(inp)
        return plan(inp)

    monkeypatch.setattr(engine_mod, "plan", spy)
    client = ZohoClient(
        accounts_url="http://127.0.0.1:9",
        client_id="id",
        client_secret=SecretStr("s"),
        refresh_token=SecretStr("r"),
    )
    eng = offline_engine(pipeline(retry_allowance=timedelta(seconds=allowance)), client)
    eng.emitter = _Emitter()  # type: ignore[assignment]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    eng.tracker.register(0, 1)
    eng.coalescer.add(ChangeEvent(1, "orders", Op.UPDATE, "k", 1, 1, {"id": 1}, at), 0)
    eng._plan(at.timestamp() + 550.0)
    assert seen and seen[-1].retry_allowance == allowance


async def test_engine_plans_behind_the_calls_already_queued_at_the_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PlannerInput.calls_ahead: the shared limiter's queue (every pipeline's calls) makes a
    # change leave sooner; without it a key planned behind a long queue arrived late
    seen: list[PlannerInput] = []
    import connector.engine_plan as engine_mod

    def spy(inp: PlannerInput) -> Any:
        seen.append(inp)
        return plan(inp)

    monkeypatch.setattr(engine_mod, "plan", spy)
    client = ZohoClient(
        accounts_url="http://127.0.0.1:9",
        client_id="id",
        client_secret=SecretStr("s"),
        refresh_token=SecretStr("r"),
        concurrency=10,
    )
    eng = offline_engine(pipeline(), client)
    eng.emitter = _Emitter()  # type: ignore[assignment]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    eng.tracker.register(0, 1)
    eng.coalescer.add(ChangeEvent(1, "orders", Op.UPDATE, "k", 1, 1, {"id": 1}, at), 0)
    # nothing queued: at 585 s the change still waits (due at ~592 s: 600 s less the margin)
    first = eng._plan(at.timestamp() + 585.0)
    assert seen[-1].calls_ahead == 0 and first is not None and first.is_empty
    # 10 calls hold the slots and 90 wait: 10 rounds of 1 s ahead, so it must leave now
    held = [await client.limiter.acquire() for _ in range(10)]
    waiting = [asyncio.create_task(client.limiter.acquire()) for _ in range(90)]
    await asyncio.sleep(0)
    try:
        second = eng._plan(at.timestamp() + 585.0)
        assert seen[-1].calls_ahead == 100
        assert second is not None and second.upserts == [["k"]]
    finally:
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for _ in held:
            await client.limiter.release()
