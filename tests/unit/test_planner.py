"""Planner: the seed's table, waiting, fencing, budget; hypothesis properties in simulated time."""

from __future__ import annotations

import heapq
import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.costs import CostModel
from connector.planner import PendingKey, Plan, PlannerInput, margin, plan

COST = CostModel()
S = 600.0


def inp(pending: list[PendingKey], now: float = 1_000.0, **kw: object) -> PlannerInput:
    base = PlannerInput(
        now=now,
        pending=pending,
        max_staleness=S,
        credits_left=50_000,
        reserve=1_000,
        concurrency=10,
        upsert_latency=1.0,
        bulk_latency=85.0,
        cost=COST,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def keys(n: int, at: float = 0.0, prefix: str = "k") -> list[PendingKey]:
    return [PendingKey(f"{prefix}{i}", at + i * 1e-6, False) for i in range(n)]


def sizes(p: Plan) -> tuple[list[int], list[int]]:
    return [len(c) for c in p.upserts], [len(j) for j in p.bulk]


# -- the seed's table: a flush at the deadline ----------------------------------------------


def test_seed_table_at_deadline() -> None:
    now = S  # everything captured at 0: deadline now, must leave
    for n, want_up, want_bulk, credits in [
        (100, [100], [], 10),
        (2_000, [100] * 20, [], 200),
        (5_000, [100] * 50, [], 500),  # tie: upsert
    ]:
        p = plan(inp(keys(n), now=now))
        assert sizes(p) == (want_up, want_bulk), n
        assert p.credits(COST) == credits
        assert p.wake_at is None and not p.budget_alert
    # a full bulk job leaves when its oldest record must (economy): not before
    p = plan(inp(keys(25_000), now=0.0))
    assert p.is_empty and p.wake_at is not None
    assert math.isclose(p.wake_at, S - margin(inp([])) - 85.0)
    p = plan(inp(keys(25_000), now=p.wake_at))
    assert sizes(p) == ([], [25_000]) and p.credits(COST) == 500


def test_waits_until_the_oldest_must_leave() -> None:
    pend = keys(150, at=100.0)
    p = plan(inp(pend, now=120.0))
    assert p.is_empty
    # 2 calls at concurrency 10: one round of 1 s, and the margin
    assert p.wake_at is not None
    assert math.isclose(p.wake_at, 100.0 + S - 1.0 - margin(inp(pend)))
    at_wake = plan(inp(pend, now=p.wake_at))
    assert sizes(at_wake) == ([100, 50], [])


def test_bulk_leaves_earlier_than_upsert() -> None:
    pend = keys(6_000, at=0.0)
    p = plan(inp(pend, now=10.0))
    assert p.is_empty and p.wake_at is not None
    assert math.isclose(p.wake_at, S - 85.0 - margin(inp(pend)))
    assert sizes(plan(inp(pend, now=p.wake_at))) == ([], [6_000])
    # too late for a bulk job: upsert (staleness before credits)
    late = plan(inp(pend, now=S - 12.0))  # 6 rounds of upsert calls still fit, a job not
    assert sizes(late) == ([100] * 60, [])


def test_in_flight_keys_are_not_planned() -> None:
    pend = [*keys(50), PendingKey("busy", 0.0, True)]
    p = plan(inp(pend, now=S))
    assert "busy" not in {k for c in p.upserts for k in c}
    assert sizes(p) == ([50], [])
    only = plan(inp([PendingKey("busy", 0.0, True)], now=S))
    assert only.is_empty and only.wake_at is None


def test_full_bulk_then_rest_waits() -> None:
    pend = keys(25_300, at=50.0)
    p = plan(inp(pend, now=60.0))
    assert p.is_empty and p.wake_at is not None
    p = plan(inp(pend, now=p.wake_at))
    assert sizes(p) == ([], [25_000])
    assert p.wake_at is not None and p.wake_at > 60.0
    assert {k for j in p.bulk for k in j} == {pk.key for pk in pend[:25_000]}  # oldest first


def test_reserve_sends_only_due_changes() -> None:
    due = keys(30, at=0.0, prefix="due")
    young = keys(500, at=500.0, prefix="young")
    p = plan(inp(due + young, now=S - 5.0, credits_left=1_020, reserve=1_000))
    sent = {k for c in p.upserts for k in c}
    assert sent == {pk.key for pk in due}
    assert p.budget_alert and p.credits(COST) <= 1_020
    assert p.wake_at is not None and p.wake_at > S - 5.0


def test_never_beyond_credits_left() -> None:
    pend = keys(400, at=0.0)
    p = plan(inp(pend, now=S, credits_left=7, reserve=1_000))
    assert p.credits(COST) <= 7 and sizes(p) == ([70], [])
    assert p.budget_alert and p.wake_at is not None and p.wake_at > S
    none = plan(inp(pend, now=S, credits_left=0, reserve=1_000))
    assert none.is_empty and none.budget_alert


def test_young_full_bulk_held_by_reserve() -> None:
    p = plan(inp(keys(25_000, at=0.0), now=1.0, credits_left=1_200, reserve=1_000))
    assert p.is_empty and p.budget_alert


# -- properties -------------------------------------------------------------------------------

SMALL = CostModel(upsert_batch=10, records_per_credit=2, bulk_batch=250, bulk_job_credits=20)

params = st.fixed_dictionaries(
    {
        "max_staleness": st.sampled_from([60.0, 300.0, 600.0]),
        "concurrency": st.integers(1, 10),
        "upsert_latency": st.floats(0.05, 2.0),
        "bulk_frac": st.floats(0.05, 0.33),
    }
)
arrivals = st.lists(
    st.tuples(st.floats(0, 1_500), st.integers(0, 150), st.integers(1, 40)),
    min_size=1,
    max_size=40,
)


def simulate(
    prm: dict[str, float],
    bursts: list[tuple[float, int, int]],
    budget: int,
    reserve: int,
    backlog: int = 0,
) -> tuple[list[float], int, list[Plan], list[PlannerInput]]:
    """A CRM answering at exactly the assumed latencies: upsert calls ``concurrency`` at a time
    (FIFO slots), bulk jobs side by side. The driver plans at every arrival, every answer and
    every wake-up, like the emitter. Returns staleness per change and credits spent.
    ``backlog``: that many initial-sync rows (keys ``b…``, no deadline) captured at 0; their
    staleness is returned too (after the live changes', in key order)."""
    smax = prm["max_staleness"]
    c = int(prm["concurrency"])
    lat = prm["upsert_latency"]
    blat = prm["bulk_frac"] * smax
    changes: list[tuple[float, str]] = []
    for t0, k0, n in bursts:
        changes.extend((round(t0, 3), f"k{(k0 + j * 7) % 200}") for j in range(n))
    changes.extend((0.0, f"b{j}") for j in range(backlog))
    changes.sort()
    pending: dict[str, list[float]] = {}  # key -> [oldest_at]
    newest: dict[str, int] = {}  # key -> newest change index
    in_flight: dict[str, int] = {}
    done_heap: list[tuple[float, int, list[tuple[str, int]]]] = []
    slots = [0.0] * c
    delivered: dict[int, float] = {}
    by_key: dict[str, list[int]] = {}
    spent = 0
    plans: list[Plan] = []
    inputs: list[PlannerInput] = []
    wake: float | None = None
    i = 0
    seq = 0
    horizon = (changes[-1][0] if changes else 0.0) + 20 * smax
    while i < len(changes) or done_heap or pending:
        cand = [math.inf]
        if i < len(changes):
            cand.append(changes[i][0])
        if done_heap:
            cand.append(done_heap[0][0])
        if wake is not None:
            cand.append(wake)
        now = min(cand)
        assert now < math.inf, "stalled"
        if now > horizon:  # only possible when the credits ran out
            break
        while done_heap and done_heap[0][0] <= now:
            t_done, _, items = heapq.heappop(done_heap)
            for key, v in items:
                del in_flight[key]
                for idx in by_key[key]:
                    if idx <= v and idx not in delivered:
                        delivered[idx] = t_done
        while i < len(changes) and changes[i][0] <= now:
            t, key = changes[i]
            by_key.setdefault(key, []).append(i)
            newest[key] = i
            pending.setdefault(key, [t])
            i += 1
        pi = PlannerInput(
            now=now,
            pending=[
                PendingKey(k, v[0], k in in_flight, backlog=k.startswith("b"))
                for k, v in pending.items()
            ],
            max_staleness=smax,
            credits_left=budget - spent,
            reserve=reserve,
            concurrency=c,
            upsert_latency=lat,
            bulk_latency=blat,
            cost=SMALL,
        )
        p = plan(pi)
        plans.append(p)
        inputs.append(pi)
        spent += p.credits(SMALL)
        wake = p.wake_at
        assert wake is None or wake > now or not p.is_empty
        for group, is_bulk in ((p.bulk, True), (p.upserts, False)):
            for ks in group:
                items = []
                for k in ks:
                    assert k not in in_flight and k in pending
                    del pending[k]
                    in_flight[k] = newest[k]
                    items.append((k, newest[k]))
                if is_bulk:
                    t_done = now + blat
                else:
                    free = heapq.heappop(slots)
                    t_done = max(now, free) + lat
                    heapq.heappush(slots, t_done)
                seq += 1
                heapq.heappush(done_heap, (t_done, seq, items))
        if len(plans) > 20_000:
            raise AssertionError("planner loops")
    live = [j for j in range(len(changes)) if not changes[j][1].startswith("b")]
    rows = [j for j in range(len(changes)) if changes[j][1].startswith("b")]
    stale = [delivered.get(j, math.inf) - changes[j][0] for j in live + rows]
    return stale, spent, plans, inputs


@settings(max_examples=60, deadline=None)
@given(params, arrivals)
def test_no_change_exceeds_max_staleness(prm: dict[str, float], bursts: list) -> None:  # type: ignore[type-arg]
    stale, _, _, _ = simulate(prm, bursts, budget=10**9, reserve=0)
    assert max(stale) <= prm["max_staleness"] + 1e-6


@settings(max_examples=60, deadline=None)
@given(params, arrivals, st.integers(0, 400), st.integers(0, 100))
def test_budget_never_exceeded(
    prm: dict[str, float],
    bursts: list,
    budget: int,
    reserve: int,  # type: ignore[type-arg]
) -> None:
    _, spent, plans, inputs = simulate(prm, bursts, budget=budget, reserve=reserve)
    assert spent <= budget
    for p, pi in zip(plans, inputs, strict=True):
        assert p.credits(SMALL) <= max(0, pi.credits_left)
        if pi.credits_left - p.credits(SMALL) < pi.reserve and not p.is_empty:
            assert p.budget_alert


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 80_000),
    st.floats(0.0, 700.0),
    st.sampled_from([COST, SMALL]),
)
def test_flush_never_costlier_than_the_other_api(n: int, now: float, cost: CostModel) -> None:
    pend = keys(n, at=0.0)
    p = plan(inp(pend, now=now, cost=cost, credits_left=10**9, reserve=0))
    k = sum(len(c) for c in p.upserts) + sum(len(j) for j in p.bulk)
    if not k:
        assert p.wake_at is not None and p.wake_at > now
        return
    assert all(len(c) <= cost.upsert_batch for c in p.upserts)
    assert all(len(j) <= cost.bulk_batch for j in p.bulk)
    # all but the last upsert call are full
    assert all(len(c) == cost.upsert_batch for c in p.upserts[:-1])
    credits = p.credits(cost)
    assert credits <= cost.upsert_credits(k)
    time_left = S - margin(inp(pend)) - now
    if time_left >= 85.0:  # a bulk job is an alternative only if it arrives in time
        assert credits <= cost.bulk_credits(k)


