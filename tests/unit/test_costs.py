"""The cost model against the seed's table (DESIGN.md §1) and its own definitions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.costs import CostModel

COST = CostModel()


@pytest.mark.parametrize(
    ("n", "calls", "up_credits", "jobs", "bulk_credits", "cheapest_jobs", "cheapest_credits"),
    [
        (100, 1, 10, 1, 500, 0, 10),
        (2_000, 20, 200, 1, 500, 0, 200),
        (5_000, 50, 500, 1, 500, 0, 500),  # tie: upsert, it answers sooner
        (25_000, 250, 2_500, 1, 500, 1, 500),
    ],
)
def test_seed_table(
    n: int,
    calls: int,
    up_credits: int,
    jobs: int,
    bulk_credits: int,
    cheapest_jobs: int,
    cheapest_credits: int,
) -> None:
    assert COST.upsert_calls(n) == calls
    assert COST.upsert_credits(n) == up_credits
    assert COST.bulk_jobs(n) == jobs
    assert COST.bulk_credits(n) == bulk_credits
    mix = COST.cheapest(n)
    assert (mix.bulk_jobs, mix.credits) == (cheapest_jobs, cheapest_credits)
    assert mix.bulk_records + mix.upsert_records == n


def test_break_even_is_derived() -> None:
    assert COST.break_even() == 5_000
    assert COST.cheapest(5_001).bulk_jobs == 1
    assert CostModel(bulk_job_credits=300).break_even() == 3_000
    assert CostModel(records_per_credit=20).break_even() == 10_000
    # per-call rounding: 30 records per credit, a call of 100 costs 4 credits
    odd = CostModel(records_per_credit=30)
    assert odd.upsert_credits(odd.break_even()) <= 500 < odd.upsert_credits(odd.break_even() + 1)


def test_mixed_flush() -> None:
    m = COST.cheapest(27_000)
    assert (m.bulk_jobs, m.bulk_records, m.upsert_records, m.credits) == (1, 25_000, 2_000, 700)
    m = COST.cheapest(30_000)  # 1 job + 5,000 upsert = 1,000 = 2 jobs: tie goes to upsert
    assert (m.bulk_jobs, m.credits) == (1, 1_000)
    assert COST.cheapest(0).credits == 0


def test_partial_calls_round_up() -> None:
    assert COST.call_credits(1) == 1
    assert COST.call_credits(11) == 2
    assert COST.upsert_credits(101) == 11
    with pytest.raises(ValueError):
        COST.call_credits(101)
    with pytest.raises(ValueError):
        COST.upsert_credits(-1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200_000))
def test_cheapest_is_minimal(n: int) -> None:
    best = COST.cheapest(n)
    assert best.credits == min(COST.upsert_credits(n), COST.bulk_credits(n), best.credits)
    assert all(best.credits <= m.credits for m in COST.mixes(n))
    assert best.credits <= COST.upsert_credits(n)
    assert best.credits <= COST.bulk_credits(n)
    assert best.bulk_records <= best.bulk_jobs * COST.bulk_batch
    assert best.upsert_calls == COST.upsert_calls(best.upsert_records)
