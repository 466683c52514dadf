"""The credit-economy benchmark at a tiny scale: it runs, its targets hold, the README renders;
its lower bound is checked against brute force."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import __main__ as dispatcher
from benchmarks import credits
from connector.costs import CostModel

SMALL = CostModel(upsert_batch=4, records_per_credit=2, bulk_batch=6, bulk_job_credits=3)


def test_credits_benchmark_tiny(tmp_path: Path) -> None:
    res = credits.run(scale=0.01, seed=3, out=tmp_path, charts=False)
    assert {"trickle", "ecommerce", "import", "mass_update", "seed"} <= set(res["traces"])
    assert len([t for t in res["traces"].values()]) >= 10
    for name, tr in res["traces"].items():
        pol = tr["policies"]
        assert pol["a"]["credits"] == tr["changes"], name  # one call of one record each
        for f in ("economy", "balanced", "fast"):
            assert pol[f]["missed_max_staleness"] == 0, (name, f)
            assert pol[f]["older_landed_after_newer"] == 0, (name, f)  # fencing
            assert pol[f]["credits"] >= tr["lower_bound"], (name, f)  # it is a lower bound
        assert pol["economy"]["credits"] <= pol["b"]["credits"], name
    data = json.loads((tmp_path / "credits.json").read_text())
    assert data["parameters"]["break_even_records"] == 5_000
    readme = dispatcher.render_readme(tmp_path)
    assert "| planner, economy |" in readme and "Command: `python -m benchmarks credits" in readme


def brute_force(starts: list[float], length: float, cost: CostModel) -> int:
    """Every partition of the windows into groups that share a point (max start − min start ≤
    length), each group priced by the cheapest mix: the relaxed optimum by enumeration."""
    best = math.inf

    def go(i: int, groups: list[list[float]]) -> None:
        nonlocal best
        if i == len(starts):
            best = min(best, sum(cost.cheapest(len(g)).credits for g in groups))
            return
        for g in groups:
            if max([*g, starts[i]]) - min([*g, starts[i]]) <= length:
                g.append(starts[i])
                go(i + 1, groups)
                g.pop()
        groups.append([starts[i]])
        go(i + 1, groups)
        groups.pop()

    go(0, [])
    return int(best)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=0, max_size=8),
    st.sampled_from([0.0, 5.0, 10.0, 25.0]),
    st.sampled_from([SMALL, CostModel(upsert_batch=3, records_per_credit=1, bulk_batch=5)]),
)
def test_lower_bound_matches_brute_force(times: list[int], length: float, cost: CostModel) -> None:
    starts = sorted(float(t) for t in times)
    assert credits.lower_bound(starts, length, cost) == brute_force(starts, length, cost)


def test_windows_are_the_greedy_disjoint_ones() -> None:
    # key a: 0, 5 (same window), 11 (new window), 12; key b: 3
    ch = [(0.0, "a"), (5.0, "a"), (11.0, "a"), (12.0, "a"), (3.0, "b")]
    assert credits.windows(ch, 10.0) == [0.0, 3.0, 11.0]


def test_readme_renders_results_without_tables(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "other", "x": {"y": 1.5}}))
    assert "| x.y | 1.5 |" in dispatcher.render_readme(tmp_path)


def test_dispatcher_rejects_unknown_names() -> None:
    assert dispatcher.main(["nope"]) == 2
