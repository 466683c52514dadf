"""A discrete-event driver for connector.planner.plan, shared by the planner tests.

It plans like the engine does (at every arrival, every answer, every wake-up), keeps the newest
version per key with in-flight fencing, and talks to a CRM whose latencies are *functions* the
test chooses (slow bulk, bulk slower than the planner thinks, 429 storms); what the planner is
told comes from a ``LatencyEstimator`` fed with what the CRM really took, as in the emitter.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.costs import CostModel
from connector.latency import LatencyEstimator
from connector.planner import PendingKey, Plan, PlannerInput, plan


@dataclass
class SimResult:
    staleness: list[float]  # per change, in input order
    credits: int
    calls: int
    jobs: int
    plans: list[Plan] = field(default_factory=list)

    @property
    def late(self) -> int:
        return sum(1 for s in self.staleness if s > self.max_staleness + 1e-6)

    max_staleness: float = 0.0

    def p50(self) -> float:
        s = sorted(self.staleness)
        return s[(len(s) - 1) // 2]


def simulate(
    changes: list[tuple[float, str]],
    *,
    max_staleness: float = 600.0,
    cost: CostModel | None = None,
    concurrency: int = 10,
    upsert_lat: Callable[[float, int], float] = lambda now, n: 1.0,
    upsert_retry: Callable[[float, int], float] = lambda now, n: 0.0,
    bulk_lat: Callable[[float, int], float] = lambda now, n: 60.0 + n / 1_000,
    estimator: LatencyEstimator | None = None,
    exact: bool = False,
    freshness: str = "economy",
    retry_allowance: float = 0.0,
    budget: int = 10**9,
    reserve: int = 0,
    bulk_ages: bool = False,
) -> SimResult:
    """``upsert_lat(now, k)`` / ``bulk_lat(now, n)``: what the CRM really takes for the k-th
    call / a job of n records sent at ``now``. ``upsert_retry(now, k)``: the seconds the k-th
    call spends in the client's retries (429 storms) before its answering HTTP call; the call
    takes both, the estimator sees only the answering call, as the emitter measures it
    (``http_seconds``: the last HTTP attempt, without backoff or slot wait). ``exact``: the
    planner is told the true latency of the next call / a job of each size at the current
    time (an oracle); otherwise the
    estimator's conservative figures, fed with the measured ones. ``bulk_ages``: the bulk
    measurements carry their time and the estimate is asked at the current one (they age, as
    in the engine); otherwise they never age."""
    cost = cost or CostModel()
    est = estimator or LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    order = sorted(range(len(changes)), key=lambda j: changes[j][0])
    pending: dict[str, float] = {}  # key -> oldest pending capture
    newest: dict[str, int] = {}
    in_flight: set[str] = set()
    by_key: dict[str, list[int]] = {}
    delivered: dict[int, float] = {}
    done: list[tuple[float, int, list[tuple[str, int]], str, int, float]] = []
    slots = [0.0] * concurrency
    spent = calls = jobs = seq = 0
    plans: list[Plan] = []
    wake: float | None = None
    i = 0
    steps = 0
    while i < len(order) or done or pending:
        cand = [math.inf]
        if i < len(order):
            cand.append(changes[order[i]][0])
        if done:
            cand.append(done[0][0])
        if wake is not None:
            cand.append(wake)
        now = min(cand)
        assert now < math.inf, "stalled with pending changes"
        while done and done[0][0] <= now:
            t_done, _, items, kind, n, started = heapq.heappop(done)
            if kind == "bulk":
                est.observe_bulk(n, t_done - started, t_done if bulk_ages else None)
            else:
                est.observe_upsert(t_done - started)
            for key, v in items:
                in_flight.discard(key)
                for idx in by_key[key]:
                    if idx <= v and idx not in delivered:
                        delivered[idx] = t_done
        while i < len(order) and changes[order[i]][0] <= now:
            j = order[i]
            t, key = changes[j]
            by_key.setdefault(key, []).append(i)  # versions: the position in time order
            newest[key] = i
            pending.setdefault(key, t)
            i += 1
        kw: dict[str, Any] = {}
        if freshness != "economy":
            kw["freshness"] = freshness
        if retry_allowance:
            kw["retry_allowance"] = retry_allowance
        if exact:
            up, full = upsert_lat(now, calls), bulk_lat(now, cost.bulk_batch)
        else:
            up = est.upsert()
            full, profile = est.bulk_profile(cost.bulk_batch, now if bulk_ages else None)
            if profile:
                kw["bulk_latency_by_size"] = profile
        pi = PlannerInput(
            now=now,
            pending=[PendingKey(k, at, k in in_flight) for k, at in pending.items()],
            max_staleness=max_staleness,
            credits_left=budget - spent,
            reserve=reserve,
            concurrency=concurrency,
            upsert_latency=up,
            bulk_latency=full,
            cost=cost,
            # the calls sent and not answered, as the engine reads them from the limiter
            calls_ahead=sum(1 for d in done if d[3] == "upsert"),
            **kw,
        )
        p = plan(pi)
        plans.append(p)
        spent += p.credits(cost)
        wake = p.wake_at
        assert wake is None or wake > now or not p.is_empty, p.reason
        for group, kind in ((p.bulk, "bulk"), (p.upserts, "upsert")):
            for ks in group:
                items = []
                for k in ks:
                    assert k not in in_flight and k in pending, k
                    del pending[k]
                    in_flight.add(k)
                    items.append((k, newest[k]))
                started = now
                if kind == "bulk":
                    t_done = now + bulk_lat(now, len(ks))
                    jobs += 1
                else:
                    free = heapq.heappop(slots)
                    start = max(now, free)  # holds a slot from here
                    retry = upsert_retry(now, calls)
                    started = start + retry  # measured: the answering HTTP call only
                    t_done = started + upsert_lat(now, calls)
                    heapq.heappush(slots, t_done)
                    calls += 1
                seq += 1
                heapq.heappush(done, (t_done, seq, items, kind, len(ks), started))
        steps += 1
        assert steps < 2_000_000, "planner loops"
    stale = [math.inf] * len(changes)
    for pos, j in enumerate(order):
        stale[j] = delivered.get(pos, math.inf) - changes[j][0]
    return SimResult(stale, spent, calls, jobs, plans, max_staleness)