# -- the initial sync's backlog: no deadline, cheapest API, live changes keep theirs ----------


def backlog_keys(n: int, at: float = 0.0) -> list[PendingKey]:
    return [PendingKey(f"b{i}", at + i * 1e-6, False, backlog=True) for i in range(n)]


def test_overdue_chunk_goes_by_bulk_not_by_the_faster_upsert() -> None:
    # captured an hour ago, bulk slower than the staleness budget: still one job (500)
    p = plan(inp(backlog_keys(25_000), now=3_600.0, max_staleness=10.0, bulk_latency=120.0))
    assert sizes(p) == ([], [25_000]) and p.credits(COST) == 500
    p = plan(inp(backlog_keys(6_000), now=3_600.0, max_staleness=10.0, bulk_latency=120.0))
    assert sizes(p) == ([], [6_000])


def test_chunk_being_read_leaves_only_as_full_jobs() -> None:
    p = plan(inp(backlog_keys(20_000), now=3_600.0, hold_backlog=True))
    assert p.is_empty and not p.budget_alert
    p = plan(inp(backlog_keys(26_000), now=3_600.0, hold_backlog=True))
    assert sizes(p) == ([], [25_000])


def test_live_changes_keep_their_deadline_beside_a_backlog() -> None:
    pend = [*keys(30, at=0.0), *backlog_keys(20_000, at=0.0)]
    p = plan(inp(pend, now=S, hold_backlog=True))  # live due now, chunk still being read
    assert sizes(p) == ([30], [])
    p = plan(inp(pend, now=S))  # chunk read whole: it goes too, by its own cheapest mix
    assert sorted(sizes(p)[0]) == [30] and sizes(p)[1] == [20_000]
    assert all(k.startswith("k") for c in p.upserts for k in c)


