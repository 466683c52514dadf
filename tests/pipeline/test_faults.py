"""Nothing lost under CRM faults (invariant 1): a 429 storm, 5 % of 500s and an access-token
expiry mid-run; nothing is dead-lettered for a transient cause."""

from __future__ import annotations

from connector.emulator.server import EmulatorHandle
from connector.zoho.client import ZohoClient

from .conftest import EngineFactory, assert_crm_matches, execute, fetch, insert_sql


async def test_storm_of_429_500_and_token_expiry(
    legacy: str, emu: EmulatorHandle, client: ZohoClient, make_engine: EngineFactory
) -> None:
    emu.set_faults(burst_429=25, error_rate=0.05, expire_tokens_after_calls=12, seed=7)
    await execute(legacy, *insert_sql(3_000))  # upsert path: 30 calls
    await (await make_engine(client)).drain()
    await execute(legacy, *insert_sql(6_000, start=3_001))  # bulk path
    await execute(legacy, "UPDATE public.orders SET status = 'Shipped' WHERE id % 97 = 0")
    await execute(legacy, "DELETE FROM public.orders WHERE id % 89 = 0")
    emu.set_faults(burst_429=10, expire_tokens_now=True)
    await (await make_engine(client)).drain()

    await assert_crm_matches(emu, legacy)
    assert await fetch(legacy, "SELECT count(*) FROM connector.dead_letters") == [(0,)]
    usage = emu.usage()
    assert usage["tokens_issued"] >= 2  # the token did expire and was refreshed
    assert client.retries > 0  # the faults were met (and retried)
