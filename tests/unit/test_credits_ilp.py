"""The exact integer program of the sending problem (benchmarks/credits_ilp.py) on tiny
instances: the DP lower bound ≤ the ILP optimum = brute force over every schedule."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import credits, credits_ilp
from connector.costs import CostModel

SMALL = CostModel(upsert_batch=4, records_per_credit=2, bulk_batch=3, bulk_job_credits=2)
S = 10.0  # max_staleness
UP, BULK = 1.0, 4.0  # soonest answers


def brute_force(changes: list[tuple[float, str]], cost: CostModel) -> int:
    """Every set of (key, moment, api) sends over the candidate moments, priced exactly."""
    apis = (("u", UP), ("b", BULK))
    moments = {a: sorted({c + S - lat for c, _ in changes}) for a, lat in apis}
    keys = sorted({k for _, k in changes})
    options = [(k, t, a) for k in keys for a, _ in apis for t in moments[a]]
    lat = dict(apis)
    best = math.inf
    # one send per change is enough: a cheapest schedule has no more sends than changes
    for r in range(len(changes) + 1):
        for sends in itertools.combinations(options, r):
            ok = all(
                any(
                    k2 == k and credits_ilp._visible(c) <= t <= c + S - lat[a] + 1e-9
                    for k2, t, a in sends
                )
                for c, k in changes
            )
            if not ok:
                continue
            total = 0
            for a, _ in apis:
                for t in moments[a]:
                    n = sum(1 for _, t2, a2 in sends if a2 == a and t2 == t)
                    if n and a == "u":
                        total += cost.upsert_credits(n)
                    elif n:
                        total += -(-n // cost.bulk_batch) * cost.bulk_job_credits
            best = min(best, total)
    return int(best)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 25), st.sampled_from("abc")), min_size=1, max_size=4))
def test_dp_bound_le_ilp_eq_brute_force(raw: list[tuple[int, str]]) -> None:
    changes = sorted((float(t) + 0.5, k) for t, k in raw)
    opt, proven = credits_ilp.ilp_optimum(changes, S, SMALL, upsert_latency=UP, bulk_base=BULK)
    assert opt == proven == brute_force(changes, SMALL)
    length = S - UP
    starts = credits.windows(changes, length)
    assert credits.lower_bound(starts, length, SMALL, S - BULK) <= opt


def test_ilp_sees_what_the_bound_relaxes() -> None:
    # one key changed at 0.5 and 9.5: the bound's greedy window [0.5, 9.5] holds both, one
    # send point; but the second change is only visible at 10, after the first's deadline
    # (9.5 by upsert): two sends
    changes = [(0.5, "a"), (9.5, "a")]
    opt, _ = credits_ilp.ilp_optimum(changes, S, SMALL, upsert_latency=UP, bulk_base=BULK)
    starts = credits.windows(changes, S - UP)
    assert credits.lower_bound(starts, S - UP, SMALL, S - BULK) == 1 < opt == 2
