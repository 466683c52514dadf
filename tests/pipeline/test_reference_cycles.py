"""No reference cycle keeps a sent batch alive.

The connector runs with the cyclic GC's thresholds raised (connector/gcsetup.py): what only the
cyclic GC can free waits for a full collection, which comes rarely. In the 60-minute soak of
session 15 a fault-free connector's RSS grew ~25 MB a minute (176 MB after a minute, 1,046 MB
after 40): each group with a row the mapping rejected kept its caught ``DataError``, whose
traceback held the emitter's frame, whose locals held the whole group (row images, CSV rows).
These tests run the pipeline with the collector off and look at what a collection then finds:
no frame of the emitter may be among it."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator

import pytest

from connector.zoho.client import ZohoClient

from .conftest import EngineFactory, execute, fetch, insert_sql

EMITTER_FILES = ("emitter.py", "emitter_bulk.py", "emitter_outcome.py", "emitter_schema.py")


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic GC off while the test runs, as good as the rare full collections of a
    running connector: what only it could free stays until the test looks."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def unreachable_emitter_frames() -> list[str]:
    """The emitter's frames that only a collection of the cyclic GC would free (kept for
    inspection with ``DEBUG_SAVEALL`` instead of freed)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted(
            f"{o.f_code.co_filename.rsplit('/', 1)[-1]}:{o.f_code.co_name}"
            for o in gc.garbage
            if isinstance(o, types.FrameType) and o.f_code.co_filename.endswith(EMITTER_FILES)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize("rows", [6_000, 40], ids=["bulk", "upsert"])
async def test_a_group_with_rows_the_mapping_rejects_leaves_no_cycle(
    legacy: str,
    client: ZohoClient,
    make_engine: EngineFactory,
    collector_off: None,
    rows: int,
) -> None:
    bad = [7, 17, 27]
    await execute(legacy, *insert_sql(rows))
    # numeric NaN converts to no CRM currency: a DataError of the mapping, per row
    await execute(legacy, "UPDATE public.orders SET amount = 'NaN' WHERE id = ANY(%s)", (bad,))
    await (await make_engine(client)).drain()

    letters = await fetch(
        legacy, "SELECT key::int, api FROM connector.dead_letters ORDER BY key::int"
    )
    assert letters == [(k, "mapping") for k in bad]  # the path under test ran
    assert unreachable_emitter_frames() == []
