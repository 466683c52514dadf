"""The upsert latency estimate is the HTTP call only (issue 18): the time a call waits for a
slot of the client's concurrency limiter is queueing, which the planner's rounds model counts
already; timing the whole await inflated the estimate (and made changes leave early)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from connector.coalesce import BatchTracker, Coalescer
from connector.config import PipelineConfig
from connector.emitter import CreditRecorder, Emitter
from connector.events import ChangeEvent, Op
from connector.zoho.client import RecordResult

HTTP_SECONDS = 0.25  # what the client reports for the HTTP call itself


class _Client:
    """Waits for a slot (the limiter is full), then reports its HTTP call through the hook,
    as ZohoClient does."""

    def __init__(self) -> None:
        self.on_call: Any = None

    async def upsert(
        self, module: str, records: Sequence[dict[str, Any]], dup: Sequence[str], **kw: Any
    ) -> list[RecordResult]:
        await asyncio.sleep(0.4)  # queued behind other calls: not the CRM's latency
        self.on_call("upsert", len(records), 1, HTTP_SECONDS, 200, None)
        return [
            RecordResult(i, "success", "SUCCESS", "ok", id=str(i), action="insert")
            for i in range(len(records))
        ]


async def test_the_estimate_excludes_the_limiter_wait() -> None:
    pipeline = PipelineConfig.model_validate(
        {
            "name": "orders",
            "source_table": "orders",
            "key_column": "id",
            "module": "Deals",
            "fields": {"title": "Deal_Name"},
        }
    )
    client = _Client()
    client.on_call = CreditRecorder()
    emitter = Emitter(pipeline, client=client, pool=None)  # type: ignore[arg-type]

    async def nothing(*a: Any, **k: Any) -> None:
        return None

    async def unchanged(records: Any, *a: Any) -> Any:
        return records

    emitter._check_source_columns = nothing  # type: ignore[method-assign]
    emitter._store = nothing  # type: ignore[method-assign]
    emitter._unchanged = unchanged  # type: ignore[method-assign]
    tracker = BatchTracker()
    coal = Coalescer(tracker)
    tracker.register(0, 1)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    coal.add(ChangeEvent(1, "orders", Op.UPDATE, "k", 1, 1, {"id": 1, "title": "x"}, at), 0)
    out = await emitter.send_upsert(coal.take(["k"]))
    assert out.acked == 1
    assert emitter.latency.upsert() == HTTP_SECONDS  # not the 0.4 s+ the await took