@settings(max_examples=40, deadline=None)
@given(params, arrivals, st.integers(1, 700))
def test_backlog_never_delays_live_changes_and_always_leaves(
    prm: dict[str, float],
    bursts: list,
    backlog: int,  # type: ignore[type-arg]
) -> None:
    stale, _, _, _ = simulate(prm, bursts, budget=10**9, reserve=0, backlog=backlog)
    live, rows = stale[: len(stale) - backlog], stale[len(stale) - backlog :]
    assert max(live) <= prm["max_staleness"] + 1e-6
    assert max(rows) < math.inf  # nothing held forever


@settings(max_examples=40, deadline=None)
@given(params, arrivals, st.integers(1, 700), st.integers(0, 400), st.integers(0, 100))
def test_budget_never_exceeded_with_a_backlog(
    prm: dict[str, float],
    bursts: list,  # type: ignore[type-arg]
    backlog: int,
    budget: int,
    reserve: int,
) -> None:
    _, spent, plans, inputs = simulate(prm, bursts, budget=budget, reserve=reserve, backlog=backlog)
    assert spent <= budget
    for p, pi in zip(plans, inputs, strict=True):
        assert p.credits(SMALL) <= max(0, pi.credits_left)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 80_000), st.floats(0.0, 5_000.0), st.sampled_from([COST, SMALL]))
