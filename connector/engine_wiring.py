"""The parts an :class:`connector.engine.Engine` runs on, built in one place: the state pool,
the emitter, and the credit hook on the Zoho client.

:mod:`connector.pipeline` composes them (``build_pipeline``) and hands them to the engine,
which requires them and never builds its own. Split from ``connector.engine`` (issue 20, the
composition root)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from psycopg_pool import AsyncConnectionPool

from connector.config import PipelineConfig
from connector.emitter import CallbackUrl, CreditRecorder, Emitter
from connector.engine_common import EngineOptions
from connector.metrics import Metrics
from connector.zoho.client import ZohoClient


@contextlib.asynccontextmanager
async def open_state_pool(dsn: str, name: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """The engine's state pool: constructed closed, opened with ``wait=True`` (fails fast when
    the database is away), closed on exit."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=4,
        kwargs={"autocommit": True},
        open=False,
        name=name,
    )
    try:
        await pool.open(wait=True)
        yield pool
    finally:
        await pool.close()


def build_emitter(
    pipeline: PipelineConfig,
    *,
    client: ZohoClient,
    pool: AsyncConnectionPool[Any],
    schema: str,
    source_dsn: str,
    options: EngineOptions,
    metrics: Metrics | None = None,
    callback_url: CallbackUrl | None = None,
    parents: Mapping[str, PipelineConfig] | None = None,
) -> Emitter:
    """The pipeline's emitter (no I/O: ``load_source_types`` runs when the engine starts).
    ``parents``: the pipelines its lookup fields name (by name), required when it maps one."""
    return Emitter(
        pipeline,
        client=client,
        pool=pool,
        schema=schema,
        metrics=metrics,
        source_dsn=source_dsn,
        callback_url=callback_url,
        bulk_poll_initial=options.bulk_poll_initial,
        bulk_poll_max=options.bulk_poll_max,
        default_bulk_latency=options.default_bulk_latency,
        orphan_fence_factor=options.orphan_fence_factor,
        orphan_fence_min=options.orphan_fence_min,
        parents=parents,
    )


@contextlib.contextmanager
def chain_credits(client: ZohoClient) -> Iterator[CreditRecorder]:
    """THE place a :class:`CreditRecorder` is installed on ``client.on_call``: it records every
    call's credits and then calls the hook that was there before (the runtime's metrics hook,
    say); on exit the previous hook is put back."""
    previous = client.on_call
    recorder = CreditRecorder(chain=previous)
    client.on_call = recorder
    try:
        yield recorder
    finally:
        client.on_call = previous
