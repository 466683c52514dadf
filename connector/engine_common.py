"""What the engine's modules share (``connector.engine`` and its mixins ``engine_read``,
``engine_fences``, ``engine_snapshot``, ``engine_replay``): the engine's options, the snapshot
mode, the clock (``Clock``, ``SystemClock``) and wait helpers. Split from
``connector.engine`` (issue 20)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

SnapshotMode = Literal["auto", "never", "force"]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    poll_interval: float = 1.0  # seconds between reads without a wake-up
    # the OutboxWatcher's adaptive poll for committed unread rows: min_interval while rows
    # keep arriving, doubling to max_interval while idle (no NOTIFY: DESIGN.md invariant 9)
    wake_poll_min: float = 0.05
    wake_poll_max: float = 1.0
    read_limit: int = 25_000  # outbox rows per read (a whole snapshot chunk fits)
    max_pending: int = 50_000  # backpressure: stop reading above this many keys
    drain_timeout: float = 30.0  # on stop, how long calls in flight may take to finish
    default_upsert_latency: float = 2.0  # planner input until measured
    default_bulk_latency: float = 120.0
    retry_backoff_max: float = 30.0
    bulk_poll_initial: float = 2.0  # first bulk job poll (a callback wakes it earlier)
    bulk_poll_max: float = 30.0
    # keys of a bulk job that may run on the CRM without its id known are held back for
    # factor × its expected duration (at least the minimum), or until its callback
    orphan_fence_factor: float = 3.0
    orphan_fence_min: float = 5.0
    # the CRM's X-API-CREDITS-REMAINING is trusted this long after the last call; then the
    # planner goes by the ledger again, so one call probes whether the credits came back
    credit_probe_interval: float = 30.0
    # acknowledged stamps kept in memory once the checkpoint has passed them (most recent
    # first); older ones are reloaded from key_state when their key shows up again
    acked_cache: int = 10_000


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _now() -> float:
    return datetime.now(UTC).timestamp()


class Clock(Protocol):
    """The engine's time: ``now()`` wall-clock seconds since the epoch (deadlines, fences,
    staleness), ``monotonic()`` for intervals, ``sleep()``. Injectable: tests pass a fake one
    instead of sleeping."""

    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_any(self, events: Sequence[asyncio.Event], timeout: float) -> None:
        """Return when one of ``events`` is set or ``timeout`` seconds have passed."""
        ...


class SystemClock:
    """The real clock (the default)."""

    def now(self) -> float:
        return _now()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_any(self, events: Sequence[asyncio.Event], timeout: float) -> None:
        if any(e.is_set() for e in events):
            return
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
