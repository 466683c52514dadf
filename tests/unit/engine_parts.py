"""An Engine for tests of its pure logic (planning, clocks, budgets): built with the parts the
composition root would give it (``connector.pipeline.build_pipeline``), but with a state pool
that is never opened, so nothing here touches a database. Running it would fail at once."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from connector.config import PipelineConfig
from connector.emitter import CreditRecorder
from connector.engine import Engine
from connector.engine_common import EngineOptions
from connector.engine_wiring import build_emitter
from connector.zoho.client import ZohoClient

UNUSED_DSN = "postgresql://unused"


def offline_engine(
    pipeline: PipelineConfig,
    client: ZohoClient,
    *,
    options: EngineOptions | None = None,
    **kw: Any,
) -> Engine:
    options = options or EngineOptions()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(UNUSED_DSN, open=False)
    emitter = build_emitter(
        pipeline,
        client=client,
        pool=pool,
        schema="connector",
        source_dsn=UNUSED_DSN,
        options=options,
    )
    return Engine(
        pipeline,
        client=client,
        pool=pool,
        emitter=emitter,
        credit_recorder=CreditRecorder(),
        state_dsn=UNUSED_DSN,
        options=options,
        **kw,
    )
