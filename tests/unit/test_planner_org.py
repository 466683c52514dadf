"""One org, several pipelines (issue 21; connector/org.py): each pipeline's planner counts the
calls the org's other pipelines need before its own first deadline, so that pipelines due
together share the one concurrency limit without any of them arriving late.

Simulated (tests/unit/planner_sim.py ``simulate_org``): each pipeline planned by its own
``plan`` as its engine does, the calls sharing the slots of one limiter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.org import OrgBoard, board_for
from tests.unit.planner_sim import simulate_org


def burst(n: int, at: float, prefix: str) -> list[tuple[float, str]]:
    return [(at, f"{prefix}{i}") for i in range(n)]


def test_three_pipelines_due_together_each_planned_alone_arrive_late() -> None:
    """300 keys in each of three pipelines, captured together, 2 slots, 1 s a call, a 10 s
    bound. Alone each needs 3 calls (2 rounds) and plans them at its latest moment; the 9
    calls need 5 rounds: planned alone they queue past the bound. With the board each counts
    the others' calls ahead of its own and starts in time."""
    pipelines = {p: burst(300, 0.0, p) for p in ("customers", "orders", "lines")}
    alone = simulate_org(pipelines, org=False, max_staleness=10.0, concurrency=2)
    assert sum(r.late for r in alone.values()) > 0
    together = simulate_org(pipelines, org=True, max_staleness=10.0, concurrency=2)
    assert sum(r.late for r in together.values()) == 0
    assert max(max(r.staleness) for r in together.values()) <= 10.0


def test_the_board_costs_nothing_when_the_pipelines_are_not_due_together() -> None:
    """A pipeline due long after the others counts none of their calls: the same calls and
    credits as planned alone."""
    pipelines = {"a": burst(250, 0.0, "a"), "b": burst(250, 30.0, "b")}
    alone = simulate_org(pipelines, org=False, max_staleness=10.0, concurrency=2)
    together = simulate_org(pipelines, org=True, max_staleness=10.0, concurrency=2)
    assert {n: (r.calls, r.credits) for n, r in alone.items()} == {
        n: (r.calls, r.credits) for n, r in together.items()
    }
    assert sum(r.late for r in together.values()) == 0


@settings(max_examples=300, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(min_value=1, max_value=250),
            st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
        ),
        min_size=1,
        max_size=6,
    ),
    concurrency=st.integers(min_value=1, max_value=4),
    max_staleness=st.sampled_from([10.0, 20.0, 60.0]),
)
def test_no_change_of_any_pipeline_late_when_the_org_has_the_capacity(
    bursts: list[tuple[str, int, float]], concurrency: int, max_staleness: float
) -> None:
    """Property: whatever bursts the pipelines of one org get, when every change of the org
    could arrive in time by upsert from the moment it is captured (all calls of any window of
    ``max_staleness`` fit the slots with two rounds to spare), no change of any pipeline is
    late. Keys are per pipeline, so a key changed again joins its pending entry."""
    pipelines: dict[str, list[tuple[float, str]]] = {}
    for i, (name, n, at) in enumerate(bursts):
        pipelines.setdefault(name, []).extend(burst(n, at, f"{name}{i}-"))
    # capacity: the calls captured in any window of max_staleness, at 1 s a call, with two
    # rounds kept for the margin and the last partial call of each burst
    times = sorted({at for _, _, at in bursts})
    for t in times:
        calls = sum(-(-n // 100) for _, n, at in bursts if t <= at < t + max_staleness)
        rounds = -(-calls // concurrency)
        if rounds + 2 > max_staleness - 1.0 - 0.01 * max_staleness:
            return  # over capacity: no plan can be in time
    result = simulate_org(pipelines, org=True, max_staleness=max_staleness, concurrency=concurrency)
    late = {n: r.late for n, r in result.items() if r.late}
    assert not late, (late, {n: max(r.staleness) for n, r in result.items()})


def test_the_board_counts_whole_calls_of_the_other_pipelines_only() -> None:
    board = OrgBoard()
    board.publish("a", [5.0, 1.0, 3.0], 2)
    board.publish("b", [2.0] * 150, 100)
    assert board.calls_due_by("a", 10.0) == 2  # b's 150 keys: two calls
    assert board.calls_due_by("b", 3.0) == 1  # a's keys due by 3: 2 keys, one call of 2
    assert board.calls_due_by("b", 0.5) == 0
    board.publish("b", [], 100)
    assert board.pipelines() == ["a"]
    board.forget("a")
    assert board.calls_due_by("c", 100.0) == 0


class _Limiter:
    """Anything a weak reference can name stands for the client's limiter."""


def test_pipelines_sharing_a_limiter_share_a_board() -> None:
    one, other = _Limiter(), _Limiter()
    assert board_for(one) is board_for(one)
    assert board_for(one) is not board_for(other)
