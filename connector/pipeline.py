"""The composition root of one pipeline: the typed bundle of what runs it and the one place
that builds it.

:func:`build_pipeline` enters, on one :class:`contextlib.AsyncExitStack`: the credit hook on
the Zoho client (:func:`chain_credits`, unless a recorder is given), the state pool (opened
with ``wait=True``, unless one is given), then builds the emitter and the
:class:`~connector.engine.Engine` and hands them their parts; on exit everything closes in the
reverse order (credits flushed, pool closed, previous hook restored). The runtime
(``Runtime.open_pipeline``), ``connector replay`` and the benchmarks use it; the engine never
builds these itself when given them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from connector.config import PipelineConfig
from connector.costs import CostModel
from connector.emitter import CallbackUrl, CreditRecorder, Emitter
from connector.engine import Engine
from connector.engine_common import Clock, EngineOptions, SnapshotMode
from connector.engine_wiring import build_emitter, chain_credits, open_state_pool
from connector.metrics import Metrics
from connector.zoho.client import ZohoClient

__all__ = ["Pipeline", "build_pipeline", "chain_credits"]


@dataclass(frozen=True)
class Pipeline:
    """One pipeline's parts, built by :func:`build_pipeline` and valid inside its block."""

    config: PipelineConfig
    pool: AsyncConnectionPool[Any]
    client: ZohoClient
    emitter: Emitter
    credits: CreditRecorder
    engine: Engine


@contextlib.asynccontextmanager
async def build_pipeline(
    config: PipelineConfig,
    *,
    client: ZohoClient,
    state_dsn: str,
    source_dsn: str | None = None,
    schema: str = "connector",
    pool: AsyncConnectionPool[Any] | None = None,
    credits: CreditRecorder | None = None,
    metrics: Metrics | None = None,
    daily_credit_budget: int = 50_000,
    credit_reserve: int = 1_000,
    callback_url: CallbackUrl | None = None,
    options: EngineOptions | None = None,
    snapshot: SnapshotMode | None = None,
    snapshot_progress: bool | None = None,
    cost: CostModel | None = None,
    clock: Clock | None = None,
    parents: Mapping[str, PipelineConfig] | None = None,
) -> AsyncIterator[Pipeline]:
    """Build one pipeline. ``pool`` / ``credits``: given ones are used and left open / in
    place (their owner closes them); otherwise they are made here and closed on exit.
    ``parents``: the pipelines its lookup fields name (by name; all of the configuration's
    pipelines will do), required when it maps a lookup."""
    options = options or EngineOptions()
    source_dsn = source_dsn or state_dsn
    async with contextlib.AsyncExitStack() as stack:
        if credits is None:
            credits = stack.enter_context(chain_credits(client))
        if pool is None:
            pool = await stack.enter_async_context(
                open_state_pool(state_dsn, f"engine-{config.name}")
            )
        emitter = build_emitter(
            config,
            client=client,
            pool=pool,
            schema=schema,
            source_dsn=source_dsn,
            options=options,
            metrics=metrics,
            callback_url=callback_url,
            parents=parents,
        )
        engine = Engine(
            config,
            client=client,
            state_dsn=state_dsn,
            source_dsn=source_dsn,
            schema=schema,
            metrics=metrics,
            daily_credit_budget=daily_credit_budget,
            credit_reserve=credit_reserve,
            callback_url=callback_url,
            credit_recorder=credits,
            options=options,
            snapshot=snapshot,
            snapshot_progress=snapshot_progress,
            cost=cost,
            pool=pool,
            emitter=emitter,
            clock=clock,
        )
        yield Pipeline(
            config=config,
            pool=pool,
            client=client,
            emitter=emitter,
            credits=credits,
            engine=engine,
        )
