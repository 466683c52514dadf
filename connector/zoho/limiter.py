"""AIMD concurrency limit shared by every CRM call (DESIGN.md §5).

Zoho answers an over-concurrency call with an immediate 429 instead of queuing it
(zoho-crm-api.md §4.3, §4.4). The limiter keeps the connector under the edition's limit and
backs off when the CRM says it is over it:

* starts at ``max_limit`` (the edition's concurrency, or ``crm.max_concurrency``);
* **multiplicative decrease** on a 429: ``limit = max(min_limit, floor(limit * factor))``, at most
  once per *generation*: calls that were already in flight when the limit was last lowered
  carry the old generation and their 429s do not lower it again (one burst is one signal);
* **additive increase**: after ``limit`` successful calls since the last change (one "window"
  of acknowledgements, as in TCP congestion avoidance) the limit grows by one, up to
  ``max_limit``.

No clock is involved, so the behaviour is deterministic and testable without timing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    """A granted slot. ``generation`` is the limiter's generation when the slot was granted."""

    generation: int


class AdaptiveLimiter:
    def __init__(self, max_limit: int, *, min_limit: int = 1, decrease_factor: float = 0.5) -> None:
        if max_limit < 1 or min_limit < 1 or min_limit > max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0.0 < decrease_factor < 1.0:
            raise ValueError("decrease_factor must be between 0 and 1")
        self._max = max_limit
        self._min = min_limit
        self._factor = decrease_factor
        self._limit = max_limit
        self._in_flight = 0
        self._waiting = 0
        self._generation = 0
        self._successes = 0
        self._decreases = 0
        self._increases = 0
        self._cond = asyncio.Condition()

    @property
    def limit(self) -> int:
        """The current concurrency limit."""
        return self._limit

    @property
    def max_limit(self) -> int:
        return self._max

    @property
    def min_limit(self) -> int:
        return self._min

    @property
    def in_flight(self) -> int:
        """Calls holding a slot right now."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot right now."""
        return self._waiting

    @property
    def queued(self) -> int:
        """Calls sent and not answered: holding a slot or waiting for one. A call made now
        starts behind them (the planner's ``calls_ahead``)."""
        return self._in_flight + self._waiting

    @property
    def decreases(self) -> int:
        """How many times the limit was lowered (for metrics and tests)."""
        return self._decreases

    @property
    def increases(self) -> int:
        return self._increases

    async def acquire(self) -> Ticket:
        self._waiting += 1
        try:
            async with self._cond:
                await self._cond.wait_for(lambda: self._in_flight < self._limit)
                self._in_flight += 1
                return Ticket(self._generation)
        finally:
            self._waiting -= 1

    async def release(self) -> None:
        async with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        ticket = await self.acquire()
        try:
            yield ticket
        finally:
            await asyncio.shield(self.release())

    def on_success(self, ticket: Ticket | None = None) -> None:
        """A call finished without an overload signal: additive increase after a window."""
        del ticket
        if self._limit >= self._max:
            self._successes = 0
            return
        self._successes += 1
        if self._successes >= self._limit:
            self._successes = 0
            self._limit += 1
            self._increases += 1
            # waiters are woken by the release that always follows a success

    def on_overload(self, ticket: Ticket | None = None) -> bool:
        """A 429: multiplicative decrease, once per generation. Returns True if lowered."""
        if ticket is not None and ticket.generation != self._generation:
            return False
        self._generation += 1
        self._successes = 0
        new = max(self._min, math.floor(self._limit * self._factor))
        if new < self._limit:
            self._limit = new
            self._decreases += 1
            return True
        return False

    def __repr__(self) -> str:
        return f"AdaptiveLimiter(limit={self._limit}/{self._max}, in_flight={self._in_flight})"
