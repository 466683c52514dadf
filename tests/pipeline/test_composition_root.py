"""The composition root (``connector.pipeline.build_pipeline``): the engine runs on the pool,
emitter and credit recorder it is given; what the root made it closes in reverse order, what
it was given it leaves to its owner; ``chain_credits`` installs the recorder and restores the
previous hook."""

from __future__ import annotations

import inspect

import connector.engine as engine_mod
from connector.emitter import CreditRecorder
from connector.emulator.server import EmulatorHandle
from connector.engine import Engine
from connector.engine_wiring import open_state_pool
from connector.pipeline import build_pipeline, chain_credits
from connector.zoho.client import ZohoClient

from .conftest import FAST, SCHEMA, assert_crm_matches, execute, fetch, insert_sql, pipeline_config


def _hook(*_args: object) -> None:
    return None


async def test_build_pipeline_runs_the_engine_on_its_parts_and_closes_them(
    legacy: str, emu: EmulatorHandle, client: ZohoClient
) -> None:
    await execute(legacy, *insert_sql(100))
    client.on_call = _hook
    async with build_pipeline(
        pipeline_config(),
        client=client,
        state_dsn=legacy,
        schema=SCHEMA,
        options=FAST,
        snapshot_progress=False,
    ) as built:
        # the one credit hook, chained to the one that was there
        assert client.on_call is built.credits
        assert built.engine.credits is built.credits
        assert built.engine.client is client
        await built.engine.drain()
        assert built.engine.emitter is built.emitter
        assert not built.pool.closed  # the engine does not close what it was given
        # the engine flushed the credits it spent into the ledger on the root's pool
        rows = await fetch(legacy, "SELECT coalesce(sum(credits), 0) FROM connector.credit_ledger")
        assert rows[0][0] == 10
    assert built.pool.closed
    assert client.on_call is _hook
    await assert_crm_matches(emu, legacy)


async def test_a_given_pool_and_recorder_are_left_to_their_owner(
    legacy: str, emu: EmulatorHandle, client: ZohoClient
) -> None:
    await execute(legacy, *insert_sql(20))
    before = client.on_call
    with chain_credits(client) as credits:
        async with open_state_pool(legacy, "test-owner") as pool:
            async with build_pipeline(
                pipeline_config(),
                client=client,
                state_dsn=legacy,
                schema=SCHEMA,
                pool=pool,
                credits=credits,
                options=FAST,
                snapshot_progress=False,
            ) as built:
                assert built.pool is pool
                assert built.credits is credits
                await built.engine.drain()
            assert not pool.closed
            assert client.on_call is credits
    assert client.on_call is before
    await assert_crm_matches(emu, legacy)


def test_an_engine_has_no_builder_of_its_own() -> None:
    """The engine is only ever given its pool, emitter and credit recorder (by
    ``build_pipeline``): it has no default for them, so no path builds a second set."""
    params = inspect.signature(Engine).parameters
    for name in ("pool", "emitter", "credit_recorder"):
        assert params[name].default is inspect.Parameter.empty, name
    assert not hasattr(engine_mod, "open_state_pool")
    assert not hasattr(engine_mod, "build_emitter")
    assert not hasattr(engine_mod, "chain_credits")


async def test_repeated_runs_reuse_the_given_parts(
    legacy: str, emu: EmulatorHandle, client: ZohoClient
) -> None:
    """Two drains of one built pipeline (a restart within one process, as replay and the
    tests do) run on the same pool and emitter and leave the CRM equal to the table."""
    await execute(legacy, *insert_sql(30))
    async with build_pipeline(
        pipeline_config(), client=client, state_dsn=legacy, schema=SCHEMA, options=FAST
    ) as built:
        await built.engine.drain()
        await execute(legacy, "UPDATE public.orders SET name = name || '!' WHERE id <= 10")
        await built.engine.drain()
        assert built.engine.emitter is built.emitter
        assert not built.pool.closed
    await assert_crm_matches(emu, legacy)


def test_chain_credits_restores_the_previous_hook() -> None:
    class _Client:
        def __init__(self) -> None:
            self.on_call = _hook

    c = _Client()
    with chain_credits(c) as rec:  # type: ignore[arg-type]
        assert isinstance(rec, CreditRecorder)
        assert c.on_call is rec
    assert c.on_call is _hook
