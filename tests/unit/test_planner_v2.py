"""Issue 18's five findings, each on its own trace, and the planner v2 properties: no change late
under arrival patterns *and* latency models (slow bulk, estimates below reality, 429 storms)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from connector.costs import CostModel
from connector.latency import LatencyEstimator
from connector.planner import PendingKey, PlannerInput, margin, plan
from tests.unit.planner_sim import simulate

COST = CostModel()
S = 600.0


def burst(n: int, at: float, prefix: str = "k", spread: float = 0.0) -> list[tuple[float, str]]:
    """``n`` keys changed at ``at``, or over ``spread`` seconds (whole seconds: one reader
    batch a second, as in the engine)."""
    return [(at + math.floor(spread * j / n), f"{prefix}{j}") for j in range(n)]


# -- finding 1: a full bulk job left without a deadline check, carrying the oldest keys ------


def test_f1_full_job_never_carries_a_change_it_cannot_bring_in_time() -> None:
    pend = [PendingKey("old", 0.5, False)]
    pend += [PendingKey(f"y{j}", 525.0, False) for j in range(24_999)]
    inp = PlannerInput(
        now=526.0,
        pending=pend,
        max_staleness=S,
        credits_left=10**6,
        reserve=0,
        concurrency=10,
        upsert_latency=1.0,
        bulk_latency=85.0,
        cost=COST,
    )
    p = plan(inp)
    at = {pk.key: pk.oldest_at for pk in pend}
    for job in p.bulk:  # every record of a job sent now arrives by its deadline
        assert all(at[k] + S >= inp.now + 85.0 + margin(inp) for k in job)
    assert "old" not in {k for j in p.bulk for k in j}


def test_f1_the_same_trace_end_to_end_is_never_late() -> None:
    changes = [(0.5, "old"), *burst(24_999, 525.0)]
    r = simulate(changes, exact=True)
    assert r.late == 0
    assert r.credits <= 500 + 1  # one job for the burst, one credit for the old change


def test_f1_slow_bulk_api_import_is_never_late() -> None:
    # every bulk job takes 8 minutes, and the planner has measured it (a previous job): an
    # import of 24,999 rows next to one change 200 s older must not leave as one job with it
    # (it would arrive 80 s late), and 30,000 more over 5 minutes must not be late either
    slow = LatencyEstimator(default_upsert=1.0, default_bulk=480.0)
    slow.observe_bulk(25_000, 480.0)
    changes = [(0.5, "old"), *burst(24_999, 200.0), *burst(30_000, 2_000.0, "i", spread=300.0)]
    r = simulate(changes, estimator=slow, bulk_lat=lambda now, n: 480.0)
    assert r.late == 0


def test_f1_estimate_from_small_jobs_is_not_used_for_a_full_one() -> None:
    # small jobs answered in 60 s; a full job really takes 300 s. An average of the small jobs
    # (what the planner was fed before) says 60 s; the estimator does not extrapolate down.
    est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    for _ in range(10):
        est.observe_bulk(6_000, 60.0)
    assert est.bulk(25_000) >= 120.0
    est.observe_bulk(25_000, 300.0)
    assert est.bulk(25_000) == 300.0 and est.bulk(6_000) == 300.0  # p95 of jobs ≥ 6,000

    def real(now: float, n: int) -> float:
        return 60.0 + 240.0 * n / 25_000

    changes = [*burst(6_000, 0.0, "a"), *burst(25_000, 2_000.0, "b", spread=200.0)]
    r = simulate(changes, estimator=LatencyEstimator(1.0, 120.0), bulk_lat=real)
    assert r.late == 0


# -- finding 2: one mix for all pending, chosen for the oldest ---------------------------------


def test_f2_old_changes_go_by_upsert_the_young_burst_by_bulk() -> None:
    # the old changes cannot wait for a job any more (63 s left, a job takes 85 s)
    changes = [*burst(5, 0.0, "old"), *burst(10_000, 530.0, "young")]
    r = simulate(changes, exact=True)
    assert r.late == 0
    assert r.credits == 1 + 500  # not 1,001 credits of upsert for everything
    assert r.jobs == 1


# -- finding 3: a bulk job made obsolete seconds later ----------------------------------------


def test_f3_mass_update_repeated_a_minute_later_goes_in_one_job() -> None:
    changes = [*burst(25_000, 10.0, "row"), *burst(25_000, 55.0, "row")]
    r = simulate(changes, exact=True)
    assert r.late == 0
    assert r.credits == 500 and r.jobs == 1


# -- finding 4: flushing every young key with the due ones loses coalescing -----------------


def test_f4_young_keys_are_not_flushed_with_the_due_ones() -> None:
    # 100 keys due at 600; 100 other keys changed at 590 and again at 700: sending those with
    # the due ones (at ~593) means sending them twice
    changes = [*burst(100, 0.0, "a"), *burst(100, 590.0, "b"), *burst(100, 700.0, "b")]
    r = simulate(changes, exact=True)
    assert r.late == 0
    assert r.credits == 20  # 10 for a, 10 for b (both versions in one send)


# -- finding 5: a freshness dial ---------------------------------------------------------------


def trickle(n: int = 3_600, keys: int = 2_000, seed: int = 3) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    return [(i + 0.5, f"k{rng.randrange(keys)}") for i in range(n)]


def test_f5_freshness_dial_buys_latency_with_credits() -> None:
    changes = trickle()
    econ = simulate(changes, exact=True)
    bal = simulate(changes, exact=True, freshness="balanced")
    fast = simulate(changes, exact=True, freshness="fast")
    assert econ.late == bal.late == fast.late == 0
    assert econ.p50() > 250.0  # economy: each change leaves near its deadline
    assert bal.p50() <= 80.0 and fast.p50() <= 5.0
    assert econ.credits < bal.credits < fast.credits


# -- properties: never late, over arrival patterns and latency models -------------------------

SMALL = CostModel(upsert_batch=10, records_per_credit=2, bulk_batch=250, bulk_job_credits=20)

arrivals = st.lists(
    st.tuples(st.floats(0, 1_500), st.integers(0, 400), st.integers(1, 120)),
    min_size=1,
    max_size=20,
)
models = st.sampled_from(["exact", "slow_bulk", "bulk_under_estimated", "storm"])


def trace(bursts: list[tuple[float, int, int]]) -> list[tuple[float, str]]:
    out = []
    for t0, k0, n in bursts:
        out.extend((round(t0, 3), f"k{(k0 + j * 7) % 600}") for j in range(n))
    return out


# derandomize: the same 50 examples every run, so that CI does not fail by chance on the known
# limit below (a strict xfail). Random searches of this property (40,000 examples in session
# 19, `/tmp`-free recipe in docs/planner.md "Searching the planner") found the four fixed
# defects and that limit
@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    arrivals,
    models,
    st.sampled_from([60.0, 300.0, 600.0]),
    st.integers(1, 10),
    st.sampled_from(["economy", "balanced", "fast"]),
)
def test_no_change_late_under_any_latency_model(
    bursts: list[tuple[float, int, int]], model: str, smax: float, conc: int, freshness: str
) -> None:
    changes = trace(bursts)
    kw: dict[str, object] = {}
    if model == "exact":
        # the CRM answers at exactly what the planner is told
        kw = {"exact": True, "bulk_lat": lambda now, n: 0.2 * smax}
    elif model == "slow_bulk":
        # bulk jobs take most of the staleness budget; measured once before
        est = LatencyEstimator(default_upsert=1.0, default_bulk=0.8 * smax)
        est.observe_bulk(SMALL.bulk_batch, 0.8 * smax)
        kw = {"estimator": est, "bulk_lat": lambda now, n: 0.8 * smax}
    elif model == "bulk_under_estimated":
        # small jobs were fast, bigger ones take longer (linear in size): the planner only
        # knows what it measured; the default is the documented full-job figure
        est = LatencyEstimator(default_upsert=1.0, default_bulk=0.3 * smax)
        est.observe_bulk(20, 0.05 * smax)
        kw = {
            "estimator": est,
            "bulk_lat": lambda now, n: 0.05 * smax + 0.25 * smax * n / SMALL.bulk_batch,
        }
    else:
        # 429 storms: some calls take up to the retry allowance longer than measured
        allowance = 0.05 * smax

        def storm(now: float, k: int) -> float:  # retries before the answering call
            return allowance if (now // 97) % 3 == 0 else 0.0

        kw = {"upsert_retry": storm, "retry_allowance": allowance}
        # only storms *within the budget*: the changes of any max_staleness window must fit in
        # the upsert rounds a storm leaves (151 keys at once, 1 slot, 4 s calls: 64 s > 60 s
        # by any schedule, found by hypothesis; a bulk job takes 60 s + rows too)
        rounds = int(0.9 * smax // (1.0 + allowance))
        ts = sorted(changes)
        for i, (t0, _) in enumerate(ts):
            keys = {k for t, k in ts[i:] if t < t0 + smax}
            assume(len(keys) <= rounds * SMALL.upsert_batch * conc)
    r = simulate(
        changes, max_staleness=smax, cost=SMALL, concurrency=conc, freshness=freshness, **kw
    )  # type: ignore[arg-type]
    assert r.late == 0, (model, max(r.staleness))


def test_a_key_changed_while_in_flight_behind_a_long_queue_is_not_late() -> None:
    # found by hypothesis in session 18's make test: one slot, exact latencies, 'balanced',
    # 426 keys at once. The planner took the slots as free, but 'balanced' had queued ~60
    # calls behind the one slot: k379, changed again at 1.5 s while its first version waited
    # in that queue, arrived at 60.5 s (bound 60 s). It now plans behind the calls already
    # sent (PlannerInput.calls_ahead): 57.5 s
    bursts = [
        (0.0, 0, 1),
        (0.0, 95, 116),
        (0.0, 210, 118),
        (0.0, 330, 114),
        (1.0, 0, 86),
        (1.0, 3, 76),
        (1.5, 1, 55),
    ]
    r = simulate(
        trace(bursts),
        max_staleness=60.0,
        cost=SMALL,
        concurrency=1,
        freshness="balanced",
        exact=True,
        bulk_lat=lambda now, n: 0.2 * 60.0,
    )
    assert r.late == 0, max(r.staleness)


def test_early_calls_do_not_queue_behind_a_storm() -> None:
    # found by a random hypothesis search in session 19: one slot, a 429 storm (calls take
    # 4 s, the retry allowance is 3 s), 'balanced', 144 changes in 1 s. 'balanced' sent every
    # full call at once into the one slot's queue; the keys changed again at 1 s waited behind
    # their first versions and were sent twice: a change late (63.0 s), 72 credits. Early
    # calls now fill free slots only (PlannerInput.calls_ahead): 58.0 s at most, 49 credits
    smax, allowance = 60.0, 3.0

    def storm(now: float, k: int) -> float:  # retries before the answering call (1 s)
        return allowance if (now // 97) % 3 == 0 else 0.0

    r = simulate(
        trace([(0.0, 16, 59), (1.0, 100, 85)]),
        max_staleness=smax,
        cost=SMALL,
        concurrency=1,
        freshness="balanced",
        upsert_retry=storm,
        retry_allowance=allowance,
    )
    assert r.late == 0, max(r.staleness)
    assert r.credits < 72


def test_changes_planned_into_a_small_job_still_go_by_job_near_their_deadline() -> None:
    # found by a random hypothesis search in session 19: small jobs measured fast (20 records,
    # 3 s), the 51 changes left after a first job planned into a job of their size (7 s).
    # When no change could wait for a *full* job any more, the planner took the full estimate
    # (26 s) and so found that none could wait for any job; the job left 3 s after its moment
    # by the already-late rule and k0 arrived at 60.46 s (bound 60 s). Every size's estimate
    # is now tried (_bulk_eligibility_latency)
    smax = 60.0
    est = LatencyEstimator(default_upsert=1.0, default_bulk=0.3 * smax)
    est.observe_bulk(20, 0.05 * smax)
    r = simulate(
        trace([(0.0, 0, 67), (21.0, 0, 1), (23.0, 0, 51)]),
        max_staleness=smax,
        cost=SMALL,
        concurrency=1,
        estimator=est,
        bulk_lat=lambda now, n: 0.05 * smax + 0.25 * smax * n / SMALL.bulk_batch,
    )
    assert r.late == 0, max(r.staleness)
    assert r.jobs == 2


def test_a_key_due_behind_a_partly_filled_call_goes_with_it() -> None:
    # found by a random hypothesis search in session 19: economy, 5 slots, a storm (16 s a
    # call with the allowance). 81 keys were due: 9 calls, the last of 2 records (whole
    # credits). The 11 keys after them were taken to fit in that call's round, so they waited
    # 1 s; behind the 9 calls they needed two calls, the second one round later: 310 s with a
    # 300 s bound. A key due behind the calls sent now goes now
    smax, allowance = 300.0, 15.0

    def storm(now: float, k: int) -> float:  # retries before the answering call (1 s)
        return allowance if (now // 97) % 3 == 0 else 0.0

    r = simulate(
        trace([(0.0, 0, 41), (1191.0, 0, 81), (1193.0, 1, 12)]),
        max_staleness=smax,
        cost=SMALL,
        concurrency=5,
        upsert_retry=storm,
        retry_allowance=allowance,
    )
    assert r.late == 0, max(r.staleness)


@pytest.mark.xfail(
    strict=True,
    reason="known limit of economy's latest-moment rule, found by a random hypothesis search "
    "in session 19, present before it: a storm, 2 slots, 201 keys leave at their latest "
    "moment and book the slots for 44 of the 60 s; 75 changes 0.6 s later (14 of them of keys "
    "in flight, so sent twice) no longer fit: one arrives at 63.4 s (62.4 s before session 19)",
)
def test_known_limit_a_burst_behind_slots_booked_at_the_latest_moment() -> None:
    # 31 calls of 4 s on 2 slots is 62 s of work from 14.4 s, when economy first sends: no
    # schedule that starts then is in time; one that sent the first burst at 0 s would be.
    # Leaving earlier when the booked rounds grow (headroom) is the fix to weigh against
    # its credits (docs/planner.md, "Known limits")
    smax, allowance = 60.0, 3.0

    def storm(now: float, k: int) -> float:  # retries before the answering call (1 s)
        return allowance if (now // 97) % 3 == 0 else 0.0

    r = simulate(
        trace([(0.0, 0, 1), (0.0, 248, 116), (15.0, 136, 75), (0.0, 246, 84)]),
        max_staleness=smax,
        cost=SMALL,
        concurrency=2,
        upsert_retry=storm,
        retry_allowance=allowance,
    )
    assert r.late == 0, max(r.staleness)


def test_upsert_estimate_is_a_high_percentile_not_an_average() -> None:
    est = LatencyEstimator(default_upsert=2.0)
    assert est.upsert() == 2.0  # nothing measured: the default
    for _ in range(9):
        est.observe_upsert(1.0)
    est.observe_upsert(30.0)  # one call retried through a 429 storm
    assert est.upsert() == 30.0  # an average (or the EWMA fed before) would say 3.9 / 6.8


# -- the bulk estimate from measured jobs, not the default -------------------------------------


def test_a_measured_job_just_below_full_size_sets_the_full_job_estimate() -> None:
    # the soak's initial sync sent 24,918 records (invalid rows left out) in 5.5 s; the
    # default (120 s) must not override that measurement for a job of 25,000
    est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    est.observe_bulk(24_918, 5.5)
    assert 5.5 <= est.bulk(25_000) <= 5.5 * 25_000 / 24_918 + 1e-9
    assert est.bulk_profile(25_000)[0] == est.bulk(25_000)


def test_mass_updates_after_a_short_initial_sync_go_by_bulk() -> None:
    # 30 s max_staleness, a 30,000-row mass update twice: after that measurement they fit a
    # bulk job each time (about 1,000 credits each), not 3,000 credits of upsert
    est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    est.observe_bulk(24_918, 5.5)
    changes = [*burst(30_000, 100.0, "row"), *burst(30_000, 170.0, "row")]
    r = simulate(
        changes,
        max_staleness=30.0,
        estimator=est,
        bulk_lat=lambda now, n: 1.0 + 4.5 * n / 25_000,
        upsert_lat=lambda now, n: 0.3,
    )
    assert r.late == 0
    assert r.jobs >= 2
    assert r.credits <= 2 * 1_000 + 20


def test_balanced_burst_never_slower_than_upsert_alone_and_cheaper() -> None:
    # 1,000 rows at once (a mass UPDATE); 2 slots of 10-record calls, 1 s each: upsert alone
    # (the seed's recipe (b)) answers them in 50 rounds, median 25 s, for 500 credits; a job
    # (250 records, 20 credits) takes 20 s. Balanced upserts what arrives before a job would
    # (20 rounds × 20 = 400) and sends full jobs for the rest at once; it used to hold the
    # jobs until their oldest change was the target age old (median 60 s + the job)
    cost = CostModel(upsert_batch=10, records_per_credit=2, bulk_batch=250, bulk_job_credits=20)
    changes = [(0.5, f"m{j}") for j in range(1_000)]
    bal = simulate(
        changes,
        cost=cost,
        concurrency=2,
        exact=True,
        bulk_lat=lambda now, n: 20.0,
        freshness="balanced",
    )
    assert bal.late == 0
    assert bal.p50() <= 25.5
    assert bal.credits < 500  # 500 upserted (250) + 2 jobs (40)


def test_typical_bulk_is_the_median_one_slow_job_does_not_move_it() -> None:
    # the safety-net poll of a job whose callback is late comes at 1.5x this figure: a median,
    # so that one slow measurement (itself maybe a lost callback) does not stretch the next
    est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    assert est.typical_bulk(25_000) is None  # nothing measured: the caller's first poll
    for seconds in (3.0, 3.5, 4.0, 38.0):
        est.observe_bulk(25_000, seconds)
    assert est.typical_bulk(25_000) == 3.5
    assert est.bulk(25_000) == 38.0  # the planner's figure stays the conservative one
    assert est.typical_bulk(50_000) == 7.0  # larger than measured: in proportion, as bulk()


def test_a_slow_spell_does_not_keep_bulk_out_for_good() -> None:
    # session 18's soak: in a latency window jobs took 24-28 s against a 30 s max_staleness;
    # an estimate above the bound forbids every job, so no job measures the CRM fast again.
    # Here jobs take 35 s for 100 s, then 1-4 s again; mass updates every 70 s for 35 minutes.
    # Measurements age (15 minutes): the planner then plans a job with the median of all, it
    # is fast, and bulk is back. Never aging, every later mass update goes by upsert.
    cost = CostModel(upsert_batch=10, records_per_credit=1, bulk_batch=300, bulk_job_credits=20)

    def bulk_lat(now: float, n: int) -> float:
        return (35.0 if 600 <= now < 700 else 1.0) + 3.0 * n / cost.bulk_batch

    changes = [c for k in range(1, 31) for c in burst(300, 70.0 * k, "row")]
    runs = {}
    for ages in (False, True):
        est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
        est.observe_bulk(cost.bulk_batch - 1, 4.0, 0.0 if ages else None)  # the initial sync
        runs[ages] = simulate(
            changes,
            max_staleness=30.0,
            cost=cost,
            estimator=est,
            bulk_lat=bulk_lat,
            upsert_lat=lambda now, n: 0.3,
            bulk_ages=ages,
        )
    trapped, aged = runs[False], runs[True]
    assert trapped.late == aged.late  # the job sent into the slow spell, in both
    assert trapped.jobs <= 10  # none after the slow job
    assert aged.jobs >= trapped.jobs + 7  # back to bulk 15 minutes after it
    assert aged.credits < 0.8 * trapped.credits


def test_bulk_measurements_age_out_of_the_high_percentile() -> None:
    est = LatencyEstimator(default_upsert=1.0, default_bulk=120.0)
    for at in range(10):
        est.observe_bulk(25_000, 3.0, float(at))
    est.observe_bulk(25_000, 38.0, 100.0)
    assert est.bulk(25_000, now=200.0) == 38.0  # fresh: the slowest of fewer than 20
    assert est.bulk(25_000, now=100.0 + 900.0) == 38.0  # still fresh at 15 minutes
    assert est.bulk(25_000, now=100.0 + 901.0) == 3.0  # none fresh: the median of all
    assert est.bulk(25_000) == 38.0  # no time given: nothing ages
    assert est.bulk_profile(25_000, now=100.0 + 901.0)[0] == 3.0
    est.observe_bulk(25_000, 5.0, 1_500.0)
    assert est.bulk(25_000, now=1_600.0) == 5.0  # the fresh one, at least the median (3.0)
    est.observe_bulk(25_000, 0.5, 1_550.0)
    assert est.bulk(25_000, now=1_600.0) == 5.0


# -- upsert only (a subform pipeline: Bulk Write takes no subform column) ----------------------

UPSERT_ONLY = CostModel(
    upsert_batch=10, records_per_credit=2, bulk_batch=250, bulk_job_credits=20, bulk_write=False
)


def test_without_bulk_write_a_mass_update_and_a_backlog_go_by_upsert() -> None:
    # the same mass update goes in one job when Bulk Write may carry it, never without
    changes = burst(2_000, 10.0)
    with_bulk = simulate(changes, max_staleness=600.0, cost=SMALL, concurrency=2)
    assert with_bulk.jobs >= 1
    r = simulate(changes, max_staleness=600.0, cost=UPSERT_ONLY, concurrency=2)
    assert (r.jobs, r.late, r.calls) == (0, 0, 200)
    backlog = [PendingKey(f"b{i}", 0.0, backlog=True) for i in range(1_000)]
    for cost in (SMALL, UPSERT_ONLY):
        inp = PlannerInput(
            now=700.0,
            pending=backlog,
            max_staleness=600.0,
            credits_left=10**6,
            reserve=0,
            concurrency=2,
            upsert_latency=1.0,
            bulk_latency=60.0,
            cost=cost,
        )
        p = plan(inp)
        assert bool(p.bulk) is cost.bulk_write  # 4 full jobs with Bulk Write, none without
        if not cost.bulk_write:
            assert sum(map(len, p.upserts)) == 1_000
    assert UPSERT_ONLY.cheapest(30_000).bulk_jobs == 0
    assert UPSERT_ONLY.mixes(30_000) == [UPSERT_ONLY.mix(30_000, 0)]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    arrivals,
    st.sampled_from([60.0, 300.0, 600.0]),
    st.integers(1, 10),
    st.sampled_from(["economy", "balanced", "fast"]),
)
def test_without_bulk_write_no_job_and_no_change_late(
    bursts: list[tuple[float, int, int]], smax: float, conc: int, freshness: str
) -> None:
    changes = trace(bursts)
    rounds = int(0.9 * smax // 1.0)  # calls of 1 s; the upsert capacity of one window
    ts = sorted(changes)
    for i, (t0, _) in enumerate(ts):
        keys = {k for t, k in ts[i:] if t < t0 + smax}
        assume(len(keys) <= rounds * UPSERT_ONLY.upsert_batch * conc)
    r = simulate(
        changes,
        max_staleness=smax,
        cost=UPSERT_ONLY,
        concurrency=conc,
        freshness=freshness,
        exact=True,
    )
    assert r.jobs == 0
    assert r.late == 0, max(r.staleness)
