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


def simulate_org(
    pipelines: dict[str, list[tuple[float, str]]],
    *,
    org: bool,
    max_staleness: float = 60.0,
    concurrency: int = 2,
    upsert_latency: float = 1.0,
    cost: CostModel | None = None,
) -> dict[str, SimResult]:
    """Several pipelines of one org, each planned by its own ``plan`` as its engine does, their
    upsert calls sharing ``concurrency`` slots (FIFO, as the client's limiter) of a CRM that
    answers each in ``upsert_latency`` (the planner is told exactly that). ``org``: each
    planner's ``calls_ahead`` also counts the other pipelines' calls that may go before its
    own (``OrgBoard.calls_ahead``, on a board every planner publishes to, as
    ``Engine._org_calls_ahead`` does); otherwise only the calls sent and not answered (the
    limiter's queue), as before session 22."""
    from connector.org import OrgBoard

    cost = cost or CostModel()
    board = OrgBoard()
    names = sorted(pipelines)
    order = {n: sorted(range(len(pipelines[n])), key=lambda j: pipelines[n][j][0]) for n in names}
    nxt = dict.fromkeys(names, 0)
    pending: dict[str, dict[str, float]] = {n: {} for n in names}
    newest: dict[str, dict[str, int]] = {n: {} for n in names}
    by_key: dict[str, dict[str, list[int]]] = {n: {} for n in names}
    in_flight: dict[str, set[str]] = {n: set() for n in names}
    delivered: dict[str, dict[int, float]] = {n: {} for n in names}
    spent = dict.fromkeys(names, 0)
    calls = dict.fromkeys(names, 0)
    wake = dict.fromkeys(names, None)  # type: dict[str, float | None]
    done: list[tuple[float, int, str, list[tuple[str, int]]]] = []
    slots = [0.0] * concurrency
    seq = steps = 0
    while True:
        cand = [math.inf]
        for n in names:
            if nxt[n] < len(order[n]):
                cand.append(pipelines[n][order[n][nxt[n]]][0])
            w = wake[n]
            if w is not None:
                cand.append(w)
        if done:
            cand.append(done[0][0])
        now = min(cand)
        if now == math.inf:
            assert not any(pending.values()), "stalled with pending changes"
            break
        while done and done[0][0] <= now:
            t_done, _, n, items = heapq.heappop(done)
            for key, v in items:
                in_flight[n].discard(key)
                for idx in by_key[n][key]:
                    if idx <= v and idx not in delivered[n]:
                        delivered[n][idx] = t_done
        for n in names:
            while nxt[n] < len(order[n]) and pipelines[n][order[n][nxt[n]]][0] <= now:
                t, key = pipelines[n][order[n][nxt[n]]]
                by_key[n].setdefault(key, []).append(nxt[n])
                newest[n][key] = nxt[n]
                pending[n].setdefault(key, t)
                nxt[n] += 1
        for n in names:
            keys = [PendingKey(k, at, k in in_flight[n]) for k, at in pending[n].items()]
            ahead = sum(1 for d in done)  # sent, not answered: the limiter's queue
            if org:
                dls = [pk.oldest_at + max_staleness for pk in keys if not pk.in_flight]
                board.publish(n, dls, cost.upsert_batch)
                if dls:
                    own = -(-len(dls) // cost.upsert_batch)
                    ahead += board.calls_ahead(n, min(dls), upsert_latency, concurrency, own)
            if not keys:
                wake[n] = None
                continue
            p = plan(
                PlannerInput(
                    now=now,
                    pending=keys,
                    max_staleness=max_staleness,
                    credits_left=10**9,
                    reserve=0,
                    concurrency=concurrency,
                    upsert_latency=upsert_latency,
                    bulk_latency=600.0,
                    cost=cost,
                    calls_ahead=ahead,
                )
            )
            assert not p.bulk, "the org simulation models upsert calls only"
            spent[n] += p.credits(cost)
            wake[n] = p.wake_at
            for ks in p.upserts:
                items = []
                for k in ks:
                    del pending[n][k]
                    in_flight[n].add(k)
                    items.append((k, newest[n][k]))
                start = max(now, heapq.heappop(slots))
                t_done = start + upsert_latency
                heapq.heappush(slots, t_done)
                calls[n] += 1
                seq += 1
                heapq.heappush(done, (t_done, seq, n, items))
            if org:  # what it sent is in the limiter's queue now, not on the board
                board.publish(
                    n,
                    [at + max_staleness for k, at in pending[n].items() if k not in in_flight[n]],
                    cost.upsert_batch,
                )
        steps += 1
        assert steps < 1_000_000, "planner loops"
    out: dict[str, SimResult] = {}
    for n in names:
        stale = [math.inf] * len(pipelines[n])
        for pos, j in enumerate(order[n]):
            stale[j] = delivered[n].get(pos, math.inf) - pipelines[n][j][0]
        out[n] = SimResult(stale, spent[n], calls[n], 0, [], max_staleness)
    return out