def test_backlog_flush_is_the_cheapest_whatever_the_time(
    n: int, now: float, cost: CostModel
) -> None:
    p = plan(inp(backlog_keys(n), now=now, cost=cost, credits_left=10**9, reserve=0))
    k = sum(len(c) for c in p.upserts) + sum(len(j) for j in p.bulk)
    if not k:
        assert p.wake_at is not None and p.wake_at > now
        return
    assert p.credits(cost) <= cost.upsert_credits(k)
    assert p.credits(cost) <= cost.bulk_credits(k)
    assert p.credits(cost) == min(m.credits for m in cost.mixes(k))


def test_late_small_flush_is_not_bought_a_bulk_job() -> None:
    # overdue; one slow upsert call (2.3 s) vs a measured small bulk job (2.0 s): upsert
    p = plan(inp(keys(61), now=S + 50.0, upsert_latency=2.3, bulk_latency=2.0))
    assert sizes(p) == ([61], [])
    # a big late flush still takes the clearly faster API
    p = plan(inp(keys(25_000), now=S + 50.0, upsert_latency=1.0, bulk_latency=3.0))
    assert sizes(p) == ([], [25_000])


def test_an_instant_upsert_round_sends_a_burst_by_upsert_without_dividing_by_zero() -> None:
    # a measured upsert latency can be 0.0 (LatencyEstimator clamps at 0) and retry_allowance
    # defaults to 0: under balanced / fast the burst's upsert share was lat_b // 0
    for freshness in ("balanced", "fast"):
        p = plan(
            inp(
                keys(30_000, at=1_000.0 - S + 200.0),
                upsert_latency=0.0,
                retry_allowance=0.0,
                freshness=freshness,
            )
        )
        ups, jobs = sizes(p)
        assert not jobs  # upsert delivers at once: nothing waits for a job
        # early calls fill the 10 free slots; the rest leaves as they free (calls_ahead)
        assert sum(ups) == 10 * COST.upsert_batch
        assert p.wake_at is not None and p.wake_at <= 1_000.0 + 0.01
